"""Watching a running migration job: samples, progress events, the convergence policy, and
the two limits.

* **completion timeout** (``completion-timeout``): the job as a whole took too long;
* **progress timeout** (``progress-timeout``, default 150 s): the job *moved no data* for
  that long, KubeVirt's definition: the bytes processed (memory plus disks, as the job
  statistics count them) did not grow. A sample that cannot be read (a connection hiccup) is
  no evidence of progress, and counts only with the time that really passed: the timer runs
  from the last sample that showed the bytes growing. It does not act once in post-copy
  (nothing can stop post-copy; it finishes on its own).

When a limit is reached, the migration's ``timeout-action`` applies: ``abort`` (the job is
aborted, the VM keeps running on the source, ``code: timeout``), ``post-copy`` (only for a
``post-copy`` migration, else like abort) or ``suspend`` (the guest pauses on the source so
the copy finishes). After a ``post-copy`` or ``suspend`` of the progress timeout, it starts
over; reached again with the guest already paused, it aborts. The progress event of that
moment carries the ``action`` taken and its ``reason`` (``progress-timeout``,
``completion-timeout``), an abort included.

Every steering call (the policy's, the limits', the operator's ``tune migration``) holds the
job's :class:`~asyncmigfra.migration.steering.MigrationSteering` lock.
"""

from __future__ import annotations

import asyncio
import math
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from asyncmigfra.errors import TaskError, TaskTimeout
from asyncmigfra.hypervisor.base import JobStats, MigrationJob, MigrationResult
from asyncmigfra.migration.context import EngineContext
from asyncmigfra.migration.plan import MigrationPlan
from asyncmigfra.migration.policy import ConvergencePolicy
from asyncmigfra.migration.progress import _Progress
from asyncmigfra.migration.steering import MigrationSteering, ended_meanwhile

if TYPE_CHECKING:
    from asyncmigfra.migration.forecast import ObservedRates

__all__ = [
    "ABORT_TIMEOUT",
    "abort_bounded",
    "watch",
]

log = structlog.stdlib.get_logger("asyncmigfra.migrating")


#: s allowed for aborting a job (libvirt calls can hang; KubeVirt allows 30 s).
ABORT_TIMEOUT = 30.0

PROGRESS_TIMEOUT = "progress-timeout"
COMPLETION_TIMEOUT = "completion-timeout"


@dataclass(slots=True)
class _StallTimer:
    """When the job last moved data (``progress-timeout``); ``limit`` 0: off."""

    limit: float
    #: Bytes processed (memory and disks) of the latest sample that showed them growing.
    moved: int = 0
    since: float = field(default_factory=time.monotonic)

    def feed(self, stats: JobStats | None, now: float) -> None:
        """A sample that was read (``None``: the job has moved nothing yet)."""
        moved = stats.memory_processed + stats.disk_processed if stats is not None else 0
        if moved > self.moved:
            self.moved = moved
            self.since = now

    def left(self, now: float) -> float:
        return self.since + self.limit - now if self.limit > 0 else math.inf

    def expired(self, now: float) -> bool:
        return self.limit > 0 and now - self.since >= self.limit

    def restart(self, now: float) -> None:
        self.since = now


async def watch(
    plan: MigrationPlan,
    job: MigrationJob,
    done: asyncio.Future[MigrationResult],
    *,
    policy: ConvergencePolicy,
    progress: _Progress,
    steering: MigrationSteering,
    ctx: EngineContext,
    interval: float,
    observed: ObservedRates | None = None,
) -> None:
    """Sample and steer the job until it ends (``done``) or a limit aborts it (raises
    ``TaskTimeout``); ``observed`` collects the samples' rates (``Forecaster.learn``)."""
    deadline = time.monotonic() + plan.completion_timeout
    stall = _StallTimer(plan.progress_timeout)
    iteration = 0
    phase = "migrating"
    timed_out = False
    while not done.done():
        waiter = asyncio.ensure_future(job.wait_iteration(iteration))
        woken = asyncio.ensure_future(steering.wake.wait())
        try:
            now = time.monotonic()
            timeout = max(0.0, min(interval, deadline - now, stall.left(now)))
            pending: set[asyncio.Future[object]] = {done, waiter, woken}  # type: ignore[arg-type]
            await asyncio.wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
        finally:
            waiter.cancel()
            woken.cancel()
        steering.wake.clear()
        new_iteration = waiter.result() if waiter.done() and not waiter.cancelled() else None
        if done.done():
            return
        stats, fresh = await _sample(job, done)
        if done.done():
            return
        now = time.monotonic()
        if fresh and stats is not None and observed is not None:
            observed.add(stats)
        if fresh:
            stall.feed(stats, now)
        else:
            # The event repeats the last figures; the pass is judged once a sample succeeds.
            stats = progress.last
        action: str | None = None
        reason: str | None = None
        async with steering.lock:
            if fresh and new_iteration is not None and stats is not None:
                iteration = new_iteration
                action = await _apply(policy.on_iteration(stats), job, done, policy, ctx)
            in_post_copy = policy.post_copy_started or (
                stats is not None and stats.phase == "post-copy"
            )
            if now >= deadline and not timed_out:
                timed_out = True
                action, reason = await _on_limit(plan, job, done, policy, ctx), COMPLETION_TIMEOUT
            elif stall.expired(now) and not in_post_copy:
                action, reason = (
                    await _on_limit(plan, job, done, policy, ctx, stalled=True),
                    PROGRESS_TIMEOUT,
                )
                stall.restart(now)
            if action == "abort":
                steering.closing = True
        if policy.post_copy_started:
            phase = "post-copy"
        tuned = steering.take_announcement() if action is None else None
        ctx.progress(
            progress.fields(
                stats,
                phase=phase,
                action=action,
                downtime=policy.downtime,
                reason=reason,
                tuned=tuned,
            )
        )
        if action == "abort":
            await _abort_on_limit(plan, job, done, stalled=reason == PROGRESS_TIMEOUT)


