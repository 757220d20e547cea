"""The hypervisor boundary: an async Protocol, its value types, and how back-ends are found.

Everything above this layer talks to a :class:`Hypervisor`; nothing above it imports libvirt.
Back-ends are found through the entry-point group ``asyncmigfra.hypervisors``: each entry
point names a :class:`HypervisorFactory`. A third party adds a back-end by publishing a
package with such an entry point; the core does not change.

Errors: a back-end raises only :class:`asyncmigfra.errors.TaskError` subclasses from its
operations (``VmNotFound``, ``WrongState``, ``HypervisorError``, ...), with its own text as
the message. Factories raise :class:`asyncmigfra.errors.ConfigError` for bad options.

Migrations are driven from above (the engine owns progress, convergence policy, timeouts and
cancel): :meth:`Hypervisor.begin_migration` starts the job and returns a
:class:`MigrationJob` handle the engine polls and steers.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, MutableMapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from asyncmigfra.errors import HypervisorError
from asyncmigfra.model import PciId, StartSpec, VcpuMap

__all__ = [
    "AdoptsMigrations",
    "check_vcpu_map",
    "domain_named",
    "DiskCopy",
    "DomainInfo",
    "DomainState",
    "FindsDomainByName",
    "HostInfo",
    "HostLoad",
    "Hypervisor",
    "HypervisorFactory",
    "JobStats",
    "KnowsLinkRate",
    "KnowsMigrationCosts",
    "KnowsResidentMemory",
    "LinkRate",
    "MeasuresDirtyRate",
    "DirtyPageSample",
    "SamplesDirtyPages",
    "MigrationJob",
    "MigrationRequest",
    "MigrationResult",
    "OpContext",
    "ReadsGuestOnce",
    "PostCopyRecovery",
    "PostCopySourceState",
    "RecoversPostCopy",
]


class DomainState(enum.StrEnum):
    """Domain states as reported in ``status`` results (libvirt's virDomainState)."""

    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutting-down"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"

    @property
    def number(self) -> int:
        """libvirt's virDomainState number, as in the original's ``Wrong domain state: 5``."""
        return list(DomainState).index(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainInfo:
    name: str
    state: DomainState
    vcpus: int
    #: KiB
    memory: int
    persistent: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class HostInfo:
    hostname: str
    cpus: int
    #: KiB
    memory: int
    #: KiB
    free_memory: int


@dataclass(frozen=True, slots=True, kw_only=True)
class HostLoad:
    """A (destination) host as this agent sees it, for placement."""

    host: str
    cpus: int
    #: KiB
    memory: int
    #: KiB
    free_memory: int
    #: vCPUs of its active domains.
    vcpus_used: int
    domains: int
    #: Free bytes of its storage pools, by pool directory (where copied disks can go).
    storage_free: Mapping[str, int] = field(default_factory=dict)


class OpContext(Protocol):
    """What an operation may tell the task that runs it."""

    def phase(self, name: str) -> None:
        """Announce a phase (``probing``, ``shutting-down``, ``detach-devices``, ...)."""

    def measure(self, tag: str) -> AbstractContextManager[None]:
        """Time a step under ``tag`` in the result's ``time-measurement`` (when enabled)."""


MigrationMode = Literal["live", "warm", "offline", "post-copy"]


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationRequest:
    """A migration with every default already resolved from the task and the config."""

    vm_name: str
    #: The destination's host name as the task gave it.
    destination: str
    mode: MigrationMode = "live"
    driver: str = "qemu"
    transport: str = "ssh"
    rdma: bool = False
    #: MiB/s; ``None`` = unlimited.
    bandwidth: int | None = None
    #: Initial downtime target (ms); ``None`` = hypervisor default.
    initial_downtime: int | None = None
    auto_converge: bool = False
    compressed: bool = False
    parallel_connections: int = 1
    persist: bool = True
    tls: bool = False
    #: Keep the guest paused on the destination (for repinning before resume).
    paused: bool = False
    #: Peer-to-peer (the job belongs to the source daemon) or client-driven.
    p2p: bool = True
    #: Copy the non-shared disks: ``all`` whole images, ``inc`` only the top layer.
    copy_storage: Literal["none", "all", "inc"] = "none"
    #: Target devs of the disks to copy; ``()``: every writable, non-shared disk.
    migrate_disks: tuple[str, ...] = ()
    #: The guest's disk writes go to both sides synchronously (only with a storage copy).
    synchronous_writes: bool = False
    #: Page compression methods (``xbzrle``, ``zlib``, ``zstd``); ``()``: none, unless the
    #: legacy ``compressed`` asks for the hypervisor's default (QEMU: xbzrle).
    compression: tuple[str, ...] = ()
    #: Level of the ``zlib`` or ``zstd`` method; ``None``: the hypervisor's default.
    compression_level: int | None = None
    #: MiB of xbzrle cache; ``None``: the hypervisor's default.
    xbzrle_cache: int | None = None
    #: Multifd zero-copy send.
    zerocopy: bool = False
    #: MiB/s once in post-copy; ``None`` = unlimited.
    postcopy_bandwidth: int | None = None
    #: Auto-converge throttle, percent; ``None``: the hypervisor's default.
    auto_converge_initial: int | None = None
    auto_converge_increment: int | None = None
    #: The host name the destination's TLS certificate must carry; ``None``: the destination's.
    tls_destination: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobStats:
    """One sample of a running migration job. Sizes in bytes, rates in bytes/s."""

    #: ``migrating``, ``post-copy`` or ``switchover``.
    phase: str
    iteration: int
    #: s since the job started.
    elapsed: float
    memory_total: int
    memory_processed: int
    memory_remaining: int
    data_remaining: int
    dirty_rate: int
    transfer_rate: int
    #: ms, as the hypervisor estimates it; ``None`` when unknown.
    expected_downtime: float | None = None
    #: Bytes of the disks a storage copy moves (0: no storage copy). The disks are copied
    #: before memory: while they are, ``memory_total`` may still be 0 and ``iteration`` is 0.
    disk_total: int = 0
    disk_processed: int = 0
    disk_remaining: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskCopy:
    """A disk that a migration with ``copy-storage`` copies to the destination."""

    #: The guest's target dev (``vda``).
    target: str
    #: The image's path (the same on both hosts).
    path: str
    #: Bytes the copy moves (``all``: the virtual size; ``inc``: the top layer's allocation).
    size: int
    #: Bytes the copy allocates on the destination.
    room: int = 0
    #: Bytes of data the copy sends over the link: at most the image's allocation (QEMU's
    #: mirror sends unallocated ranges as zero writes, a few bytes each); ``None``: unknown,
    #: take ``size``.
    data: int | None = None

    @property
    def sent(self) -> int:
        """Bytes the copy is predicted to send (``data``, else ``size``)."""
        return self.size if self.data is None else min(self.size, self.data)


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationResult:
    #: ms, as measured by the hypervisor at switchover; ``None`` when unknown.
    downtime: float | None = None
    iterations: int = 0
    post_copy: bool = False
    #: Bytes of memory transferred.
    transferred: int = 0
    #: Bytes of guest memory (0: unknown) and of it the bytes sent as zero pages (a flag
    #: each; ``None``: unknown), as the hypervisor counted them for the whole job.
    memory_total: int = 0
    zero_bytes: int | None = None


@runtime_checkable
class MigrationJob(Protocol):
    """A running migration job. Every method is bounded by the back-end."""

    async def stats(self) -> JobStats | None:
        """The current job statistics; ``None`` when the job has not started moving memory."""

    async def wait_iteration(self, after: int) -> int:
        """Return once the memory iteration number exceeds ``after`` (event driven)."""

    async def wait(self) -> MigrationResult:
        """Wait for the job to end. Raises ``MigrationFailed`` (VM still on the source),
        ``TaskCancelled`` (aborted) or another ``TaskError``."""

    async def set_max_downtime(self, ms: int) -> None: ...

    async def set_bandwidth(self, mibs: int, *, post_copy: bool = False) -> None:
        """Cap the transfer at ``mibs`` MiB/s from now on; 0: unlimited. ``post_copy``: the
        cap of the post-copy phase (libvirt's ``MIGRATE_MAX_SPEED_POSTCOPY``), for a job that
        is in post-copy or may switch to it."""

    async def start_post_copy(self) -> None: ...

    async def suspend_source(self) -> None:
        """Pause the guest so the remaining copy finishes (``timeout-action: suspend``)."""

    async def abort(self) -> None:
        """Abort the job; the VM keeps running on the source."""


# --- optional capabilities: a back-end has them or not; check with ``isinstance`` ----------


@runtime_checkable
class AdoptsMigrations(Protocol):
    """A back-end whose migration jobs outlive the agent (libvirt: peer-to-peer jobs belong
    to libvirtd), so that after a restart the agent can follow one to its end."""

    async def adopt_migration(
        self, vm_name: str, *, destination: str | None = None
    ) -> MigrationJob | None:
        """A handle for ``vm_name``'s outgoing migration if one runs, else ``None``;
        ``destination`` is where the adopting task sends it."""


#: Where the guest of a broken post-copy is, as the source sees it: ``broken`` (paused there
#: in the post-copy-failed state: resumable), ``left`` (no longer on the source: the migration
#: completed after all), ``other`` (on the source in another state).
PostCopySourceState = Literal["broken", "left", "other"]


@runtime_checkable
class PostCopyRecovery(Protocol):
    """A post-copy migration whose connection broke after the switch: the guest's vCPUs run
    on the destination and wait there for the memory still on the source, where the guest
    is paused (libvirt: ``VIR_DOMAIN_PAUSED_POSTCOPY_FAILED``). Only resuming the migration
    can finish it: :meth:`resume_post_copy` is tried again until it succeeds, bounded by the
    engine."""

    async def resume_post_copy(self) -> MigrationResult:
        """One attempt to resume the migration; returns once it completed. Raises a
        ``TaskError`` when this attempt failed (the link is still down, the destination is
        not ready yet: try again), ``NotSupported`` when resuming can never work here."""

    async def stats(self) -> JobStats | None:
        """The statistics of the attempt running now (the last known ones otherwise)."""

    async def source_state(self) -> PostCopySourceState:
        """Where the guest is now, as the source sees it (see :data:`PostCopySourceState`)."""

    async def describe(self) -> str:
        """Where the guest's state is on both hosts and how an operator resumes it by hand
        (for a result that gives up)."""


@runtime_checkable
class RecoversPostCopy(Protocol):
    """A back-end that can resume a post-copy migration whose connection broke (libvirt >=
    8.5 with QEMU >= 7: ``VIR_MIGRATE_POSTCOPY_RESUME``; the ``fake`` back-end)."""

    async def broken_post_copy(self, request: MigrationRequest) -> PostCopyRecovery | None:
        """A handle for resuming ``request``'s migration when its guest is in the post-copy
        failed state on this host (whoever started it: this job, an earlier agent run), else
        ``None``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkRate:
    """Bytes/s a migration from this host to one destination can move (``inf``: no limit
    known). An evacuation's migrations share ``outgoing`` (this host's NIC) and, those to
    the same destination, its ``incoming``; each one alone gets at most ``single``."""

    #: One migration alone (its stream; the smallest of the three when only it is known).
    single: float
    #: This host's NIC, for all its outgoing migrations together.
    outgoing: float
    #: The destination's NIC, for all migrations into it together.
    incoming: float


@runtime_checkable
class MeasuresDirtyRate(Protocol):
    """A back-end that can tell how fast a running guest dirties its memory without
    migrating it (libvirt: ``virDomainStartDirtyRateCalc`` in page-sampling mode; fake: its
    ``dirty-rate``), for the migration prediction (``migration.forecast``), which predicted
    evacuation schedules (docs/protocol.md §3.7) use too.

    A back-end whose figure is a sample of pages over the period (QEMU's page sampling)
    says nothing about shorter times: the prediction then takes a shorter pass to dirty a
    whole period's worth. A back-end whose figure holds at every time scale (the fake's
    steady guests) sets a class attribute ``samples_pages = False``."""

    async def measure_dirty_rate(self, vm_name: str, *, seconds: int = 1) -> float:
        """Bytes/s the running guest ``vm_name`` dirtied over a sample of ``seconds``
        (1-60). Must not harm the guest. Raises ``VmNotFound``, ``WrongState`` (not
        running), ``NotSupported`` (this host cannot measure) or another ``TaskError``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DirtyPageSample:
    """One page-sampling probe (or several pooled): of ``sampled`` guest pages picked at
    random, ``dirty`` changed within ``period`` s; ``memory``: bytes of guest RAM they were
    picked from (see ``migration.dirtysample`` for what that makes of the rate)."""

    sampled: int
    dirty: int
    memory: int
    period: float

    def __post_init__(self) -> None:
        if not 0 <= self.dirty <= self.sampled:
            raise ValueError(f"need 0 <= dirty <= sampled, got {self.dirty} of {self.sampled}")
        if self.memory < 0 or not (math.isfinite(self.period) and self.period > 0):
            raise ValueError("memory must be >= 0 and period a finite number > 0")

    @property
    def rate(self) -> float:
        """Bytes/s: the point estimate (0 when nothing was sampled)."""
        if self.sampled == 0:
            return 0.0
        return self.dirty / self.sampled * self.memory / self.period


@runtime_checkable
class SamplesDirtyPages(Protocol):
    """A ``MeasuresDirtyRate`` back-end whose figure is a sample of pages (libvirt's page
    sampling) and that can tell the sample's size, so that the prediction knows how sure the
    figure is and can pool several probes."""

    async def sample_dirty_pages(self, vm_name: str, *, seconds: int = 1) -> DirtyPageSample:
        """One probe of ``seconds`` (1-60) on the running ``vm_name``; raises as
        ``measure_dirty_rate`` does."""


@runtime_checkable
class KnowsMigrationCosts(Protocol):
    """A back-end whose migrations have fixed costs of their own (the fake's simulation),
    for the prediction; others are predicted with the model's defaults (QEMU as the rig
    measured it, ``migration.prediction_inputs.MigrationCosts``)."""

    def migration_costs(self) -> Mapping[str, float]:
        """Seconds and milliseconds by ``MigrationCosts`` field name (any subset)."""


@runtime_checkable
class KnowsResidentMemory(Protocol):
    """A back-end that can tell how much memory a running guest's hypervisor process keeps
    resident (libvirt: ``memoryStats()['rss']``, QEMU's RSS read by libvirtd from
    ``/proc``; nothing asks the guest). Guest pages that were never written are not
    resident and are zero, so this bounds the memory a migration sends in full."""

    async def resident_memory(self, vm_name: str) -> int | None:
        """KiB resident for the running guest ``vm_name``; ``None`` when not known.
        Raises ``VmNotFound`` or another ``TaskError``."""


@runtime_checkable
class FindsDomainByName(Protocol):
    """A back-end that reads one domain by its name (libvirt: a lookup and its info) rather
    than listing every domain on the host to find it."""

    async def domain_named(self, vm_name: str) -> DomainInfo | None:
        """The domain ``vm_name`` as :meth:`Hypervisor.list_domains` would list it;
        ``None`` when there is none."""


@runtime_checkable
class ReadsGuestOnce(Protocol):
    """A back-end that can read a guest once for several steps of a migration and answer
    their reads of it from that one read (libvirt: one round trip instead of one per step)."""

    def reading_once(self, vm_name: str) -> AbstractContextManager[None]:
        """Within the block (this task only), reads of ``vm_name`` share one read; the first
        change the back-end makes to the guest ends it (later reads read again), and a block
        opened within starts afresh. What each step decides, and its errors, stay as
        without the block."""


@runtime_checkable
class KnowsLinkRate(Protocol):
    """A back-end that knows (configured, measured or learned) the rates of the links its
    migrations take."""

    async def link_rate(self, destination: str) -> LinkRate | None:
        """The rates toward ``destination``; ``None`` when unknown."""


@runtime_checkable
class Hypervisor(Protocol):
    """All operations the agent needs. ``kind`` names the back-end (``libvirt``, ``fake``)."""

    kind: str

    async def open(self) -> None:
        """Connect. Called once before any operation."""

    async def aclose(self) -> None:
        """Release connections and threads. Safe to call twice."""

    async def start(self, spec: StartSpec, ctx: OpContext) -> None: ...

    async def stop(
        self,
        vm_name: str,
        ctx: OpContext,
        *,
        force: bool = False,
        undefine: bool = False,
        force_after_timeout: bool = False,
    ) -> None: ...

    async def suspend(self, vm_name: str, ctx: OpContext) -> None: ...

    async def resume(self, vm_name: str, ctx: OpContext) -> None: ...

    async def repin(self, vm_name: str, vcpu_map: VcpuMap, ctx: OpContext) -> None: ...

    async def set_memory(self, vm_name: str, kib: int, ctx: OpContext) -> None:
        """Set a running guest's current memory (balloon target, KiB), live only."""
        ...

    async def current_memory(self, vm_name: str) -> int:
        """The memory (KiB) a running guest has now, as its balloon reports it live (libvirt:
        ``memoryStats()['actual']``, which asks QEMU, rather than the current memory libvirt
        caches from QEMU's BALLOON_CHANGE events, which QEMU sends at most once a second)."""
        ...

    async def check_migration(
        self, request: MigrationRequest, *, memory: bool = True
    ) -> tuple[DiskCopy, ...]:
        """Pre-checks before anything is touched: the destination is reachable (else
        ``ConnectionFailed``), has no active domain of that name, accepts the guest's CPU and
        machine type and (unless ``memory`` is false: a swap weighs both VMs itself) has the
        memory (else ``IncompatibleDestination``). Storage: a guest with local disks needs
        ``copy-storage``; with it, the destination must be able to take each disk. Returns
        the disks the migration copies (empty without ``copy-storage``)."""

    async def disks_to_copy(self, request: MigrationRequest) -> tuple[DiskCopy, ...]:
        """The disks ``request`` would copy (its ``copy-storage``), from the source's view
        alone: for placing an evacuation before any destination is chosen."""
        ...

    async def begin_migration(self, request: MigrationRequest, ctx: OpContext) -> MigrationJob:
        """Check the VM, start the job and return its handle (raises before anything moved)."""

    async def list_domains(self, *, active_only: bool = False) -> list[DomainInfo]: ...

    async def host_info(self) -> HostInfo: ...

    async def storage_paths(self) -> tuple[str, ...]:
        """The directories of the host's storage pools (where images may live); the default
        of ``agent.xml-allowed-paths`` besides ``/var/lib/libvirt/images``."""
        ...

    async def host_load(self, host: str) -> HostLoad:
        """CPUs, memory and what runs on ``host`` (a migration destination), for placement.
        Raises ``ConnectionFailed`` when it cannot be reached."""

    async def detach_ivshmem(
        self, vm_name: str, ctx: OpContext, *, unplug_timeout: float
    ) -> str | None:
        """Hot-unplug the guest's ivshmem (``<shmem>``) device and wait, up to ``timeout`` s,
        for it to be gone; return its device XML (to reattach), ``None`` when it has none.
        More than one: ``HypervisorError('Found more than one ivshmem device. Only
        migration of one is supported.')`` (protocol §3.6) before anything is touched."""

    async def attach_ivshmem(self, vm_name: str, device_xml: str, ctx: OpContext) -> None:
        """Hot-plug an ivshmem device that :meth:`detach_ivshmem` returned."""

    async def detach_hostdevs(
        self, vm_name: str, ctx: OpContext, *, unplug_timeout: float
    ) -> dict[PciId, int]:
        """Hot-unplug every PCI ``<hostdev>`` and wait, up to ``timeout`` s, until each is
        gone (the device-removed event); return how many of each vendor:device it had."""

    async def attach_hostdevs(
        self, vm_name: str, counts: Mapping[PciId, int], ctx: OpContext
    ) -> None:
        """Attach ``counts[id]`` free host devices of each type (``pci-ids``, protocol §3.2)."""

    def on_host(self, host: str) -> Hypervisor:
        """The same operations, acting on ``host`` (a migration destination or swap partner)
        through this agent's own connection to it: repin and resume a guest that arrived
        paused, reattach its devices there, or migrate a guest from there (a swap's second
        half). The view shares this instance's connections; ``open``/``aclose`` on it do
        nothing. ``on_host`` of this agent's own host name returns ``self``."""


class HypervisorFactory(Protocol):
    """What an ``asyncmigfra.hypervisors`` entry point names.

    ``options`` is the config's ``hypervisor:`` map without ``type``; unknown or bad keys
    raise ``ConfigError`` naming ``hypervisor.<key>``. ``hostname`` is the agent's name.
    ``shared`` is one dict per process that agents of the same process share (the ``fake``
    back-end keeps its simulated cluster there, so two agents in one process see each
    other's hosts).
    """

    def __call__(
        self,
        options: Mapping[str, object],
        *,
        hostname: str,
        shared: MutableMapping[str, object],
    ) -> Hypervisor: ...


def check_vcpu_map(vcpu_map: VcpuMap, cpus: int, host: str) -> None:
    """Refuse a pinning that names no CPU for a vCPU or a CPU ``host`` (with ``cpus`` CPUs)
    does not have, in libvirt's words; every back-end checks the same way."""
    for allowed in vcpu_map:
        if not allowed:
            raise HypervisorError(
                "Error pinning vcpu: invalid argument: Empty cpu list for pinning"
            )
        for cpu in allowed:
            if not 0 <= cpu < cpus:
                raise HypervisorError(
                    f"Error pinning vcpu: invalid argument: CPU {cpu} does not exist "
                    f"on {host} ({cpus} CPUs)"
                )


async def domain_named(hypervisor: Hypervisor, vm_name: str) -> DomainInfo | None:
    """The domain ``vm_name`` as ``hypervisor.list_domains()`` lists it (``None``: none):
    read alone where the back-end can (:class:`FindsDomainByName`), else from the list."""
    if isinstance(hypervisor, FindsDomainByName):
        return await hypervisor.domain_named(vm_name)
    for dom in await hypervisor.list_domains():
        if dom.name == vm_name:
            return dom
    return None
