"""What a forecast reads of the guest before it predicts (:mod:`.forecast`): the domain, the
state a migration of it demands, its memory and the disks a storage copy would move, each
as ``begin_migration`` and its pre-check would see them, changing nothing."""

from __future__ import annotations

from asyncmigfra.errors import TaskError, VmNotFound, WrongState
from asyncmigfra.hypervisor.base import (
    DiskCopy,
    DomainInfo,
    DomainState,
    Hypervisor,
    domain_named,
)
from asyncmigfra.migration.plan import MigrationPlan

__all__ = ["check_state", "disks_anyway", "find_domain", "guest_memory"]


async def find_domain(hypervisor: Hypervisor, vm_name: str) -> DomainInfo:
    dom = await domain_named(hypervisor, vm_name)
    if dom is not None:
        return dom
    raise VmNotFound(f"Domain not found: no domain with matching name '{vm_name}'")


def check_state(dom: DomainInfo, mode: str) -> None:
    """The state ``begin_migration`` would demand (its own text)."""
    if mode == "offline":
        ok = dom.state is DomainState.SHUTOFF
    else:
        ok = dom.state in (DomainState.RUNNING, DomainState.PAUSED)
    if not ok:
        raise WrongState(f"Wrong domain state: {dom.state.number}")


async def guest_memory(hypervisor: Hypervisor, dom: DomainInfo) -> int:
    """Bytes: the guest's current memory (its balloon), else its configured memory."""
    if dom.state is DomainState.RUNNING:
        try:
            current = await hypervisor.current_memory(dom.name)
        except TaskError:
            current = 0
        if 0 < current <= dom.memory:
            return current * 1024
    return dom.memory * 1024


async def disks_anyway(hypervisor: Hypervisor, plan: MigrationPlan) -> tuple[DiskCopy, ...]:
    """The disks from the source's view alone, when the pre-check refused."""
    if plan.request.copy_storage == "none":
        return ()
    try:
        return await hypervisor.disks_to_copy(plan.request)
    except TaskError:
        return ()
