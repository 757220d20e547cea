"""The configuration's frozen dataclasses, grouped by subject, and the hook point names.

Every field's type annotation drives its conversion in :mod:`asyncmigfra.settings.schema`, so a
new field is configurable without touching the loader.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from asyncmigfra.streamoptions import CompressionMethod


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
    #: QoS of ``progress`` events.
    progress_qos: int = 0
    #: QoS of every other event (``accepted``, ``phase``, ``done`` ...).
    event_qos: int = 1
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
    #: s the history (``task: history``, kept in the journal) keeps a finished subtask.
    history_retention: float = 30 * 86400.0
    #: History entries kept at most (the oldest go first); 0: no history is kept.
    history_max_entries: int = 100_000
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

    migration_type: Literal["live", "warm", "offline", "post-copy", "auto"] = "warm"
    #: ms; ``None``: the hypervisor's default.
    max_downtime: int | None = None
    #: MiB/s; ``None``: unlimited.
    bandwidth: int | None = None
    auto_converge: bool = False
    compressed: bool = False
    parallel_connections: int = 1
    #: s per GiB of guest memory plus the disks a storage copy moves.
    completion_timeout_per_gib: float = 150.0
    #: s
    completion_timeout_min: float = 120.0
    timeout_action: Literal["abort", "post-copy", "suspend"] = "abort"
    persist: bool = True
    retry_counter: int = 0
    #: s before the first retry (doubles each time).
    retry_delay: float = 2.0
    #: s the agent keeps trying to resume a post-copy migration whose connection broke
    #: after the switch; 0: no recovery (the task fails at once).
    postcopy_recovery_window: float = 300.0
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
    #: ``copy-storage`` of a migration that names none: ``none`` (shared storage), ``all``
    #: (copy whole images of the non-shared disks) or ``inc`` (only their top layer).
    copy_storage: Literal["none", "all", "inc"] = "none"
    #: ``copy-storage-synchronous-writes`` of a migration that copies storage and names none.
    copy_storage_synchronous_writes: bool = False
    #: s a migration may move no data before ``timeout-action`` applies; 0: off.
    progress_timeout: float = 150.0
    #: ``compression`` of a migration that names none (``()``: none).
    compression: tuple[CompressionMethod, ...] = ()
    #: ``compression-level`` (zlib 0-9, zstd 0-20), with the configured ``compression`` only.
    compression_level: int | None = None
    #: MiB, a power of two; with the configured ``compression`` only.
    xbzrle_cache: int | None = None
    zerocopy: bool = False
    #: MiB/s once in post-copy; ``None``: unlimited.
    postcopy_bandwidth: int | None = None
    #: Percent (1-99); needs ``auto-converge``.
    auto_converge_initial: int | None = None
    auto_converge_increment: int | None = None
    #: MiB/s a migration is predicted to get from a destination's link until the agent has
    #: learned that link's rate from its own migrations (1 GbE, the smallest usual network).
    link_rate: float = 110.0
    #: ``migration-type: auto`` may choose post-copy when pre-copy is predicted not to finish.
    allow_post_copy: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggingSettings:
    """``logging``."""

    #: ``auto``: console on a TTY, JSON otherwise.
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsSettings:
    """``metrics``: the Prometheus exposition (docs/operations.md "Metrics")."""

    #: ``host:port`` (``[v6-address]:port``) of ``/metrics``; ``None``: off.
    listen: str | None = None

    def address(self) -> tuple[str, int] | None:
        """``listen`` as (host, port); ``None`` when off. The loader checked its shape."""
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.removeprefix("[").removesuffix("]"), int(port)


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
    #: ``metrics``: the Prometheus exposition (off unless ``metrics.listen`` is set).
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
