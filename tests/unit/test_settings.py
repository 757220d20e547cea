"""The configuration loader: original migfra.conf files, the new keys, and every error path.

Spec references: ``migfra-original.md`` §3 (MQTT) and §4.2 (the config file), §1.10 (pscom
topics); ``extensions.md`` "Topics" (event and status topics).
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from asyncmigfra.errors import ConfigError
from asyncmigfra.settings import (
    AgentSettings,
    HookSettings,
    HostDevice,
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
SECRET = "hunter2-very-secret"


@pytest.fixture(autouse=True)
def _machine_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``socket.gethostname()`` predictable; the loader falls back to it."""
    monkeypatch.setattr("socket.gethostname", lambda: "machine")


def load(text: str, **kwargs: Any) -> Settings:
    kwargs.setdefault("hostname", "node1")
    return settings_from_text(textwrap.dedent(text), **kwargs)


def config_error(text: str, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text, **kwargs)
    return info.value


def attr_path(obj: object, dotted: str) -> object:
    """``mqtt.port``; a number indexes a sequence (``hooks.0.name``)."""
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)  # type: ignore[index]
    return obj


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


# --- every new key --------------------------------------------------------------------------------


#: The smallest valid command hook and MQTT map, for the rows below.
HOOK = "name: h, when: before-start, command: x"
MQTT = "request-topic: r/<host>, response-topic: s/+/<vm_name>"

