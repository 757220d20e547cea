"""Post-copy recovery: finish a post-copy migration whose connection broke after the switch.

Once a migration has switched to post-copy, the guest's vCPUs run on the destination and
part of its memory is still only on the source. When the connection breaks then, the guest
can neither go back nor go on: it is paused on the source and waits on the destination
(libvirt: ``VIR_DOMAIN_PAUSED_POSTCOPY_FAILED`` / ``RUNNING_POSTCOPY_FAILED``). Nothing but
resuming the migration saves it, so the engine does not give up there: it announces
``phase: post-copy-recovery`` and a progress event with ``action: recovering``, then tries to
resume (:meth:`PostCopyRecovery.resume_post_copy`) at once and again every
:data:`PROBE_FIRST_DELAY`..\\ :data:`PROBE_MAX_DELAY` s until it works, within
``migration.postcopy-recovery-window`` s (0: no recovery) counted from the moment this agent
run found the failure. An attempt in flight when the window ends is never interrupted
(interrupting a resumed post-copy would only break it again).

A cancel (or the agent's shutdown) during recovery is ignored and noted, as during post-copy:
stopping would leave the guest paused on both hosts. An agent that dies meanwhile leaves the
task in its journal; the next run finds the broken guest and recovers it the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

import structlog

from asyncmigfra.errors import NotSupported, TaskError, TaskTimeout
from asyncmigfra.hypervisor.base import (
    Hypervisor,
    MigrationRequest,
    MigrationResult,
    PostCopyRecovery,
    RecoversPostCopy,
)
from asyncmigfra.migration.context import EngineContext
from asyncmigfra.migration.plan import MigrationPlan
from asyncmigfra.migration.progress import _Progress
from asyncmigfra.model import MigrateSpec
from asyncmigfra.settings import Settings

__all__ = [
    "PROBE_FIRST_DELAY",
    "PROBE_MAX_DELAY",
    "PostCopyLost",
    "broken_post_copy",
    "recover_or_raise",
    "recover_post_copy",
    "resume_found",
]

log = structlog.stdlib.get_logger("asyncmigfra.migrating")

T = TypeVar("T")

#: s before the second attempt; each later wait is 1.5 times longer, up to the maximum.
PROBE_FIRST_DELAY = 1.0
PROBE_MAX_DELAY = 2.0
_PROBE_GROWTH = 1.5

CANCEL_NOTE = "cancel arrived during post-copy recovery, which cannot be undone"


class PostCopyLost(TaskError):
    """Recovery was refused for good: not retried (the guest is not on the source)."""

    code = "migration-failed"


async def broken_post_copy(
    hypervisor: Hypervisor, request: MigrationRequest, window: float
) -> PostCopyRecovery | None:
    """The recovery handle for ``request`` when recovery is on (``window`` > 0), the back-end
    can recover and the guest is in the post-copy-failed state; else ``None``."""
    if window <= 0 or not isinstance(hypervisor, RecoversPostCopy):
        return None
    try:
        return await hypervisor.broken_post_copy(request)
    except TaskError as exc:
        log.warning("migration.post_copy_state_unknown", error=str(exc))
        return None


async def recover_or_raise(
    failure: TaskError,
    request: MigrationRequest,
    ctx: EngineContext,
    *,
    hypervisor: Hypervisor,
    window: float,
    interval: float,
    progress: _Progress,
) -> MigrationResult:
    """After a migration job failed with ``failure``: recover it when it is a broken
    post-copy (:func:`recover_post_copy`), else raise ``failure``."""
    handle = await broken_post_copy(hypervisor, request, window)
    if handle is None:
        raise failure
    log.warning("migration.post_copy_broken", error=str(failure))
    return await recover_post_copy(
        handle, ctx, window=window, interval=interval, progress=progress, cause=str(failure)
    )


async def recover_post_copy(
    handle: PostCopyRecovery,
    ctx: EngineContext,
    *,
    window: float,
    interval: float,
    progress: _Progress,
    cause: str = "",
) -> MigrationResult:
    """Resume ``handle`` until it works or ``window`` s are over (see the module docstring).
    Success: ``ctx.outcome`` gets ``recovered: true`` and ``recovery-time``. Failure:
    ``recovered: false`` and a ``timeout`` (window over) or ``migration-failed`` (refused for
    good) error whose text says where the guest is and how to resume it by hand."""
    started = time.monotonic()
    deadline = started + window
    ctx.phase("post-copy-recovery")
    _announce(ctx, progress)
    delay = PROBE_FIRST_DELAY
    attempts = 0
    last = cause
    while True:
        attempts += 1
        try:
            result = await _attempt(handle, ctx, progress, interval)
        except TaskError as exc:
            last = str(exc)
            log.info("migration.post_copy_resume_failed", attempt=attempts, error=last)
            if isinstance(exc, NotSupported):
                why = f"resuming is not possible: {last}"
                raise await _gave_up(handle, ctx, PostCopyLost, why) from exc
            where = await _uninterrupted(handle.source_state(), ctx)
            if where == "left":
                # The broken job finished after all (its stream was only stalled).
                return _recovered(ctx, started, MigrationResult(post_copy=True))
            if where == "other":
                why = f"the guest left the post-copy-failed state: {last}"
                raise await _gave_up(handle, ctx, PostCopyLost, why) from exc
        else:
            return _recovered(ctx, started, result)
        if time.monotonic() + delay > deadline:
            raise await _gave_up(
                handle,
                ctx,
                TaskTimeout,
                f"post-copy recovery window of {window:g} s over after {attempts} attempts "
                f"(last error: {last})",
            )
        _announce(ctx, progress)
        await _uninterrupted(asyncio.sleep(delay), ctx)
        delay = min(delay * _PROBE_GROWTH, PROBE_MAX_DELAY)


def _announce(ctx: EngineContext, progress: _Progress) -> None:
    """A progress event ``action: recovering`` (the last figures known)."""
    ctx.progress(
        progress.fields(progress.last, phase="post-copy", action="recovering", downtime=None)
    )


async def _attempt(
    handle: PostCopyRecovery, ctx: EngineContext, progress: _Progress, interval: float
) -> MigrationResult:
    """One resume; while it runs, a progress event every ``interval`` s."""
    attempt = asyncio.ensure_future(handle.resume_post_copy())
    while not attempt.done():
        await _uninterrupted(asyncio.wait({attempt}, timeout=interval), ctx)
        if attempt.done():
            break
        try:
            stats = await _uninterrupted(handle.stats(), ctx)
        except TaskError:
            stats = None
        ctx.progress(progress.fields(stats, phase="post-copy", action=None, downtime=None))
    return attempt.result()


async def _uninterrupted(step: Awaitable[T], ctx: EngineContext) -> T:
    """Await ``step`` to its end, ignoring (and noting) cancellation: stopping a recovery
    would leave the guest paused on both hosts."""
    future = asyncio.ensure_future(step)
    while True:
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.cancelled():
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            if CANCEL_NOTE not in (ctx.outcome.details or ""):
                log.warning("migration.cancel_ignored_in_recovery")
                ctx.outcome.note(CANCEL_NOTE)


def _recovered(ctx: EngineContext, started: float, result: MigrationResult) -> MigrationResult:
    took = round(time.monotonic() - started, 3)
    ctx.outcome.recovered = True
    ctx.outcome.recovery_time = took
    log.info("migration.post_copy_recovered", recovery_time=took)
    return result


async def _gave_up(
    handle: PostCopyRecovery, ctx: EngineContext, kind: type[TaskError], why: str
) -> TaskError:
    ctx.outcome.recovered = False
    try:
        where = await _uninterrupted(handle.describe(), ctx)
    except TaskError as exc:
        where = f"the guest's state could not be read ({exc})"
    log.error("migration.post_copy_recovery_failed", reason=why)
    return kind(f"post-copy failed and was not recovered: {why}; {where}")


async def resume_found(
    handle: PostCopyRecovery,
    plan: MigrationPlan,
    spec: MigrateSpec,
    ctx: EngineContext,
    *,
    settings: Settings,
) -> MigrationResult:
    """A migrate task that finds its VM in the post-copy-failed state on this host (the task
    sent again after a recovery gave up, or re-run by a restarted agent) resumes that
    migration instead of starting one; hooks and devices ran with the first attempt."""
    progress = _Progress(max_downtime=None, memory=plan.memory)
    with ctx.measure("migrate"):
        result = await recover_post_copy(
            handle,
            ctx,
            window=settings.migration.postcopy_recovery_window,
            interval=settings.agent.progress_interval,
            progress=progress,
        )
    ctx.progress(progress.final(downtime=None))
    ctx.outcome.destination = spec.destination
    if result.downtime is not None:
        ctx.record("downtime", result.downtime / 1000.0)
        ctx.outcome.downtime = float(result.downtime)
    return result
