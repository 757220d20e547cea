"""The steps around a migration: devices out and back in (ivshmem, PCI), repin + resume on
the destination, the built-in ``reduce-memory`` balloon step, the pscom hook, and running
clean-up steps on an error path (:func:`_unwind`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field

import structlog

from asyncmigfra.errors import ConnectionFailed, HookFailed, TaskError, VmNotFound
from asyncmigfra.hypervisor.base import Hypervisor
from asyncmigfra.migration.context import EngineContext
from asyncmigfra.model import PciId, VcpuMap
from asyncmigfra.peers.bus import MessageBus
from asyncmigfra.peers.pscom import PscomHook, count_processes
from asyncmigfra.peers.userhooks import HookRunner
from asyncmigfra.settings import HookSettings, Settings

__all__ = [
    "DetachedDevices",
    "after_arrival",
    "detach_devices",
    "reattach_devices",
    "repin_on_destination",
]

log = structlog.stdlib.get_logger("asyncmigfra.migrating")


#: Unwinding steps still running after their task was cancelled again (kept referenced).
_UNWINDING: set[asyncio.Future[None]] = set()


async def _unwind(step: Coroutine[None, None, None]) -> None:
    """Run a clean-up step on an error path: shielded from cancellation (each part is bounded
    by its own timeout), failures only logged: the error being handled is what the task
    reports."""
    task = asyncio.ensure_future(step)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        _UNWINDING.add(task)
        task.add_done_callback(_UNWINDING.discard)
        raise
    except Exception as exc:  # noqa: BLE001 - logged; the original error is reported
        log.error("migration.unwind_failed", error=str(exc))  # noqa: TRY400


# ---- reduce-memory (built-in hook) ---------------------------------------------------------

#: s without any change in the guest's memory after which ballooning down stops waiting (a
#: guest without a balloon driver never answers).
BALLOON_STALL = 3.0


#: s between two looks at the guest's memory while it balloons down.
BALLOON_POLL = 0.1


@dataclass(frozen=True, slots=True)
class _Balloon:
    """A guest ballooned down before its migration: what to give back afterwards."""

    hook: HookSettings
    vm: str
    #: KiB the guest had before.
    original: int


async def _shrink(
    hooks: HookRunner | None,
    host: Hypervisor,
    vm: str,
    ctx: EngineContext,
    warnings: list[str],
) -> _Balloon | None:
    """``reduce-memory``: balloon the guest down to the hook's target and wait (bounded by the
    hook's ``timeout``, and by :data:`BALLOON_STALL` without progress) until it got there, so
    the migration copies less. ``None``: nothing to give back."""
    hook = hooks.builtin("reduce-memory") if hooks is not None else None
    if hook is None:
        return None
    balloon: _Balloon | None = None
    ctx.phase(f"hook:{hook.name}")
    try:
        with ctx.measure(f"hook-{hook.name}"):
            current = await host.current_memory(vm)
            if current <= 0:
                raise HookFailed(f"the size of {vm} is unknown")
            target = hook.memory_target_mib(current / 1024) * 1024
            if target >= current:
                return None
            await host.set_memory(vm, target, ctx)
            balloon = _Balloon(hook, vm, current)
            try:
                reached = await _wait_for_balloon(host, vm, target, current, hook.timeout)
            except asyncio.CancelledError:
                await _unwind(_restore(balloon, host, ctx, [], arrived=False))
                raise
            log.info("balloon.reduced", before=current, target=target, reached=reached)
            if reached > target + max(1024, target // 50):
                raise HookFailed(
                    f"the guest gave back {current - reached} of {current - target} KiB "
                    f"within {hook.timeout:g} s (is a balloon driver running in it?)"
                )
    except TaskError as exc:
        text = f"hook {hook.name} (before-migrate) failed: {exc}"
        log.warning("hook.failed", hook=hook.name, point="before-migrate", error=text)
        if hook.policy == "fail":
            if balloon is not None:
                with contextlib.suppress(HookFailed):
                    await _restore(balloon, host, ctx, [], arrived=False)
            raise HookFailed(text) from exc
        warnings.append(text)
    return balloon


async def _wait_for_balloon(
    host: Hypervisor, vm: str, target: int, start: int, limit: float
) -> int:
    """The guest's memory (KiB) once it reached ``target``, stopped moving, or after ``limit``
    seconds."""
    deadline = time.monotonic() + limit
    last, last_change = start, time.monotonic()
    while True:
        now = await host.current_memory(vm)
        tick = time.monotonic()
        if now != last:
            last, last_change = now, tick
        if now <= target or tick >= deadline or tick - last_change >= BALLOON_STALL:
            return now
        await asyncio.sleep(BALLOON_POLL)


async def _restore(
    balloon: _Balloon, there: Hypervisor, ctx: EngineContext, warnings: list[str], *, arrived: bool
) -> None:
    """Give the guest its memory back (on the destination, or on the source after a failure).
    Not waited for: the guest grows on its own time."""
    hook = balloon.hook
    ctx.phase(f"hook:{hook.name}")
    try:
        with ctx.measure(f"hook-{hook.name}"):
            async with asyncio.timeout(hook.timeout):
                await there.set_memory(balloon.vm, balloon.original, ctx)
    except (TaskError, TimeoutError) as exc:
        reason = str(exc) or f"no answer within {hook.timeout:g} s"
        where = f"the VM migrated to {ctx.outcome.destination} but " if arrived else ""
        text = f"{where}hook {hook.name} (after-migrate) failed: {reason}"
        log.warning("hook.failed", hook=hook.name, point="after-migrate", error=text)
        if hook.policy == "fail":
            raise HookFailed(text) from exc
        warnings.append(text)


async def _pscom_hook(
    procs: int | str | None, vm: str, bus: MessageBus | None, settings: Settings
) -> PscomHook | None:
    """The pscom hook for ``pscom-hook-procs`` (``auto``: count over SSH); ``None``: none."""
    if procs in (None, 0) or bus is None:
        return None
    count = await count_processes(settings.pscom, vm) if procs == "auto" else int(procs)
    return PscomHook(bus, settings.pscom, vm, count) if count > 0 else None


@dataclass(slots=True)
class DetachedDevices:
    """What was unplugged before a migration, to plug back in after it (by type)."""

    ivshmem: str | None = None
    pci: dict[PciId, int] = field(default_factory=dict)


async def detach_devices(
    hypervisor: Hypervisor,
    vm_name: str,
    ctx: EngineContext,
    *,
    unplug_timeout: float,
    suffix: str = "",
) -> DetachedDevices:
    """Unplug ivshmem, then the PCI host devices (this order: the original's commit 12f38b6
    fixed a hang with it), each waiting for the guest to release the device. On a failure
    what was already unplugged is plugged back and the task fails ``hook-failed``."""
    ctx.phase("detach-devices")
    devices = DetachedDevices()
    try:
        with ctx.measure(f"detach-ivshmem-devs{suffix}"):
            devices.ivshmem = await hypervisor.detach_ivshmem(
                vm_name, ctx, unplug_timeout=unplug_timeout
            )
        with ctx.measure(f"detach-pci-devs{suffix}"):
            devices.pci = await hypervisor.detach_hostdevs(
                vm_name, ctx, unplug_timeout=unplug_timeout
            )
    except (VmNotFound, ConnectionFailed):
        raise  # nothing was unplugged: the usual error, not a hook's
    except Exception as exc:
        problems = await reattach_devices(hypervisor, vm_name, devices, ctx, suffix=suffix)
        note = f"; putting them back failed too: {'; '.join(problems)}" if problems else ""
        raise HookFailed(f"detaching devices before the migration failed: {exc}{note}") from exc
    return devices


async def reattach_devices(
    there: Hypervisor,
    vm_name: str,
    devices: DetachedDevices,
    ctx: EngineContext,
    *,
    suffix: str = "",
) -> list[str]:
    """Plug back the same number of PCI devices of each type (free ones, chosen on ``there``),
    then the ivshmem device. Returns what failed (empty: everything is back)."""
    if not devices.pci and devices.ivshmem is None:
        with ctx.measure(f"reattach-pci-devs{suffix}"):
            return []
    ctx.phase("reattach-devices")
    problems: list[str] = []
    with ctx.measure(f"reattach-pci-devs{suffix}"):
        if devices.pci:
            try:
                await there.attach_hostdevs(vm_name, devices.pci, ctx)
            except Exception as exc:  # noqa: BLE001 - collected and reported by the caller
                problems.append(f"PCI devices: {exc}")
    if devices.ivshmem is not None:
        with ctx.measure(f"reattach-ivshmem-devs{suffix}"):
            try:
                await there.attach_ivshmem(vm_name, devices.ivshmem, ctx)
            except Exception as exc:  # noqa: BLE001 - collected and reported by the caller
                problems.append(f"ivshmem device: {exc}")
    return problems


async def after_arrival(
    there: Hypervisor,
    vm_name: str,
    devices: DetachedDevices,
    vcpu_map: VcpuMap | None,
    ctx: EngineContext,
    *,
    suffix: str = "",
) -> None:
    """The post-migration steps on the destination, in the original's guard order: repin and
    resume, PCI devices, ivshmem. Every step runs even when an earlier one failed; any
    failure is ``hook-failed`` and the result keeps ``destination`` (the VM is there)."""
    failure: HookFailed | None = None
    if vcpu_map is not None:
        try:
            await repin_on_destination(there, vm_name, vcpu_map, ctx, suffix=suffix)
        except HookFailed as exc:
            failure = exc
    problems = await reattach_devices(there, vm_name, devices, ctx, suffix=suffix)
    if problems:
        where = ctx.outcome.destination
        text = f"the VM migrated to {where} but devices were not reattached: " + "; ".join(problems)
        if failure is not None:
            text = f"{failure}; {text}"
        raise HookFailed(text)
    if failure is not None:
        raise failure


async def repin_on_destination(
    there: Hypervisor, vm_name: str, vcpu_map: VcpuMap, ctx: EngineContext, *, suffix: str = ""
) -> None:
    """Pin the vCPUs of a guest that arrived paused (``MigrationRequest.paused``), then resume
    it (``vcpu-map``, protocol §3.6). The guest is resumed even when pinning fails: it is better
    running unpinned than paused for good; the failure is still ``hook-failed``, and the
    result says where and in which state the guest is."""
    ctx.phase("repin")
    where = ctx.outcome.destination
    with ctx.measure(f"repin{suffix}"):
        pin_error: Exception | None = None
        try:
            await there.repin(vm_name, vcpu_map, ctx)
        except Exception as exc:  # noqa: BLE001 - reported below, after the resume
            pin_error = exc
            log.warning("migration.repin_failed", destination=where, error=str(exc))
        try:
            await there.resume(vm_name, ctx)
        except Exception as exc:
            ctx.outcome.state = "paused"
            raise HookFailed(
                f"the VM migrated to {where} but stays paused there: resume failed: {exc}"
                + (f" (repin failed too: {pin_error})" if pin_error else "")
            ) from exc
    if pin_error is not None:
        ctx.outcome.state = "running"
        raise HookFailed(
            f"the VM migrated to {where} and runs there unpinned: repin failed: {pin_error}"
        ) from pin_error
