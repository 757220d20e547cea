"""The configuration loader: the ``hooks:`` section (user hooks around tasks)."""

from __future__ import annotations

from pathlib import Path

import pytest
from settings_support import (
    config_error,
    load,
    predictable_machine_name,  # noqa: F401
)

from asyncmigfra.settings import HookSettings, MqttHookSettings, default_settings

# --- hooks ----------------------------------------------------------------------------------------


def test_hooks_default_to_none() -> None:
    assert load("").hooks == ()
    assert load("hooks:\n").hooks == ()
    assert load("hooks: []\n").hooks == ()


def test_hooks_full_example() -> None:
    """The issue's example, in order."""
    settings = load(
        """\
        hooks:
          - name: drain-storage
            when: [before-migrate]
            on: source
            command: ["/usr/local/bin/drain", "--fast"]
            timeout: 30
            policy: fail
          - name: notify-dcim
            when: [after-migrate]
            on: destination
            mqtt:
              request-topic: dcim/<host>/hooks/request
              response-topic: dcim/<host>/hooks/response
              qos: 1
            timeout: 10
            policy: warn
          - name: shrink
            builtin: reduce-memory
            memory: 50%
            policy: warn
          - name: log-<hostname>
            when: [before-start, after-stop]
            command: logger -t asyncmigfra "$ASYNCMIGFRA_POINT <hostname>"
        """
    )

    assert settings.hooks == (
        HookSettings(
            name="drain-storage",
            when=("before-migrate",),
            command=("/usr/local/bin/drain", "--fast"),
        ),
        HookSettings(
            name="notify-dcim",
            when=("after-migrate",),
            on="destination",
            mqtt=MqttHookSettings(
                request_topic="dcim/<host>/hooks/request",
                response_topic="dcim/<host>/hooks/response",
            ),
            timeout=10.0,
            policy="warn",
        ),
        HookSettings(
            name="shrink",
            when=("before-migrate", "after-migrate"),
            builtin="reduce-memory",
            memory_percent=50.0,
            policy="warn",
        ),
        HookSettings(
            name="log-node1",
            when=("before-start", "after-stop"),
            command='logger -t asyncmigfra "$ASYNCMIGFRA_POINT node1"',
        ),
    )


@pytest.mark.parametrize(
    "when",
    [
        pytest.param("", id="absent"),
        pytest.param("when: [before-migrate, after-migrate]", id="both"),
        pytest.param("when: [after-migrate, before-migrate]", id="both-reversed"),
    ],
)
def test_reduce_memory_points_are_fixed(when: str) -> None:
    hook = load(f"hooks: [{{name: s, builtin: reduce-memory, {when}}}]").hooks[0]

    assert hook.when == ("before-migrate", "after-migrate")


