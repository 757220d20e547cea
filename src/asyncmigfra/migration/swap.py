"""``swap-with``: two VMs trade hosts (protocol §3.6), fixing what the original got wrong (§9.4).

VM 1 (``vm-name``) runs on this host, VM 2 (``swap-with.vm-name``) on ``destination``. VM 1
goes there and VM 2 comes here. How:

* **Pre-checks for both halves** before anything is touched: the usual checks (reachable, no
  name clash, machine type, CPU) of VM 1 against the destination and of VM 2 against this
  host, and memory weighed *for the pair*, in KiB on both sides (the original compared the
  balloon size in KiB with free memory in bytes, so its fallback almost never triggered).
* **In parallel** when each host has room for the VM coming in while its own still runs (the
  original's normal path). Otherwise **in sequence**: first the VM whose destination has room
  now; that frees its memory for the other. When neither order fits: ``incompatible-
  destination``. The original's third way, an internal snapshot of the smaller VM, needs the
  VM defined on both hosts and shared storage; it is not done here.
* **Each half is a whole migration**: pscom hook, devices out and back, retries, progress,
  convergence policy, repin with its own ``vcpu-map``. Its events carry its own ``vm-name``;
  its time-measurement tags end in ``-<vm>`` (``migrate-<vm>``, ``detach-pci-devs-<vm>``,
  ``repin-<vm>`` ...), and ``migrate`` times both, as in the original, without its duplicate
  ``detach-ivshmem-devs`` tag that failed every timed swap (docs/protocol.md §9.4).
* **Both outcomes are reported** (the original never looked at its threads' exceptions and
  reported a failed half as success, §9.4). When one half fails, the other is stopped (its
  job aborted, its VM stays where it was) unless it already arrived or runs post-copy, which
  cannot be undone; nothing is migrated back automatically. The entry of ``vm-name`` carries
  the failure's ``code`` and ``details``; its ``swap-with:`` map has VM 2's own ``status``,
  ``destination``, ``code`` and ``details``, and the ``order`` used.
* **VM 2's lane is held on the destination's agent** for the whole swap (``peerlanes``), so
  that agent runs no task of its own on VM 2 meanwhile; a task it has on VM 2 already makes
  the swap ``busy`` before anything moves. ``migration.swap-lock`` decides what happens when
  that agent does not answer: ``best-effort`` goes on and says so in ``details``,
  ``required`` refuses, ``off`` does not ask.
* VM 2's half runs on the destination's libvirtd through this agent's connection to it
  (``Hypervisor.on_host``), peer-to-peer back to this host: the destination's daemon must
  reach this host (``hypervisor.hosts.<this host>`` when it needs explicit addresses).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, replace
from typing import Literal

import structlog

from asyncmigfra.errors import (
    IncompatibleDestination,
    InvalidTask,
    NotSupported,
    TaskCancelled,
    TaskError,
)
from asyncmigfra.hypervisor.base import Hypervisor, MigrationResult
from asyncmigfra.migration.context import EngineContext
from asyncmigfra.migration.engine import carry_out, check_pscom
from asyncmigfra.migration.plan import MigrationPlan, memory_of, plan_for
from asyncmigfra.model import MigrateSpec
from asyncmigfra.peers.bus import MessageBus
from asyncmigfra.peers.lanes import hold_peer_lane
from asyncmigfra.settings import Settings
from asyncmigfra.tasks.outcomes import as_task_error

__all__ = ["swap"]

log = structlog.stdlib.get_logger(__name__)

Order = Literal["parallel", "sequential"]


@dataclass(slots=True)
class _Half:
    """One VM's migration in a swap."""

    spec: MigrateSpec
    #: Where the VM runs now.
    host: Hypervisor
    source: str
    ctx: EngineContext
    plan: MigrationPlan | None = None
    #: KiB
    memory: int = 0
    result: MigrationResult | None = None
    error: TaskError | None = None
    #: The half was stopped (or never started) because the other one failed.
    stopped: bool = False

    @property
    def vm(self) -> str:
        return self.spec.vm_name


