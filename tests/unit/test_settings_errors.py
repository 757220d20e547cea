"""The configuration loader: errors name the key path; unknown keys; YAML syntax errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from settings_support import (
    config_error,
    predictable_machine_name,  # noqa: F401
)

from asyncmigfra.errors import ConfigError
from asyncmigfra.settings import load_settings

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