async def abort_bounded(job: MigrationJob) -> None:
    """Abort the job within :data:`ABORT_TIMEOUT` s; a failure is logged only (the job may
    already have ended)."""
    try:
        async with asyncio.timeout(ABORT_TIMEOUT):
            await job.abort()
    except Exception as exc:  # noqa: BLE001 - the job may already have ended
        log.warning("migration.abort_failed", error=str(exc))


async def _sample(
    job: MigrationJob, done: asyncio.Future[MigrationResult]
) -> tuple[JobStats | None, bool]:
    """The job's statistics and whether they could be read now (``fresh``). Sampling only
    informs: a failed sample (the job ending under it, a connection hiccup) never fails the
    task, whose outcome is the job's own, and no policy decision is taken on it."""
    try:
        return await job.stats(), True
    except TaskError as exc:
        if not await ended_meanwhile(done):
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
        if await ended_meanwhile(done):
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


async def _on_limit(
    plan: MigrationPlan,
    job: MigrationJob,
    done: asyncio.Future[MigrationResult],
    policy: ConvergencePolicy,
    ctx: EngineContext,
    *,
    stalled: bool = False,
) -> str | None:
    """The ``timeout-action`` at a limit (``stalled``: the progress timeout, else the
    completion timeout): the action taken, ``"abort"`` when the caller must abort the job,
    ``None`` when nothing was done (the job ended meanwhile, or the guest is already paused
    for the copy to finish)."""
    action = plan.timeout_action
    if stalled:
        log.warning("migration.progress_timeout", action=action, limit=plan.progress_timeout)
    else:
        log.warning("migration.completion_timeout", action=action, limit=plan.completion_timeout)
    if policy.post_copy_started:
        # Nothing can stop post-copy; it finishes on its own (and fast).
        return "post-copy"
    if action == "post-copy" and plan.request.mode == "post-copy":
        policy.post_copy_started = True
        if await _steer(action, job.start_post_copy(), done, policy):
            ctx.phase("post-copy")
            return "post-copy"
    elif action == "suspend" and policy.source_suspended:
        if not stalled:
            return None  # paused already: the copy finishes, no further limit applies
    elif action == "suspend" and await _steer(action, job.suspend_source(), done, policy):
        policy.source_suspended = True
        ctx.phase("suspended-copy")
        return "suspend"
    if done.done():
        return None  # the job ended on its own meanwhile; its outcome decides
    return "abort"


async def _abort_on_limit(
    plan: MigrationPlan,
    job: MigrationJob,
    done: asyncio.Future[MigrationResult],
    *,
    stalled: bool,
) -> None:
    """Abort the job a limit ended and raise ``TaskTimeout``; a job that ended on its own
    meanwhile is left to its outcome."""
    if done.done():
        return
    async with asyncio.timeout(ABORT_TIMEOUT):
        await job.abort()
    if stalled:
        raise TaskTimeout(
            f"migration moved no data for {plan.progress_timeout:g} s (progress-timeout);"
            " it was aborted and the VM keeps running on the source"
        )
    raise TaskTimeout(
        f"migration did not complete within {plan.completion_timeout:g} s "
        "(completion-timeout); it was aborted and the VM keeps running on the source"
    )
