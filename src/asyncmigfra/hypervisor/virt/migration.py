"""The running libvirt migration, :class:`LibvirtMigrationJob` (its request in libvirt's
terms: :mod:`.migrationparams`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Self

import structlog

import libvirt
from asyncmigfra.errors import (
    HypervisorError,
    MigrationFailed,
    TaskCancelled,
    TaskError,
    VmNotFound,
    WrongState,
)
from asyncmigfra.hypervisor.base import (
    JobStats,
    MigrationRequest,
    MigrationResult,
)
from asyncmigfra.hypervisor.virt import storagecopy
from asyncmigfra.hypervisor.virt.connections import _is_libvirt_error
from asyncmigfra.hypervisor.virt.domains import _JOB_NONE, _PAUSED
from asyncmigfra.hypervisor.virt.errors import (
    _code,
    _message,
    error_class,
    map_libvirt_errors,
    translate_error,
)
from asyncmigfra.hypervisor.virt.events import DomainEvent
from asyncmigfra.hypervisor.virt.migrationparams import (
    BANDWIDTH_UNLIMITED,
    MigrationTarget,
    _num,
    job_stats,
)
from asyncmigfra.hypervisor.virt.options import HostAddress

if TYPE_CHECKING:
    from asyncmigfra.hypervisor.virt.backend import LibvirtHypervisor

# The package's logger name, as before the split into modules.
log = structlog.stdlib.get_logger("asyncmigfra.hypervisor.virt")


#: s between jobStats() looks while a migration job is starting (doubling up to the max).
_JOB_START_POLL = 0.05
_JOB_START_POLL_MAX = 0.5
#: s begin_migration waits to see the job before it returns the handle anyway.
_JOB_START_LIMIT = 30.0
#: s wait() waits for the JOB_COMPLETED event after the migrate call returned.
_COMPLETED_EVENT_WAIT = 0.5
#: s abort() keeps retrying while the job is not abortable yet (still starting).
_ABORT_RETRY_LIMIT = 5.0
#: s between the state checks of an adopted job (besides its events).
_ADOPTED_RECHECK = 1.0
#: s aclose() allows a still-running job to end after aborting it.
_CLOSE_JOB_LIMIT = 30.0


def _with_note(error: TaskError, note: str | None) -> TaskError:
    """``error`` with ``note`` added to its message (same class and cause)."""
    if note is None:
        return error
    noted = type(error)(f"{error}; {note}")
    noted.__cause__ = error.__cause__
    return noted


class LibvirtMigrationJob:
    """A running libvirt migration (see :class:`~asyncmigfra.hypervisor.base.MigrationJob`).

    The blocking migrate call runs in a worker thread owned by this job (``_call``);
    :meth:`wait` awaits it (shielded: cancelling a waiter never orphans the thread).
    """

    def __init__(
        self,
        hypervisor: LibvirtHypervisor,
        *,
        uri: str,
        request: MigrationRequest,
        target: MigrationTarget,
        flags: int,
        params: Mapping[str, object],
    ) -> None:
        self.request = request
        self.vm_name = request.vm_name
        self.target = target
        self.flags = flags
        self.params = dict(params)
        self._hv = hypervisor
        self._uri = uri
        self._iteration = 0
        self._iteration_event = asyncio.Event()
        self._completed_stats: Mapping[str, object] | None = None
        self._dest_stats: Mapping[str, object] | None = None
        self._completed_event = asyncio.Event()
        #: Set by every event for the domain (an adopted job's follower waits on it).
        self._changed = asyncio.Event()
        self._aborted = False
        self._adopted = False
        self._last: JobStats | None = None
        self._post_copy = False
        self._suspended = False
        self._seen_active = False
        self._task: asyncio.Future[None] | None = None
        self._outcome: MigrationResult | TaskError | None = None
        self._unwatch: Callable[[], None] | None = None

    def __repr__(self) -> str:
        state = "done" if self.done else "running"
        where = "adopted" if self._adopted else f"-> {self.target.host}"
        return f"LibvirtMigrationJob({self.vm_name!r} {where}, {state})"

    @property
    def done(self) -> bool:
        """The migrate call has returned (successfully or not)."""
        return self._ended()

    def _ended(self) -> bool:
        return self._task is not None and self._task.done()

    # ---- start ---------------------------------------------------------------------------

    def _blocking_migrate(self) -> None:
        """Worker thread: the migrate call (blocks until the job ends).

        It runs on a connection of its own. Measured on the rig (libvirt 9.0, keepalive 5/3):
        while one thread sat in ``migrateToURI3`` on the shared connection, ``jobStats()``
        from another thread on that connection took up to 5 s (a keepalive interval); on any
        other connection it took 1-5 ms. Steering and statistics stay on the shared one.
        """
        private = self._hv._pool[self._uri]
        conn = private.open_private()
        try:
            dom = conn.lookupByName(self.vm_name)
            if self.request.p2p:
                dom.migrateToURI3(self.target.p2p_uri, self.params, self.flags)
                return
            dest_conn = self._hv._pool[self.target.uri].get()
            dest_dom = dom.migrate3(dest_conn, self.params, self.flags)
            if dest_dom is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    stats = dest_dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
                    self._dest_stats = dict(stats)
        finally:
            private.release_private(conn)

    async def _start(self) -> None:
        hv = self._hv
        self._unwatch = hv._hub_or_raise().watch(self._uri, self.vm_name, self._on_event)
        self._task = asyncio.ensure_future(hv._run(self._blocking_migrate))
        self._task.add_done_callback(lambda _f: self._wake())
        hv._jobs.add(self)
        try:
            self._seen_active = await self._await_job()
            if self._seen_active and self.request.initial_downtime is not None:
                try:
                    await self.set_max_downtime(self.request.initial_downtime)
                except TaskError as exc:
                    log.warning("migration.initial_downtime_failed", error=str(exc))
        except BaseException:
            # Cancelled (or failed) before the caller got the handle: nobody else could
            # abort this job, so abort it here and wait for the thread.
            await self._settle()
            raise
        if self._task.done() and not self._seen_active:
            error = self._task.exception()
            if error is not None:
                await self._release_storage()
                self._finish()
                if _is_libvirt_error(error):
                    raise translate_error(error, "Migration failed: ") from error
                raise error

    async def _settle(self) -> None:
        """Abort the job if it still runs and wait (bounded) for the migrate thread."""
        if not self._ended():
            log.warning("migration.aborting_unowned_job", vm=self.vm_name)
            try:
                await self.abort()
            except TaskError as exc:
                log.warning("migration.abort_failed", vm=self.vm_name, error=str(exc))
        if self._task is not None:
            try:
                async with asyncio.timeout(_CLOSE_JOB_LIMIT):
                    await asyncio.wait({self._task})
            except TimeoutError:  # pragma: no cover - libvirt ignores the abort
                log.error("migration.did_not_end", vm=self.vm_name)  # noqa: TRY400
            if self._outcome is None and self._task.done() and not self._task.cancelled():
                # Conclude now, while the connection is still open: wait() may come later.
                self._outcome = await self._conclude(self._task.exception())
        self._finish()

    async def _await_job(self) -> bool:
        """Wait until jobStats() shows the job (True) or the migrate call ended (False)."""
        assert self._task is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _JOB_START_LIMIT
        delay = _JOB_START_POLL
        while not self._task.done():
            try:
                raw = await self._hv._call(self._uri, self._raw_stats)
            except (libvirt.libvirtError, TaskError) as exc:
                # No job statistics here (the test driver), the domain already left, or the
                # connection hiccuped: give a call that is failing a moment to end, then let
                # the engine watch the job.
                log.info("migration.job_not_observable", error=str(exc))
                await asyncio.wait({self._task}, timeout=_JOB_START_POLL_MAX)
                return False
            if _num(raw, "type") != _JOB_NONE:
                return True
            if loop.time() >= deadline:
                log.warning("migration.job_not_seen", limit=_JOB_START_LIMIT)
                return False
            waiter = asyncio.ensure_future(self._iteration_event.wait())
            wake: set[asyncio.Future[Any]] = {self._task, waiter}
            try:
                await asyncio.wait(wake, timeout=delay)
            finally:
                waiter.cancel()
            delay = min(delay * 2, _JOB_START_POLL_MAX)
            if self._iteration > 0:
                return True
        return False

    # ---- adoption ------------------------------------------------------------------------

    @classmethod
    def adopted(
        cls,
        hypervisor: LibvirtHypervisor,
        *,
        uri: str,
        vm_name: str,
        target: MigrationTarget | None = None,
    ) -> Self:
        """A handle on an outgoing job this agent did not start (a peer-to-peer job outlives
        the agent that started it). Its flags are unknown here; its destination is
        ``target`` when the adopting task names it."""
        target = target or MigrationTarget(host="", uri="", p2p_uri="")
        return cls(
            hypervisor,
            uri=uri,
            request=MigrationRequest(vm_name=vm_name, destination=target.host, p2p=True),
            target=target,
            flags=0,
            params={},
        )

    async def _adopt(self) -> None:
        hv = self._hv
        self._adopted = True
        self._seen_active = True
        self._unwatch = hv._hub_or_raise().watch(self._uri, self.vm_name, self._on_event)
        self._task = asyncio.ensure_future(self._follow())
        self._task.add_done_callback(lambda _f: self._wake())
        hv._jobs.add(self)

    async def _follow(self) -> None:
        """Stand-in for the migrate call of an adopted job: return when the job has ended
        with the domain gone from the source, raise when the domain stayed. Woken by the
        domain's events; re-checks every ``_ADOPTED_RECHECK`` s as well, because a failed
        or aborted job may end without an event on the source."""
        while True:
            self._changed.clear()  # before the check: an event during it means "look again"
            if not await self._hv._call(self._uri, self._job_running):
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_ADOPTED_RECHECK):
                    await self._changed.wait()
        where = await self._source_state()
        if where == "postcopy-failed":
            raise HypervisorError("Migration failed: the post-copy migration broke")
        if where == "source":
            if self._aborted:
                raise TaskCancelled("Migration failed: the migration job was aborted")
            raise MigrationFailed("Migration failed: the migration job ended without completing")

    def _job_running(self, conn: Any) -> bool:
        try:
            dom = conn.lookupByName(self.vm_name)
            raw = dom.jobStats()
            state, reason = dom.state()
        except libvirt.libvirtError:
            return False  # the domain left, or is no longer running
        if state == _PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED:
            return False  # a broken post-copy keeps its job in jobStats(); nothing runs
        return _num(raw, "type") != _JOB_NONE

    def _raw_stats(self, conn: Any) -> dict[str, Any]:
        return dict(conn.lookupByName(self.vm_name).jobStats())

    # ---- events --------------------------------------------------------------------------

    def _on_event(self, event: DomainEvent) -> None:
        self._changed.set()
        if event.kind == "migration-iteration":
            self._iteration = max(self._iteration, event.iteration)
            self._wake()
        elif event.kind == "job-completed":
            self._completed_stats = event.stats
            self._completed_event.set()
            self._wake()

    def _wake(self) -> None:
        event, self._iteration_event = self._iteration_event, asyncio.Event()
        event.set()

    def _finish(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        self._hv._jobs.discard(self)

    # ---- MigrationJob --------------------------------------------------------------------

    async def stats(self) -> JobStats | None:
        if self.done:
            return self._last

        def sample(conn: Any) -> tuple[dict[str, Any], int, int]:
            dom = conn.lookupByName(self.vm_name)
            raw = dict(dom.jobStats())
            state, reason = dom.state()
            return raw, int(state), int(reason)

        try:
            raw, state, reason = await self._hv._call(self._uri, sample)
        except libvirt.libvirtError as exc:
            if error_class(exc) in (VmNotFound, WrongState):
                return self._last  # the job ended (the domain left) between two looks
            raise translate_error(exc, "Error getting job statistics: ") from exc
        phase = "migrating"
        if self._post_copy or (state == _PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_POSTCOPY):
            phase = "post-copy"
        elif (
            state == _PAUSED
            and reason == libvirt.VIR_DOMAIN_PAUSED_MIGRATION
            and self.request.mode in ("live", "post-copy")
        ):
            phase = "switchover"
        stats = job_stats(raw, phase=phase)
        if stats is not None:
            self._last = stats
            if stats.iteration > self._iteration:
                self._iteration = stats.iteration
                self._wake()
        return stats

    async def wait_iteration(self, after: int) -> int:
        while True:
            if self._iteration > after or self.done:
                return self._iteration
            await self._iteration_event.wait()

    async def wait(self) -> MigrationResult:
        if self._outcome is None:
            assert self._task is not None
            # asyncio.wait neither raises the call's error nor cancels the call when this
            # waiter is cancelled (the thread must finish; abort() is how it is stopped).
            await asyncio.wait({self._task})
            self._outcome = await self._conclude(self._task.exception())
            self._finish()
        outcome = self._outcome
        if isinstance(outcome, MigrationResult):
            return outcome
        # A fresh exception per call: re-raising one instance grows its traceback.
        raise type(outcome)(str(outcome)) from outcome.__cause__

    async def _conclude(self, exc: BaseException | None) -> MigrationResult | TaskError:
        if exc is None:
            return await self._result()
        if isinstance(exc, TaskCancelled):  # an adopted job that was aborted
            await self._resume_if_we_paused()
            return _with_note(exc, await self._release_storage())
        if isinstance(exc, TaskError):  # e.g. the destination connection could not be opened
            error: TaskError = exc
            message = str(exc)
        elif not _is_libvirt_error(exc):  # pragma: no cover - a bug: the runner reports it
            raise exc
        else:
            message = f"Migration failed: {_message(exc)}"
            if _code(exc) == libvirt.VIR_ERR_OPERATION_ABORTED:
                error = TaskCancelled(message)
                error.__cause__ = exc
                await self._resume_if_we_paused()
                return _with_note(error, await self._release_storage())
            error = translate_error(exc, "Migration failed: ")
        where = await self._source_state()
        if where == "source":
            await self._resume_if_we_paused()
            failed = MigrationFailed(message)
            failed.__cause__ = exc
            return _with_note(failed, await self._release_storage())
        detail = {
            "gone": "the domain is no longer on the source",
            "unknown": "the domain's state on the source is unknown",
            "postcopy-failed": "post-copy failed: the guest is paused on the source",
        }[where]
        wrapped = type(error)(f"{message} ({detail})")
        wrapped.__cause__ = exc
        return wrapped

    async def _source_state(self) -> Literal["source", "gone", "unknown", "postcopy-failed"]:
        offline = self.request.mode == "offline"

        def look(conn: Any) -> Literal["source", "gone", "postcopy-failed"]:
            try:
                dom = conn.lookupByName(self.vm_name)
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                    return "gone"
                raise
            state, reason = dom.state()
            if offline:
                return "source"
            if state == _PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED:
                return "postcopy-failed"
            return "source" if bool(dom.isActive()) else "gone"

        try:
            return await self._hv._call(self._uri, look)
        except (libvirt.libvirtError, TaskError) as exc:
            log.warning("migration.source_state_unknown", error=str(exc))
            return "unknown"

    async def _release_storage(self) -> str | None:
        """After a failure that left the VM on the source: remove the images this migration
        created on the destination (:func:`storagecopy.release_created`); a note for the
        result when some could not be removed. An adopted job acts on the domain's record
        when its destination is known (the adopting task's)."""
        if not self._adopted and self.request.copy_storage == "none":
            return None
        target = self.target if self.target.host else None
        return await storagecopy.release_created(self._hv, self._uri, self.vm_name, target)

    async def _forget_storage_record(self) -> None:
        """After success: the record of created images travelled with the guest; drop it."""
        if not self.target.uri or (not self._adopted and self.request.copy_storage == "none"):
            return
        await storagecopy.forget_record(self._hv, self.vm_name, self.target)

    async def _resume_if_we_paused(self) -> None:
        if not self._suspended:
            return

        def resume(conn: Any) -> None:
            dom = conn.lookupByName(self.vm_name)
            if int(dom.state()[0]) == _PAUSED:
                dom.resume()

        try:
            await self._hv._call(self._uri, resume)
        except (libvirt.libvirtError, TaskError) as exc:
            log.warning("migration.resume_after_failure_failed", error=str(exc))

    async def _result(self) -> MigrationResult:
        await self._forget_storage_record()
        stats = self._dest_stats or self._completed_stats
        if stats is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_COMPLETED_EVENT_WAIT):
                    await self._completed_event.wait()
            stats = self._completed_stats
        if stats is None and self._hv.config.hosts.get(self.target.host, HostAddress()).uri:
            stats = await self._destination_stats()
        downtime = stats.get("downtime") if stats else None
        last = self._last
        iterations = _num(stats, "memory_iteration") if stats else 0
        transferred = _num(stats, "memory_processed") if stats else 0
        zero: int | None = None
        if stats and isinstance(stats.get("memory_constant"), int):
            zero = _num(stats, "memory_constant") * (_num(stats, "memory_page_size") or 4096)
        return MigrationResult(
            downtime=float(downtime) if isinstance(downtime, int | float) else None,
            iterations=iterations or (last.iteration if last else self._iteration),
            post_copy=self._post_copy,
            transferred=transferred or (last.memory_processed if last else 0),
            memory_total=_num(stats, "memory_total") if stats else 0,
            zero_bytes=zero,
        )

    async def _destination_stats(self) -> Mapping[str, object] | None:
        def look(conn: Any) -> dict[str, Any]:
            dom = conn.lookupByName(self.vm_name)
            return dict(dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED))

        try:
            return await self._hv._call(self.target.uri, look)
        except (libvirt.libvirtError, TaskError) as exc:
            log.info("migration.destination_stats_unavailable", error=str(exc))
            return None

    async def _on_domain(self, prefix: str, action: Callable[[Any], object]) -> None:
        with map_libvirt_errors(prefix):
            await self._hv._call(self._uri, lambda c: action(c.lookupByName(self.vm_name)))

    async def set_max_downtime(self, ms: int) -> None:
        await self._on_domain(
            "Error setting max downtime: ", lambda d: d.migrateSetMaxDowntime(int(ms), 0)
        )

    async def set_bandwidth(self, mibs: int, *, post_copy: bool = False) -> None:
        """``virDomainMigrateSetMaxSpeed``. 0 (unlimited) is libvirt's own maximum for
        pre-copy; for post-copy 0 itself, which QEMU reads as no limit."""
        if post_copy:
            speed = min(max(0, mibs), BANDWIDTH_UNLIMITED)
            flags = libvirt.VIR_DOMAIN_MIGRATE_MAX_SPEED_POSTCOPY
        else:
            speed = BANDWIDTH_UNLIMITED if mibs <= 0 else min(mibs, BANDWIDTH_UNLIMITED)
            flags = 0
        await self._on_domain(
            "Error setting the migration bandwidth: ",
            lambda d: d.migrateSetMaxSpeed(int(speed), flags),
        )

    async def start_post_copy(self) -> None:
        await self._on_domain("Error starting post-copy: ", lambda d: d.migrateStartPostCopy(0))
        self._post_copy = True

    async def suspend_source(self) -> None:
        if self.done:
            return
        self._suspended = True
        await self._on_domain("Error suspending domain: ", lambda d: d.suspend())

    async def abort(self) -> None:
        """Abort the job; retried briefly while the job is still starting (not abortable)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _ABORT_RETRY_LIMIT
        while not self._ended():
            try:
                self._aborted = True
                await self._on_domain("Error aborting migration: ", lambda d: d.abortJob())
            except (WrongState, VmNotFound):
                if self._ended():
                    return
                if loop.time() >= deadline:
                    raise
                assert self._task is not None
                await asyncio.wait({self._task}, timeout=0.1)
                continue
            return
