"""The migration engine: start the job, watch it, steer it, and report it honestly.

The original blocked in one ``virDomainMigrate3`` call with no progress, no timeout and no
way to stop it. Here the hypervisor only starts the job (:meth:`Hypervisor.begin_migration`)
and this engine owns the rest:

* **progress** every ``agent.progress-interval`` and on every memory iteration, with a
  ``percent`` that never goes backwards and reaches 100 only when the job completed;
* **convergence policy**, decided once per memory iteration, never on one sample: when an
  iteration leaves no less to copy than the one before, the downtime target goes up one step
  (a geometric schedule up to ``max-downtime``, as oVirt does); when the target is at its
  maximum and the copy still stalls, a ``post-copy`` migration switches to post-copy.
  Every change is announced in a progress event's ``action``;
* **completion timeout** (``completion-timeout``, default 150 s per GiB, at least 120 s), then
  the ``timeout-action``: ``abort`` (result ``code: timeout``), ``post-copy`` or ``suspend``;
* **cancel**: a cancelled engine aborts the job (bounded) and waits for it to end, so the VM
  keeps running on the source and no thread is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import structlog

from asyncmigfra.errors import (
    ConnectionFailed,
    HookFailed,
    IncompatibleDestination,
    NotSupported,
    TaskError,
    TaskTimeout,
    VmNotFound,
)
from asyncmigfra.hooks import PscomHook, count_processes
from asyncmigfra.hypervisor.base import (
    Hypervisor,
    JobStats,
    MigrationJob,
    MigrationRequest,
    MigrationResult,
)
from asyncmigfra.model import MigrateSpec, MigrationParams, PciId, VcpuMap
from asyncmigfra.outcomes import Outcome
from asyncmigfra.peers import MessageBus
from asyncmigfra.settings import HookSettings, MigrationDefaults, Settings
from asyncmigfra.timing import TimeMeasurement
from asyncmigfra.userhooks import HookCall, HookRunner

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

__all__ = [
    "ConvergencePolicy",
    "EngineContext",
    "MigrationPlan",
    "carry_out",
    "check_not_here",
    "check_pscom",
    "estimate_eta",
    "follow_adopted",
    "memory_of",
    "migrate",
    "plan_for",
    "plan_migration",
]

log = structlog.stdlib.get_logger(__name__)

#: s allowed for aborting a job (libvirt calls can hang; KubeVirt allows 30 s).
ABORT_TIMEOUT = 30.0
#: Steps of the downtime schedule.
DOWNTIME_STEPS = 5
#: A pass "stalls" when it leaves at least this share of what the previous pass left.
STALL = 0.9
#: A copy is hopeless when the guest dirties at least this share of what the link sends.
HOPELESS_RATE = 0.85
#: Iterations to wait at the maximum downtime before switching to post-copy.
STALLS_BEFORE_POSTCOPY = 2
#: s a steering call that failed waits for the job's end before it counts as a failure.
STEER_SETTLE = 1.0


class EngineContext(Protocol):
    task_id: str | None
    vm_name: str
    timer: TimeMeasurement
    outcome: Outcome

    def phase(self, name: str) -> None: ...

    def measure(self, tag: str) -> AbstractContextManager[None]: ...

    def record(self, tag: str, seconds: float) -> None: ...

    def progress(self, fields: dict[str, object]) -> None: ...

    @property
    def hooks(self) -> HookRunner | None:
        """The configured hooks (``None``: none)."""
        ...

    def companion(self, vm_name: str) -> EngineContext:
        """A context for another VM of the same task (a swap partner): its events carry that
        VM's name and its time-measurement tags the suffix ``-<vm>``."""
        ...


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


