"""A migration's parameters: the task's, then the agent's ``migration:`` defaults
(:func:`plan_migration`), and the geometric downtime schedule."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TypeVar

from asyncmigfra.errors import IncompatibleDestination, InvalidTask
from asyncmigfra.hypervisor.base import Hypervisor, MigrationRequest, domain_named
from asyncmigfra.model import CopyStorage, MigrateSpec, MigrationParams
from asyncmigfra.settings import MigrationDefaults, Settings
from asyncmigfra.streamoptions import StreamOptions, conflicts

__all__ = [
    "MigrationPlan",
    "check_not_here",
    "memory_of",
    "plan_for",
    "plan_migration",
]


#: Steps of the downtime schedule.
DOWNTIME_STEPS = 5

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class MigrationPlan:
    request: MigrationRequest
    #: ms; ``None``: the hypervisor's default target, never raised by the agent.
    max_downtime: int | None
    completion_timeout: float
    timeout_action: str
    retries: int
    retry_delay: float
    #: Bytes of guest memory the plan was made for (0: unknown): the progress events'
    #: ``percent`` and ``eta`` count it while the disks are copied, before memory moves.
    memory: int = 0
    #: s the job may move no data before ``timeout_action`` applies; 0: off.
    progress_timeout: float = 0.0
    #: ``migration-type: auto``: ``request.mode`` is ``live`` until the prediction chooses
    #: (``migration.forecast.choose``), which may make it ``post-copy`` or refuse.
    auto: bool = False
    #: The task gave ``completion-timeout`` (else it is the agent's default, which a
    #: prediction may replace) and ``timeout-action``.
    timeout_given: bool = False
    timeout_action_given: bool = False


_GIB = 1024**3


def plan_migration(
    spec: MigrateSpec,
    *,
    defaults: MigrationDefaults,
    driver: str,
    transport: str,
    memory_kib: int,
    disk_bytes: int = 0,
) -> MigrationPlan:
    """Resolve every parameter from the task, then the agent's ``migration:`` defaults.

    ``disk_bytes``: what a storage copy moves (the pre-check's figure; 0 when unknown). The
    default completion timeout is ``completion-timeout-per-gib`` for each GiB of memory and,
    when the migration copies storage, of ``disk_bytes`` (at least ``completion-timeout-min``).
    Raises ``InvalidTask`` for ``migrate-disks`` or synchronous writes that the task gave
    without ``copy-storage`` when the agent's default is ``none`` (the parser refuses them
    with an explicit ``copy-storage: none``), and for stream options that do not go together
    once the defaults complete the task's (:func:`_stream`).
    """
    p: MigrationParams = spec.parameter
    chosen = p.migration_type or defaults.migration_type
    mode = "live" if chosen == "auto" else chosen
    max_downtime = p.max_downtime if p.max_downtime is not None else defaults.max_downtime
    copy_storage, synchronous_writes = _storage(p, defaults)
    copied = max(0, disk_bytes) if copy_storage != "none" else 0
    gib = (memory_kib * 1024 + copied) / _GIB
    timeout = p.completion_timeout or max(
        defaults.completion_timeout_min, defaults.completion_timeout_per_gib * gib
    )
    request = MigrationRequest(
        vm_name=spec.vm_name,
        destination=spec.destination,
        mode=mode,
        driver=spec.driver or driver,
        transport=p.transport or transport,
        rdma=p.rdma_migration,
        bandwidth=p.bandwidth if p.bandwidth is not None else defaults.bandwidth,
        initial_downtime=_downtime_schedule(max_downtime)[0] if max_downtime else None,
        auto_converge=p.auto_converge if p.auto_converge is not None else defaults.auto_converge,
        compressed=p.compressed if p.compressed is not None else defaults.compressed,
        parallel_connections=p.parallel_connections or defaults.parallel_connections,
        persist=p.persist if p.persist is not None else defaults.persist,
        tls=p.tls if p.tls is not None else defaults.tls,
        paused=p.vcpu_map is not None,
        p2p=defaults.p2p,
        copy_storage=copy_storage,
        migrate_disks=p.migrate_disks or (),
        synchronous_writes=synchronous_writes,
    )
    request = _stream(request, p, defaults)
    return MigrationPlan(
        request=request,
        max_downtime=max_downtime,
        completion_timeout=float(timeout),
        timeout_action=p.timeout_action or defaults.timeout_action,
        retries=p.retry_counter if p.retry_counter is not None else defaults.retry_counter,
        retry_delay=defaults.retry_delay,
        memory=max(0, memory_kib) * 1024,
        progress_timeout=(
            p.progress_timeout if p.progress_timeout is not None else defaults.progress_timeout
        ),
        auto=chosen == "auto",
        timeout_given=bool(p.completion_timeout),
        timeout_action_given=p.timeout_action is not None,
    )


def _given(task: _T | None, default: _T) -> _T:
    return task if task is not None else default


def _stream(
    request: MigrationRequest, p: MigrationParams, defaults: MigrationDefaults
) -> MigrationRequest:
    """The stream options: the task's, then the config's. The configured ``compression-level``
    and ``xbzrle-cache`` tune the configured ``compression`` only: a task that names its own
    methods takes its own level and cache (or the hypervisor's). Refuses (``InvalidTask``)
    what does not go together once merged (:mod:`asyncmigfra.streamoptions`)."""
    own_methods = p.compression is not None
    level = p.compression_level
    cache = p.xbzrle_cache
    if not own_methods:
        level = _given(level, defaults.compression_level)
        cache = _given(cache, defaults.xbzrle_cache)
    postcopy = _given(p.postcopy_bandwidth, defaults.postcopy_bandwidth)
    request = replace(
        request,
        compression=_given(p.compression, defaults.compression),
        compression_level=level,
        xbzrle_cache=cache,
        zerocopy=_given(p.zerocopy, defaults.zerocopy),
        postcopy_bandwidth=postcopy or None,
        auto_converge_initial=_given(p.auto_converge_initial, defaults.auto_converge_initial),
        auto_converge_increment=_given(p.auto_converge_increment, defaults.auto_converge_increment),
        tls_destination=p.tls_destination,
    )
    found = conflicts(
        StreamOptions(
            parallel_connections=request.parallel_connections,
            compression=request.compression,
            compression_level=request.compression_level,
            xbzrle_cache=request.xbzrle_cache,
            zerocopy=request.zerocopy,
            tls=request.tls,
            tls_destination=request.tls_destination,
            compressed=request.compressed,
            auto_converge=request.auto_converge,
            auto_converge_initial=request.auto_converge_initial,
            auto_converge_increment=request.auto_converge_increment,
        )
    )
    if found:
        raise InvalidTask(
            f"{found[0].key} {found[0].reason} (the task's parameter completed with this"
            " agent's migration: defaults)"
        )
    return request


def _storage(p: MigrationParams, defaults: MigrationDefaults) -> tuple[CopyStorage, bool]:
    """``copy-storage`` and whether writes are synchronous, from the task, then the config."""
    copy_storage: CopyStorage = p.copy_storage or defaults.copy_storage
    if copy_storage == "none":
        for given, key in (
            (bool(p.migrate_disks), "migrate-disks"),
            (bool(p.synchronous_writes), "copy-storage-synchronous-writes"),
        ):
            if given:
                raise InvalidTask(
                    f"{key} needs copy-storage all or inc: the task gives no copy-storage and"
                    " the agent's default (migration.copy-storage) is none"
                )
        return copy_storage, False
    sync = p.synchronous_writes
    return copy_storage, defaults.copy_storage_synchronous_writes if sync is None else sync


def _downtime_schedule(max_downtime: int) -> list[int]:
    """Geometric steps from a tenth of the maximum up to it (oVirt-style)."""
    low = max(1, max_downtime // 10)
    if DOWNTIME_STEPS <= 1 or low >= max_downtime:
        return [max_downtime]
    ratio = (max_downtime / low) ** (1 / (DOWNTIME_STEPS - 1))
    steps = [round(low * ratio**i) for i in range(DOWNTIME_STEPS)]
    steps[-1] = max_downtime
    return sorted(set(steps))


def check_not_here(destination: str, hostname: str) -> None:
    """Refuse a destination that names this agent's own host: libvirt would refuse it only
    after the devices were detached ("Attempt to migrate guest to the same host"). An
    address that reaches this host under another name is the back-end's pre-check."""
    if destination == hostname:
        raise IncompatibleDestination(
            f"destination {destination} is this agent's own host: a VM cannot migrate to the"
            " host it runs on"
        )


async def memory_of(hypervisor: Hypervisor, vm_name: str) -> int:
    """Guest memory (KiB) for the default completion timeout; 0 when the back-end does not
    know the VM (``begin_migration`` reports a missing VM with its own error). Reads the one
    domain where the back-end can (:func:`domain_named`), not every domain on the host."""
    dom = await domain_named(hypervisor, vm_name)
    return dom.memory if dom is not None else 0


async def plan_for(
    spec: MigrateSpec,
    *,
    hypervisor: Hypervisor,
    settings: Settings,
    memory: int | None = None,
    disk_bytes: int = 0,
) -> MigrationPlan:
    """:func:`plan_migration` with this agent's settings; ``memory`` (KiB) is looked up when
    not given, ``disk_bytes`` is what a storage copy moves (0: unknown)."""
    if memory is None:
        memory = await memory_of(hypervisor, spec.vm_name)
    return plan_migration(
        spec,
        defaults=settings.migration,
        driver=settings.hypervisor.driver,
        transport=settings.hypervisor.transport,
        memory_kib=memory,
        disk_bytes=disk_bytes,
    )