#: One row per configurable key: (YAML, attribute path, the value it must give).
NEW_KEYS = [
    pytest.param("hostname: n5", "hostname", "n5", id="hostname"),
    # communicator
    pytest.param("communicator: {host: broker}", "mqtt.host", "broker", id="host"),
    pytest.param("communicator: {port: 8883}", "mqtt.port", 8883, id="port"),
    pytest.param("communicator: {keepalive: 0}", "mqtt.keepalive", 0, id="keepalive"),
    pytest.param("communicator: {id: me}", "mqtt.client_id", "me", id="id"),
    pytest.param(
        "communicator: {subscribe-topic: t/in}", "mqtt.task_topic", "t/in", id="subscribe-topic"
    ),
    pytest.param(
        "communicator: {publish-topic: t/out}", "mqtt.result_topic", "t/out", id="publish-topic"
    ),
    pytest.param("communicator: {event-topic: t/ev}", "mqtt.event_topic", "t/ev", id="event-topic"),
    pytest.param(
        "communicator: {status-topic: t/st}", "mqtt.status_topic", "t/st", id="status-topic"
    ),
    pytest.param("communicator: {protocol: 3.1.1}", "mqtt.protocol", "3.1.1", id="protocol"),
    pytest.param("communicator: {username: bob}", "mqtt.username", "bob", id="username"),
    pytest.param("communicator: {tls: true}", "mqtt.tls", TlsSettings(), id="tls-true"),
    pytest.param("communicator: {tls: {}}", "mqtt.tls", TlsSettings(), id="tls-empty-map"),
    pytest.param("communicator: {tls: false}", "mqtt.tls", None, id="tls-false"),
    pytest.param("communicator: {tls: null}", "mqtt.tls", None, id="tls-null"),
    pytest.param(
        "communicator: {tls: {insecure: true}}", "mqtt.tls.insecure", True, id="tls-insecure"
    ),
    pytest.param(
        "communicator: {reconnect-min-delay: 1}",
        "mqtt.reconnect_min_delay",
        1.0,
        id="reconnect-min-delay",
    ),
    pytest.param(
        "communicator: {reconnect-max-delay: 5.5}",
        "mqtt.reconnect_max_delay",
        5.5,
        id="reconnect-max-delay",
    ),
    pytest.param(
        "communicator: {session-expiry: 0}", "mqtt.session_expiry", 0, id="session-expiry"
    ),
    pytest.param("communicator: {progress-qos: 1}", "mqtt.progress_qos", 1, id="progress-qos"),
    pytest.param("communicator: {event-qos: 0}", "mqtt.event_qos", 0, id="event-qos"),
    pytest.param(
        "communicator: {takeover-limit: 0}", "mqtt.takeover_limit", 0, id="takeover-limit"
    ),
    pytest.param(
        "agent: {host-devices: [{vendor: '8086', device: 0x10fb}, {address: '00:1f.2'}]}",
        "agent.host_devices",
        (HostDevice(vendor=0x8086, device=0x10FB), HostDevice(address="0000:00:1f.2")),
        id="host-devices",
    ),
    pytest.param(
        "limits: {max-intake-bytes: 4096}", "limits.max_intake_bytes", 4096, id="max-intake-bytes"
    ),
    pytest.param("agent: {xml-policy: trusted}", "agent.xml_policy", "trusted", id="xml-policy"),
    pytest.param(
        "agent: {xml-allowed-paths: [/srv/images]}",
        "agent.xml_allowed_paths",
        ("/srv/images",),
        id="xml-allowed-paths",
    ),
    pytest.param(
        "agent: {allowed-drivers: [qemu, lxc]}",
        "agent.allowed_drivers",
        ("qemu", "lxc"),
        id="allowed-drivers",
    ),
    pytest.param(
        "agent: {allowed-transports: [ssh, tls]}",
        "agent.allowed_transports",
        ("ssh", "tls"),
        id="allowed-transports",
    ),
    pytest.param(
        "communicator: {takeover-window: 30}", "mqtt.takeover_window", 30.0, id="takeover-window"
    ),
    # hypervisor
    pytest.param("hypervisor: {type: libvirt}", "hypervisor.type", "libvirt", id="hypervisor-type"),
    pytest.param(
        "hypervisor: {type: libvirt, driver: lxctools}",
        "hypervisor.driver",
        "lxctools",
        id="hypervisor-driver",
    ),
    pytest.param(
        "hypervisor: {type: libvirt, transport: tls}",
        "hypervisor.transport",
        "tls",
        id="hypervisor-transport",
    ),
    # pscom-handler
    pytest.param(
        "pscom-handler: {request-topic: r/<vm_name>}",
        "pscom.request_topic",
        "r/<vm_name>",
        id="pscom-request-topic",
    ),
    pytest.param(
        "pscom-handler: {response-topic: r/+/x}",
        "pscom.response_topic",
        "r/+/x",
        id="pscom-response-topic",
    ),
    pytest.param("pscom-handler: {qos: 1}", "pscom.qos", 1, id="pscom-qos"),
    pytest.param("pscom-handler: {timeout: 3}", "pscom.timeout", 3.0, id="pscom-timeout"),
    pytest.param(
        "pscom-handler: {ssh-host: 'x-<vm_name>'}",
        "pscom.ssh_host",
        "x-<vm_name>",
        id="pscom-ssh-host",
    ),
    pytest.param("pscom-handler: {ssh-port: 2222}", "pscom.ssh_port", 2222, id="pscom-ssh-port"),
    pytest.param("pscom-handler: {ssh-user: mpi}", "pscom.ssh_user", "mpi", id="pscom-ssh-user"),
    pytest.param(
        "pscom-handler: {ssh-key-file: /k}", "pscom.ssh_key_file", "/k", id="pscom-ssh-key-file"
    ),
    pytest.param(
        "pscom-handler: {known-hosts: /kh}", "pscom.known_hosts", "/kh", id="pscom-known-hosts"
    ),
    pytest.param(
        "pscom-handler: {ssh-timeout: 4}", "pscom.ssh_timeout", 4.0, id="pscom-ssh-timeout"
    ),
    pytest.param(
        "pscom-handler: {auto-command: echo 3}",
        "pscom.auto_command",
        "echo 3",
        id="pscom-auto-command",
    ),
    # limits
    pytest.param(
        "limits: {max-concurrent-tasks: 2}",
        "limits.max_concurrent_tasks",
        2,
        id="max-concurrent-tasks",
    ),
    pytest.param(
        "limits: {max-queued-tasks: 3}", "limits.max_queued_tasks", 3, id="max-queued-tasks"
    ),
    pytest.param(
        "limits: {max-message-size: 4096}", "limits.max_message_size", 4096, id="max-message-size"
    ),
    pytest.param("limits: {max-subtasks: 7}", "limits.max_subtasks", 7, id="max-subtasks"),
    pytest.param("limits: {dedupe-window: 60}", "limits.dedupe_window", 60.0, id="dedupe-window"),
    pytest.param(
        "limits: {max-yaml-nodes: 500}", "limits.max_yaml_nodes", 500, id="max-yaml-nodes"
    ),
    pytest.param("limits: {max-yaml-depth: 8}", "limits.max_yaml_depth", 8, id="max-yaml-depth"),
    # agent
    pytest.param("agent: {allow-quit: false}", "agent.allow_quit", False, id="allow-quit"),
    pytest.param(
        "agent: {allow-xml-start: false}", "agent.allow_xml_start", False, id="allow-xml-start"
    ),
    pytest.param(
        "agent: {progress-interval: 2}", "agent.progress_interval", 2.0, id="progress-interval"
    ),
    pytest.param("agent: {state-dir: /srv/amf}", "agent.state_dir", "/srv/amf", id="state-dir"),
    pytest.param(
        "agent: {history-retention: 3600}",
        "agent.history_retention",
        3600.0,
        id="history-retention",
    ),
    pytest.param(
        "agent: {history-max-entries: 0}", "agent.history_max_entries", 0, id="history-max"
    ),
    # migration
    pytest.param(
        "migration: {migration-type: post-copy}",
        "migration.migration_type",
        "post-copy",
        id="migration-type",
    ),
    pytest.param(
        "migration: {max-downtime: 300}", "migration.max_downtime", 300, id="max-downtime"
    ),
    pytest.param(
        "migration: {max-downtime: null}", "migration.max_downtime", None, id="max-downtime-null"
    ),
    pytest.param("migration: {bandwidth: 1000}", "migration.bandwidth", 1000, id="bandwidth"),
    pytest.param(
        "migration: {auto-converge: true}", "migration.auto_converge", True, id="auto-converge"
    ),
    pytest.param("migration: {compressed: true}", "migration.compressed", True, id="compressed"),
    pytest.param(
        "migration: {parallel-connections: 4}",
        "migration.parallel_connections",
        4,
        id="parallel-connections",
    ),
    pytest.param(
        "migration: {completion-timeout-per-gib: 30}",
        "migration.completion_timeout_per_gib",
        30.0,
        id="completion-timeout-per-gib",
    ),
    pytest.param(
        "migration: {completion-timeout-min: 10.5}",
        "migration.completion_timeout_min",
        10.5,
        id="completion-timeout-min",
    ),
    pytest.param(
        "migration: {timeout-action: suspend}",
        "migration.timeout_action",
        "suspend",
        id="timeout-action",
    ),
    pytest.param("migration: {persist: false}", "migration.persist", False, id="persist"),
    pytest.param("migration: {retry-counter: 3}", "migration.retry_counter", 3, id="retry-counter"),
    pytest.param("migration: {retry-delay: 0.25}", "migration.retry_delay", 0.25, id="retry-delay"),
    pytest.param(
        "migration: {postcopy-recovery-window: 0}",
        "migration.postcopy_recovery_window",
        0.0,
        id="postcopy-recovery-window",
    ),
    pytest.param("migration: {tls: true}", "migration.tls", True, id="migration-tls"),
    pytest.param("migration: {p2p: false}", "migration.p2p", False, id="p2p"),
    pytest.param("migration: {max-outgoing: 5}", "migration.max_outgoing", 5, id="max-outgoing"),
    pytest.param("migration: {max-incoming: 6}", "migration.max_incoming", 6, id="max-incoming"),
    pytest.param(
        "migration: {device-timeout: 2.5}", "migration.device_timeout", 2.5, id="device-timeout"
    ),
    pytest.param(
        "migration: {swap-lock: required}", "migration.swap_lock", "required", id="swap-lock"
    ),
    pytest.param(
        "migration: {swap-lock-timeout: 0.5}",
        "migration.swap_lock_timeout",
        0.5,
        id="swap-lock-timeout",
    ),
    pytest.param("migration: {copy-storage: all}", "migration.copy_storage", "all", id="copy"),
    pytest.param(
        "migration: {copy-storage: INC}", "migration.copy_storage", "inc", id="copy-storage-case"
    ),
    pytest.param(
        "migration: {copy-storage-synchronous-writes: yes}",
        "migration.copy_storage_synchronous_writes",
        True,
        id="copy-storage-synchronous-writes",
    ),
    pytest.param(
        "migration: {progress-timeout: 30}",
        "migration.progress_timeout",
        30.0,
        id="progress-timeout",
    ),
    pytest.param(
        "migration: {compression: [xbzrle]}",
        "migration.compression",
        ("xbzrle",),
        id="compression",
    ),
    pytest.param(
        "migration: {compression: [zlib], parallel-connections: 2, compression-level: 4}",
        "migration.compression_level",
        4,
        id="compression-level",
    ),
    pytest.param(
        "migration: {compression: [xbzrle], xbzrle-cache: 32}",
        "migration.xbzrle_cache",
        32,
        id="xbzrle-cache",
    ),
    pytest.param(
        "migration: {zerocopy: true, parallel-connections: 2}",
        "migration.zerocopy",
        True,
        id="zerocopy",
    ),
    pytest.param(
        "migration: {postcopy-bandwidth: 100}",
        "migration.postcopy_bandwidth",
        100,
        id="postcopy-bandwidth",
    ),
    pytest.param(
        "migration: {auto-converge: true, auto-converge-initial: 40}",
        "migration.auto_converge_initial",
        40,
        id="auto-converge-initial",
    ),
    pytest.param(
        "migration: {auto-converge: true, auto-converge-increment: 15}",
        "migration.auto_converge_increment",
        15,
        id="auto-converge-increment",
    ),
    pytest.param("migration: {link-rate: 1250}", "migration.link_rate", 1250.0, id="link-rate"),
    pytest.param(
        "migration: {allow-post-copy: no}", "migration.allow_post_copy", False, id="allow-post-copy"
    ),
    pytest.param(
        "migration: {migration-type: auto}", "migration.migration_type", "auto", id="auto-type"
    ),
    # logging, shutdown
    pytest.param("logging: {format: json}", "logging.format", "json", id="logging-format"),
    pytest.param("logging: {level: debug}", "logging.level", "debug", id="logging-level"),
    pytest.param(
        "logging: {level: WARNING}", "logging.level", "warning", id="logging-level-upper-case"
    ),
    pytest.param("shutdown: {grace-period: 0}", "shutdown.grace_period", 0.0, id="grace-period"),
    pytest.param(
        "shutdown: {hard-exit-after: 5}", "shutdown.hard_exit_after", 5.0, id="hard-exit-after"
    ),
    # hooks
    pytest.param(f"hooks: [{{{HOOK}}}]", "hooks.0.name", "h", id="hook-name"),
    pytest.param(f"hooks: [{{{HOOK}}}]", "hooks.0.when", ("before-start",), id="hook-when-one"),
    pytest.param(
        "hooks: [{name: h, when: [after-stop, before-start, after-stop], command: x}]",
        "hooks.0.when",
        ("after-stop", "before-start"),
        id="hook-when-list",
    ),
    pytest.param(
        "hooks: [{name: h, when: after-migrate, on: destination, command: x}]",
        "hooks.0.on",
        "destination",
        id="hook-on",
    ),
    pytest.param(f"hooks: [{{{HOOK}}}]", "hooks.0.on", "source", id="hook-on-default"),
    pytest.param(f"hooks: [{{{HOOK}}}]", "hooks.0.command", "x", id="hook-command-string"),
    pytest.param(
        "hooks: [{name: h, when: before-start, command: [/bin/drain, --fast, 5]}]",
        "hooks.0.command",
        ("/bin/drain", "--fast", "5"),
        id="hook-command-argv",
    ),
    pytest.param(f"hooks: [{{{HOOK}, timeout: 2.5}}]", "hooks.0.timeout", 2.5, id="hook-timeout"),
    pytest.param(f"hooks: [{{{HOOK}}}]", "hooks.0.timeout", 30.0, id="hook-timeout-default"),
    pytest.param(f"hooks: [{{{HOOK}, policy: warn}}]", "hooks.0.policy", "warn", id="hook-policy"),
    pytest.param(f"hooks: [{{{HOOK}}}]", "hooks.0.policy", "fail", id="hook-policy-default"),
    pytest.param(
        f"hooks: [{{name: h, when: after-migrate, mqtt: {{{MQTT}}}}}]",
        "hooks.0.mqtt",
        MqttHookSettings(request_topic="r/<host>", response_topic="s/+/<vm_name>"),
        id="hook-mqtt",
    ),
    pytest.param(
        f"hooks: [{{name: h, when: after-migrate, mqtt: {{{MQTT}}}}}]",
        "hooks.0.mqtt.request_topic",
        "r/<host>",
        id="hook-mqtt-request-topic",
    ),
    pytest.param(
        f"hooks: [{{name: h, when: after-migrate, mqtt: {{{MQTT}}}}}]",
        "hooks.0.mqtt.response_topic",
        "s/+/<vm_name>",
        id="hook-mqtt-response-topic",
    ),
    pytest.param(
        f"hooks: [{{name: h, when: after-migrate, mqtt: {{{MQTT}, qos: 2}}}}]",
        "hooks.0.mqtt.qos",
        2,
        id="hook-mqtt-qos",
    ),
    pytest.param(
        "hooks: [{name: s, builtin: reduce-memory}]",
        "hooks.0.builtin",
        "reduce-memory",
        id="hook-builtin",
    ),
    pytest.param(
        "hooks: [{name: s, builtin: reduce-memory}]",
        "hooks.0.memory_percent",
        50.0,
        id="hook-memory-default",
    ),
    pytest.param(
        "hooks: [{name: s, builtin: reduce-memory, memory: 12.5%}]",
        "hooks.0.memory_percent",
        12.5,
        id="hook-memory-percent",
    ),
    pytest.param(
        "hooks: [{name: s, builtin: reduce-memory, memory: 2048}]",
        "hooks.0.memory_mib",
        2048,
        id="hook-memory-mib",
    ),
]


