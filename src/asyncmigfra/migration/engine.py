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
* **completion timeout** (``completion-timeout``, default 150 s per GiB of memory and of the
  disks a storage copy moves, at least 120 s) and **progress timeout** (``progress-timeout``,
  default 150 s without data moving), then the ``timeout-action``: ``abort`` (result
  ``code: timeout``), ``post-copy`` or ``suspend`` (:mod:`.watching`);
* **steering from outside**: while the job runs, a :class:`~.steering.MigrationSteering` on
  the task's context lets ``tune migration`` change it (:mod:`.steering`);
* **cancel**: a cancelled engine aborts the job (bounded) and waits for it to end, so the VM
  keeps running on the source and no thread is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from contextlib import AbstractContextManager
from dataclasses import replace

import structlog

from asyncmigfra.errors import (
    HookFailed,
    NotSupported,
    TaskError,
)
from asyncmigfra.hypervisor.base import (
    Hypervisor,
    MigrationJob,
    MigrationResult,
    PostCopyRecovery,
    ReadsGuestOnce,
)
from asyncmigfra.migration.companions import (
    _Balloon,
    _pscom_hook,
    _restore,
    _shrink,
    _unwind,
    after_arrival,
    detach_devices,
    reattach_devices,
)
from asyncmigfra.migration.context import EngineContext
from asyncmigfra.migration.forecast import ObservedRates, forecaster_of, predicted
from asyncmigfra.migration.plan import MigrationPlan, check_not_here, memory_of, plan_for
from asyncmigfra.migration.policy import ConvergencePolicy
from asyncmigfra.migration.progress import _Progress
from asyncmigfra.migration.recovery import broken_post_copy, recover_or_raise, resume_found
from asyncmigfra.migration.steering import MigrationSteering
from asyncmigfra.migration.watching import ABORT_TIMEOUT, abort_bounded, watch
from asyncmigfra.model import MigrateSpec
from asyncmigfra.peers.bus import MessageBus
from asyncmigfra.peers.userhooks import HookCall, HookRunner
from asyncmigfra.settings import Settings

__all__ = [
    "carry_out",
    "check_not_here",
    "check_pscom",
    "follow_adopted",
    "migrate",
]

log = structlog.stdlib.get_logger("asyncmigfra.migrating")


async def migrate(
    spec: MigrateSpec,
    ctx: EngineContext,
    *,
    hypervisor: Hypervisor,
    settings: Settings,
    bus: MessageBus | None = None,
) -> MigrationResult:
    """Migrate one VM; on success ``ctx.outcome`` gets ``destination`` (and ``retries``).
    (``swap-with`` is :func:`asyncmigfra.migration.swap.swap`.)"""
    check_pscom(spec, bus)
    # The pre-checks read the guest once; when nothing runs between them and the job that
    # could change it, that read serves the devices and the job's start as well.
    with _reading_once(hypervisor, spec.vm_name):
        plan, broken = await _checked(spec, ctx, hypervisor=hypervisor, settings=settings)
        if broken is None:
            return await carry_out(
                plan,
                spec,
                ctx,
                hypervisor=hypervisor,
                settings=settings,
                bus=bus,
                source=settings.hostname,
                read_again=_steps_before_move(plan, spec, ctx.hooks),
            )
    # This migration broke in post-copy earlier: resume it.
    return await resume_found(broken, plan, spec, ctx, settings=settings)


def _reading_once(hypervisor: Hypervisor, vm_name: str) -> AbstractContextManager[None]:
    """Where the back-end can, the steps within read the guest once (``ReadsGuestOnce``)."""
    if isinstance(hypervisor, ReadsGuestOnce):
        return hypervisor.reading_once(vm_name)
    return contextlib.nullcontext()


def _steps_before_move(plan: MigrationPlan, spec: MigrateSpec, hooks: HookRunner | None) -> bool:
    """Whether anything may run between the pre-checks and the devices' detach (a
    ``before-migrate`` hook, ``reduce-memory``, the pscom hook) or ran for long (the dirty-rate
    probe of ``migration-type: auto``): then the detach and the job's start read the guest
    again."""
    if plan.auto or spec.parameter.pscom_hook_procs not in (None, 0):
        return True
    if hooks is None:
        return False
    return hooks.wants("before-migrate") or hooks.builtin("reduce-memory") is not None


