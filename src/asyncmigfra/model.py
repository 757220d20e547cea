"""Typed tasks and results: the values that flow between the layers.

A task message (one MQTT payload) becomes a :class:`TaskMessage` holding one or more
subtasks (``StartSpec`` per ``vm-configurations`` item, ``StopSpec`` per ``list`` item, one
``MigrateSpec`` for ``migrate vm``, ...). The field names follow the wire keys with ``-``
turned into ``_``; ``None`` means "not given" wherever the wire key is optional and the
default comes from the agent's configuration.

Results keep the original's shape (protocol §4, §9.5): :class:`ResultEntry` per subtask, collected
into one :class:`ResultMessage` per task message.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal, NewType

from asyncmigfra.streamoptions import CompressionMethod

__all__ = [
    "EvacuateSpec",
    "HistorySpec",
    "Ivshmem",
    "MigrateSpec",
    "MigrationParams",
    "PciAddress",
    "PciId",
    "PlanEvacuationSpec",
    "PlanMigrationSpec",
    "QuitSpec",
    "RepinSpec",
    "ResultEntry",
    "ResultMessage",
    "ResumeSpec",
    "StartSpec",
    "StatusSpec",
    "StopSpec",
    "Subtask",
    "SuspendSpec",
    "SwapWith",
    "TaskId",
    "TaskKind",
    "TaskMessage",
    "CancelSpec",
    "TuneSpec",
    "VcpuMap",
    "VmName",
    "VmSubtask",
]

TaskId = NewType("TaskId", str)
VmName = NewType("VmName", str)

#: ``vcpu-map``: index = vCPU number, inner tuple = the host CPUs it may run on.
VcpuMap = tuple[tuple[int, ...], ...]


class TaskKind(enum.StrEnum):
    """The ``task:`` values, and the ``result:`` name each one answers with."""

    START = "start vm"
    STOP = "stop vm"
    SUSPEND = "suspend vm"
    RESUME = "resume vm"
    MIGRATE = "migrate vm"
    EVACUATE = "evacuate node"
    REPIN = "repin vm"
    QUIT = "quit"
    STATUS = "status"
    CANCEL = "cancel"
    TUNE = "tune migration"
    PLAN_MIGRATION = "plan migration"
    PLAN_EVACUATION = "plan evacuation"
    HISTORY = "history"

    @property
    def result_name(self) -> str:
        return _RESULT_NAMES[self]


_RESULT_NAMES: dict[TaskKind, str] = {
    TaskKind.START: "vm started",
    TaskKind.STOP: "vm stopped",
    TaskKind.SUSPEND: "vm suspended",
    TaskKind.RESUME: "vm resumed",
    TaskKind.MIGRATE: "vm migrated",
    TaskKind.EVACUATE: "node evacuated",
    TaskKind.REPIN: "vm repinned",
    TaskKind.QUIT: "quit",
    TaskKind.STATUS: "status",
    TaskKind.CANCEL: "cancelled",
    TaskKind.TUNE: "tuned",
    TaskKind.PLAN_MIGRATION: "plan",
    TaskKind.PLAN_EVACUATION: "plan",
    TaskKind.HISTORY: "history",
}


# --------------------------------------------------------------------------------------------
# Subtasks


@dataclass(frozen=True, slots=True, kw_only=True)
class Subtask:
    """Keys every subtask has (docs/protocol.md §3.1)."""

    time_measurement: bool = False
    concurrent_execution: bool = True
    #: libvirt driver (``qemu``, ``lxctools``); ``None``: the configured default.
    driver: str | None = None

    @property
    def lane(self) -> str | None:
        """The VM this subtask serialises on (``None``: no per-VM ordering needed)."""
        return None

    @property
    def result_name(self) -> str:
        """The ``vm-name`` its result entry carries."""
        return "n/a"


@dataclass(frozen=True, slots=True)
class PciId:
    vendor: int
    device: int


@dataclass(frozen=True, slots=True)
class PciAddress:
    domain: int
    bus: int
    slot: int
    function: int

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"


@dataclass(frozen=True, slots=True)
class Ivshmem:
    id: str
    size: str
    path: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StartSpec(Subtask):
    #: The resolved name: ``vm-name``, else the ``<name>`` in ``xml``, else ``""``.
    vm_name: str
    #: Set when the name could not be resolved (the subtask then fails with it).
    name_error: str | None = None
    xml: str | None = None
    vcpus: int | None = None
    #: KiB.
    memory: int | None = None
    transient: bool = False
    pci_ids: tuple[PciId, ...] = ()
    devs: tuple[PciAddress, ...] = ()
    ivshmem: Ivshmem | None = None
    probe_with_ssh: bool = True
    probe_hostname: str | None = None
    vcpu_map: VcpuMap | None = None
    memnode_map: VcpuMap | None = None

    @property
    def lane(self) -> str | None:
        return self.vm_name or None

    @property
    def result_name(self) -> str:
        return self.vm_name


@dataclass(frozen=True, slots=True, kw_only=True)
class StopSpec(Subtask):
    vm_name: str | None = None
    #: ECMAScript-style regex, full-matched against the names of active domains.
    regex: str | None = None
    force: bool = False
    undefine: bool = False
    #: New: destroy when the graceful shutdown does not finish within ``stop-timeout``.
    force_after_timeout: bool = False

    @property
    def lane(self) -> str | None:
        return self.vm_name

    @property
    def result_name(self) -> str:
        return self.vm_name if self.vm_name is not None else (self.regex or "")


@dataclass(frozen=True, slots=True, kw_only=True)
class VmSubtask(Subtask):
    """A subtask on one named VM: it serialises on that VM's lane and its entry names it."""

    vm_name: str

    @property
    def lane(self) -> str | None:
        return self.vm_name

    @property
    def result_name(self) -> str:
        return self.vm_name