@pytest.mark.parametrize(("text", "attribute", "expected"), NEW_KEYS)
def test_new_key_sets_its_field(text: str, attribute: str, expected: object) -> None:
    settings = load(text + "\n", hostname=None)

    assert attr_path(settings, attribute) == expected
    assert type(expected) is type(attr_path(settings, attribute))


def test_new_key_table_covers_every_field() -> None:
    """Guard: a field added to the dataclasses must get a row in NEW_KEYS (the TLS file
    names have their own tests below, as they need files)."""
    covered = {param.values[1] for param in NEW_KEYS}
    sections = {
        "mqtt": MqttSettings,
        "hypervisor": HypervisorSettings,
        "pscom": PscomSettings,
        "limits": LimitsSettings,
        "agent": AgentSettings,
        "migration": MigrationDefaults,
        "logging": LoggingSettings,
        "shutdown": ShutdownSettings,
    }
    expected = (
        {"hostname"}
        | {
            f"{name}.{f.name}"
            for name, cls in sections.items()
            for f in dataclasses.fields(cls)
            if (name, f.name) not in {("mqtt", "password"), ("hypervisor", "options")}
        }
        | {"mqtt.tls.insecure"}
        | {f"hooks.0.{f.name}" for f in dataclasses.fields(HookSettings)}
        | {f"hooks.0.mqtt.{f.name}" for f in dataclasses.fields(MqttHookSettings)}
    )

    assert expected - covered == set()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("'5'", "5", id="str-5"),
        pytest.param("'5.0'", "5", id="str-5.0"),
        pytest.param("v5", "5", id="v5"),
        pytest.param("5", "5", id="int-5"),
        pytest.param("5.0", "5", id="float-5.0"),
        pytest.param("311", "3.1.1", id="int-311"),
        pytest.param("'311'", "3.1.1", id="str-311"),
        pytest.param("3.1.1", "3.1.1", id="dotted"),
        pytest.param("v311", "3.1.1", id="v311"),
        pytest.param("MQTTv311", "3.1.1", id="mqttv311"),
    ],
)
def test_protocol_aliases(value: str, expected: str) -> None:
    assert load(f"communicator: {{protocol: {value}}}").mqtt.protocol == expected