async def swap(
    spec: MigrateSpec,
    ctx: EngineContext,
    *,
    hypervisor: Hypervisor,
    settings: Settings,
    bus: MessageBus | None = None,
) -> MigrationResult:
    """Swap ``spec.vm_name`` (here) with ``swap-with.vm-name`` (on ``spec.destination``)."""
    partner = spec.parameter.swap_with
    if partner is None:  # pragma: no cover - the runner routes only swaps here
        raise InvalidTask("swap-with is missing")
    here, there = settings.hostname, spec.destination
    if spec.driver == "lxctools":
        raise NotSupported("Currently swap migration is only supported by the qemu driver.")
    if (spec.parameter.migration_type or settings.migration.migration_type) == "auto":
        raise NotSupported(
            "migration-type auto does not predict swap-with (two migrations sharing the link):"
            " name live or post-copy"
        )
    if there == here:
        raise InvalidTask(f"swap-with needs another host than this one ({here}) as destination")
    if partner.vm_name == spec.vm_name:
        raise InvalidTask("swap-with names the migrating VM itself")
    params = replace(spec.parameter, swap_with=None)
    ours = replace(spec, parameter=params)
    theirs = replace(
        spec,
        vm_name=partner.vm_name,
        destination=here,
        # (migrate-disks names disks of the task's VM: the partner's storage copy, if any,
        # takes the default, every writable non-shared disk. tls-destination names the
        # destination's certificate: the partner goes to this host, whose name it checks.)
        parameter=replace(
            params,
            vcpu_map=partner.vcpu_map,
            pscom_hook_procs=partner.pscom_hook_procs,
            migrate_disks=None,
            tls_destination=None,
        ),
    )
    check_pscom(ours, bus)
    check_pscom(theirs, bus)
    uncoordinated: str | None = None
    async with contextlib.AsyncExitStack() as stack:
        if settings.migration.swap_lock != "off":
            ctx.phase("peer-lane")
            with ctx.measure("peer-lane"):
                hold = hold_peer_lane(
                    bus,
                    task_topic=settings.mqtt.task_topic,
                    hostname=here,
                    peer=there,
                    vm_name=partner.vm_name,
                    mode=settings.migration.swap_lock,
                    answer_within=settings.migration.swap_lock_timeout,
                )
                uncoordinated = await stack.enter_async_context(hold)
        result = await _swap_held(
            ours, theirs, ctx, hypervisor=hypervisor, settings=settings, bus=bus
        )
    if uncoordinated is not None:
        ctx.outcome.note(uncoordinated)
    return result


async def _swap_held(
    ours: MigrateSpec,
    theirs: MigrateSpec,
    ctx: EngineContext,
    *,
    hypervisor: Hypervisor,
    settings: Settings,
    bus: MessageBus | None,
) -> MigrationResult:
    """The swap proper, while VM 2's lane is held on the destination's agent."""
    here, there = settings.hostname, ours.destination
    ctx.phase("pre-checks")
    with ctx.measure("pre-checks"):
        halves = [
            _Half(ours, hypervisor, here, ctx.companion(ours.vm_name)),
            _Half(theirs, hypervisor.on_host(there), there, ctx.companion(theirs.vm_name)),
        ]
        order, first = await _prepare(halves, hypervisor=hypervisor, settings=settings)
    log.info("swap.planned", partner=theirs.vm_name, order=order, first=first.vm)
    with ctx.measure("migrate"):
        try:
            if order == "parallel":
                await _parallel(halves, settings=settings, bus=bus)
            else:
                second = halves[1] if first is halves[0] else halves[0]
                await _sequential(first, second, settings=settings, bus=bus)
        except asyncio.CancelledError:
            # The cancelled entry still says what became of VM 2.
            for half in halves:
                if half.result is None and half.error is None:
                    half.stopped = True
                    half.error = TaskCancelled(f"cancelled; {half.vm} stays on {half.source}")
            _record(halves, ctx, order)
            raise
    _record(halves, ctx, order)
    return _outcome(halves)