@dataclass(slots=True)
class ConvergencePolicy:
    """Per-iteration decisions. Pure: feed it one ``JobStats`` per iteration."""

    max_downtime: int | None
    post_copy_allowed: bool
    schedule: list[int] = field(init=False)
    step: int = 0
    last_remaining: int | None = None
    stalls_at_max: int = 0
    post_copy_started: bool = False

    def __post_init__(self) -> None:
        self.schedule = _downtime_schedule(self.max_downtime) if self.max_downtime else []

    def _hopeless(self, stats: JobStats) -> bool:
        # "At least as fast" with a tolerance: a guest that rewrites the same pages every
        # pass shows a dirty rate that levels off right at the link rate (measured on the
        # rig: 7.1-8.0 MiB/s dirtied against 8.0 MiB/s sent), so a strict comparison would
        # flip on noise and cost several pointless passes.
        if stats.transfer_rate <= 0 or stats.dirty_rate < stats.transfer_rate * HOPELESS_RATE:
            return False
        if self.max_downtime is None or stats.expected_downtime is None:
            return True
        return stats.expected_downtime > self.max_downtime

    def _within_target(self, stats: JobStats) -> bool:
        # The hypervisor switches over at the end of a pass whose rest fits the downtime
        # target: a pass that leaves the same few pages of an idle guest is converging, not
        # stalling, and stepping the target up then only races the job's end.
        target = self.downtime
        expected = stats.expected_downtime
        return target is not None and expected is not None and expected <= target

    @property
    def downtime(self) -> int | None:
        """The current target (ms); ``None`` while the hypervisor's default applies."""
        return self.schedule[self.step] if self.schedule else None

    def revert(self, action: str) -> None:
        """Forget ``action``: the hypervisor refused it (the job ended, or it cannot)."""
        if action == "raise-downtime" and self.step > 0:
            self.step -= 1
        elif action == "post-copy":
            self.post_copy_started = False

    def on_iteration(self, stats: JobStats) -> str | None:
        """Return the action to take now (``raise-downtime``, ``post-copy``) or ``None``."""
        remaining = stats.memory_remaining
        stalled = (
            self.last_remaining is not None
            and remaining > 0
            and remaining >= self.last_remaining * STALL
            and not self._within_target(stats)
        )
        self.last_remaining = remaining
        if stats.iteration < 2 or not stalled or self.post_copy_started:
            return None
        if self.post_copy_allowed and self._hopeless(stats):
            # The guest dirties memory at least as fast as the link sends it: no downtime
            # target within max-downtime can make pre-copy converge, so stepping up only
            # wastes iterations (KubeVirt's stall detector reasons the same way).
            self.post_copy_started = True
            return "post-copy"
        if self.schedule and self.step < len(self.schedule) - 1:
            self.step += 1
            return "raise-downtime"
        self.stalls_at_max += 1
        if self.post_copy_allowed and self.stalls_at_max >= STALLS_BEFORE_POSTCOPY:
            self.post_copy_started = True
            return "post-copy"
        return None


def estimate_eta(stats: JobStats) -> float | None:
    """The remaining time (s, 1 decimal) of a running job, as progress events carry it in
    ``eta`` (protocol §5.5): the data still to send divided by the rate at which it shrinks,
    the transfer rate minus the dirty rate (in post-copy the whole transfer rate: dirtied
    pages no longer need sending again). ``None`` when that rate is not positive (the copy
    does not converge at this rate: no honest estimate) or the job reported no rate."""
    if stats.transfer_rate <= 0:
        return None
    shrinking = stats.transfer_rate
    if stats.phase != "post-copy":
        shrinking -= stats.dirty_rate
    if shrinking <= 0:
        return None
    return round(max(0, stats.data_remaining) / shrinking, 1)


@dataclass(slots=True)
class _Progress:
    """Turns job samples into progress event fields; ``percent`` never decreases."""

    max_downtime: int | None
    percent: float = 0.0
    started: float = field(default_factory=time.monotonic)
    last: JobStats | None = None
    #: ``time.monotonic()`` when ``last`` was taken.
    last_at: float = 0.0

    def elapsed(self) -> float:
        """s since the job started, on the back-end's clock (its samples' ``elapsed``) carried
        forward by the wall clock since the last sample, so it never goes backwards."""
        now = time.monotonic()
        if self.last is None:
            return now - self.started
        return self.last.elapsed + (now - self.last_at)

    def fields(
        self, stats: JobStats | None, *, phase: str, action: str | None, downtime: int | None
    ) -> dict[str, object]:
        out: dict[str, object] = {"phase": phase}
        if stats is not None:
            self.last = stats
            self.last_at = time.monotonic()
            total = stats.memory_processed + stats.memory_remaining
            if total > 0:
                pct = 100.0 * stats.memory_processed / total
                self.percent = max(self.percent, min(99.0, pct))
            out.update(
                {
                    "iteration": stats.iteration,
                    "elapsed": round(stats.elapsed, 3),
                    "percent": round(self.percent, 1),
                    "memory-total": stats.memory_total,
                    "memory-processed": stats.memory_processed,
                    "memory-remaining": stats.memory_remaining,
                    "data-remaining": stats.data_remaining,
                    "dirty-rate": stats.dirty_rate,
                    "transfer-rate": stats.transfer_rate,
                }
            )
            if stats.expected_downtime is not None:
                out["expected-downtime"] = round(stats.expected_downtime, 1)
            eta = estimate_eta(stats)
            if eta is not None:
                out["eta"] = eta
        else:
            out.update(
                {
                    "iteration": 0,
                    "elapsed": round(self.elapsed(), 3),
                    "percent": round(self.percent, 1),
                }
            )
        if downtime is not None:
            out["max-downtime"] = downtime
        if action is not None:
            out["action"] = action
        return out

    def final(self, *, downtime: int | None) -> dict[str, object]:
        """The last event of a completed job: 100 %, nothing left to copy."""
        last = self.last
        out: dict[str, object] = {"phase": "completed"}
        out["iteration"] = last.iteration if last else 0
        out["elapsed"] = round(self.elapsed(), 3)
        out["percent"] = 100.0
        if last is not None:
            out["memory-total"] = last.memory_total
            out["memory-processed"] = last.memory_processed + last.memory_remaining
            out["memory-remaining"] = 0
            out["data-remaining"] = 0
            out["transfer-rate"] = last.transfer_rate
        out["eta"] = 0.0
        if downtime is not None:
            out["max-downtime"] = downtime
        return out


