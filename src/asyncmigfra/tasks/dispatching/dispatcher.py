"""The :class:`Dispatcher`: lifecycle, intake and running of jobs.

The class is one object with shared state (jobs, lanes, counters, the TaskGroup), so it is
not split into independent modules: its parts are mixins over that state
(:class:`~asyncmigfra.tasks.dispatching.base._DispatcherBase`). This module keeps what accepts and
runs jobs (``submit``, ``_run_job``, the journal hand-off, ``drain``); duplicates live in
:mod:`.remembered`, stop-by-regex and evacuate in :mod:`.expansion`, the status, cancel and
quit answers in :mod:`.answers`, the tune answer in :mod:`.tuning`, the lanes in
:mod:`.lanes`, the job records in :mod:`.jobs`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable

import structlog

from asyncmigfra.errors import (
    TaskRejected,
    Unavailable,
)
from asyncmigfra.model import (
    EvacuateSpec,
    PlanEvacuationSpec,
    PlanMigrationSpec,
    ResultEntry,
    StopSpec,
    TaskKind,
    TaskMessage,
)
from asyncmigfra.tasks.dispatching.answers import _Answers
from asyncmigfra.tasks.dispatching.jobs import Reply, _audit, _Job, _Run
from asyncmigfra.tasks.dispatching.planning import _Planning
from asyncmigfra.tasks.dispatching.remembered import _Remembering
from asyncmigfra.tasks.dispatching.tuning import _Tuning
from asyncmigfra.tasks.outcomes import absorb_cancel, entry_for
from asyncmigfra.wire.rendering import parse_error_result

log = structlog.stdlib.get_logger("asyncmigfra.dispatching")


_SHUTTING_DOWN = "the agent is shutting down; send the task again later"
#: s a task waits for its journal record before it is refused with ``unavailable``.
JOURNAL_DEADLINE = 10.0


def _unavailable(reason: str) -> str:
    return (
        f"the agent's journal cannot write ({reason}), so it cannot promise a result: "
        "nothing was done; send the task again later or to another agent"
    )


class Dispatcher(_Answers, _Tuning, _Planning, _Remembering):
    """Accepts parsed messages and runs them; results go to ``deliver``."""

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """Own the jobs' TaskGroup until :meth:`close`; running jobs finish first."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                await self._stop.wait()
                await self._idle.wait()
        finally:
            self._tg = None
            self._answer_thread.shutdown(wait=False)  # idle: every answer task has ended

    def close(self) -> None:
        self._stop.set()

    async def drain(self, grace: float) -> None:
        """Refuse new work; give running work ``grace`` seconds; cancel the rest."""
        self._draining = True
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
        except TimeoutError:
            log.warning("agent.grace_period_over", remaining=len(self._jobs))
            self.cancel_all("the agent is shutting down")
            await self._idle.wait()

    def cancel_all(self, reason: str) -> None:
        for job in list(self._jobs):
            self._cancel_job(job, reason)

    def migration_route(self, task_id: str | None, vm_name: str) -> tuple[str, str] | None:
        """(source, destination) of ``vm_name``'s migration in task ``task_id`` while it runs
        (a swap's partner moves the other way); ``None``: no such migration."""
        jobs = self._by_id.get(task_id, ()) if task_id else self._jobs
        for job in jobs:
            for run in job.runs:
                route = run.routes.get(vm_name)
                if route is not None:
                    return route
        return None

    @property
    def draining(self) -> bool:
        return self._draining

    def hold_lane(self, vm_name: str) -> Callable[[], None] | str:
        """Take ``vm_name``'s lane for another agent (a swap moving this agent's VM, see
        ``peerlanes``): the function that gives it back, or why it cannot be had now. Only an
        empty lane is taken, so a hold never waits and never overtakes work already here."""
        if self._draining:
            return "the agent is shutting down"
        if self._lanes.busy(vm_name):
            return f"a task of this agent runs or waits on {vm_name}"
        return self._lanes.reserve(vm_name).release

    # ---------------------------------------------------------------- intake

    def reject(self, exc: TaskRejected, reply: Reply | None = None) -> None:
        """Answer a message that could not be parsed (``result: unknown``)."""
        self.rejected += 1
        self._events.rejected(exc.task_id, code=exc.code, details=exc.details)
        self._deliver(parse_error_result(exc), reply, None)

    def submit(
        self,
        msg: TaskMessage,
        *,
        payload: bytes,
        reply: Reply | None = None,
        journal_key: str | None = None,
        recovered: bool = False,
    ) -> None:
        """Accept a parsed message (non-blocking). Every path ends in exactly one result.

        ``journal_key`` is set for a message recovered from the journal (it is not recorded
        again); ``recovered`` says it had already started, so it is reconciled, not re-run.
        """
        if self._tg is None or self._stop.is_set():
            self._refuse(msg, reply, "busy", _SHUTTING_DOWN)
            return
        if msg.kind is TaskKind.STATUS:
            self._spawn(self._answer_status(msg, reply), f"status[{msg.id}]")
            return
        if msg.kind is TaskKind.HISTORY:
            self._spawn(self._answer_history(msg, reply), f"history[{msg.id}]")
            return
        if msg.kind is TaskKind.CANCEL:
            self._answer_cancel(msg, reply)
            return
        if msg.kind is TaskKind.TUNE:
            self._spawn(self._answer_tune(msg, reply), f"tune[{msg.id}]")
            return
        dedupe = (msg.id, hashlib.blake2b(payload, digest_size=16).hexdigest()) if msg.id else None
        if dedupe is not None and self._duplicate(dedupe, msg, reply):
            return
        if msg.kind is TaskKind.QUIT:
            self._answer_quit(msg, reply)
            return
        if self._draining:
            self._refuse(msg, reply, "busy", _SHUTTING_DOWN)
            return
        limit = self._settings.limits.max_queued_tasks
        if len(msg.subtasks) > limit:
            self._refuse(
                msg,
                reply,
                "busy",
                f"the message has {len(msg.subtasks)} subtasks, more than the agent ever queues "
                f"(limits.max-queued-tasks: {limit}); split it",
            )
            return
        if self.queued + len(msg.subtasks) > limit:
            self._refuse(
                msg,
                reply,
                "busy",
                f"the agent is busy: {self.queued} subtasks are waiting "
                f"(limits.max-queued-tasks: {limit})",
            )
            return
        container_sequential = not msg.concurrent_execution
        runs = [
            _Run(i, s, sequential=container_sequential or not s.concurrent_execution)
            for i, s in enumerate(msg.subtasks)
        ]
        job = _Job(msg=msg, reply=reply, dedupe=dedupe, runs=runs, recovered=recovered)
        if journal_key is not None:
            job.key = journal_key
        # Every subtask takes its place in its VM's lane now, in arrival order; a sequential
        # one also waits for the earlier subtasks of its message. Waits only point to earlier
        # (message, subtask) pairs, so they cannot form a cycle.
        for run in runs:
            lane = run.spec.lane
            if lane:
                run.ticket = self._lanes.reserve(lane)
        self.queued += len(runs)
        self._jobs.add(job)
        self._idle.clear()
        if msg.id:
            self._by_id.setdefault(msg.id, []).append(job)
        if dedupe is not None:
            self._running_keys[dedupe] = job
        if self._journal is not None and journal_key is None:
            # ``accepted`` goes out once the record is durable: from then on a result is owed
            # even across a crash. A job whose work can begin at once is written ``running``
            # in the same write (one hand-off to the journal's thread instead of two).
            at_once = self._starts_at_once(job)
            written = self._journal.accepted(
                job.key,
                task_id=msg.id,
                payload=payload,
                response_topic=reply.response_topic if reply else None,
                correlation=reply.correlation_data if reply else None,
                running=at_once,
            )
            job.journaled = written
            if at_once:
                job.started = True
                job.marked = written
                job.promised = True
                self._promised += 1
        job.runner = self._spawn(self._run_job(job), f"job[{msg.id or job.key[:8]}]")

    def _starts_at_once(self, job: _Job) -> bool:
        """Whether ``job``'s work can begin as soon as its record is durable: one subtask
        (not a plan: plans take no slot), its lane already granted, a slot free that no
        other such job was promised. The slot is then promised to it until it takes it."""
        if len(job.runs) != 1:
            return False
        run = job.runs[0]
        if isinstance(run.spec, PlanMigrationSpec | PlanEvacuationSpec):
            return False
        if run.ticket is not None and not run.ticket.granted.done():
            return False
        limit = self._settings.limits.max_concurrent_tasks
        return not self._slots.locked() and self.running + self._promised < limit

    def _unpromise(self, job: _Job) -> None:
        """``job`` takes its promised slot now, or never will."""
        if job.promised:
            job.promised = False
            self._promised -= 1

    def _spawn(self, coro: object, name: str) -> asyncio.Task[None]:
        assert self._tg is not None, "Dispatcher.run() is not running"
        return self._tg.create_task(coro, name=f"asyncmigfra.{name}")  # type: ignore[arg-type]

    # ---------------------------------------------------------------- running

    async def _run_job(self, job: _Job) -> None:
        if job.journaled is not None and not await self._journaled(job):
            return
        job.accepted = True
        msg = job.msg
        self._events.accepted(msg.id, task=msg.kind.value, vm_names=msg.vm_names)
        self._flush_after_accepted(job)
        entries_by_run: dict[int, list[ResultEntry]] = {}
        try:
            if len(job.runs) == 1:
                # One subtask (most messages): it runs in the job's own task, without a
                # TaskGroup and a task of its own; a cancel of it cancels this task, and
                # ``_guarded`` turns that into its ``cancelled`` entry as in a task.
                run = job.runs[0]
                run.task = asyncio.current_task()
                entries_by_run[run.index] = await self._guarded(job, run)
            else:
                entries_by_run = await self._run_all(job)
        finally:
            self._finish(job)
        entries = [e for run in job.runs for e in entries_by_run.get(run.index, [])]
        result = self._result(job.msg, entries, job.header)
        if job.dedupe is not None:
            self._remember(job.dedupe, result)
        _audit(job.msg, entries, time.monotonic() - job.received)
        self._deliver(result, job.reply, job.key)

    async def _run_all(self, job: _Job) -> dict[int, list[ResultEntry]]:
        """The subtasks of a job of several, each in its own task (the sequential ones after
        the earlier ones ended); their entries by run index."""
        async with asyncio.TaskGroup() as tg:
            started: list[asyncio.Task[list[ResultEntry]]] = []
            for run in job.runs:
                if run.sequential and started:
                    await asyncio.wait(started)
                name = f"asyncmigfra.task[{job.msg.id}/{run.spec.result_name}]"
                task = tg.create_task(self._guarded(job, run), name=name)
                run.task = task
                started.append(task)
                if run.sequential:
                    await asyncio.wait([task])
        return {run.index: task.result() for run, task in zip(job.runs, started, strict=True)}

    async def _journaled(self, job: _Job) -> bool:
        """Wait until the job's record is durable. Nothing of the task runs, and no other
        event of it goes out, before that (protocol.md §1.4). A write that fails or takes
        longer than ``JOURNAL_DEADLINE`` refuses the job (``unavailable``), and a cancel (or
        the shutdown) before it withdraws the job; either way the record is withdrawn, so a
        write that still lands later is not run after a restart. ``True``: accepted."""
        assert job.journaled is not None
        try:
            async with asyncio.timeout(JOURNAL_DEADLINE):
                await asyncio.shield(job.journaled)
        except TimeoutError:
            self._withdraw(job)
            self._refuse_unrun(
                job, Unavailable.code, _unavailable(f"no write within {JOURNAL_DEADLINE:g} s")
            )
            return False
        except asyncio.CancelledError as exc:
            reason = next((r.cancel_reason for r in job.runs if r.cancel_reason), None)
            cancelled = absorb_cancel(exc, reason)
            self._withdraw(job)
            self._refuse_unrun(job, cancelled.code, str(cancelled))
            return False
        except Exception as exc:  # noqa: BLE001 - every failed write means the same
            self._refuse_unrun(job, Unavailable.code, _unavailable(str(exc)))
            return False
        return True

    def _withdraw(self, job: _Job) -> None:
        if self._journal is not None:
            self._journal.withdrawn(job.key)

    def _refuse_unrun(self, job: _Job, code: str, details: str) -> None:
        """Answer a job that never started (no ``accepted`` went out): one entry per
        subtask with ``code``, a ``rejected`` event; its lanes and counters are freed."""
        log.error("task.refused", task_id=job.msg.id, code=code, details=details)
        self._unpromise(job)
        for run in job.runs:
            if run.ticket is not None:
                run.ticket.release()
            run.state = "done"
        self.queued -= len(job.runs)
        self._finish(job, completed=False)
        self._refuse(job.msg, job.reply, code, details)
        self._flush_after_accepted(job)

    @staticmethod
    def _flush_after_accepted(job: _Job) -> None:
        pending, job.after_accepted = job.after_accepted, []
        for emit in pending:
            emit()

    def _finish(self, job: _Job, *, completed: bool = True) -> None:
        self._unpromise(job)  # a job cancelled before its subtask ever ran
        self._jobs.discard(job)
        if job.msg.id:
            jobs = self._by_id.get(job.msg.id, [])
            if job in jobs:
                jobs.remove(job)
            if not jobs:
                self._by_id.pop(job.msg.id, None)
        if job.dedupe is not None:
            self._running_keys.pop(job.dedupe, None)
        self.completed += completed
        if not self._jobs:
            self._idle.set()

    async def _guarded(self, job: _Job, run: _Run) -> list[ResultEntry]:
        """Run one subtask; a cancellation we asked for becomes a ``cancelled`` entry."""
        try:
            return await self._execute(job, run)
        except asyncio.CancelledError as exc:
            cancelled = absorb_cancel(exc, run.cancel_reason)
            # What the operation recorded still goes out (a swap's partner outcome).
            outcome, timer = (run.ctx.outcome, run.ctx.timer) if run.ctx else (None, None)
            entry = entry_for(run.spec.result_name, cancelled, outcome, timer)
            self._report(job, entry, time.monotonic() - (run.started or job.received))
            return [entry]
        except Exception as exc:  # noqa: BLE001 - the outcome boundary: a bug is an entry
            entry = entry_for(run.spec.result_name, exc, logger=log, task_id=job.msg.id)
            self._report(job, entry, time.monotonic() - (run.started or job.received))
            return [entry]
        finally:
            if run.state == "queued":
                self.queued -= 1
            elif run.state == "running":
                self.running -= 1
            run.state = "done"
            if run.ticket is not None:
                run.ticket.release()

    async def _execute(self, job: _Job, run: _Run) -> list[ResultEntry]:
        self._unpromise(job)
        if run.cancel_reason is not None:
            raise asyncio.CancelledError
        spec = run.spec
        lane = spec.lane
        if lane and run.ticket is None:
            run.ticket = self._lanes.reserve(lane)
        if run.ticket is not None:
            await run.ticket.acquire()
        if isinstance(spec, PlanMigrationSpec | PlanEvacuationSpec):
            with structlog.contextvars.bound_contextvars(
                task_id=job.msg.id, vm=spec.result_name, task=job.msg.kind.value
            ):
                return await self._plan(job, run, spec)  # no slot, no lane (planning)
        async with self._slots:
            self.queued -= 1
            self.running += 1
            run.state = "running"
            run.started = time.monotonic()
            if not job.started:
                job.started = True
                if self._journal is not None:
                    job.marked = self._journal.running(job.key)
            if job.marked is not None and not job.marked.done():
                # Work begins only once a restart would reconcile it, not run it again.
                try:
                    await asyncio.shield(job.marked)
                except Exception as exc:  # noqa: BLE001 - accepted is a promise: go on
                    log.warning("journal.running_not_recorded", task_id=job.msg.id, error=str(exc))
            with structlog.contextvars.bound_contextvars(
                task_id=job.msg.id, vm=spec.result_name, task=job.msg.kind.value
            ):
                if isinstance(spec, StopSpec) and spec.vm_name is None and spec.regex:
                    return await self._stop_regex(job, run, spec)
                if isinstance(spec, EvacuateSpec):
                    return await self._evacuate(job, run, spec)
                return [await self._one(job, run, spec, spec.result_name)]
