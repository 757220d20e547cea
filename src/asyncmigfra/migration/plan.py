"""A migration's parameters: the task's, then the agent's ``migration:`` defaults
(:func:`plan_migration`), and the geometric downtime schedule."""

from __future__ import annotations

from dataclasses import dataclass

from asyncmigfra.hypervisor.base import Hypervisor, MigrationRequest
from asyncmigfra.model import MigrateSpec, MigrationParams
from asyncmigfra.settings import MigrationDefaults, Settings

__all__ = [
    "MigrationPlan",
    "memory_of",
    "plan_for",
    "plan_migration",
]


#: Steps of the downtime schedule.
DOWNTIME_STEPS = 5


@dataclass(frozen=True, slots=True)
class MigrationPlan:
    request: MigrationRequest
    #: ms; ``None``: the hypervisor's default target, never raised by the agent.
    max_downtime: int | None
    completion_timeout: float
    timeout_action: str
    retries: int
    retry_delay: float


def plan_migration(
    spec: MigrateSpec, *, defaults: MigrationDefaults, driver: str, transport: str, memory_kib: int
) -> MigrationPlan:
    """Resolve every parameter from the task, then the agent's ``migration:`` defaults."""
    p: MigrationParams = spec.parameter
    mode = p.migration_type or defaults.migration_type
    max_downtime = p.max_downtime if p.max_downtime is not None else defaults.max_downtime
    gib = memory_kib / (1024 * 1024)
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
    )
    return MigrationPlan(
        request=request,
        max_downtime=max_downtime,
        completion_timeout=float(timeout),
        timeout_action=p.timeout_action or defaults.timeout_action,
        retries=p.retry_counter if p.retry_counter is not None else defaults.retry_counter,
        retry_delay=defaults.retry_delay,
    )


def _downtime_schedule(max_downtime: int) -> list[int]:
    """Geometric steps from a tenth of the maximum up to it (oVirt-style)."""
    low = max(1, max_downtime // 10)
    if DOWNTIME_STEPS <= 1 or low >= max_downtime:
        return [max_downtime]
    ratio = (max_downtime / low) ** (1 / (DOWNTIME_STEPS - 1))
    steps = [round(low * ratio**i) for i in range(DOWNTIME_STEPS)]
    steps[-1] = max_downtime
    return sorted(set(steps))


async def memory_of(hypervisor: Hypervisor, vm_name: str) -> int:
    """Guest memory (KiB) for the default completion timeout; 0 when the back-end does not
    list it (``begin_migration`` reports a missing VM with its own error)."""
    for dom in await hypervisor.list_domains():
        if dom.name == vm_name:
            return dom.memory
    return 0


async def plan_for(
    spec: MigrateSpec, *, hypervisor: Hypervisor, settings: Settings, memory: int | None = None
) -> MigrationPlan:
    if memory is None:
        memory = await memory_of(hypervisor, spec.vm_name)
    return plan_migration(
        spec,
        defaults=settings.migration,
        driver=settings.hypervisor.driver,
        transport=settings.hypervisor.transport,
        memory_kib=memory,
    )