async def memory_of(hypervisor: Hypervisor, vm_name: str) -> int:
    """Guest memory (KiB) for the default completion timeout; 0 when the back-end does not
    list it (``begin_migration`` reports a missing VM with its own error)."""
    for dom in await hypervisor.list_domains():
        if dom.name == vm_name:
            return dom.memory
    return 0


async def migrate(
    spec: MigrateSpec,
    ctx: EngineContext,
    *,
    hypervisor: Hypervisor,
    settings: Settings,
    bus: MessageBus | None = None,
) -> MigrationResult:
    """Migrate one VM; on success ``ctx.outcome`` gets ``destination`` (and ``retries``).
    (``swap-with`` is :func:`asyncmigfra.swapping.swap`.)"""
    check_pscom(spec, bus)
    plan = await plan_for(spec, hypervisor=hypervisor, settings=settings)
    # Pre-checks come before anything touches the VM (devices included): a failure leaves
    # it exactly as it was.
    ctx.phase("pre-checks")
    with ctx.measure("pre-checks"):
        check_not_here(spec.destination, settings.hostname)
        await hypervisor.check_migration(plan.request)
    return await carry_out(
        plan,
        spec,
        ctx,
        hypervisor=hypervisor,
        settings=settings,
        bus=bus,
        source=settings.hostname,
    )


def check_not_here(destination: str, hostname: str) -> None:
    """Refuse a destination that names this agent's own host: libvirt would refuse it only
    after the devices were detached ("Attempt to migrate guest to the same host"). An
    address that reaches this host under another name is the back-end's pre-check."""
    if destination == hostname:
        raise IncompatibleDestination(
            f"destination {destination} is this agent's own host: a VM cannot migrate to the"
            " host it runs on"
        )


def check_pscom(spec: MigrateSpec, bus: MessageBus | None) -> None:
    """Refuse a pscom hook that cannot run: a silent skip would leave MPI processes running
    through the migration."""
    if spec.parameter.pscom_hook_procs not in (None, 0) and bus is None:
        raise NotSupported("pscom-hook-procs needs the agent's MQTT connection")


