"""Agent configuration: frozen dataclasses grouped by subject, and the YAML loader.

The original migfra.conf (``communicator``, ``hypervisor``, ``pscom-handler``) loads
unchanged; every new key is optional and documented in ``config/asyncmigfra.example.yaml``.
A bad or unknown key raises :class:`asyncmigfra.errors.ConfigError` naming its key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import socket
import types
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from asyncmigfra.errors import ConfigError
from asyncmigfra.values import BOOL_EXPECTED, parse_bool, parse_number

__all__ = [
    "HOOK_POINTS",
    "AgentSettings",
    "HookSettings",
    "HostDevice",
    "HypervisorSettings",
    "LimitsSettings",
    "LoggingSettings",
    "MigrationDefaults",
    "MqttHookSettings",
    "MqttSettings",
    "PscomSettings",
    "Settings",
    "ShutdownSettings",
    "TlsSettings",
    "default_settings",
    "load_settings",
    "settings_from_text",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsSettings:
    """``communicator.tls``: MQTT over TLS."""

    #: CA bundle to verify the broker with; ``None``: the system's default CAs.
    ca_file: str | None = None
    #: Client certificate (PEM) for mutual TLS.
    cert_file: str | None = None
    #: Client key (PEM).
    key_file: str | None = None
    #: Skip hostname verification (never in production).
    insecure: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttSettings:
    """``communicator``: the broker connection and the agent's topics."""

    host: str = "localhost"
    port: int = 1883
    #: s
    keepalive: int = 60
    client_id: str = "fast-migfra-localhost"
    task_topic: str = "fast/migfra/localhost/task"
    result_topic: str = "fast/migfra/localhost/result"
    event_topic: str = "fast/migfra/localhost/event"
    status_topic: str = "fast/migfra/localhost/status"
    #: MQTT protocol version: ``"5"`` (default) or ``"3.1.1"``.
    protocol: Literal["3.1.1", "5"] = "5"
    username: str | None = None
    #: Resolved from ``password``, ``password-file`` or ``password-env``; never logged.
    password: str | None = field(default=None, repr=False)
    tls: TlsSettings | None = None
    #: s; first reconnect delay (jittered, doubling up to the maximum).
    reconnect_min_delay: float = 0.5
    #: s
    reconnect_max_delay: float = 30.0
    #: s the broker keeps the agent's session (and queues its tasks) while it is away (MQTT 5).
    session_expiry: int = 86400
    #: QoS of ``progress`` events (others use 1).
    progress_qos: int = 0
    #: Session takeovers (another client connected with ``client_id``) within
    #: ``takeover_window`` after which the agent gives up (exit code 2); 0: never give up.
    takeover_limit: int = 5
    #: s over which takeovers are counted for ``takeover_limit``.
    takeover_window: float = 60.0


#: The original's two process counts (docs/protocol.md §3.6, the pscom hook), tried in this order.
DEFAULT_PSCOM_COUNT_COMMAND = (
    "PATH=$PATH:/opt/parastation/bin; "
    "n=$(psiadmin -d -c 'l p -1' 2>/dev/null | perl -ane 'print if /^ / && $F[5] >= 0'"
    " | wc -l); "
    '[ "$n" -gt 0 ] 2>/dev/null || '
    'n=$(pgrep -P "$(pgrep -d, hydra_pmi_proxy)" 2>/dev/null | wc -l); '
    'echo "$n"'
)


@dataclass(frozen=True, slots=True, kw_only=True)
class PscomSettings:
    """``pscom-handler``: the ParaStation MPI suspend/resume hook (docs/protocol.md §3.6)."""

    request_topic: str = "fast/pscom/<vm_name>/any_proc/request"
    response_topic: str = "fast/pscom/<vm_name>/+/response"
    qos: int = 0
    #: s for all answers of one suspend or resume round (one deadline, not one per answer);
    #: ``None``: 10 s per process, at most 120 s (the original waited 10 s per answer, unbounded).
    timeout: float | None = None
    #: ``pscom-hook-procs: auto`` counts the MPI processes by running ``auto-command`` in the
    #: guest over SSH (asyncssh, extra ``pscom``). ``<vm_name>`` is replaced in the host.
    ssh_host: str = "<vm_name>"
    ssh_port: int = 22
    #: ``None``: the agent's own user name.
    ssh_user: str | None = None
    #: Private key file; ``None``: the user's default keys and ssh-agent.
    ssh_key_file: str | None = None
    #: known_hosts file the guest's host key is checked against. ``None``: the host key is NOT
    #: verified (as in the original): whoever answers for the guest's name sets the count.
    known_hosts: str | None = None
    #: s for the SSH connection and the command together.
    ssh_timeout: float = 10.0
    #: Shell command printing the process count (its last output line): the original's psid
    #: query, then its Hydra query when the first counts none.
    auto_command: str = DEFAULT_PSCOM_COUNT_COMMAND


