"""The configuration loader: original migfra.conf files, defaults, the host name and topics,
the file itself and the example file.

Spec references: ``migfra-original.md`` §3 (MQTT) and §4.2 (the config file), §1.10 (pscom
topics); ``extensions.md`` "Topics" (event and status topics). The other keys are in
``test_settings_keys.py``, error paths in ``test_settings_errors.py``, passwords and TLS in
``test_settings_secrets.py``, hooks in ``test_settings_hooks.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from settings_support import (
    config_error,
    load,
    predictable_machine_name,  # noqa: F401
)

from asyncmigfra.errors import ConfigError
from asyncmigfra.settings import (
    AgentSettings,
    HookSettings,
    HypervisorSettings,
    LimitsSettings,
    LoggingSettings,
    MetricsSettings,
    MigrationDefaults,
    MqttHookSettings,
    MqttSettings,
    PscomSettings,
    Settings,
    ShutdownSettings,
    TlsSettings,
    default_settings,
    load_settings,
    settings_from_text,
)
from asyncmigfra.settings import schema as settings_module

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"


# --- the original configuration (spec 4.2) --------------------------------------------------------


def test_spec_4_2_original_config_loads() -> None:
    """config/migfra.conf, the original template, loads unchanged."""
    settings = load_settings(CONFIG_DIR / "migfra.conf", hostname="node7")

    assert settings.mqtt == MqttSettings(
        host="devon",
        port=1883,
        keepalive=60,
        client_id="fast-migfra-node7",
        task_topic="fast/migfra/node7/task",
        result_topic="fast/migfra/node7/result",
        event_topic="fast/migfra/node7/event",
        status_topic="fast/migfra/node7/status",
    )
    assert settings.hypervisor == HypervisorSettings(type="libvirt")
    assert settings.pscom == PscomSettings()
    assert settings.hostname == "node7"


def test_spec_4_2_original_config_uses_the_machine_name() -> None:
    """Without ``--hostname``, ``<hostname>`` is ``gethostname()``, as in the original."""
    settings = load_settings(CONFIG_DIR / "migfra.conf")

    assert settings.hostname == "machine"
    assert settings.mqtt.client_id == "fast-migfra-machine"
    assert settings.mqtt.result_topic == "fast/migfra/machine/result"


def test_spec_4_2_original_dummy_config_loads() -> None:
    """The dummy back-end keeps its ``never-throw`` option for its factory to read."""
    settings = load_settings(CONFIG_DIR / "migfra-dummy.conf", hostname="node7")

    assert settings.hypervisor == HypervisorSettings(type="dummy", options={"never-throw": True})
    assert settings.mqtt.task_topic == "fast/migfra/node7/task"


def test_spec_4_2_libvirt_options_pass_through_unvalidated() -> None:
    """Back-end options go to the factory as they are; only driver/transport are read here."""
    settings = load(
        """\
        hypervisor:
          type: libvirt
          nodes: [node1, <hostname>]
          driver: lxctools
          transport: tcp
          start-timeout: 60
          stop-timeout: 30
          some-future-option: {a: 1}
        """
    )

    assert settings.hypervisor.driver == "lxctools"
    assert settings.hypervisor.transport == "tcp"
    assert settings.hypervisor.options == {
        "nodes": ["node1", "node1"],
        "driver": "lxctools",
        "transport": "tcp",
        "start-timeout": 60,
        "stop-timeout": 30,
        "some-future-option": {"a": 1},
    }


def test_spec_4_2_hostname_placeholder_replaced_in_keys_and_values() -> None:
    """Every ``<hostname>`` is replaced; ``<vm_name>`` in pscom topics stays (spec 1.10)."""
    settings = load(
        """\
        communicator:
          id: agent-<hostname>-<hostname>
          subscribe-topic: site/<hostname>/in
        hypervisor:
          type: fake
          <hostname>-peer: <hostname>
        pscom-handler:
          request-topic: fast/pscom/<vm_name>/<hostname>/request
        """,
        hostname="h1",
    )

    assert settings.mqtt.client_id == "agent-h1-h1"
    assert settings.mqtt.task_topic == "site/h1/in"
    assert settings.hypervisor.options == {"h1-peer": "h1"}
    assert settings.pscom.request_topic == "fast/pscom/<vm_name>/h1/request"


def test_spec_4_2_numeric_hostname_stays_a_string() -> None:
    """A host name made of digits must not turn the substituted ``id`` into a number."""
    settings = load("communicator: {id: <hostname>}\n", hostname="1234")

    assert settings.mqtt.client_id == "1234"


def test_spec_4_2_document_markers_and_comments() -> None:
    settings = load(
        """\
        %YAML 1.2
        ---
        # a comment
        communicator:   # another
          port: 1884    # and one more
        ...
        """
    )

    assert settings.mqtt.port == 1884


def test_spec_4_2_quoted_numbers_accepted_like_yaml_cpp() -> None:
    """yaml-cpp read every scalar as text, so ``port: "1883"`` worked in the original."""
    settings = load(
        "communicator: {port: '1884', keepalive: '30'}\nagent: {progress-interval: '2.5'}"
    )

    assert (
        settings.mqtt.port,
        settings.mqtt.keepalive,
        settings.agent.progress_interval,
    ) == (1884, 30, 2.5)


# --- leniency: missing sections and keys ----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty-file"),
        pytest.param("---\n...\n", id="empty-document"),
        pytest.param("communicator:\nhypervisor:\n", id="empty-sections"),
        pytest.param("communicator: {type: mqtt}\n", id="type-only"),
    ],
)
def test_missing_sections_and_keys_get_defaults(text: str) -> None:
    """Unlike the original (spec 4.2), nothing is required; defaults derive from the name."""
    assert load(text) == default_settings(hostname="node1")


def test_default_settings_derive_from_hostname() -> None:
    settings = default_settings(hostname="n9")

    assert settings.hostname == "n9"
    assert settings.mqtt.client_id == "fast-migfra-n9"
    assert [
        settings.mqtt.task_topic,
        settings.mqtt.result_topic,
        settings.mqtt.event_topic,
        settings.mqtt.status_topic,
    ] == [
        "fast/migfra/n9/task",
        "fast/migfra/n9/result",
        "fast/migfra/n9/event",
        "fast/migfra/n9/status",
    ]
    assert settings.hypervisor == HypervisorSettings(type="dummy", options={})


def test_default_settings_equal_dataclass_defaults_for_localhost() -> None:
    """The dataclass defaults and the loader's defaults describe the same agent."""
    assert default_settings(hostname="localhost") == Settings()


