"""The configuration loader: every new key sets its field, and the protocol aliases."""

from __future__ import annotations

import dataclasses

import pytest
from settings_support import (
    load,
    predictable_machine_name,  # noqa: F401
)

from asyncmigfra.settings import (
    AgentSettings,
    HookSettings,
    HostDevice,
    HypervisorSettings,
    LimitsSettings,
    LoggingSettings,
    MigrationDefaults,
    MqttHookSettings,
    MqttSettings,
    PscomSettings,
    ShutdownSettings,
    TlsSettings,
)


def attr_path(obj: object, dotted: str) -> object:
    """``mqtt.port``; a number indexes a sequence (``hooks.0.name``)."""
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)  # type: ignore[index]
    return obj


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