# --- errors name the key path ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "communicator: {port: abc}",
            "communicator.port: expected an integer, got 'abc'",
            id="port-type",
        ),
        pytest.param(
            "communicator: {port: 0}",
            "communicator.port: must be between 1 and 65535, got 0",
            id="port-low",
        ),
        pytest.param(
            "communicator: {port: 65536}",
            "communicator.port: must be between 1 and 65535, got 65536",
            id="port-high",
        ),
        pytest.param(
            "communicator: {port: 1883.5}",
            "communicator.port: expected an integer, got 1883.5",
            id="port-float",
        ),
        pytest.param(
            "communicator: {port: true}",
            "communicator.port: expected an integer, got True",
            id="port-bool",
        ),
        pytest.param(
            "communicator: {port: }",
            "communicator.port: expected an integer, got nothing",
            id="port-null",
        ),
        pytest.param(
            "communicator: {keepalive: -1}",
            "communicator.keepalive: must be between 0 and 65535, got -1",
            id="keepalive",
        ),
        pytest.param(
            "communicator: {host: 10}",
            "communicator.host: expected a string, got 10",
            id="host-type",
        ),
        pytest.param(
            "communicator: {host: ''}", "communicator.host: must not be empty", id="host-empty"
        ),
        pytest.param(
            "communicator: {id: ' '}", "communicator.id: must not be empty", id="id-empty"
        ),
        pytest.param(
            "communicator: {type: amqp}",
            "communicator.type: expected 'mqtt' (the only communicator), got 'amqp'",
            id="type",
        ),
        pytest.param(
            "communicator: {protocol: 4}",
            "communicator.protocol: expected one of '3.1.1', '5', got 4",
            id="protocol",
        ),
        pytest.param(
            "communicator: {progress-qos: 3}",
            "communicator.progress-qos: must be between 0 and 2, got 3",
            id="progress-qos",
        ),
        pytest.param(
            "communicator: {event-qos: -1}",
            "communicator.event-qos: must be between 0 and 2, got -1",
            id="event-qos",
        ),
        pytest.param(
            "agent: {host-devices: [{vendor: '8086'}]}",
            "agent.host-devices[0]: expected {vendor, device} or {address}",
            id="host-device-half",
        ),
        pytest.param(
            "agent: {host-devices: [{address: '00:1f'}]}",
            "agent.host-devices[0].address: expected a PCI address [DDDD:]BB:SS.F, got '00:1f'",
            id="host-device-address",
        ),
        pytest.param(
            "agent: {host-devices: [{vendor: xyz, device: '1'}]}",
            "agent.host-devices[0].vendor: expected a PCI id as lspci prints it ('8086' or 0x8086),"
            " got 'xyz'",
            id="host-device-vendor",
        ),
        pytest.param(
            "agent: {host-devices: {vendor: '1', device: '1'}}",
            "agent.host-devices: expected a list, got {'vendor': '1', 'device': '1'}",
            id="host-devices-not-a-list",
        ),
        pytest.param(
            "agent: {xml-allowed-paths: [images]}",
            "agent.xml-allowed-paths[0]: expected an absolute directory, got 'images'",
            id="relative-allowed-path",
        ),
        pytest.param(
            "agent: {allowed-drivers: ['qemu+ext']}",
            "agent.allowed-drivers[0]: expected a driver or transport name, got 'qemu+ext'",
            id="bad-driver",
        ),
        pytest.param(
            "agent: {xml-policy: lax}",
            "agent.xml-policy: expected one of 'strict', 'trusted', got 'lax'",
            id="xml-policy",
        ),
        pytest.param(
            "communicator: {session-expiry: -1}",
            "communicator.session-expiry: must be between 0 and 4294967295, got -1",
            id="session-expiry",
        ),
        pytest.param(
            "communicator: {reconnect-min-delay: 0}",
            "communicator.reconnect-min-delay: must be greater than 0, got 0",
            id="delay-zero",
        ),
        pytest.param(
            "communicator: {reconnect-min-delay: .inf}",
            "communicator.reconnect-min-delay: expected a number, got inf",
            id="delay-inf",
        ),
        pytest.param(
            "communicator: {reconnect-min-delay: .nan}",
            "communicator.reconnect-min-delay: expected a number, got nan",
            id="delay-nan",
        ),
        pytest.param(
            "communicator: {reconnect-min-delay: 10, reconnect-max-delay: 5}",
            "communicator.reconnect-max-delay: must be at least reconnect-min-delay (10)",
            id="delay-order",
        ),
        pytest.param(
            "communicator: {tls: {insecure: yEs}}",
            "communicator.tls.insecure: expected a boolean (true/false, yes/no, on/off, y/n),"
            " got 'yEs'",
            id="bool-mixed-case",
        ),
        pytest.param(
            "communicator: {tls: 5}", "communicator.tls: expected a map, got 5", id="tls-type"
        ),
        pytest.param(
            "communicator: [a]", "communicator: expected a map, got ['a']", id="section-list"
        ),
        pytest.param(
            "pscom-handler: {qos: -1}",
            "pscom-handler.qos: must be between 0 and 2, got -1",
            id="pscom-qos",
        ),
        pytest.param(
            "pscom-handler: {timeout: 0}",
            "pscom-handler.timeout: must be greater than 0, got 0",
            id="pscom-timeout",
        ),
        pytest.param(
            "pscom-handler: {ssh-port: 0}",
            "pscom-handler.ssh-port: must be between 1 and 65535, got 0",
            id="pscom-ssh-port",
        ),
        pytest.param(
            "limits: {max-queued-tasks: 0}",
            "limits.max-queued-tasks: must be at least 1, got 0",
            id="count-zero",
        ),
        pytest.param(
            "limits: {max-message-size: 300000000}",
            "limits.max-message-size: must be between 1 and 268435455, got 300000000",
            id="message-size",
        ),
        pytest.param(
            "limits: {dedupe-window: -5}",
            "limits.dedupe-window: must be greater than 0, got -5",
            id="dedupe-window",
        ),
        pytest.param("limits: 5", "limits: expected a map, got 5", id="limits-scalar"),
        pytest.param(
            "agent: {allow-quit: 1}",
            "agent.allow-quit: expected a boolean (true/false, yes/no, on/off, y/n), got 1",
            id="bool-int",
        ),
        pytest.param(
            "agent: {progress-interval: fast}",
            "agent.progress-interval: expected a number, got 'fast'",
            id="float-str",
        ),
        pytest.param(
            "migration: {migration-type: hot}",
            "migration.migration-type: expected one of 'live', 'warm', 'offline', 'post-copy',"
            " 'auto', got 'hot'",
            id="enum",
        ),
        pytest.param(
            "migration: {migration-type: postcopy}",
            "migration.migration-type: expected one of 'live', 'warm', 'offline', 'post-copy',"
            " 'auto', got 'postcopy'; did you mean 'post-copy'?",
            id="enum-suggestion",
        ),
        pytest.param(
            "migration: {link-rate: 0}",
            "migration.link-rate: must be between 0.01 and 1048576, got 0",
            id="link-rate-range",
        ),
        pytest.param(
            "migration: {max-downtime: 0}",
            "migration.max-downtime: must be at least 1, got 0",
            id="optional-int-range",
        ),
        pytest.param(
            "migration: {retry-counter: -1}",
            "migration.retry-counter: must be at least 0, got -1",
            id="retry-counter",
        ),
        pytest.param(
            "migration: {copy-storage: full}",
            "migration.copy-storage: expected one of 'none', 'all', 'inc', got 'full'",
            id="copy-storage",
        ),
        pytest.param(
            "migration: {copy-storage-synchronous-writes: sometimes}",
            "migration.copy-storage-synchronous-writes: expected a boolean (true/false, yes/no,"
            " on/off, y/n), got 'sometimes'",
            id="copy-storage-synchronous-writes",
        ),
        pytest.param(
            "migration: {persist: null}",
            "migration.persist: expected a boolean (true/false, yes/no, on/off, y/n), got nothing",
            id="bool-null",
        ),
        pytest.param(
            "logging: {level: verbose}",
            "logging.level: expected one of 'debug', 'info', 'warning', 'error', got 'verbose'",
            id="level",
        ),
        pytest.param(
            "logging: {format: jsn}",
            "logging.format: expected one of 'auto', 'json', 'console', got 'jsn';"
            " did you mean 'json'?",
            id="format",
        ),
        pytest.param(
            "shutdown: {grace-period: -1}",
            "shutdown.grace-period: must be at least 0, got -1",
            id="grace-period",
        ),
        pytest.param(
            "shutdown: {hard-exit-after: 0}",
            "shutdown.hard-exit-after: must be greater than 0, got 0",
            id="hard-exit-after",
        ),
        pytest.param(
            "hypervisor: {nodes: [a]}",
            "hypervisor.type: missing: name the back-end (libvirt, dummy, fake, ...)",
            id="hypervisor-no-type",
        ),
        pytest.param(
            "hypervisor: {type: ''}",
            "hypervisor.type: expected a back-end name, got ''",
            id="hypervisor-empty-type",
        ),
        pytest.param(
            "hypervisor: {type: 3}",
            "hypervisor.type: expected a back-end name, got 3",
            id="hypervisor-int-type",
        ),
        pytest.param(
            "hypervisor: {type: libvirt, driver: 1}",
            "hypervisor.driver: expected a non-empty string, got 1",
            id="hypervisor-driver",
        ),
        pytest.param(
            "hypervisor: {type: libvirt, transport: ''}",
            "hypervisor.transport: expected a non-empty string, got ''",
            id="hypervisor-transport",
        ),
        pytest.param(
            "hypervisor: libvirt",
            "hypervisor: expected a map, got 'libvirt'",
            id="hypervisor-scalar",
        ),
        pytest.param("limits: {1: 2}", "limits.1: keys must be strings", id="non-string-key"),
    ],
)
def test_errors_name_the_key_path(text: str, message: str) -> None:
    assert str(config_error(text + "\n")) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "limits: {max-queued-taks: 1}",
            "limits.max-queued-taks: unknown key; did you mean 'max-queued-tasks'?",
            id="limits",
        ),
        pytest.param(
            "comunicator: {}",
            "comunicator: unknown key; did you mean 'communicator'?",
            id="top-level",
        ),
        pytest.param(
            "communicator: {subscribe_topic: a}",
            "communicator.subscribe_topic: unknown key; did you mean 'subscribe-topic'?",
            id="underscore",
        ),
        pytest.param(
            "communicator: {pasword: x}",
            "communicator.pasword: unknown key; did you mean 'password'?",
            id="password-typo",
        ),
        pytest.param(
            "communicator: {tls: {ca_file: x}}",
            "communicator.tls.ca_file: unknown key; did you mean 'ca-file'?",
            id="nested",
        ),
        pytest.param(
            "pscom: {}", "pscom: unknown key; did you mean 'pscom-handler'?", id="pscom-section"
        ),
    ],
)
def test_unknown_key_suggests_the_closest(text: str, message: str) -> None:
    assert str(config_error(text + "\n")) == message