def test_load_settings_none_means_defaults() -> None:
    assert load_settings(None) == default_settings()
    assert load_settings(None).hostname == "machine"


def test_copy_storage_defaults_copy_nothing() -> None:
    """Issue 16: shared storage unless a task or the config asks for a storage copy; the
    disks to copy are a task's choice (they name one VM's disks), never a config default."""
    migration = load_settings(None).migration
    assert (migration.copy_storage, migration.copy_storage_synchronous_writes) == ("none", False)
    error = config_error("migration: {migrate-disks: [vda]}\n")
    assert str(error).startswith("migration.migrate-disks: unknown key")


def test_default_settings_overrides() -> None:
    """Sections are replaced by instance, or patched field by field from a mapping."""
    settings = default_settings(
        hostname="n2",
        mqtt={"port": 1884},
        hypervisor=HypervisorSettings(type="fake"),
    )

    assert settings.mqtt.port == 1884
    assert settings.mqtt.task_topic == "fast/migfra/n2/task"
    assert settings.hypervisor == HypervisorSettings(type="fake")


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"nosuch": {}}, id="unknown-section"),
        pytest.param({"mqtt": {"nosuch": 1}}, id="unknown-field"),
        pytest.param({"mqtt": 5}, id="wrong-type"),
    ],
)
def test_default_settings_bad_overrides_are_type_errors(overrides: dict[str, Any]) -> None:
    """Overrides come from code, so a mistake there is a TypeError, not a ConfigError."""
    with pytest.raises(TypeError):
        default_settings(hostname="n", **overrides)


# --- host name ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "in_file", "expected"),
    [
        pytest.param("cli", "file", "cli", id="argument-wins"),
        pytest.param(None, "file", "file", id="file-next"),
        pytest.param(None, None, "machine", id="gethostname-last"),
        pytest.param("cli", None, "cli", id="argument-only"),
    ],
)
def test_hostname_precedence(argument: str | None, in_file: str | None, expected: str) -> None:
    text = f"hostname: {in_file}\ncommunicator: {{id: x-<hostname>}}\n" if in_file else ""
    settings = settings_from_text(text, hostname=argument)

    assert settings.hostname == expected
    assert settings.mqtt.task_topic == f"fast/migfra/{expected}/task"


