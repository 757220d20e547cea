"""The configuration loader: the MQTT password sources (never shown) and the TLS files."""

from __future__ import annotations

from pathlib import Path

import pytest
from settings_support import (
    config_error,
    load,
    predictable_machine_name,  # noqa: F401
)

from asyncmigfra.settings import TlsSettings, load_settings

SECRET = "hunter2-very-secret"


# --- passwords ------------------------------------------------------------------------------------


def test_password_inline() -> None:
    settings = load(f"communicator: {{username: u, password: {SECRET}}}")

    assert settings.mqtt.password == SECRET


def test_password_file_strips_only_the_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(f" {SECRET} \n")
    config = tmp_path / "agent.yaml"
    # Relative to the configuration file, not to the working directory.
    config.write_text("communicator: {username: u, password-file: pw}\n")

    assert load_settings(config, hostname="n").mqtt.password == f" {SECRET} "


def test_password_file_crlf(tmp_path: Path) -> None:
    (tmp_path / "pw").write_bytes(SECRET.encode() + b"\r\n")

    settings = load(f"communicator: {{password-file: {tmp_path / 'pw'}}}")

    assert settings.mqtt.password == SECRET


def test_password_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCMIGFRA_TEST_PW", SECRET)

    settings = load("communicator: {password-env: ASYNCMIGFRA_TEST_PW}")

    assert settings.mqtt.password == SECRET


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        pytest.param(
            "communicator: {password-env: ASYNCMIGFRA_UNSET}",
            "communicator.password-env",
            "is not set",
            id="env-unset",
        ),
        pytest.param(
            "communicator: {password-env: ASYNCMIGFRA_EMPTY}",
            "communicator.password-env",
            "is empty",
            id="env-empty",
        ),
        pytest.param(
            "communicator: {password-file: /nonexistent/pw}",
            "communicator.password-file",
            "file not found",
            id="file-missing",
        ),
        pytest.param(
            "communicator: {password-file: empty}",
            "communicator.password-file",
            "is empty",
            id="file-empty",
        ),
        pytest.param(
            "communicator: {password-file: 5}",
            "communicator.password-file",
            "expected a string",
            id="file-type",
        ),
        pytest.param(
            "communicator: {password: 5}",
            "communicator.password",
            "expected a string",
            id="password-type",
        ),
        pytest.param(
            "communicator: {password: a, password-env: B}",
            "communicator",
            "set only one of",
            id="two-sources",
        ),
        pytest.param(
            "communicator: {password: a, protocol: 3.1.1}",
            "communicator.username",
            "protocol is 3.1.1",
            id="needs-username-311",
        ),
    ],
)
def test_password_errors(
    text: str, path: str, fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ASYNCMIGFRA_UNSET", raising=False)
    monkeypatch.setenv("ASYNCMIGFRA_EMPTY", "")
    (tmp_path / "empty").write_text("\n")

    error = config_error(text, base_dir=tmp_path)

    assert error.path == path
    assert fragment in str(error)


def test_password_without_username_allowed_with_mqtt_5() -> None:
    assert load("communicator: {password: pw}").mqtt.password == "pw"


def test_password_never_in_repr() -> None:
    settings = load(f"communicator: {{username: u, password: {SECRET}}}")

    assert SECRET not in repr(settings)
    assert SECRET not in repr(settings.mqtt)
    assert SECRET not in str(settings)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            f"communicator:\n  password: {SECRET}\n  password: other\n", id="duplicate-key"
        ),
        pytest.param(f"communicator:\n  password: {SECRET}\n  port: abc\n", id="later-error"),
        pytest.param(f'communicator:\n  password: "{SECRET}\n', id="unterminated-quote"),
        pytest.param(f"communicator:\n  password: [{SECRET}]\n", id="wrong-type"),
        pytest.param(
            f"communicator:\n  password: {SECRET}\n  password-file: x\n", id="two-sources"
        ),
    ],
)
def test_password_never_in_error_messages(text: str) -> None:
    error = config_error(text)

    assert SECRET not in str(error)
    assert SECRET not in repr(error)
    assert error.__cause__ is None or SECRET not in str(error.__cause__)
    assert error.__suppress_context__ or SECRET not in str(error.__context__)


# --- TLS ------------------------------------------------------------------------------------------


def test_tls_files_resolved_against_the_config_file(tmp_path: Path) -> None:
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("PEM")
    config = tmp_path / "agent.yaml"
    config.write_text(
        "communicator:\n  tls:\n    ca-file: ca.pem\n    cert-file: client.pem\n"
        "    key-file: client.key\n"
    )

    tls = load_settings(config, hostname="n").mqtt.tls

    assert tls == TlsSettings(
        ca_file=str(tmp_path / "ca.pem"),
        cert_file=str(tmp_path / "client.pem"),
        key_file=str(tmp_path / "client.key"),
    )


@pytest.mark.parametrize(
    ("tls", "path", "fragment"),
    [
        pytest.param(
            "{ca-file: missing.pem}", "communicator.tls.ca-file", "file not found", id="ca-missing"
        ),
        pytest.param(
            "{cert-file: missing.pem}",
            "communicator.tls.cert-file",
            "file not found",
            id="cert-missing",
        ),
        pytest.param(
            "{cert-file: there.pem, key-file: missing.key}",
            "communicator.tls.key-file",
            "file not found",
            id="key-missing",
        ),
        pytest.param(
            "{key-file: there.pem}",
            "communicator.tls.key-file",
            "needs cert-file",
            id="key-without-cert",
        ),
        pytest.param("{ca-file: ''}", "communicator.tls.ca-file", "empty", id="empty-name"),
    ],
)
def test_tls_errors_name_the_key(tls: str, path: str, fragment: str, tmp_path: Path) -> None:
    (tmp_path / "there.pem").write_text("PEM")

    error = config_error(f"communicator: {{tls: {tls}}}", base_dir=tmp_path)

    assert error.path == path
    assert fragment in str(error)