@dataclass(frozen=True, slots=True, kw_only=True)
class SuspendSpec(VmSubtask):
    """``suspend vm``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumeSpec(VmSubtask):
    """``resume vm``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RepinSpec(VmSubtask):
    vcpu_map: VcpuMap


#: ``auto``: the agent predicts and chooses ``live`` or ``post-copy``, or refuses
#: (``will-not-converge``); see ``migration.forecast``.
MigrationType = Literal["live", "warm", "offline", "post-copy", "auto"]
TimeoutAction = Literal["abort", "post-copy", "suspend"]
#: ``copy-storage``: copy no disk, whole images, or only the top layer of each.
CopyStorage = Literal["none", "all", "inc"]
#: ``pscom-hook-procs``: a count, or ``"auto"`` (ask the guest).
PscomProcs = int | Literal["auto"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SwapWith:
    vm_name: str
    pscom_hook_procs: PscomProcs | None = None
    vcpu_map: VcpuMap | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationParams:
    """``parameter:`` of ``migrate vm`` (and of ``evacuate node``). ``None``: config default."""

    #: ``None``: the agent's ``migration.migration-type`` (default ``warm``, as the original).
    migration_type: MigrationType | None = None
    rdma_migration: bool = False
    pscom_hook_procs: PscomProcs | None = None
    transport: str | None = None
    vcpu_map: VcpuMap | None = None
    #: ``retry-counter`` / the original's ``retry_counter``.
    retry_counter: int | None = None
    swap_with: SwapWith | None = None
    #: ms
    max_downtime: int | None = None
    #: MiB/s
    bandwidth: int | None = None
    auto_converge: bool | None = None
    compressed: bool | None = None
    parallel_connections: int | None = None
    #: s
    completion_timeout: float | None = None
    timeout_action: TimeoutAction | None = None
    persist: bool | None = None
    tls: bool | None = None
    #: ``copy-storage``: copy the non-shared disks (``all``: whole images, ``inc``: the top
    #: layer only, the destination has the backing images).
    copy_storage: CopyStorage | None = None
    #: ``migrate-disks``: the target devs to copy (``vda``, ...); ``()``: given empty, which
    #: like ``None`` means every writable, non-shared disk (libvirt's default).
    migrate_disks: tuple[str, ...] | None = None
    #: ``copy-storage-synchronous-writes``: the guest's disk writes go to both sides.
    synchronous_writes: bool | None = None
    #: s without data moving before ``timeout-action`` applies; 0: off.
    progress_timeout: float | None = None
    #: ``compression``: the methods (``()``: given empty, none, whatever the config says).
    compression: tuple[CompressionMethod, ...] | None = None
    #: Level of the ``zlib`` or ``zstd`` method.
    compression_level: int | None = None
    #: MiB
    xbzrle_cache: int | None = None
    zerocopy: bool | None = None
    #: MiB/s once in post-copy; 0: unlimited.
    postcopy_bandwidth: int | None = None
    #: Percent.
    auto_converge_initial: int | None = None
    auto_converge_increment: int | None = None
    #: The host name the destination's TLS certificate must carry.
    tls_destination: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrateSpec(VmSubtask):
    destination: str
    parameter: MigrationParams = field(default_factory=MigrationParams)


EvacuateMode = Literal["auto", "compact", "scatter"]
#: ``placement``: in placement order, ``max-parallel`` at once; ``predicted``: in waves
#: planned from predictions (protocol §3.7).
EvacuationSchedule = Literal["placement", "predicted"]


@dataclass(frozen=True, slots=True, kw_only=True)
class EvacuateSpec(Subtask):
    destinations: tuple[str, ...]
    mode: EvacuateMode = "auto"
    overbooking: bool = True
    parameter: MigrationParams = field(default_factory=MigrationParams)
    #: Outgoing migrations at once; ``None``: config default.
    max_parallel: int | None = None
    schedule: EvacuationSchedule = "placement"


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanMigrationSpec(Subtask):
    """``plan migration``: predict the ``migrate vm`` with the same keys; change nothing.

    It takes no VM lane (see ``tasks.dispatching.planning``): a plan answers at once, even
    while a migration of the same VM runs or waits."""

    migration: MigrateSpec

    @property
    def result_name(self) -> str:
        return self.migration.vm_name


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanEvacuationSpec(Subtask):
    """``plan evacuation``: place and predict the ``evacuate node`` with the same keys."""

    evacuation: EvacuateSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class QuitSpec(Subtask):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusSpec(Subtask):
    pass


#: The most entries one ``history`` task may ask for (its ``limit``), and its default.
HISTORY_LIMIT_MAX = 1000
HISTORY_LIMIT_DEFAULT = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class HistorySpec(Subtask):
    """``history``: what this agent did, from its journal, newest first (protocol §3.15)."""

    #: Only this VM's entries; ``None``: every VM's.
    vm_name: str | None = None
    #: Only subtasks started at or after this time (s since the epoch); ``None``: all kept.
    since: float | None = None
    #: Entries at most (1 to ``HISTORY_LIMIT_MAX``).
    limit: int = HISTORY_LIMIT_DEFAULT


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelSpec(Subtask):
    #: The ``id`` of the task to cancel.
    target: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TuneSpec(Subtask):
    """``tune migration``: change a running migration (protocol §3.11)."""

    #: The ``id`` of the ``migrate vm`` or ``evacuate node`` task to change.
    target: str
    #: Only this VM of the target (an evacuation's or a swap's); ``None``: every VM whose
    #: migration job runs.
    vm_name: str | None = None
    #: MiB/s; 0: unlimited.
    bandwidth: int | None = None
    #: ms
    max_downtime: int | None = None
    #: Switch to post-copy now.
    post_copy: bool = False
    #: Pause the guest on the source so the copy finishes now.
    force_complete: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskMessage:
    """One parsed MQTT task payload."""

    kind: TaskKind
    id: str | None
    #: Container level: ``false`` runs the subtasks one after another, in order.
    concurrent_execution: bool = True
    subtasks: tuple[Subtask, ...] = ()

    @property
    def vm_names(self) -> tuple[str, ...]:
        return tuple(s.result_name for s in self.subtasks if s.result_name != "n/a")


# --------------------------------------------------------------------------------------------
# Results

Status = Literal["success", "error"]


@dataclass(slots=True, kw_only=True)
class ResultEntry:
    """One ``list:`` item (or the flat body of ``vm migrated``)."""

    vm_name: str
    status: Status
    details: str | None = None
    #: Wire code (errors only).
    code: str | None = None
    #: tag -> seconds; ``None`` when time measurement was off.
    time_measurement: dict[str, float] | None = None
    #: Additional keys, in order, after ``time-measurement`` (``retries``, ``destination``,
    #: ``state``, ``vcpus``, ``memory`` ...). Values are str, int, float, bool or nested
    #: lists/maps of those.
    extra: dict[str, object] = field(default_factory=dict)
    # Not rendered: what the journal's history keeps of the subtask (``tasks.history``).
    #: s since the epoch when the subtask began its work; ``None``: it never began.
    started: float | None = None
    #: s the subtask took (the ``done`` event's ``duration``); ``None``: it never began.
    seconds: float | None = None
    #: ms the guest was paused at the switchover, as the hypervisor measured it.
    downtime: float | None = None


@dataclass(slots=True, kw_only=True)
class ResultMessage:
    """The one result published per task message."""

    #: The ``result:`` string (``vm started``, ``unknown``, ...).
    result: str
    entries: list[ResultEntry]
    id: str | None = None
    #: ``True`` only for ``vm migrated``: the single entry goes to the top level (protocol §4.2).
    flat: bool = False
    #: Top-level keys placed after ``result:`` and before the entries (``status`` task).
    header: dict[str, object] = field(default_factory=dict)
    #: Not rendered: the task it answers (``None``: a message that never became one).
    task: TaskKind | None = None

    @property
    def ok(self) -> bool:
        return all(e.status == "success" for e in self.entries)