@pytest.mark.parametrize(
    ("argument", "text"),
    [
        pytest.param("a/b", "", id="slash"),
        pytest.param("a+b", "", id="plus"),
        pytest.param("a#b", "", id="hash"),
        pytest.param("", "", id="empty"),
        pytest.param("a b", "", id="space"),
        pytest.param(None, "hostname: node/1\n", id="file-slash"),
        pytest.param(None, "hostname: 12\n", id="file-not-a-string"),
        pytest.param("ok", "hostname: [a]\n", id="file-checked-even-if-overridden"),
    ],
)
def test_bad_hostname_rejected(argument: str | None, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_text(text, hostname=argument)

    assert info.value.path == "hostname"


ORIGINAL_FORMAT = (
    "communicator:\n  type: mqtt\n  id: fast-migfra-<hostname>\n"
    "  subscribe-topic: {topic}\n  publish-topic: fast/migfra/<hostname>/result\n"
    "  host: localhost\n  port: 1883\n  keepalive: 60\n"
)


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        pytest.param("fast/migfra/node-a/task", "node-a", id="original-shape"),
        pytest.param("site/rack1/n1/task", "n1", id="longer-prefix"),
        pytest.param("fast/migfra/<hostname>/task", "machine", id="placeholder"),
        pytest.param("node-a/task", "machine", id="no-prefix"),
        pytest.param("/node-a/task", "machine", id="empty-prefix"),
        pytest.param("fast/migfra/node-a/tasks", "machine", id="not-task"),
        pytest.param("fast/migfra/node <a>/task", "machine", id="not-a-name"),
        pytest.param("fast/migfra/n-<hostname>/task", "machine", id="partial-placeholder"),
    ],
)
def test_identity_from_the_task_topic(topic: str, expected: str) -> None:
    """extensions.md "Identity": without ``hostname``, a task topic ``<prefix>/<name>/task``
    names the agent, and ``<hostname>`` everywhere else in the file is that name."""
    settings = settings_from_text(ORIGINAL_FORMAT.format(topic=topic))

    assert settings.hostname == expected
    assert settings.mqtt.client_id == f"fast-migfra-{expected}"
    assert settings.mqtt.result_topic == f"fast/migfra/{expected}/result"


def test_two_agents_on_one_machine_differ_by_their_topics() -> None:
    a = settings_from_text(ORIGINAL_FORMAT.format(topic="fast/migfra/node-a/task"))
    b = settings_from_text(ORIGINAL_FORMAT.format(topic="fast/migfra/node-b/task"))

    assert (a.hostname, b.hostname) == ("node-a", "node-b")
    assert a.mqtt.client_id != b.mqtt.client_id
    assert a.mqtt.status_topic == "fast/migfra/node-a/status"


@pytest.mark.parametrize(
    ("argument", "in_file", "expected"),
    [
        pytest.param("cli", "file", "cli", id="argument-first"),
        pytest.param(None, "file", "file", id="file-before-topic"),
        pytest.param(None, None, "node-a", id="topic-before-machine"),
    ],
)
def test_identity_order(argument: str | None, in_file: str | None, expected: str) -> None:
    text = ORIGINAL_FORMAT.format(topic="fast/migfra/node-a/task")
    if in_file:
        text = f"hostname: {in_file}\n{text}"
    assert settings_from_text(text, hostname=argument).hostname == expected


def test_bad_machine_hostname_points_to_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "weird host")

    with pytest.raises(ConfigError, match="--hostname"):
        settings_from_text("")


# --- topics (extensions.md "Topics", spec 3) ------------------------------------------------------


@pytest.mark.parametrize(
    ("communicator", "event", "status"),
    [
        pytest.param({}, "fast/migfra/node1/event", "fast/migfra/node1/status", id="defaults"),
        pytest.param({"subscribe-topic": "a/b/task"}, "a/b/event", "a/b/status", id="last-level"),
        pytest.param({"subscribe-topic": "tasks"}, "tasks/event", "tasks/status", id="no-slash"),
        pytest.param({"subscribe-topic": "a/b/"}, "a/b/event", "a/b/status", id="trailing-slash"),
        pytest.param(
            {"subscribe-topic": "a/task", "event-topic": "ev", "status-topic": "st"},
            "ev",
            "st",
            id="explicit-wins",
        ),
        pytest.param(
            {"subscribe-topic": "a/task", "status-topic": "st"},
            "a/event",
            "st",
            id="one-explicit",
        ),
    ],
)
def test_extensions_topics_event_and_status_derive_from_task_topic(
    communicator: dict[str, str], event: str, status: str
) -> None:
    settings = load("communicator:\n" + "".join(f"  {k}: {v}\n" for k, v in communicator.items()))

    assert (settings.mqtt.event_topic, settings.mqtt.status_topic) == (event, status)