def test_default_settings_accepts_hooks() -> None:
    hooks = (HookSettings(name="a", when=("after-stop",), command="true"),)

    assert default_settings(hostname="n", hooks=hooks).hooks == hooks


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "hooks: {name: a}", "hooks: expected a list of hooks, got {'name': 'a'}", id="map"
        ),
        pytest.param("hooks: [drain]", "hooks[0]: expected a map, got 'drain'", id="scalar-entry"),
        pytest.param(
            "hooks: [{name: a, when: before-start, command: x}, {name: b, when: x, comand: y}]",
            "hooks[1].comand: unknown key; did you mean 'command'?",
            id="unknown-key",
        ),
        pytest.param(
            "hooks: [{name: a, when: after-migrate, mqtt: {request-topic: r, response_topic: s}}]",
            "hooks[0].mqtt.response_topic: unknown key; did you mean 'response-topic'?",
            id="unknown-mqtt-key",
        ),
        pytest.param(
            "hooks: [{name: a, when: before-start}]",
            "hooks[0]: set exactly one of command, mqtt, builtin (got none)",
            id="no-kind",
        ),
        pytest.param(
            "hooks: [{name: a, when: before-start, command: x, mqtt: {}}]",
            "hooks[0]: set exactly one of command, mqtt, builtin (got command, mqtt)",
            id="two-kinds",
        ),
        pytest.param(
            "hooks: [{name: a, command: x, builtin: reduce-memory}]",
            "hooks[0]: set exactly one of command, mqtt, builtin (got command, builtin)",
            id="command-and-builtin",
        ),
        pytest.param(
            "hooks: [{when: before-start, command: x}]", "hooks[0].name: missing", id="no-name"
        ),
        pytest.param(
            "hooks: [{name: Drain, when: before-start, command: x}]",
            "hooks[0].name: expected lower-case letters, digits and '-' (not first), at most 64"
            " characters, got 'Drain'",
            id="name-upper-case",
        ),
        pytest.param(
            "hooks: [{name: -a, when: before-start, command: x}]",
            "hooks[0].name: expected lower-case letters, digits and '-' (not first), at most 64"
            " characters, got '-a'",
            id="name-dash-first",
        ),
        pytest.param(
            f"hooks: [{{name: {'a' * 65}, when: before-start, command: x}}]",
            "hooks[0].name: expected lower-case letters, digits and '-' (not first), at most 64"
            f" characters, got '{'a' * 56}...",
            id="name-too-long",
        ),
        pytest.param(
            "hooks: [{name: 7, when: before-start, command: x}]",
            "hooks[0].name: expected a string, got 7",
            id="name-type",
        ),
        pytest.param(
            "hooks: [{name: a, when: before-start, command: x},"
            " {name: b, when: after-stop, command: y}, {name: a, when: after-stop, command: z}]",
            "hooks[2].name: 'a' is already the name of hooks[0]",
            id="duplicate-name",
        ),
        pytest.param(
            "hooks: [{name: a, command: x}]",
            "hooks[0].when: missing: one or more of before-migrate, after-migrate, before-start,"
            " after-stop",
            id="no-when",
        ),
        pytest.param(
            "hooks: [{name: a, when: [], command: x}]",
            "hooks[0].when: expected one or a list of before-migrate, after-migrate, before-start,"
            " after-stop, got []",
            id="when-empty",
        ),
        pytest.param(
            "hooks: [{name: a, when: before-strat, command: x}]",
            "hooks[0].when: expected one of before-migrate, after-migrate, before-start,"
            " after-stop, got 'before-strat'; did you mean 'before-start'?",
            id="when-typo",
        ),
        pytest.param(
            "hooks: [{name: a, when: [after-stop, 3], command: x}]",
            "hooks[0].when[1]: expected one of before-migrate, after-migrate, before-start,"
            " after-stop, got 3",
            id="when-item-type",
        ),
        pytest.param(
            "hooks: [{name: a, when: after-stop, on: dest, command: x}]",
            "hooks[0].on: expected one of 'source', 'destination', got 'dest'; did you mean"
            " 'destination'?",
            id="on-value",
        ),
        pytest.param(
            "hooks: [{name: a, when: [after-migrate, after-stop], on: destination, command: x}]",
            "hooks[0].on: destination applies to before-migrate and after-migrate only, not to"
            " after-stop (configure a separate hook for those)",
            id="on-destination-at-stop",
        ),
        pytest.param(
            "hooks: [{name: a, when: after-stop, command: x, policy: warm}]",
            "hooks[0].policy: expected one of 'fail', 'warn', got 'warm'; did you mean 'warn'?",
            id="policy",
        ),
        pytest.param(
            "hooks: [{name: a, when: after-stop, command: x, timeout: 0}]",
            "hooks[0].timeout: must be greater than 0, got 0",
            id="timeout-zero",
        ),
        pytest.param(
            "hooks: [{name: a, when: after-stop, command: x, timeout: soon}]",
            "hooks[0].timeout: expected a number, got 'soon'",
            id="timeout-type",
        ),
        pytest.param(
            "hooks: [{name: a, when: after-stop, command: []}]",
            "hooks[0].command: expected a non-empty list (argv) or a string (run with /bin/sh -c),"
            " got []",
            id="command-empty-list",
        ),
        pytest.param(
            "hooks: [{name: a, when: after-stop, command: ' '}]",
            "hooks[0].command: must not be empty",
            id="command-blank",
        ),
        pytest.param(
            "hooks: [{name: a, when: after-stop, command: [x, {y: 1}]}]",
            "hooks[0].command[1]: expected a string, got {'y': 1}",
            id="command-item-type",
        ),
        pytest.param(
            "hooks: [{name: a, when: after-stop, command: ['', x]}]",
            "hooks[0].command[0]: the program name must not be empty",
            id="command-empty-program",
        ),
        pytest.param(
            "hooks: [{name: a, when: after-stop, command: {x: 1}}]",
            "hooks[0].command: expected a non-empty list (argv) or a string (run with /bin/sh -c),"
            " got {'x': 1}",
            id="command-map",
        ),
        pytest.param(
            "hooks: [{name: a, when: after-stop, mqtt: {response-topic: s}}]",
            "hooks[0].mqtt.request-topic: missing",
            id="mqtt-no-request-topic",
        ),
        pytest.param(
            "hooks: [{name: a, when: after-stop, mqtt: {request-topic: r}}]",
            "hooks[0].mqtt.response-topic: missing",
            id="mqtt-no-response-topic",
        ),
        pytest.param(
            "hooks: [{name: a, when: after-stop, mqtt: {request-topic: r/#, response-topic: s}}]",
            "hooks[0].mqtt.request-topic: must not contain the wildcards '+' or '#': 'r/#'",
            id="mqtt-request-wildcard",
        ),
        pytest.param(
            "hooks: [{name: a, when: after-stop, mqtt: {request-topic: r, response-topic: s/#/t}}]",
            "hooks[0].mqtt.response-topic: '#' must be the last level: 's/#/t'",
            id="mqtt-response-hash",
        ),
        pytest.param(
            "hooks: [{name: a, when: after-stop,"
            " mqtt: {request-topic: r/<vm>, response-topic: s}}]",
            "hooks[0].mqtt.request-topic: unknown placeholder '<vm>'; did you mean '<vm_name>'?",
            id="mqtt-placeholder-typo",
        ),
        pytest.param(
            "hooks: [{name: a, when: after-stop,"
            " mqtt: {request-topic: r, response-topic: s/<zzzzzz>}}]",
            "hooks[0].mqtt.response-topic: unknown placeholder '<zzzzzz>' (known: <host>,"
            " <vm_name>, <hook>)",
            id="mqtt-placeholder-unknown",
        ),
        pytest.param(
            "hooks: [{name: a, when: after-stop, mqtt: {request-topic: r, response-topic: s,"
            " qos: 3}}]",
            "hooks[0].mqtt.qos: must be between 0 and 2, got 3",
            id="mqtt-qos",
        ),
        pytest.param(
            "hooks: [{name: a, when: after-stop, mqtt: [r, s]}]",
            "hooks[0].mqtt: expected a map, got ['r', 's']",
            id="mqtt-list",
        ),
        pytest.param(
            "hooks: [{name: a, builtin: reduce-memry}]",
            "hooks[0].builtin: expected one of 'reduce-memory', got 'reduce-memry'; did you mean"
            " 'reduce-memory'?",
            id="builtin-typo",
        ),
        pytest.param(
            "hooks: [{name: a, builtin: reduce-memory, when: before-migrate}]",
            "hooks[0].when: reduce-memory always runs at before-migrate and after-migrate;"
            " leave `when` out",
            id="builtin-when",
        ),
        pytest.param(
            "hooks: [{name: a, builtin: reduce-memory, when: [before-migrate, after-migrate,"
            " before-start]}]",
            "hooks[0].when: reduce-memory always runs at before-migrate and after-migrate;"
            " leave `when` out",
            id="builtin-when-extra",
        ),
        pytest.param(
            "hooks: [{name: a, builtin: reduce-memory, on: destination}]",
            "hooks[0].on: reduce-memory chooses its hosts itself; leave `on` out",
            id="builtin-on",
        ),
        pytest.param(
            "hooks: [{name: a, builtin: reduce-memory}, {name: b, builtin: reduce-memory}]",
            "hooks[1].builtin: reduce-memory is already configured by hooks[0]",
            id="builtin-twice",
        ),
        pytest.param(
            "hooks: [{name: a, builtin: reduce-memory, memory: 0%}]",
            "hooks[0].memory: must be between 1% and 100%, got 0%",
            id="memory-percent-low",
        ),
        pytest.param(
            "hooks: [{name: a, builtin: reduce-memory, memory: 101%}]",
            "hooks[0].memory: must be between 1% and 100%, got 101%",
            id="memory-percent-high",
        ),
        pytest.param(
            "hooks: [{name: a, builtin: reduce-memory, memory: 15}]",
            "hooks[0].memory: must be at least 16 MiB, got 15",
            id="memory-mib-low",
        ),
        pytest.param(
            "hooks: [{name: a, builtin: reduce-memory, memory: 2GiB}]",
            "hooks[0].memory: expected a percentage (50%) or MiB as an integer, got '2GiB'",
            id="memory-unit",
        ),
        pytest.param(
            "hooks: [{name: a, builtin: reduce-memory, memory: half%}]",
            "hooks[0].memory: expected N% or MiB, got 'half%'",
            id="memory-bad-percent",
        ),
        pytest.param(
            "hooks: [{name: a, when: after-stop, command: x, memory: 50%}]",
            "hooks[0].memory: only for builtin: reduce-memory",
            id="memory-without-builtin",
        ),
    ],
)
def test_bad_hooks_name_the_entry(text: str, message: str) -> None:
    error = config_error(text + "\n")

    assert str(error) == message
    assert error.path.startswith("hooks")


def test_bad_hooks_config_is_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI refuses to start, as for any other configuration error."""
    from asyncmigfra import cli  # noqa: PLC0415

    path = tmp_path / "agent.yaml"
    path.write_text("hooks:\n  - name: a\n    when: after-stop\n    comand: x\n")

    assert cli.main(["agent", "--config", str(path), "--hostname", "n1"]) == 2
    assert "hooks[0].comand: unknown key; did you mean 'command'?" in capsys.readouterr().err