def test_unknown_key_without_near_miss_lists_known_keys() -> None:
    error = config_error("shutdown: {zzz: 1}\n")

    assert error.path == "shutdown.zzz"
    assert "unknown key (known keys: grace-period, hard-exit-after)" in str(error)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        pytest.param("a: [1\n", r"^<string>: line 2, column 1: expected ',' or '\]'", id="flow"),
        pytest.param(
            "communicator:\n\tport: 1\n", r"^<string>: line 2, column 1: .*'\\t'", id="tab"
        ),
        pytest.param(
            "limits: {}\nlimits: {}\n",
            r"^<string>: line 2, column 1: duplicate key 'limits'$",
            id="duplicate",
        ),
        pytest.param(
            "a: 1\n---\nb: 2\n",
            r"^<string>: line 2, column 1: but found another document",
            id="two-documents",
        ),
        pytest.param(
            "a: !!python/object:os.system 1\n",
            r"^<string>: line 1, column 4: could not determine a constructor",
            id="unsafe-tag",
        ),
        pytest.param(
            "- a\n- b\n",
            r"^<string>: the top level must be a map, got \['a', 'b'\]$",
            id="top-level-list",
        ),
        pytest.param("a: \x00\n", r"^<string>: invalid YAML: unacceptable character", id="reader"),
    ],
)
def test_yaml_syntax_errors_name_line_and_column(text: str, pattern: str) -> None:
    error = config_error(text)

    assert re.search(pattern, str(error)), str(error)
    assert error.path == ""


def test_yaml_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.conf"
    path.write_text("communicator: {port: 1\n")

    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: line \d+, column \d+: "):
        load_settings(path)


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
