"""Steering a running migration from outside: what ``tune migration`` reaches (protocol
§3.11).

The engine owns the job and everything that changes it. While a job runs, the engine puts a
:class:`MigrationSteering` on the task's context (``EngineContext.steerable``) and takes it
away when the job has ended, so the dispatcher finds a running migration by its task and VM
and never touches the hypervisor's job itself. A change goes through the same lock as the
engine's own steering (the convergence policy, the timeouts), updates the policy so it
respects the operator's values (:class:`~asyncmigfra.migration.policy.ConvergencePolicy`),
and is announced in the next progress event (``action: tuned`` with the values), which the
engine publishes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import structlog

from asyncmigfra.errors import Busy, NotSupported, TaskError, WrongState
from asyncmigfra.hypervisor.base import MigrationJob, MigrationResult
from asyncmigfra.migration.policy import ConvergencePolicy

__all__ = [
    "MigrationSteering",
    "Tuning",
    "ended_meanwhile",
]

log = structlog.stdlib.get_logger("asyncmigfra.migrating")


#: s a steering call that failed waits for the job's end before it counts as a failure.
STEER_SETTLE = 1.0
#: s a tune waits for the engine's own steering call to finish before it answers busy.
LOCK_WAIT = 5.0
#: s :meth:`MigrationSteering.moving` waits for a sample of the job.
SAMPLE_WAIT = 2.0


async def ended_meanwhile(done: asyncio.Future[MigrationResult]) -> bool:
    """After a refused steering call: give the job up to :data:`STEER_SETTLE` s to end (a
    domain that just left the source makes libvirt answer "no domain"); ``True`` if it did."""
    await asyncio.wait({done}, timeout=STEER_SETTLE)
    return done.done()


@dataclass(frozen=True, slots=True, kw_only=True)
class Tuning:
    """What ``tune migration`` asks of one running migration."""

    #: MiB/s; 0: unlimited.
    bandwidth: int | None = None
    #: ms
    max_downtime: int | None = None
    post_copy: bool = False
    force_complete: bool = False


class MigrationSteering:
    """One running migration job, as the operator may change it.

    ``lock`` serialises every steering call on the job (the engine's and the operator's);
    ``wake`` tells the engine to publish a progress event now; ``closing`` is set once the
    engine aborts the job (a timeout, a cancel), after which nothing can be changed.
    """

    def __init__(
        self,
        *,
        vm_name: str,
        job: MigrationJob,
        done: asyncio.Future[MigrationResult],
        policy: ConvergencePolicy,
        migration_type: str,
        on_phase: Callable[[str], None],
    ) -> None:
        self.vm_name = vm_name
        self.lock = asyncio.Lock()
        self.wake = asyncio.Event()
        self.closing = False
        self._job = job
        self._done = done
        self._policy = policy
        self._migration_type = migration_type
        self._on_phase = on_phase
        self._announcement: dict[str, object] = {}
        #: MiB/s the operator set with ``tune migration`` (0: unlimited); ``None``: not set.
        #: It holds: a scheduler's :meth:`cap` no longer changes the bandwidth.
        self.operator_bandwidth: int | None = None
        #: The job was seen moving data (see :meth:`moving`).
        self._moving = False
        #: Its bandwidth was changed while it ran (its rate no longer shows the link's).
        self.recapped = False

    def __repr__(self) -> str:
        return f"MigrationSteering({self.vm_name!r}, running={self.running})"

    @property
    def running(self) -> bool:
        return not (self.closing or self._done.done())

    async def moving(self) -> bool:
        """The job has ended its setup: a sample of it shows data (memory or disks) sent,
        or a phase past pre-copy. Once seen, asked no more; a sample that cannot be read (in
        :data:`SAMPLE_WAIT` s) answers ``False`` (still in setup, as far as is known)."""
        if self._moving or not self.running:
            return self._moving
        try:
            async with asyncio.timeout(SAMPLE_WAIT):
                stats = await self._job.stats()
        except (TaskError, TimeoutError):
            return False
        if stats is not None:
            sent = stats.memory_processed + stats.disk_processed
            self._moving = sent > 0 or stats.phase != "migrating"
        return self._moving

    def take_announcement(self) -> dict[str, object] | None:
        """The fields of the ``tuned`` progress event owed since the last one, if any."""
        if not self._announcement:
            return None
        fields, self._announcement = {"action": "tuned", **self._announcement}, {}
        return fields

    async def tune(self, tuning: Tuning) -> dict[str, object]:
        """Apply the operator's ``tuning`` now; the values applied, by wire key. Raises
        ``WrongState`` (the job ended or ends, or the change contradicts one made before),
        ``NotSupported`` (post-copy for a migration that was not started with it allowed),
        ``Busy`` (the engine's own steering call did not finish in time) or the job's
        ``TaskError``. A bandwidth set here holds against :meth:`cap`."""
        async with self._locked():
            self._check(tuning)
            return await self._apply(tuning, by_operator=True)

    async def cap(self, bandwidth: int) -> bool:
        """A scheduler's bandwidth cap (MiB/s, 0: unlimited), applied unless the operator
        set the bandwidth (:attr:`operator_bandwidth`: then it holds, and this is
        ``False``). Raises as :meth:`tune`."""
        async with self._locked():
            if self.operator_bandwidth is not None:
                return False
            await self._apply(Tuning(bandwidth=bandwidth), by_operator=False)
            return True

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """The job's steering lock (see :meth:`tune` for what it raises)."""
        self._refuse_if_over()
        try:
            async with asyncio.timeout(LOCK_WAIT):
                await self.lock.acquire()
        except TimeoutError:
            raise Busy(
                f"the migration of {self.vm_name} is busy changing its job; send the tune again"
            ) from None
        try:
            self._refuse_if_over()
            yield
        finally:
            self.lock.release()

    def _refuse_if_over(self) -> None:
        if not self.running:
            raise WrongState(f"the migration of {self.vm_name} is ending; it can no longer change")

    def _check(self, tuning: Tuning) -> None:
        """Refuse, before anything changes, what cannot be done."""
        policy = self._policy
        if tuning.post_copy and not policy.post_copy_allowed:
            raise NotSupported(
                f"the migration of {self.vm_name} cannot switch to post-copy: it was started"
                f" with migration-type {self._migration_type}, and only a migration-type"
                " post-copy migration can switch"
            )
        if tuning.post_copy and policy.source_suspended:
            raise WrongState(
                f"the guest {self.vm_name} is paused on the source to finish the copy"
                " (force-complete or timeout-action suspend): post-copy is no longer needed"
            )
        if tuning.force_complete and policy.post_copy_started:
            raise WrongState(
                f"the migration of {self.vm_name} is in post-copy: the guest already runs on"
                " the destination, the copy finishes on its own"
            )

    async def _apply(self, tuning: Tuning, *, by_operator: bool) -> dict[str, object]:
        policy, job = self._policy, self._job
        applied: dict[str, object] = {}
        try:
            if tuning.bandwidth is not None:
                await job.set_bandwidth(tuning.bandwidth, post_copy=policy.post_copy_started)
                self.recapped = True
                applied["bandwidth"] = tuning.bandwidth
                if by_operator:
                    self.operator_bandwidth = tuning.bandwidth
            if tuning.max_downtime is not None:
                await job.set_max_downtime(tuning.max_downtime)
                policy.set_by_operator(tuning.max_downtime)
                applied["max-downtime"] = tuning.max_downtime
            if tuning.post_copy:
                if not policy.post_copy_started:
                    policy.post_copy_started = True
                    try:
                        await job.start_post_copy()
                    except BaseException:
                        policy.revert("post-copy")
                        raise
                    self._on_phase("post-copy")
                applied["post-copy"] = True
            if tuning.force_complete:
                if not policy.source_suspended:
                    await job.suspend_source()
                    policy.source_suspended = True
                    self._on_phase("suspended-copy")
                policy.force_completed = True
                applied["force-complete"] = True
        except TaskError as exc:
            raise await self._refused(exc, applied) from exc
        finally:
            if applied:
                self._announcement.update(applied)
                self.wake.set()
                log.info("migration.tuned", vm=self.vm_name, **_log_keys(applied))
        return applied

    async def _refused(self, exc: TaskError, applied: dict[str, object]) -> TaskError:
        """What a refused call becomes: ``WrongState`` when the job ended meanwhile, else the
        job's own error, noting what was already applied."""
        if await ended_meanwhile(self._done):
            return WrongState(
                f"the migration of {self.vm_name} ended before the change took effect"
            )
        log.warning("migration.tune_refused", vm=self.vm_name, error=str(exc))
        if not applied:
            return exc
        done = ", ".join(f"{key} {value}" for key, value in applied.items())
        return type(exc)(f"{exc} (already applied: {done})")


def _log_keys(applied: dict[str, object]) -> dict[str, object]:
    return {key.replace("-", "_"): value for key, value in applied.items()}