async def carry_out(
    plan: MigrationPlan,
    spec: MigrateSpec,
    ctx: EngineContext,
    *,
    hypervisor: Hypervisor,
    settings: Settings,
    bus: MessageBus | None,
    source: str,
) -> MigrationResult:
    """Everything after the pre-checks: ``before-migrate`` hooks, ``reduce-memory``, pscom
    suspend, devices out, the migration (with its retries), the destination's steps, pscom
    resume, memory back, ``after-migrate`` hooks. ``hypervisor`` acts on the VM's host,
    ``source`` names it."""
    hooks = ctx.hooks
    call = HookCall(
        point="before-migrate",
        task="migrate vm",
        task_id=ctx.task_id,
        vm_name=spec.vm_name,
        source=source,
        destination=spec.destination,
    )
    warnings: list[str] = []
    balloon: _Balloon | None = None
    try:
        if hooks is not None:
            warnings += await hooks.run(call, ctx)  # policy fail: raises, VM not touched yet
        balloon = await _shrink(hooks, hypervisor, spec.vm_name, ctx, warnings)
        result = await _suspended_move(
            plan, spec, ctx, hypervisor=hypervisor, settings=settings, bus=bus
        )
    except BaseException as exc:
        # The after-migrate hooks run whenever the before-migrate ones started (a drain gets
        # its undrain), with outcome error. Where the VM is now: on the destination when the
        # failure came after its arrival.
        arrived = ctx.outcome.destination is not None
        there = hypervisor.on_host(spec.destination) if arrived else hypervisor
        after = replace(call, point="after-migrate", outcome="error", details=_why(exc))
        await _unwind(_after_failure(hooks, balloon, there, after, ctx))
        raise
    if balloon is not None:
        await _restore(balloon, hypervisor.on_host(spec.destination), ctx, warnings, arrived=True)
    if hooks is not None:
        warnings += await hooks.run(replace(call, point="after-migrate", outcome="success"), ctx)
    ctx.outcome.note(*warnings)
    return result


async def _suspended_move(
    plan: MigrationPlan,
    spec: MigrateSpec,
    ctx: EngineContext,
    *,
    hypervisor: Hypervisor,
    settings: Settings,
    bus: MessageBus | None,
) -> MigrationResult:
    """The move with the VM's MPI processes suspended around it (pscom hook)."""
    params = spec.parameter
    vm = spec.vm_name
    pscom = await _pscom_hook(params.pscom_hook_procs, vm, bus, settings)
    if pscom is not None:
        await pscom.suspend(ctx)  # a failure resumes what it suspended and raises HookFailed
    try:
        result = await _move(plan, spec, ctx, hypervisor=hypervisor, settings=settings)
    except BaseException:
        if pscom is not None:
            await pscom.resume_quietly(ctx)  # on the source, or where the VM arrived
        raise
    if pscom is not None:
        try:
            await pscom.resume(ctx)
        except HookFailed as exc:
            raise HookFailed(
                f"the VM migrated to {spec.destination} but resuming its MPI processes "
                f"failed: {exc}"
            ) from exc
    return result