@dataclass(frozen=True, slots=True, kw_only=True)
class HypervisorSettings:
    """``hypervisor``: the back-end and its options."""

    #: Entry-point name in ``asyncmigfra.hypervisors`` (``libvirt``, ``dummy``, ``fake``).
    type: str = "dummy"
    #: Default libvirt driver for tasks without ``driver``.
    driver: str = "qemu"
    #: Default transport for destination URIs.
    transport: str = "ssh"
    #: The whole ``hypervisor:`` map without ``type``, handed to the back-end's factory.
    options: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsSettings:
    """``limits``: what the agent accepts before it answers ``busy`` or ``invalid-message``."""

    #: Subtasks running at once.
    max_concurrent_tasks: int = 64
    #: Subtasks waiting (for a VM or a slot) before new messages get ``busy``.
    max_queued_tasks: int = 4096
    #: Bytes.
    max_message_size: int = 1024 * 1024
    #: Bytes of received messages waiting to be read; past it, messages are answered
    #: ``busy`` unread (a flood of large messages cannot take the agent's memory).
    max_intake_bytes: int = 16 * 1024 * 1024
    #: Subtasks in one message.
    max_subtasks: int = 1000
    #: s a task id is remembered to refuse running it twice.
    dedupe_window: float = 3600.0
    #: Nodes in one YAML message after alias expansion (alias bombs are rejected).
    max_yaml_nodes: int = 100_000
    #: Nesting depth of one YAML message.
    max_yaml_depth: int = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class HostDevice:
    """One entry of ``agent.host-devices``: a PCI vendor and device id (``pci-ids``, a
    hostdev given by vendor and product) or a PCI address (``devs``, a hostdev's address)."""

    vendor: int | None = None
    device: int | None = None
    #: ``dddd:bb:ss.f``, lower case.
    address: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentSettings:
    """``agent``: behaviour switches."""

    #: Accept ``task: quit`` (the original always did; anyone on the broker can send it).
    allow_quit: bool = True
    #: Accept ``start vm`` with ``xml`` (arbitrary XML can map host devices and files).
    allow_xml_start: bool = True
    #: s between ``progress`` events of a running migration.
    progress_interval: float = 0.5
    #: Where the task journal lives. ``auto``: ``/var/lib/asyncmigfra/<hostname>`` for root,
    #: else ``$XDG_STATE_HOME/asyncmigfra/<hostname>`` (``~/.local/state``); ``none``: no
    #: journal (accepted tasks are then lost if the agent dies).
    state_dir: str = "auto"
    #: The only host devices a task may attach (``pci-ids``, ``devs``, hostdevs in XML);
    #: empty: none (as Nova's ``device_spec``).
    host_devices: tuple[HostDevice, ...] = ()
    #: ``strict``: refuse domain XML with ``qemu:`` elements, host devices not in
    #: ``host-devices`` and host files outside ``xml-allowed-paths``; ``trusted``: take any.
    xml_policy: Literal["strict", "trusted"] = "strict"
    #: Directories whose files domain XML may use (disks, kernels, sockets, ...); ``None``:
    #: ``/var/lib/libvirt/images`` and the directories of the host's storage pools.
    xml_allowed_paths: tuple[str, ...] | None = None
    #: The ``driver`` values a task may name; ``None``: the configured driver only.
    allowed_drivers: tuple[str, ...] | None = None
    #: The ``transport`` values a migration may name; ``None``: the configured one only.
    allowed_transports: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationDefaults:
    """``migration``: agent-wide defaults for ``migrate vm`` parameters."""

    migration_type: Literal["live", "warm", "offline", "post-copy"] = "warm"
    #: ms; ``None``: the hypervisor's default.
    max_downtime: int | None = None
    #: MiB/s; ``None``: unlimited.
    bandwidth: int | None = None
    auto_converge: bool = False
    compressed: bool = False
    parallel_connections: int = 1
    #: s per GiB of guest memory.
    completion_timeout_per_gib: float = 150.0
    #: s
    completion_timeout_min: float = 120.0
    timeout_action: Literal["abort", "post-copy", "suspend"] = "abort"
    persist: bool = True
    retry_counter: int = 0
    #: s before the first retry (doubles each time).
    retry_delay: float = 2.0
    tls: bool = False
    #: Peer-to-peer migrations (the job belongs to libvirtd and survives an agent restart).
    p2p: bool = True
    #: Outgoing migrations at once on this host.
    max_outgoing: int = 2
    #: Incoming migrations at once per destination.
    max_incoming: int = 2
    #: s to wait for the guest to release each hot-unplugged device (PCI, ivshmem).
    device_timeout: float = 10.0
    #: A swap holds VM 2's lane on the destination's agent: ``best-effort`` goes on
    #: uncoordinated (and says so) when that agent does not answer, ``required`` refuses.
    swap_lock: Literal["off", "best-effort", "required"] = "best-effort"
    #: s to wait for the destination's agent to answer a lane hold.
    swap_lock_timeout: float = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggingSettings:
    """``logging``."""

    #: ``auto``: console on a TTY, JSON otherwise.
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownSettings:
    """``shutdown``: SIGTERM handling."""

    #: s running work may take to finish after SIGTERM before it is aborted.
    grace_period: float = 60.0
    #: s after the grace period before the process exits even if a thread hangs.
    hard_exit_after: float = 30.0