async def _prepare(
    halves: list[_Half], *, hypervisor: Hypervisor, settings: Settings
) -> tuple[Order, _Half]:
    """Plan and pre-check both halves; choose the order from the memory of both hosts."""
    ours, theirs = halves
    for half in halves:
        half.memory = await memory_of(half.host, half.vm)
        half.plan = await plan_for(
            half.spec, hypervisor=half.host, settings=settings, memory=half.memory
        )
        copies = await half.host.check_migration(half.plan.request, memory=False)
        if copies:
            half.plan = await plan_for(
                half.spec,
                hypervisor=half.host,
                settings=settings,
                memory=half.memory,
                disk_bytes=sum(c.size for c in copies),
            )
    assert ours.plan is not None
    if ours.plan.request.mode == "offline":
        return "parallel", ours  # shut-off guests need no memory on the way
    there = ours.spec.destination
    free_here = (await hypervisor.host_info()).free_memory
    free_there = (await hypervisor.host_load(there)).free_memory
    ours_fits = ours.memory <= free_there
    theirs_fits = theirs.memory <= free_here
    if ours_fits and theirs_fits:
        return "parallel", ours
    # One at a time: the first VM's departure frees its memory for the second.
    if ours_fits and theirs.memory <= free_here + ours.memory:
        return "sequential", ours
    if theirs_fits and ours.memory <= free_there + theirs.memory:
        return "sequential", theirs
    raise IncompatibleDestination(
        f"swap: neither host has room for the other VM: {ours.vm} needs {ours.memory} KiB on "
        f"{there} ({free_there} KiB free), {theirs.vm} needs {theirs.memory} KiB on "
        f"{settings.hostname} ({free_here} KiB free)"
    )


async def _run(half: _Half, *, settings: Settings, bus: MessageBus | None) -> None:
    """One half; its outcome lands in ``half.result`` or ``half.error`` (cancellation of the
    half itself propagates, so the caller can tell a stopped half from a failed one)."""
    assert half.plan is not None
    try:
        with structlog.contextvars.bound_contextvars(vm=half.vm):  # its log lines name its VM
            half.result = await carry_out(
                half.plan,
                half.spec,
                half.ctx,
                hypervisor=half.host,
                settings=settings,
                bus=bus,
                source=half.source,
            )
    except Exception as exc:  # noqa: BLE001 - a bug is this half's failure, not the swap's end
        half.error = as_task_error(exc, log, "swap.half_crashed", vm=half.vm)


async def _parallel(halves: list[_Half], *, settings: Settings, bus: MessageBus | None) -> None:
    tasks = {
        asyncio.create_task(_run(h, settings=settings, bus=bus), name=f"swap-{h.vm}"): h
        for h in halves
    }
    pending: set[asyncio.Task[None]] = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failed = [tasks[t] for t in done if tasks[t].error is not None]
            if failed and pending:
                # Stop the other half: its job is aborted and its VM stays where it was
                # (unless it already switched to post-copy, which the engine finishes).
                for task in pending:
                    task.cancel()
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    for task, half in tasks.items():
        if task.cancelled() and half.result is None and half.error is None:
            other = next(h for h in halves if h is not half)
            half.stopped = True
            half.error = TaskCancelled(
                f"stopped because the migration of {other.vm} failed; {half.vm} stays on "
                f"{half.source}"
            )


async def _sequential(
    first: _Half, second: _Half, *, settings: Settings, bus: MessageBus | None
) -> None:
    await _run(first, settings=settings, bus=bus)
    if first.error is not None:
        second.stopped = True
        second.error = TaskCancelled(
            f"not started because the migration of {first.vm} failed; {second.vm} stays on "
            f"{second.source}"
        )
        return
    await _run(second, settings=settings, bus=bus)


def _record(halves: list[_Half], ctx: EngineContext, order: Order) -> None:
    """Both outcomes into the result: VM 1's keys at the top, VM 2's under ``swap-with``."""
    ours, theirs = halves
    ctx.outcome.merge(ours.ctx.outcome)
    sub: dict[str, object] = {"vm-name": theirs.vm}
    sub["status"] = "error" if theirs.error is not None else "success"
    if theirs.error is not None:
        sub["code"] = theirs.error.code
        sub["details"] = str(theirs.error)
    sub.update(theirs.ctx.outcome.keys())
    if theirs.ctx.outcome.details is not None and "details" not in sub:
        sub["details"] = theirs.ctx.outcome.details
    sub["order"] = order
    ctx.outcome.swap_with = sub


def _outcome(halves: list[_Half]) -> MigrationResult:
    """VM 1's result, or the error to report: VM 1's own failure first, else VM 2's."""
    ours, theirs = halves
    if ours.error is not None and not ours.stopped:
        if theirs.error is not None and not theirs.stopped:
            raise type(ours.error)(f"{ours.error}; swap-with {theirs.vm}: {theirs.error}")
        raise ours.error
    if theirs.error is not None and not theirs.stopped:
        note = f"; {ours.error}" if ours.error is not None else ""
        raise type(theirs.error)(f"swap-with {theirs.vm}: {theirs.error}{note}")
    if ours.error is not None:  # pragma: no cover - a stopped half implies a failed one
        raise ours.error
    assert ours.result is not None
    return ours.result