def _why(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return str(exc) or exc.__class__.__name__


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


async def _after_failure(
    hooks: HookRunner | None,
    balloon: _Balloon | None,
    there: Hypervisor,
    call: HookCall,
    ctx: EngineContext,
) -> None:
    """After a failed (or cancelled) migration: memory back where the VM is, then the
    ``after-migrate`` hooks with ``outcome: error``; their failures are logged only."""
    if balloon is not None:
        warnings: list[str] = []
        with contextlib.suppress(HookFailed):
            await _restore(balloon, there, ctx, warnings, arrived=False)
    if hooks is not None:
        try:
            await hooks.run(call, ctx)
        except HookFailed as exc:
            log.error("hook.failed_after_failure", error=str(exc))  # noqa: TRY400


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


async def _move(
    plan: MigrationPlan,
    spec: MigrateSpec,
    ctx: EngineContext,
    *,
    hypervisor: Hypervisor,
    settings: Settings,
) -> MigrationResult:
    """Devices out, the migration, then the destination's steps (devices back, repin)."""
    vm = spec.vm_name
    devices = await detach_devices(
        hypervisor, vm, ctx, unplug_timeout=settings.migration.device_timeout
    )
    try:
        result = await _migrate_with_retries(
            plan, spec, ctx, hypervisor=hypervisor, settings=settings
        )
    except BaseException:
        # The VM is still on the source: give it its devices back there (docs/protocol.md §3.6).
        problems = await reattach_devices(hypervisor, vm, devices, ctx)
        if problems:
            log.error("migration.source_reattach_failed", problems=problems)  # noqa: TRY400
        raise
    await after_arrival(
        hypervisor.on_host(spec.destination), vm, devices, spec.parameter.vcpu_map, ctx
    )
    return result


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


async def _migrate_with_retries(
    plan: MigrationPlan,
    spec: MigrateSpec,
    ctx: EngineContext,
    *,
    hypervisor: Hypervisor,
    settings: Settings,
) -> MigrationResult:
    attempt = 0
    while True:
        try:
            result = await _migrate_once(plan, ctx, hypervisor=hypervisor, settings=settings)
        except Exception as exc:
            retryable = getattr(exc, "retryable", False)
            if not retryable or attempt >= plan.retries:
                if attempt:
                    ctx.outcome.retries = attempt
                raise
            attempt += 1
            delay = plan.retry_delay * 2 ** (attempt - 1)
            log.warning("migration.retry_scheduled", attempt=attempt, delay=delay, error=str(exc))
            ctx.phase("retry-wait")
            await asyncio.sleep(delay)
            continue
        if attempt:
            ctx.outcome.retries = attempt
        return _arrived(spec, result, ctx)


async def follow_adopted(
    spec: MigrateSpec,
    job: MigrationJob,
    ctx: EngineContext,
    *,
    hypervisor: Hypervisor,
    settings: Settings,
) -> MigrationResult:
    """Follow a migration job that a previous agent run started (peer-to-peer jobs belong to
    libvirtd and outlive the agent) to its end, with progress, policy and timeout."""
    plan = await plan_for(spec, hypervisor=hypervisor, settings=settings)
    ctx.phase("adopted")
    result = await _migrate_once(plan, ctx, hypervisor=hypervisor, settings=settings, adopted=job)
    return _arrived(spec, result, ctx)


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


def _arrived(spec: MigrateSpec, result: MigrationResult, ctx: EngineContext) -> MigrationResult:
    """Record where the VM runs now and the downtime libvirt measured."""
    ctx.outcome.destination = spec.destination
    if result.downtime is not None:
        ctx.record("downtime", result.downtime / 1000.0)
    return result


async def _migrate_once(
    plan: MigrationPlan,
    ctx: EngineContext,
    *,
    hypervisor: Hypervisor,
    settings: Settings,
    adopted: MigrationJob | None = None,
) -> MigrationResult:
    request = plan.request
    policy = ConvergencePolicy(
        max_downtime=plan.max_downtime, post_copy_allowed=request.mode == "post-copy"
    )
    progress = _Progress(max_downtime=plan.max_downtime)
    with ctx.measure("migrate"):
        job = adopted or await hypervisor.begin_migration(request, ctx)
        ctx.phase("migrating")
        done = asyncio.ensure_future(job.wait())
        try:
            await _watch(
                plan,
                job,
                done,
                policy=policy,
                progress=progress,
                ctx=ctx,
                interval=settings.agent.progress_interval,
            )
        except asyncio.CancelledError:
            if not policy.post_copy_started:
                log.info("migration.cancelling")
                await _abort_bounded(job)
                raise
            # Post-copy cannot be undone (the guest already runs on the destination): finish
            # it and report what really happened instead of a false "cancelled".
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            log.warning("migration.cancel_ignored_in_post_copy")
            ctx.outcome.details = "cancel arrived during post-copy, which cannot be undone"
            async with asyncio.timeout(plan.completion_timeout):
                await asyncio.wait({done})
        finally:
            await _settle(done)
        result = done.result()
    final = progress.final(downtime=policy.downtime)
    if result.downtime is not None:
        final["downtime"] = round(result.downtime, 1)
    ctx.progress(final)
    return result


async def _watch(
    plan: MigrationPlan,
    job: MigrationJob,
    done: asyncio.Future[MigrationResult],
    *,
    policy: ConvergencePolicy,
    progress: _Progress,
    ctx: EngineContext,
    interval: float,
) -> None:
    """Sample and steer the job until it ends (``done``) or the completion timeout acts."""
    deadline = time.monotonic() + plan.completion_timeout
    iteration = 0
    phase = "migrating"
    timed_out = False
    while not done.done():
        action = None
        waiter = asyncio.ensure_future(job.wait_iteration(iteration))
        try:
            timeout = max(0.0, min(interval, deadline - time.monotonic()))
            pending: set[asyncio.Future[object]] = {done, waiter}  # type: ignore[arg-type]
            await asyncio.wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
        finally:
            waiter.cancel()
        new_iteration = waiter.result() if waiter.done() and not waiter.cancelled() else None
        if done.done():
            return
        stats, fresh = await _sample(job, done)
        if done.done():
            return
        if not fresh:
            # The event repeats the last figures; the pass is judged once a sample succeeds.
            stats = progress.last
        elif new_iteration is not None and stats is not None:
            iteration = new_iteration
            action = await _apply(policy.on_iteration(stats), job, done, policy, ctx)
        if time.monotonic() >= deadline and not timed_out:
            timed_out = True
            action = await _on_timeout(plan, job, done, policy, ctx)
        if policy.post_copy_started:
            phase = "post-copy"
        ctx.progress(progress.fields(stats, phase=phase, action=action, downtime=policy.downtime))


async def _abort_bounded(job: MigrationJob) -> None:
    try:
        async with asyncio.timeout(ABORT_TIMEOUT):
            await job.abort()
    except Exception as exc:  # noqa: BLE001 - the job may already have ended
        log.warning("migration.abort_failed", error=str(exc))


async def _settle(done: asyncio.Future[MigrationResult]) -> None:
    """Wait (bounded) for the job's end so no thread or task outlives the engine."""
    if not done.done():
        try:
            async with asyncio.timeout(ABORT_TIMEOUT):
                await asyncio.wait({done})
        except TimeoutError:
            log.error("migration.job_did_not_end", limit=ABORT_TIMEOUT)  # noqa: TRY400
        except asyncio.CancelledError:
            done.cancel()
            raise
        if not done.done():
            done.cancel()
    if done.done() and not done.cancelled():
        done.exception()  # mark retrieved; the caller reads the result


async def _sample(
    job: MigrationJob, done: asyncio.Future[MigrationResult]
) -> tuple[JobStats | None, bool]:
    """The job's statistics and whether they could be read now (``fresh``). Sampling only
    informs: a failed sample (the job ending under it, a connection hiccup) never fails the
    task, whose outcome is the job's own, and no policy decision is taken on it."""
    try:
        return await job.stats(), True
    except TaskError as exc:
        await asyncio.wait({done}, timeout=STEER_SETTLE)
        if not done.done():
            log.warning("migration.sample_failed", error=str(exc))
        return None, False


async def _steer(
    action: str,
    call: Coroutine[None, None, None],
    done: asyncio.Future[MigrationResult],
    policy: ConvergencePolicy,
) -> bool:
    """Run one steering call on the job; ``True`` when it took effect.

    A sample and the call that acts on it are two round trips, and the job may end between
    them: the domain has then left the source and libvirt answers "no domain" or "not
    migrating". That is no failure (the job's own outcome decides), so a refused call waits
    briefly for the job's end before it is judged. A call refused while the job still runs
    is logged and the copy goes on as it was, still bounded by the completion timeout.
    Either way the policy forgets the action at once, so a cancel arriving meanwhile
    aborts the job instead of waiting for a post-copy that never began.
    """
    try:
        await call
    except TaskError as exc:
        policy.revert(action)
        await asyncio.wait({done}, timeout=STEER_SETTLE)
        if done.done():
            log.info("migration.steering_after_end", action=action, error=str(exc))
        else:
            log.warning("migration.steering_failed", action=action, error=str(exc))
        return False
    return True


async def _apply(
    action: str | None,
    job: MigrationJob,
    done: asyncio.Future[MigrationResult],
    policy: ConvergencePolicy,
    ctx: EngineContext,
) -> str | None:
    if action == "raise-downtime" and policy.downtime is not None:
        if not await _steer(action, job.set_max_downtime(policy.downtime), done, policy):
            return None
        log.info("migration.downtime_raised", downtime=policy.downtime)
    elif action == "post-copy":
        if not await _steer(action, job.start_post_copy(), done, policy):
            return None
        ctx.phase("post-copy")
        log.info("migration.post_copy_started")
    return action


async def _on_timeout(
    plan: MigrationPlan,
    job: MigrationJob,
    done: asyncio.Future[MigrationResult],
    policy: ConvergencePolicy,
    ctx: EngineContext,
) -> str | None:
    action = plan.timeout_action
    log.warning("migration.completion_timeout", action=action, limit=plan.completion_timeout)
    if policy.post_copy_started:
        # Nothing can stop post-copy; it finishes on its own (and fast).
        return "post-copy"
    if action == "post-copy" and plan.request.mode == "post-copy":
        policy.post_copy_started = True
        if await _steer(action, job.start_post_copy(), done, policy):
            ctx.phase("post-copy")
            return "post-copy"
    elif action == "suspend" and await _steer(action, job.suspend_source(), done, policy):
        ctx.phase("suspended-copy")
        return "suspend"
    if done.done():
        return None  # the job ended on its own meanwhile; its outcome decides
    async with asyncio.timeout(ABORT_TIMEOUT):
        await job.abort()
    raise TaskTimeout(
        f"migration did not complete within {plan.completion_timeout:g} s "
        "(completion-timeout); it was aborted and the VM keeps running on the source"
    )