#: Where a ``hooks:`` entry can run: around a migration (on its source agent), before a
#: ``start vm`` and after a ``stop vm``.
HOOK_POINTS: tuple[str, ...] = ("before-migrate", "after-migrate", "before-start", "after-stop")
#: The points that have a destination (``on: destination`` applies to these only).
MIGRATE_HOOK_POINTS: tuple[str, ...] = ("before-migrate", "after-migrate")
#: Placeholders an MQTT hook's topics may contain (replaced per call).
HOOK_TOPIC_PLACEHOLDERS: tuple[str, ...] = ("<host>", "<vm_name>", "<hook>")


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttHookSettings:
    """``hooks[N].mqtt``: a hook answered by a request/response exchange over the broker."""

    #: Published to (no wildcards); ``<host>``, ``<vm_name>`` and ``<hook>`` are replaced.
    request_topic: str
    #: Subscribed to while the hook waits (``+``/``#`` allowed); same placeholders.
    response_topic: str
    #: QoS of the request and of the response subscription.
    qos: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class HookSettings:
    """One ``hooks:`` entry: a command, an MQTT request or a built-in step around a task.

    Exactly one of ``command``, ``mqtt`` and ``builtin`` is set.
    """

    #: ``[a-z0-9][a-z0-9-]*``, at most 64 characters, unique; phase ``hook:<name>`` and
    #: time-measurement tag ``hook-<name>``.
    name: str
    #: The points it runs at (a subset of :data:`HOOK_POINTS`, in the configured order).
    when: tuple[str, ...]
    #: Which host a migrate-point hook is about (``ASYNCMIGFRA_HOST``, ``<host>``).
    on: Literal["source", "destination"] = "source"
    #: An argv tuple, or a string run with ``/bin/sh -c``.
    command: tuple[str, ...] | str | None = None
    mqtt: MqttHookSettings | None = None
    #: A step the agent implements itself; ``when`` is then fixed.
    builtin: Literal["reduce-memory"] | None = None
    #: ``reduce-memory``: the guest's memory during the migration as a percentage of its
    #: current memory (``memory: 50%``) ...
    memory_percent: float | None = None
    #: ... or in MiB (``memory: 2048``). One of the two is set for ``reduce-memory``.
    memory_mib: int | None = None
    #: s the command or the MQTT answer may take.
    timeout: float = 30.0
    #: ``fail``: a failure fails the task (``hook-failed``); ``warn``: logged and reported.
    policy: Literal["fail", "warn"] = "fail"

    def memory_target_mib(self, current_mib: float) -> int:
        """``reduce-memory``: the MiB to balloon a guest with ``current_mib`` down to (never
        more than it has now, at least 1)."""
        if self.memory_mib is not None:
            target = float(self.memory_mib)
        elif self.memory_percent is not None:
            target = current_mib * self.memory_percent / 100
        else:
            target = current_mib
        return max(1, int(min(target, current_mib)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    #: The agent's name (extensions.md "Identity"): the ``host:`` of its events, results and
    #: presence, the ``<hostname>`` of its configuration, its journal directory and the name
    #: its peers use for it.
    hostname: str = "localhost"
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    hypervisor: HypervisorSettings = field(default_factory=HypervisorSettings)
    pscom: PscomSettings = field(default_factory=PscomSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    agent: AgentSettings = field(default_factory=AgentSettings)
    migration: MigrationDefaults = field(default_factory=MigrationDefaults)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    shutdown: ShutdownSettings = field(default_factory=ShutdownSettings)
    #: ``hooks:``, in the configured order (the order they run in).
    hooks: tuple[HookSettings, ...] = ()


# --------------------------------------------------------------------------------------------
# Loading (below this line)
#
# How a file becomes a ``Settings``:
#
# 1. The text is parsed once with ruamel's safe loader (duplicate keys are an error).
# 2. The agent's name is resolved (argument, then the file's ``hostname``, then the literal
#    host level of ``communicator.subscribe-topic``, then ``gethostname()``) and every literal
#    ``<hostname>`` is replaced with it. So two agents on one machine configured only with
#    ``subscribe-topic: fast/migfra/node-a/task`` and ``.../node-b/task`` are ``node-a`` and
#    ``node-b`` everywhere, their ``id: fast-migfra-<hostname>`` included. (For every file whose
#    topics use ``<hostname>`` the name is the machine's, as in the original.)
#    The original replaced it in the *text*;
#    we replace it in every string scalar and key of the parsed tree instead, which gives the
#    same result for every file the original accepted (yaml-cpp reads all scalars as text) but
#    cannot change the YAML structure or turn a quoted id into a number when the host name
#    looks like one.
# 3. Each section is converted field by field. The wire key of a field is its name with ``_``
#    turned into ``-`` (plus the original's names in ``_RENAMED``), and its type annotation
#    drives the conversion, so a new dataclass field is configurable without touching the
#    loader; only its allowed range goes into ``_RANGES``.
#
# Leniency compared with the original (all of it documented in the example file):
# missing ``communicator``/``hypervisor`` sections and missing communicator keys get
# defaults, and ``communicator.type`` may be left out. A ``hypervisor`` section with options
# must still name its ``type``: silently falling back to the dummy back-end would make a
# misconfigured agent report success without touching a VM.

_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_HOSTNAME_PLACEHOLDER = "<hostname>"
_MAX_TOPIC_BYTES = 65535

#: Settings field -> top-level section key, where it is not the field name.
_SECTION_NAMES: dict[str, str] = {"mqtt": "communicator", "pscom": "pscom-handler"}

#: (class, field) -> wire key, where it is not the field name with ``-`` for ``_``.
_RENAMED: dict[tuple[type, str], str] = {
    (MqttSettings, "client_id"): "id",
    (MqttSettings, "task_topic"): "subscribe-topic",
    (MqttSettings, "result_topic"): "publish-topic",
}

#: Fields the generic converter leaves alone; their section code reads them.
_HANDLED_ELSEWHERE: frozenset[tuple[type, str]] = frozenset(
    {
        (MqttSettings, "password"),
        (HookSettings, "when"),
        (HookSettings, "command"),
        (HookSettings, "mqtt"),
        (HookSettings, "memory_percent"),
        (HookSettings, "memory_mib"),
    }
)

#: Extra wire keys a section accepts besides its fields.
_PASSWORD_KEYS = ("password", "password-file", "password-env")
_COMMUNICATOR_EXTRA = ("type", *_PASSWORD_KEYS)
#: Wire keys of a ``hooks:`` entry that its own code reads.
_HOOK_EXTRA = ("when", "command", "mqtt", "memory")
#: What a hook runs: exactly one of these keys.
_HOOK_KINDS = ("command", "mqtt", "builtin")
_HOOK_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]*\Z")
_HOOK_NAME_MAX = 64
_PLACEHOLDER_RE = re.compile(r"<[A-Za-z_][A-Za-z0-9_-]*>")
#: ``reduce-memory``'s default target and its smallest absolute one.
_REDUCE_MEMORY_DEFAULT_PERCENT = 50.0
_REDUCE_MEMORY_MIN_MIB = 16


@dataclass(frozen=True, slots=True)
class _Range:
    """The allowed values of one numeric field."""

    low: float | None = None
    high: float | None = None
    #: ``low`` itself is not allowed (delays must be > 0).
    low_exclusive: bool = False

    def check(self, value: float, path: str) -> None:
        """Raise ``ConfigError`` at ``path`` unless ``value`` is in range."""
        low, high = self.low, self.high
        got = _num(value)
        if low is not None and high is not None and not low <= value <= high:
            raise ConfigError(f"must be between {_num(low)} and {_num(high)}, got {got}", path=path)
        if low is not None and self.low_exclusive and value <= low:
            raise ConfigError(f"must be greater than {_num(low)}, got {got}", path=path)
        if low is not None and value < low:
            raise ConfigError(f"must be at least {_num(low)}, got {got}", path=path)
        if high is not None and value > high:
            raise ConfigError(f"must be at most {_num(high)}, got {got}", path=path)


_COUNT = _Range(low=1)
_NON_NEGATIVE = _Range(low=0)
_DELAY = _Range(low=0, low_exclusive=True)
_QOS = _Range(low=0, high=2)

#: The range of every numeric field; a test checks that none is missing.
_RANGES: dict[tuple[type, str], _Range] = {
    (MqttSettings, "port"): _Range(low=1, high=65535),
    (MqttSettings, "keepalive"): _Range(low=0, high=65535),
    (MqttSettings, "reconnect_min_delay"): _DELAY,
    (MqttSettings, "reconnect_max_delay"): _DELAY,
    (MqttSettings, "session_expiry"): _Range(low=0, high=0xFFFFFFFF),
    (MqttSettings, "progress_qos"): _QOS,
    # 0: log every takeover but never give up.
    (MqttSettings, "takeover_limit"): _NON_NEGATIVE,
    (MqttSettings, "takeover_window"): _DELAY,
    (PscomSettings, "qos"): _QOS,
    (PscomSettings, "timeout"): _DELAY,
    (PscomSettings, "ssh_port"): _Range(low=1, high=65535),
    (PscomSettings, "ssh_timeout"): _DELAY,
    (LimitsSettings, "max_concurrent_tasks"): _COUNT,
    (LimitsSettings, "max_queued_tasks"): _COUNT,
    # An MQTT packet cannot be larger than 256 MiB.
    (LimitsSettings, "max_message_size"): _Range(low=1, high=268_435_455),
    (LimitsSettings, "max_intake_bytes"): _Range(low=1),
    (LimitsSettings, "max_subtasks"): _COUNT,
    (LimitsSettings, "dedupe_window"): _DELAY,
    (LimitsSettings, "max_yaml_nodes"): _COUNT,
    (LimitsSettings, "max_yaml_depth"): _COUNT,
    (AgentSettings, "progress_interval"): _DELAY,
    (MigrationDefaults, "max_downtime"): _COUNT,
    (MigrationDefaults, "bandwidth"): _COUNT,
    (MigrationDefaults, "parallel_connections"): _COUNT,
    (MigrationDefaults, "completion_timeout_per_gib"): _DELAY,
    (MigrationDefaults, "completion_timeout_min"): _DELAY,
    (MigrationDefaults, "retry_counter"): _NON_NEGATIVE,
    (MigrationDefaults, "retry_delay"): _DELAY,
    (MigrationDefaults, "max_outgoing"): _COUNT,
    (MigrationDefaults, "max_incoming"): _COUNT,
    (MigrationDefaults, "device_timeout"): _DELAY,
    (MigrationDefaults, "swap_lock_timeout"): _DELAY,
    # 0: abort running work at once on SIGTERM.
    (ShutdownSettings, "grace_period"): _NON_NEGATIVE,
    (ShutdownSettings, "hard_exit_after"): _DELAY,
    (HookSettings, "timeout"): _DELAY,
    (MqttHookSettings, "qos"): _QOS,
}


def _protocol_alias(value: object) -> object:
    """Map the spellings people use for MQTT versions to ``"5"`` / ``"3.1.1"``.

    Unknown values are returned unchanged so the ``Literal`` check reports them.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        numbers: dict[float, str] = {5: "5", 311: "3.1.1"}
        return numbers.get(value, value)
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("mqtt").removeprefix("v")
        return {"5": "5", "5.0": "5", "311": "3.1.1", "3.1.1": "3.1.1"}.get(key, value)
    return value


#: (class, field) -> function applied to the raw value before conversion.
_NORMALIZERS: dict[tuple[type, str], Callable[[object], object]] = {
    (MqttSettings, "protocol"): _protocol_alias,
}


@dataclass(frozen=True, slots=True)
class _Context:
    """What every section converter needs besides its own map."""

    hostname: str
    #: Relative file names (``password-file``, ``tls.*``) are resolved against this.
    base_dir: Path


# --- small helpers ---------------------------------------------------------------------------


def _num(value: float) -> str:
    """A number as people write it (``1`` rather than ``1.0``)."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _show(value: object) -> str:
    """A short rendering of a bad value for an error message (never used for secrets)."""
    if value is None:
        return "nothing"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _did_you_mean(word: str, known: Collection[str]) -> str:
    """``; did you mean 'x'?`` for a near miss, else nothing.

    difflib finds typos; a shortened key (``pscom`` for ``pscom-handler``) is too far from
    its full name for difflib, so a prefix match is tried next.
    """
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    if not close and len(word) >= 3:
        close = sorted(key for key in known if key.startswith(word) or word.startswith(key))
    return f"; did you mean {close[0]!r}?" if close else ""


def _as_map(raw: object, path: str) -> dict[str, object]:
    """A section's map; ``None`` (an empty section) counts as an empty map."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a map, got {_show(raw)}", path=path)
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError("keys must be strings", path=_join(path, repr(key)))
    return raw


def _check_keys(mapping: Mapping[str, object], known: Collection[str], path: str) -> None:
    """Refuse any key that is not in ``known``: a typo must never be silently ignored."""
    for key in mapping:
        if key not in known:
            hint = _did_you_mean(key, known) or f" (known keys: {', '.join(sorted(known))})"
            raise ConfigError(f"unknown key{hint}", path=_join(path, key))


def _wire_name(cls: type, name: str) -> str:
    return _RENAMED.get((cls, name), name.replace("_", "-"))


@cache
def _field_table(cls: type) -> dict[str, tuple[str, Any]]:
    """Wire key -> (field name, resolved type) for a settings dataclass."""
    hints = get_type_hints(cls)
    return {
        _wire_name(cls, f.name): (f.name, hints[f.name])
        for f in dataclasses.fields(cls)
        if (cls, f.name) not in _HANDLED_ELSEWHERE
    }


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    if get_origin(tp) in (Union, types.UnionType):
        args = get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
    return tp, False


def _expected(tp: Any) -> str:
    """How an error message names what a field wants."""
    if tp is bool:
        return BOOL_EXPECTED
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return "a map"


# --- conversion --------------------------------------------------------------------------------


def _convert(value: object, tp: Any, path: str, ctx: _Context) -> object:
    """Check ``value`` against the annotation ``tp`` and return it in the field's type.

    Quoted numbers are accepted for numeric fields, as yaml-cpp (which reads every scalar as
    text) accepted them in original migfra.conf files. Booleans are YAML 1.2 ``true`` or
    ``false`` or any yaml-cpp spelling (``yes``, ``Off``, ``Y``: :mod:`asyncmigfra.values`),
    which YAML 1.2 loads as strings: the same words as in tasks and ``hypervisor:`` options.
    """
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"expected {_expected(inner)}, got nothing", path=path)
    if inner is bool:
        if isinstance(value, bool):
            return value
        parsed = parse_bool(value.strip()) if isinstance(value, str) else None
        if parsed is None:
            raise ConfigError(f"expected {BOOL_EXPECTED}, got {_show(value)}", path=path)
        return parsed
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INT_RE.match(value.strip()):
            return int(value)
        raise ConfigError(f"expected an integer, got {_show(value)}", path=path)
    if inner is float:
        candidate = parse_number(value) if isinstance(value, str) else value
        if (
            isinstance(candidate, int | float)
            and not isinstance(candidate, bool)
            and math.isfinite(candidate)
        ):
            return float(candidate)
        raise ConfigError(f"expected a number, got {_show(value)}", path=path)
    if inner is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"expected a string, got {_show(value)}", path=path)
    if get_origin(inner) is Literal:
        choices: tuple[str, ...] = get_args(inner)
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        hint = _did_you_mean(value.lower(), choices) if isinstance(value, str) else ""
        raise ConfigError(
            f"expected {_expected(inner)}, got {_show(value)}{hint}",
            path=path,
        )
    if get_origin(inner) is tuple:
        (item_type, _) = get_args(inner)
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {_show(value)}", path=path)
        if item_type is HostDevice:
            return tuple(_host_device(item, f"{path}[{i}]") for i, item in enumerate(value))
        return tuple(_convert(item, item_type, f"{path}[{i}]", ctx) for i, item in enumerate(value))
    if inner is TlsSettings:
        if isinstance(value, str) and parse_bool(value.strip()) is not None:
            value = parse_bool(value.strip())
        if value is False:
            return None
        return _tls({} if value is True else value, path, ctx)
    raise AssertionError(f"no converter for {tp!r} at {path}")  # pragma: no cover


_PCI_ADDRESS_RE = re.compile(
    r"(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])\Z"
)


def _pci_id(value: object, path: str) -> int:
    """A vendor or device id: hex text as ``lspci -nn`` prints it (``'8086'``), or ``0x8086``."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        text = value.strip().lower().removeprefix("0x")
        if re.fullmatch(r"[0-9a-f]{1,4}", text):
            number = int(text, 16)
    if number is None or not 0 <= number <= 0xFFFF:
        raise ConfigError(
            f"expected a PCI id as lspci prints it ('8086' or 0x8086), got {_show(value)}",
            path=path,
        )
    return number


def _host_device(raw: object, path: str) -> HostDevice:
    """``{vendor, device}`` or ``{address}``."""
    mapping = _as_map(raw, path)
    _check_keys(mapping, ["vendor", "device", "address"], path)
    if "address" in mapping:
        if len(mapping) != 1:
            raise ConfigError("an address entry has no vendor or device", path=path)
        text = mapping["address"]
        match = _PCI_ADDRESS_RE.match(text.strip()) if isinstance(text, str) else None
        if match is None or int(match.group(3), 16) > 0x1F:
            raise ConfigError(
                f"expected a PCI address [DDDD:]BB:SS.F, got {_show(text)}",
                path=_join(path, "address"),
            )
        domain, bus, slot, function = match.groups()
        address = f"{int(domain or '0', 16):04x}:{int(bus, 16):02x}:{int(slot, 16):02x}.{function}"
        return HostDevice(address=address)
    if set(mapping) != {"vendor", "device"}:
        raise ConfigError("expected {vendor, device} or {address}", path=path)
    return HostDevice(
        vendor=_pci_id(mapping["vendor"], _join(path, "vendor")),
        device=_pci_id(mapping["device"], _join(path, "device")),
    )


def _section(
    cls: type, raw: object, path: str, ctx: _Context, *, extra: Collection[str] = ()
) -> tuple[dict[str, Any], dict[str, object]]:
    """Convert one section's map into constructor kwargs for ``cls``.

    Returns the kwargs of the keys that were given (absent keys keep the dataclass default)
    and, separately, the raw values of the ``extra`` keys the caller handles itself.
    """
    mapping = _as_map(raw, path)
    table = _field_table(cls)
    _check_keys(mapping, [*table, *extra], path)
    kwargs: dict[str, Any] = {}
    extras: dict[str, object] = {}
    for key, value in mapping.items():
        if key not in table:
            extras[key] = value
            continue
        attr, tp = table[key]
        sub = _join(path, key)
        normalize = _NORMALIZERS.get((cls, attr))
        converted = _convert(normalize(value) if normalize else value, tp, sub, ctx)
        limits = _RANGES.get((cls, attr))
        if limits is not None and isinstance(converted, int | float):
            limits.check(converted, sub)
        kwargs[attr] = converted
    return kwargs, extras


def _existing_file(value: str, path: str, ctx: _Context) -> str:
    """Resolve a configured file name (``~``, relative to the config file) and require it."""
    if not value.strip():
        raise ConfigError("expected a file name, got an empty string", path=path)
    resolved = ctx.base_dir / Path(value).expanduser()
    if not resolved.is_file():
        raise ConfigError(f"file not found: {resolved}", path=path)
    return str(resolved)


def _tls(raw: object, path: str, ctx: _Context) -> TlsSettings:
    """``communicator.tls``: the files must exist now, not at the first connect attempt."""
    kwargs, _ = _section(TlsSettings, raw, path, ctx)
    for attr in ("ca_file", "cert_file", "key_file"):
        if kwargs.get(attr) is not None:
            kwargs[attr] = _existing_file(
                kwargs[attr], _join(path, _wire_name(TlsSettings, attr)), ctx
            )
    if kwargs.get("key_file") is not None and kwargs.get("cert_file") is None:
        raise ConfigError("needs cert-file as well", path=_join(path, "key-file"))
    return TlsSettings(**kwargs)


def _password(extras: Mapping[str, object], ctx: _Context) -> str | None:
    """Resolve the MQTT password from exactly one of its three sources; never echo it."""
    given = [key for key in _PASSWORD_KEYS if extras.get(key) is not None]
    if len(given) > 1:
        raise ConfigError(
            f"set only one of {', '.join(_PASSWORD_KEYS)} (got {', '.join(given)})",
            path="communicator",
        )
    if not given:
        return None
    key = given[0]
    path = f"communicator.{key}"
    value = extras[key]
    if key == "password":
        if not isinstance(value, str):
            raise ConfigError("expected a string", path=path)
        return value
    if not isinstance(value, str):
        raise ConfigError(f"expected a string, got {_show(value)}", path=path)
    if key == "password-env":
        secret = os.environ.get(value)
        if secret is None:
            raise ConfigError(f"environment variable {value!r} is not set", path=path)
        if not secret:
            raise ConfigError(f"environment variable {value!r} is empty", path=path)
        return secret
    name = _existing_file(value, path, ctx)
    try:
        secret = Path(name).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {name}: {type(exc).__name__}", path=path) from None
    if not secret:
        raise ConfigError(f"{name} is empty", path=path)
    return secret


# --- topics ------------------------------------------------------------------------------------


def _sibling_topic(task_topic: str, leaf: str) -> str:
    """``a/b/task`` -> ``a/b/<leaf>``; a topic without ``/`` gets ``/<leaf>`` appended."""
    head, slash, _ = task_topic.rpartition("/")
    return f"{head}/{leaf}" if slash else f"{task_topic}/{leaf}"


def _check_topic_name(topic: str, path: str) -> None:
    """A topic the agent publishes to or subscribes to exactly: no wildcards."""
    if not topic:
        raise ConfigError("must not be empty", path=path)
    if "+" in topic or "#" in topic:
        raise ConfigError(f"must not contain the wildcards '+' or '#': {topic!r}", path=path)
    if "\0" in topic:
        raise ConfigError("must not contain NUL", path=path)
    if len(topic.encode("utf-8")) > _MAX_TOPIC_BYTES:
        raise ConfigError("is longer than MQTT allows (65535 bytes)", path=path)


def _check_topic_filter(topic: str, path: str) -> None:
    """A subscription filter: ``+`` and ``#`` only as whole levels, ``#`` only last."""
    if not topic:
        raise ConfigError("must not be empty", path=path)
    levels = topic.split("/")
    for index, level in enumerate(levels):
        if ("+" in level or "#" in level) and level not in {"+", "#"}:
            raise ConfigError(f"a wildcard must fill a whole level: {topic!r}", path=path)
        if level == "#" and index != len(levels) - 1:
            raise ConfigError(f"'#' must be the last level: {topic!r}", path=path)
    if "\0" in topic:
        raise ConfigError("must not contain NUL", path=path)


# --- sections ----------------------------------------------------------------------------------


def _mqtt(raw: object, ctx: _Context) -> MqttSettings:
    """``communicator``: fill what the original required from the host name, then check."""
    kwargs, extras = _section(MqttSettings, raw, "communicator", ctx, extra=_COMMUNICATOR_EXTRA)
    if "type" in extras and extras["type"] != "mqtt":
        raise ConfigError(
            f"expected 'mqtt' (the only communicator), got {_show(extras['type'])}",
            path="communicator.type",
        )
    name = ctx.hostname
    kwargs.setdefault("client_id", f"fast-migfra-{name}")
    kwargs.setdefault("task_topic", f"fast/migfra/{name}/task")
    kwargs.setdefault("result_topic", f"fast/migfra/{name}/result")
    kwargs.setdefault("event_topic", _sibling_topic(kwargs["task_topic"], "event"))
    kwargs.setdefault("status_topic", _sibling_topic(kwargs["task_topic"], "status"))
    settings = MqttSettings(**kwargs, password=_password(extras, ctx))

    def where(attr: str) -> str:
        return f"communicator.{_wire_name(MqttSettings, attr)}"

    for attr in ("host", "client_id"):
        if not getattr(settings, attr).strip():
            raise ConfigError("must not be empty", path=where(attr))
    seen: dict[str, str] = {}
    for attr in ("task_topic", "result_topic", "event_topic", "status_topic"):
        topic: str = getattr(settings, attr)
        _check_topic_name(topic, where(attr))
        if topic in seen:
            raise ConfigError(
                f"must differ from {_wire_name(MqttSettings, seen[topic])} ({topic!r})",
                path=where(attr),
            )
        seen[topic] = attr
    if settings.reconnect_max_delay < settings.reconnect_min_delay:
        raise ConfigError(
            f"must be at least reconnect-min-delay ({_num(settings.reconnect_min_delay)})",
            path=where("reconnect_max_delay"),
        )
    if settings.password is not None and settings.username is None and settings.protocol != "5":
        raise ConfigError(
            "required when a password is set and the protocol is 3.1.1",
            path="communicator.username",
        )
    return settings


def _hypervisor(raw: object) -> HypervisorSettings:
    """``hypervisor``: only the shape is checked; the back-end's factory checks its options."""
    mapping = _as_map(raw, "hypervisor")
    if not mapping:
        return HypervisorSettings()
    if "type" not in mapping:
        raise ConfigError(
            "missing: name the back-end (libvirt, dummy, fake, ...)", path="hypervisor.type"
        )
    kind = mapping["type"]
    if not isinstance(kind, str) or not kind.strip():
        raise ConfigError(f"expected a back-end name, got {_show(kind)}", path="hypervisor.type")
    options = {key: value for key, value in mapping.items() if key != "type"}
    defaults = HypervisorSettings()
    named: dict[str, str] = {}
    for key in ("driver", "transport"):
        value = options.get(key, getattr(defaults, key))
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(
                f"expected a non-empty string, got {_show(value)}", path=f"hypervisor.{key}"
            )
        named[key] = value
    return HypervisorSettings(type=kind, options=options, **named)


def _pscom(raw: object, ctx: _Context) -> PscomSettings:
    """``pscom-handler``: the request topic is published to, the response topic subscribed."""
    kwargs, _ = _section(PscomSettings, raw, "pscom-handler", ctx)
    settings = PscomSettings(**kwargs)
    _check_topic_name(settings.request_topic, "pscom-handler.request-topic")
    _check_topic_filter(settings.response_topic, "pscom-handler.response-topic")
    return settings


def _hook_when(raw: object, path: str) -> tuple[str, ...]:
    """``when``: one point or a non-empty list of them, duplicates dropped, order kept."""
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise ConfigError(
            f"expected one or a list of {', '.join(HOOK_POINTS)}, got {_show(raw)}", path=path
        )
    points: list[str] = []
    for index, item in enumerate(items):
        where = f"{path}[{index}]" if isinstance(raw, list) else path
        point = item.strip().lower() if isinstance(item, str) else item
        if point not in HOOK_POINTS:
            hint = _did_you_mean(point, HOOK_POINTS) if isinstance(point, str) else ""
            raise ConfigError(
                f"expected one of {', '.join(HOOK_POINTS)}, got {_show(item)}{hint}", path=where
            )
        assert isinstance(point, str)
        if point not in points:
            points.append(point)
    return tuple(points)


def _hook_command(raw: object, path: str) -> tuple[str, ...] | str:
    """``command``: a non-empty argv list (integers become text) or a shell command line."""
    if isinstance(raw, str):
        if not raw.strip():
            raise ConfigError("must not be empty", path=path)
        if "\0" in raw:
            raise ConfigError("must not contain NUL", path=path)
        return raw
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            f"expected a non-empty list (argv) or a string (run with /bin/sh -c), got {_show(raw)}",
            path=path,
        )
    argv: list[str] = []
    for index, item in enumerate(raw):
        where = f"{path}[{index}]"
        word = str(item) if isinstance(item, int) and not isinstance(item, bool) else item
        if not isinstance(word, str):
            raise ConfigError(f"expected a string, got {_show(item)}", path=where)
        if "\0" in word:
            raise ConfigError("must not contain NUL", path=where)
        argv.append(word)
    if not argv[0].strip():
        raise ConfigError("the program name must not be empty", path=f"{path}[0]")
    return tuple(argv)


def _check_hook_placeholders(topic: str, path: str) -> None:
    """Only ``<host>``, ``<vm_name>`` and ``<hook>`` are replaced: any other ``<...>`` is a
    typo that would otherwise end up in the topic literally."""
    for match in _PLACEHOLDER_RE.finditer(topic):
        word = match.group(0)
        if word not in HOOK_TOPIC_PLACEHOLDERS:
            hint = _did_you_mean(word, HOOK_TOPIC_PLACEHOLDERS) or (
                f" (known: {', '.join(HOOK_TOPIC_PLACEHOLDERS)})"
            )
            raise ConfigError(f"unknown placeholder {word!r}{hint}", path=path)


def _hook_mqtt(raw: object, path: str, ctx: _Context) -> MqttHookSettings:
    """``mqtt``: both topics are required; the request topic is published to exactly."""
    kwargs, _ = _section(MqttHookSettings, raw, path, ctx)
    for attr in ("request_topic", "response_topic"):
        if attr not in kwargs:
            raise ConfigError("missing", path=_join(path, _wire_name(MqttHookSettings, attr)))
    settings = MqttHookSettings(**kwargs)
    request_path = _join(path, "request-topic")
    response_path = _join(path, "response-topic")
    _check_topic_name(settings.request_topic, request_path)
    _check_topic_filter(settings.response_topic, response_path)
    _check_hook_placeholders(settings.request_topic, request_path)
    _check_hook_placeholders(settings.response_topic, response_path)
    return settings


def _hook_memory(raw: object, path: str) -> dict[str, Any]:
    """``memory``: ``"N%"`` of the current memory (1..100) or MiB as an integer (>= 16)."""
    if isinstance(raw, str) and raw.strip().endswith("%"):
        number = raw.strip()[:-1].strip()
        percent = parse_number(number)
        if percent is None:
            raise ConfigError(f"expected N% or MiB, got {_show(raw)}", path=path)
        if not 1 <= percent <= 100:
            raise ConfigError(f"must be between 1% and 100%, got {_num(percent)}%", path=path)
        return {"memory_percent": percent}
    if isinstance(raw, str) and _INT_RE.match(raw.strip()):
        raw = int(raw)
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise ConfigError(
            f"expected a percentage (50%) or MiB as an integer, got {_show(raw)}", path=path
        )
    if raw < _REDUCE_MEMORY_MIN_MIB:
        raise ConfigError(f"must be at least {_REDUCE_MEMORY_MIN_MIB} MiB, got {raw}", path=path)
    return {"memory_mib": raw}


def _hook(raw: object, path: str, ctx: _Context) -> HookSettings:
    """One ``hooks:`` entry."""
    kwargs, extras = _section(HookSettings, raw, path, ctx, extra=_HOOK_EXTRA)
    mapping = _as_map(raw, path)
    kinds = [key for key in _HOOK_KINDS if mapping.get(key) is not None]
    if len(kinds) != 1:
        got = ", ".join(kinds) if kinds else "none"
        raise ConfigError(f"set exactly one of {', '.join(_HOOK_KINDS)} (got {got})", path=path)
    name = kwargs.get("name")
    if name is None:
        raise ConfigError("missing", path=_join(path, "name"))
    if not _HOOK_NAME_RE.match(name) or len(name) > _HOOK_NAME_MAX:
        raise ConfigError(
            f"expected lower-case letters, digits and '-' (not first), at most "
            f"{_HOOK_NAME_MAX} characters, got {_show(name)}",
            path=_join(path, "name"),
        )
    when_path = _join(path, "when")
    if kinds[0] == "builtin":
        fixed = MIGRATE_HOOK_POINTS
        if extras.get("when") is not None:
            when = _hook_when(extras["when"], when_path)
            if set(when) != set(fixed):
                raise ConfigError(
                    f"{kwargs['builtin']} always runs at {' and '.join(fixed)}; leave `when` out",
                    path=when_path,
                )
        kwargs["when"] = fixed
        if kwargs.get("on") == "destination":
            raise ConfigError(
                f"{kwargs['builtin']} chooses its hosts itself; leave `on` out",
                path=_join(path, "on"),
            )
        memory = extras.get("memory")
        if memory is None:
            kwargs["memory_percent"] = _REDUCE_MEMORY_DEFAULT_PERCENT
        else:
            kwargs.update(_hook_memory(memory, _join(path, "memory")))
    else:
        if "memory" in extras:
            raise ConfigError("only for builtin: reduce-memory", path=_join(path, "memory"))
        if extras.get("when") is None:
            raise ConfigError(f"missing: one or more of {', '.join(HOOK_POINTS)}", path=when_path)
        kwargs["when"] = _hook_when(extras["when"], when_path)
        if kwargs.get("on") == "destination":
            others = [point for point in kwargs["when"] if point not in MIGRATE_HOOK_POINTS]
            if others:
                raise ConfigError(
                    f"destination applies to {' and '.join(MIGRATE_HOOK_POINTS)} only, not to "
                    f"{', '.join(others)} (configure a separate hook for those)",
                    path=_join(path, "on"),
                )
        if kinds[0] == "command":
            kwargs["command"] = _hook_command(extras["command"], _join(path, "command"))
        else:
            kwargs["mqtt"] = _hook_mqtt(extras["mqtt"], _join(path, "mqtt"), ctx)
    return HookSettings(**kwargs)


def _hooks(raw: object, ctx: _Context) -> tuple[HookSettings, ...]:
    """``hooks``: a list of hooks, unique by name, at most one of each builtin."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"expected a list of hooks, got {_show(raw)}", path="hooks")
    hooks: list[HookSettings] = []
    names: dict[str, int] = {}
    builtins: dict[str, int] = {}
    for index, item in enumerate(raw):
        path = f"hooks[{index}]"
        hook = _hook(item, path, ctx)
        if hook.name in names:
            raise ConfigError(
                f"{hook.name!r} is already the name of hooks[{names[hook.name]}]",
                path=f"{path}.name",
            )
        names[hook.name] = index
        if hook.builtin is not None:
            if hook.builtin in builtins:
                raise ConfigError(
                    f"{hook.builtin} is already configured by hooks[{builtins[hook.builtin]}]",
                    path=f"{path}.builtin",
                )
            builtins[hook.builtin] = index
        hooks.append(hook)
    return tuple(hooks)


def _settings(tree: Mapping[str, object], ctx: _Context) -> Settings:
    """Build every section; the tree's top-level keys are already checked."""

    def plain(cls: type, section: str) -> dict[str, Any]:
        return _section(cls, tree.get(section), section, ctx)[0]

    return Settings(
        hostname=ctx.hostname,
        mqtt=_mqtt(tree.get("communicator"), ctx),
        hypervisor=_hypervisor(tree.get("hypervisor")),
        pscom=_pscom(tree.get("pscom-handler"), ctx),
        limits=LimitsSettings(**plain(LimitsSettings, "limits")),
        agent=_agent(plain(AgentSettings, "agent")),
        migration=MigrationDefaults(**plain(MigrationDefaults, "migration")),
        logging=LoggingSettings(**plain(LoggingSettings, "logging")),
        shutdown=ShutdownSettings(**plain(ShutdownSettings, "shutdown")),
        hooks=_hooks(tree.get("hooks"), ctx),
    )


def _agent(kwargs: dict[str, Any]) -> AgentSettings:
    for i, directory in enumerate(kwargs.get("xml_allowed_paths") or ()):
        if not directory.startswith("/") or "\0" in directory:
            raise ConfigError(
                f"expected an absolute directory, got {_show(directory)}",
                path=f"agent.xml-allowed-paths[{i}]",
            )
    for key in ("allowed_drivers", "allowed_transports"):
        for i, word in enumerate(kwargs.get(key) or ()):
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", word):
                raise ConfigError(
                    f"expected a driver or transport name, got {_show(word)}",
                    path=f"agent.{key.replace('_', '-')}[{i}]",
                )
    return AgentSettings(**kwargs)


def _top_level_keys() -> dict[str, str]:
    """Top-level wire key -> ``Settings`` field."""
    return {
        _SECTION_NAMES.get(f.name, f.name.replace("_", "-")): f.name
        for f in dataclasses.fields(Settings)
    }


# --- hostname ----------------------------------------------------------------------------------


def _check_hostname(name: str, origin: str) -> str:
    """The agent's name goes into topics and client ids: keep it to host-name characters."""
    if not _HOSTNAME_RE.match(name) or len(name) > 255:
        raise ConfigError(
            f"{origin} {_show(name)} cannot name this agent: use letters, digits, '.', '-' and"
            " '_' (it becomes part of MQTT topics)",
            path="hostname",
        )
    return name


def _name_from_topic(task_topic: object) -> str | None:
    """The host level of a task topic shaped ``<prefix>/<name>/task`` with a literal name
    (``fast/migfra/node-a/task`` gives ``node-a``); ``None`` for any other shape, or when
    that level is ``<hostname>`` or could not name an agent."""
    if not isinstance(task_topic, str):
        return None
    levels = task_topic.split("/")
    if len(levels) < 3 or levels[-1] != "task" or not any(levels[:-2]):
        return None
    name = levels[-2]
    if _HOSTNAME_PLACEHOLDER in name or not _HOSTNAME_RE.match(name) or len(name) > 255:
        return None
    return name


def _resolve_hostname(argument: str | None, tree: Mapping[str, object]) -> str:
    """The agent's name (extensions.md "Identity"): ``--hostname``, else the file's
    ``hostname:``, else the task topic's host level (``communicator.subscribe-topic``
    shaped ``<prefix>/<name>/task``), else ``socket.gethostname()``."""
    from_file = tree.get("hostname")
    file_name: str | None = None
    if from_file is not None:
        if not isinstance(from_file, str):
            raise ConfigError(f"expected a string, got {_show(from_file)}", path="hostname")
        file_name = _check_hostname(from_file, "the configured name")
    if argument is not None:
        return _check_hostname(argument, "the --hostname")
    if file_name is not None:
        return file_name
    communicator = tree.get("communicator")
    if isinstance(communicator, Mapping):
        from_topic = _name_from_topic(communicator.get("subscribe-topic"))
        if from_topic is not None:
            return from_topic
    return _check_hostname(
        socket.gethostname(), "the machine's host name (set hostname: or --hostname)"
    )


def _substitute(node: object, hostname: str) -> object:
    """Replace ``<hostname>`` in every string key and value; ``<vm_name>`` stays literal."""
    if isinstance(node, str):
        return node.replace(_HOSTNAME_PLACEHOLDER, hostname)
    if isinstance(node, dict):
        return {
            _substitute(key, hostname): _substitute(value, hostname) for key, value in node.items()
        }
    if isinstance(node, list):
        return [_substitute(item, hostname) for item in node]
    return node


# --- parsing -----------------------------------------------------------------------------------


def _parse_yaml(text: str, source: str) -> object:
    """One YAML document with ruamel's safe loader; errors name the line and column.

    The parser's own message quotes the offending line, and a duplicate-key message quotes
    both values. Either may be a password, so the message is rebuilt from the problem and the
    position only, and the parser's exception is not chained.
    """
    yaml = YAML(typ="safe")
    yaml.allow_duplicate_keys = False
    try:
        return yaml.load(text)
    except DuplicateKeyError as exc:
        key = re.match(r'found duplicate key "(.*?)" with value', exc.problem or "")
        what = f"duplicate key {key.group(1)!r}" if key else "duplicate key"
        raise ConfigError(f"{source}: {_position(exc)}{what}") from None
    except MarkedYAMLError as exc:
        problem = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        raise ConfigError(f"{source}: {_position(exc)}{problem}{context}") from None
    except YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{source}: invalid YAML: {detail}") from None


def _position(exc: MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    if mark is None:
        return ""
    return f"line {mark.line + 1}, column {mark.column + 1}: "


# --- public API --------------------------------------------------------------------------------


def settings_from_text(
    text: str,
    *,
    hostname: str | None = None,
    source: str = "<string>",
    base_dir: str | os.PathLike[str] | None = None,
) -> Settings:
    """Parse a configuration document.

    Args:
        text: The YAML text (the original migfra.conf and the extended format alike).
        hostname: ``--hostname``; wins over the file's ``hostname:`` and the machine's name.
        source: Names the document in file-level error messages.
        base_dir: Relative ``password-file`` and ``tls`` file names are resolved against it
            (default: the current directory).

    Raises:
        ConfigError: a syntax error (with line and column), or a bad or unknown key (with its
            key path).
    """
    document = _parse_yaml(text, source)
    if document is not None and not isinstance(document, dict):
        raise ConfigError(f"{source}: the top level must be a map, got {_show(document)}")
    tree = _as_map(document, "")
    top = _top_level_keys()
    _check_keys(tree, top, "")
    name = _resolve_hostname(hostname, tree)
    substituted = _substitute(tree, name)
    assert isinstance(substituted, dict)
    directory = Path(base_dir) if base_dir is not None else Path()
    ctx = _Context(hostname=name, base_dir=directory.expanduser().absolute())
    return _settings(substituted, ctx)


def load_settings(path: str | os.PathLike[str] | None, *, hostname: str | None = None) -> Settings:
    """Read the configuration file at ``path``; ``None`` means the built-in defaults.

    Unlike the original, which started with an empty configuration and exited 0, a missing
    file is a :class:`ConfigError` (the CLI exits 2). Relative file names inside the file are
    resolved against the file's directory, so the result does not depend on the working
    directory the agent was started from.
    """
    if path is None:
        return default_settings(hostname=hostname)
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: configuration file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from exc
    return settings_from_text(text, hostname=hostname, source=str(file), base_dir=file.parent)


def default_settings(*, hostname: str | None = None, **overrides: object) -> Settings:
    """The settings of an empty configuration file, for the demo and for tests.

    ``overrides`` replace whole sections by ``Settings`` field name (``mqtt=``,
    ``hypervisor=``, ...): either a section instance, used as is, or a mapping of field names
    applied to that section's defaults (``mqtt={"port": 1884}`` keeps the host-name topics).
    Overrides are trusted code, not configuration, and are not validated.

    Raises:
        ConfigError: the host name cannot be used.
        TypeError: an unknown section or field name.
    """
    settings = settings_from_text("", hostname=hostname, source="<defaults>")
    changes: dict[str, Any] = {}
    for section, value in overrides.items():
        if section not in {f.name for f in dataclasses.fields(Settings)}:
            raise TypeError(f"default_settings() got an unexpected section {section!r}")
        current = getattr(settings, section)
        if isinstance(value, type(current)):
            changes[section] = value
        elif isinstance(value, Mapping):
            changes[section] = dataclasses.replace(current, **value)
        else:
            raise TypeError(
                f"{section}= must be a {type(current).__name__} or a mapping, got {value!r}"
            )
    return dataclasses.replace(settings, **changes)