@pytest.mark.parametrize(
    ("text", "path"),
    [
        pytest.param(
            "communicator: {subscribe-topic: a/+/task}", "communicator.subscribe-topic", id="plus"
        ),
        pytest.param("communicator: {publish-topic: a/#}", "communicator.publish-topic", id="hash"),
        pytest.param("communicator: {event-topic: ''}", "communicator.event-topic", id="empty"),
        pytest.param("communicator: {status-topic: a/+}", "communicator.status-topic", id="status"),
        pytest.param(
            "communicator: {subscribe-topic: a/x, publish-topic: a/x}",
            "communicator.publish-topic",
            id="same-as-task",
        ),
        pytest.param(
            "communicator: {event-topic: s, status-topic: s}",
            "communicator.status-topic",
            id="event-equals-status",
        ),
        pytest.param(
            "pscom-handler: {request-topic: fast/pscom/+/request}",
            "pscom-handler.request-topic",
            id="pscom-request-wildcard",
        ),
        pytest.param(
            "pscom-handler: {response-topic: a/b+/response}",
            "pscom-handler.response-topic",
            id="pscom-response-partial-level",
        ),
        pytest.param(
            "pscom-handler: {response-topic: a/#/response}",
            "pscom-handler.response-topic",
            id="pscom-response-hash-not-last",
        ),
        pytest.param(
            "pscom-handler: {response-topic: ''}",
            "pscom-handler.response-topic",
            id="pscom-response-empty",
        ),
    ],
)
def test_bad_topics_rejected(text: str, path: str) -> None:
    assert config_error(text).path == path


def test_spec_1_10_pscom_topics_configurable() -> None:
    settings = load(
        """\
        pscom-handler:
          request-topic: mpi/<vm_name>/request
          response-topic: mpi/<vm_name>/#
          qos: 2
        """
    )

    assert settings.pscom == PscomSettings(
        request_topic="mpi/<vm_name>/request", response_topic="mpi/<vm_name>/#", qos=2
    )


# --- the file itself ------------------------------------------------------------------------------


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    """The original exited 0 with an empty configuration (spec 4.1); we refuse to start."""
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_settings(tmp_path / "nope.conf")


def test_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path)


def test_non_utf8_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.conf"
    path.write_bytes(b"communicator: {host: m\xfcnchen}\n")

    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(path)


# --- the example file -----------------------------------------------------------------------------


def test_example_file_loads_to_the_defaults() -> None:
    """Every uncommented key in the example shows its default (only hostname and the
    password sources, whose defaults cannot be written down, are commented out)."""
    example = load_settings(CONFIG_DIR / "asyncmigfra.example.yaml", hostname="node1")

    assert example == default_settings(hostname="node1")


def test_example_file_documents_every_key() -> None:
    """Each configurable key appears in the example, commented out or not."""
    text = (CONFIG_DIR / "asyncmigfra.example.yaml").read_text()
    keys = set(settings_module._top_level_keys())
    keys |= set(settings_module._COMMUNICATOR_EXTRA)
    keys |= set(settings_module._HOOK_EXTRA)
    for cls in (
        HookSettings,
        MqttHookSettings,
        MqttSettings,
        TlsSettings,
        PscomSettings,
        LimitsSettings,
        AgentSettings,
        MigrationDefaults,
        LoggingSettings,
        ShutdownSettings,
        MetricsSettings,
    ):
        keys |= set(settings_module._field_table(cls))
    keys |= {"type", "driver", "transport", "nodes", "start-timeout", "stop-timeout"}

    # A key of a list entry may follow its "- ".
    missing = {
        key for key in keys if not re.search(rf"^[\s#]*(?:- )?{re.escape(key)}:", text, re.M)
    }

    assert missing == set()


def test_example_file_hook_entries_load() -> None:
    """The commented-out ``hooks:`` entries of the example are a valid configuration."""
    text = (CONFIG_DIR / "asyncmigfra.example.yaml").read_text()
    block = text.split("\nhooks: []", 1)[1].split("\n# Exactly one of", 1)[0]
    uncommented = "\n".join(line[2:] for line in block.splitlines() if line.startswith("# "))

    hooks = load(uncommented).hooks

    assert [(h.name, h.when, h.policy) for h in hooks] == [
        ("drain-storage", ("before-migrate",), "fail"),
        ("notify-dcim", ("after-migrate",), "warn"),
        ("shrink", ("before-migrate", "after-migrate"), "warn"),
    ]
    assert hooks[1].mqtt == MqttHookSettings(
        request_topic="dcim/<host>/hooks/request", response_topic="dcim/<host>/hooks/response"
    )


def test_every_numeric_field_has_a_range() -> None:
    """Guard: a new numeric field must say what values it allows."""
    numeric = {
        (cls, name)
        for cls in (
            MqttSettings,
            PscomSettings,
            LimitsSettings,
            AgentSettings,
            MigrationDefaults,
            ShutdownSettings,
            LoggingSettings,
            TlsSettings,
            HookSettings,
            MqttHookSettings,
        )
        for _, (name, tp) in settings_module._field_table(cls).items()
        if settings_module._unwrap_optional(tp)[0] in (int, float)
    }

    assert numeric - set(settings_module._RANGES) == set()