async def _checked(
    spec: MigrateSpec, ctx: EngineContext, *, hypervisor: Hypervisor, settings: Settings
) -> tuple[MigrationPlan, PostCopyRecovery | None]:
    """The plan, the broken post-copy to resume (if any), else the pre-checks and the
    prediction."""
    memory = await memory_of(hypervisor, spec.vm_name)
    plan = await plan_for(spec, hypervisor=hypervisor, settings=settings, memory=memory)
    broken = await broken_post_copy(
        hypervisor, plan.request, settings.migration.postcopy_recovery_window
    )
    if broken is not None:
        return plan, broken
    # Pre-checks come before anything touches the VM (devices included): a failure leaves
    # it exactly as it was.
    ctx.phase("pre-checks")
    with ctx.measure("pre-checks"):
        check_not_here(spec.destination, settings.hostname)
        copies = await hypervisor.check_migration(plan.request)
    disk_bytes = sum(c.size for c in copies)
    if copies:
        # The disks to copy count in the default completion timeout.
        plan = await plan_for(
            spec, hypervisor=hypervisor, settings=settings, memory=memory, disk_bytes=disk_bytes
        )
    sent = sum(c.sent for c in copies)  # the data that crosses the link
    return await predicted(plan, ctx, hypervisor=hypervisor, settings=settings, disk=sent), None


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
    read_again: bool = True,
) -> MigrationResult:
    """Everything after the pre-checks: ``before-migrate`` hooks, ``reduce-memory``, pscom
    suspend, devices out, the migration (with its retries), the destination's steps, pscom
    resume, memory back, ``after-migrate`` hooks. ``hypervisor`` acts on the VM's host,
    ``source`` names it. ``read_again`` false: the guest as the pre-checks read it (within
    their ``reading_once``) serves the detach and the job's start."""
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
            plan,
            spec,
            ctx,
            hypervisor=hypervisor,
            settings=settings,
            bus=bus,
            read_again=read_again,
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
    read_again: bool,
) -> MigrationResult:
    """The move with the VM's MPI processes suspended around it (pscom hook)."""
    params = spec.parameter
    vm = spec.vm_name
    pscom = await _pscom_hook(params.pscom_hook_procs, vm, bus, settings)
    if pscom is not None:
        await pscom.suspend(ctx)  # a failure resumes what it suspended and raises HookFailed
    try:
        result = await _move(
            plan, spec, ctx, hypervisor=hypervisor, settings=settings, read_again=read_again
        )
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


async def _move(
    plan: MigrationPlan,
    spec: MigrateSpec,
    ctx: EngineContext,
    *,
    hypervisor: Hypervisor,
    settings: Settings,
    read_again: bool,
) -> MigrationResult:
    """Devices out, the migration, then the destination's steps (devices back, repin)."""
    vm = spec.vm_name
    # The devices and the job's start read the guest once, afresh unless the pre-checks'
    # read may serve (the first change ends the read: a retry, a recovery read again).
    fresh = _reading_once(hypervisor, vm) if read_again else contextlib.nullcontext()
    with fresh:
        devices = await detach_devices(
            hypervisor, vm, ctx, unplug_timeout=settings.migration.device_timeout
        )
        try:
            result = await _migrate_with_retries(
                plan, spec, ctx, hypervisor=hypervisor, settings=settings
            )
        except BaseException:
            # The VM is still on the source: its devices back there (docs/protocol.md §3.6).
            problems = await reattach_devices(hypervisor, vm, devices, ctx)
            if problems:
                log.error("migration.source_reattach_failed", problems=problems)  # noqa: TRY400
            raise
    await after_arrival(
        hypervisor.on_host(spec.destination), vm, devices, spec.parameter.vcpu_map, ctx
    )
    return result


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
    if plan.request.copy_storage != "none":
        # The disks count in the default completion timeout here as well.
        with contextlib.suppress(TaskError):
            copies = await hypervisor.disks_to_copy(plan.request)
            disk_bytes = sum(c.size for c in copies)
            plan = await plan_for(
                spec, hypervisor=hypervisor, settings=settings, disk_bytes=disk_bytes
            )
    ctx.phase("adopted")
    result = await _migrate_once(plan, ctx, hypervisor=hypervisor, settings=settings, adopted=job)
    return _arrived(spec, result, ctx)


def _arrived(spec: MigrateSpec, result: MigrationResult, ctx: EngineContext) -> MigrationResult:
    """Record where the VM runs now and the downtime libvirt measured."""
    ctx.outcome.destination = spec.destination
    if result.downtime is not None:
        ctx.record("downtime", result.downtime / 1000.0)
        ctx.outcome.downtime = float(result.downtime)
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
    progress = _Progress(max_downtime=plan.max_downtime, memory=plan.memory)
    forecaster = forecaster_of(ctx)
    observed = ObservedRates()
    started = time.monotonic()
    with ctx.measure("migrate"), forecaster.migrating() if forecaster else contextlib.nullcontext():
        job = adopted or await hypervisor.begin_migration(request, ctx)
        ctx.phase("migrating")
        done = asyncio.ensure_future(job.wait())
        steering = MigrationSteering(
            vm_name=ctx.vm_name,
            job=job,
            done=done,
            policy=policy,
            migration_type=request.mode,
            on_phase=ctx.phase,
        )
        if forecaster is not None:
            observed.shared_now = lambda: forecaster.in_flight > 1 or steering.recapped
        try:
            with ctx.steerable(steering):
                await watch(
                    plan,
                    job,
                    done,
                    policy=policy,
                    progress=progress,
                    steering=steering,
                    ctx=ctx,
                    interval=settings.agent.progress_interval,
                    observed=observed,
                )
        except asyncio.CancelledError:
            if not policy.post_copy_started:
                log.info("migration.cancelling")
                steering.closing = True
                await abort_bounded(job)
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
        try:
            result = done.result()
        except TaskError as exc:  # a broken post-copy is resumed (migration/recovery.py)
            result = await recover_or_raise(
                exc,
                request,
                ctx,
                hypervisor=hypervisor,
                window=settings.migration.postcopy_recovery_window,
                interval=settings.agent.progress_interval,
                progress=progress,
            )
    if forecaster is not None:
        elapsed = None if adopted is not None else time.monotonic() - started
        await forecaster.learn(plan, observed, result, elapsed=elapsed)
    final = progress.final(downtime=policy.downtime)
    if result.downtime is not None:
        final["downtime"] = round(result.downtime, 1)
    ctx.progress(final)
    return result


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
