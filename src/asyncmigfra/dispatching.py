"""The dispatcher: who runs what, when, and in which order.

One accepted message is a *job*; each of its subtasks runs as its own named asyncio task,
owned by the job, which is owned by the dispatcher's TaskGroup. The rules:

* **Concurrency.** Subtasks of a message run concurrently; ``concurrent-execution: false`` (on
  the message or on an item) runs that subtask after every earlier one finished, in list
  order (protocol §7.1). One result is published per message when all its subtasks are done.
* **Per-VM order.** Work on the same VM never overlaps: each VM has a FIFO *lane*; a subtask
  reserves its place at submission (synchronously, so the order is the arrival order) and
  starts when it reaches the front. This is what the original lacked (protocol §7.2).
* **Limits.** At most ``limits.max-concurrent-tasks`` subtasks run at once; at most
  ``limits.max-queued-tasks`` wait. A message that does not fit is answered at once with
  ``code: busy`` for every entry — never dropped.
* **Duplicates.** The same payload with the same ``id`` received again within
  ``limits.dedupe-window`` is not run twice: while the first runs the copy gets a
  ``rejected`` event (its result follows once), after it finished its result is published
  again.
* **Cancel.** ``task: cancel`` marks the target's subtasks and cancels their asyncio tasks:
  a queued one never starts, a running migration aborts its job (see ``migrating``). Each
  cancelled entry reports ``code: cancelled``.
* **Shutdown.** :meth:`Dispatcher.drain` answers new work with ``busy``, lets running work
  finish within a grace period, then cancels what remains, so every accepted task still gets
  its result.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import structlog

from asyncmigfra import __version__
from asyncmigfra.errors import (
    NoDestination,
    TaskCancelled,
    TaskError,
    TaskRejected,
    Unavailable,
    WrongState,
)
from asyncmigfra.events import Events
from asyncmigfra.hypervisor.base import DomainInfo, Hypervisor
from asyncmigfra.journal import Journal, journal_state
from asyncmigfra.model import (
    CancelSpec,
    EvacuateSpec,
    MigrateSpec,
    ResultEntry,
    ResultMessage,
    StopSpec,
    Subtask,
    TaskKind,
    TaskMessage,
)
from asyncmigfra.outcomes import absorb_cancel, entry_for
from asyncmigfra.patterns import MAX_PATTERN, matching_names
from asyncmigfra.peers import MessageBus
from asyncmigfra.placement import Capacity, VmSize, place
from asyncmigfra.rendering import parse_error_result
from asyncmigfra.running import SubtaskContext, reconcile_subtask, run_subtask
from asyncmigfra.settings import Settings
from asyncmigfra.timing import TimeMeasurement
from asyncmigfra.userhooks import HookRunner

__all__ = ["Dispatcher", "Reply"]

log = structlog.stdlib.get_logger(__name__)

_SHUTTING_DOWN = "the agent is shutting down; send the task again later"
#: s a task waits for its journal record before it is refused with ``unavailable``.
JOURNAL_DEADLINE = 10.0


def _estimated_bytes(key: tuple[str, str], result: ResultMessage) -> int:
    """About what a remembered result costs in memory (its strings and a per-object toll)."""
    cost = 400 + len(key[0]) + len(key[1])
    for entry in result.entries:
        cost += 300 + len(entry.vm_name) + len(entry.details or "") + 100 * len(entry.extra)
    return cost


def _unavailable(reason: str) -> str:
    return (
        f"the agent's journal cannot write ({reason}), so it cannot promise a result: "
        "nothing was done; send the task again later or to another agent"
    )


#: Finished tasks remembered for duplicate detection, at most.
_MAX_REMEMBERED = 100_000
#: Bytes (estimated) of remembered results, at most: ids are bounded (256 characters), but a
#: result with many entries and long details is not.
_MAX_REMEMBERED_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Reply:
    """MQTT 5 request/response data of the message a result answers."""

    response_topic: str | None = None
    correlation_data: bytes | None = None


#: ``deliver(result, reply, journal_key)``: publish a result; ``journal_key`` names the
#: journal record it settles (``None`` for answers to messages that were never accepted).
Deliver = Callable[[ResultMessage, Reply | None, str | None], None]


# --------------------------------------------------------------------------------------------
# Lanes: FIFO per VM


class _Ticket:
    __slots__ = ("granted", "key", "lanes")

    def __init__(self, lanes: _Lanes, key: str) -> None:
        self.lanes = lanes
        self.key = key
        self.granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def acquire(self) -> None:
        await asyncio.shield(self.granted)

    def release(self) -> None:
        self.lanes.release(self)


class _Lanes:
    """One FIFO queue of tickets per VM; the ticket at the front holds the VM."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[_Ticket]] = {}

    def reserve(self, key: str) -> _Ticket:
        ticket = _Ticket(self, key)
        queue = self._queues.setdefault(key, deque())
        queue.append(ticket)
        if len(queue) == 1:
            ticket.granted.set_result(None)
        return ticket

    def release(self, ticket: _Ticket) -> None:
        queue = self._queues.get(ticket.key)
        if queue is None or ticket not in queue:
            return
        was_front = queue[0] is ticket
        queue.remove(ticket)
        if not queue:
            del self._queues[ticket.key]
        elif was_front and not queue[0].granted.done():
            queue[0].granted.set_result(None)

    def busy(self, key: str) -> bool:
        return key in self._queues


# --------------------------------------------------------------------------------------------
# Jobs


State = Literal["queued", "running", "done"]


@dataclass(slots=True, eq=False)
class _Run:
    """One subtask of a job and its progress through the dispatcher."""

    index: int
    spec: Subtask
    sequential: bool
    state: State = "queued"
    ticket: _Ticket | None = None
    task: asyncio.Task[list[ResultEntry]] | None = None
    cancel_reason: str | None = None
    started: float | None = None
    ctx: SubtaskContext | None = None


@dataclass(slots=True, eq=False)
class _Job:
    msg: TaskMessage
    reply: Reply | None
    #: (id, payload digest) for duplicate detection; ``None`` without an id.
    dedupe: tuple[str, str] | None
    runs: list[_Run]
    #: The journal record of this job.
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: Recovered from the journal after it had started: reconcile instead of running again.
    recovered: bool = False
    started: bool = False
    #: Top-level result keys (an evacuation's own ``time-measurement``).
    header: dict[str, object] = field(default_factory=dict)
    #: The journal write of this job: the job starts, and ``accepted`` goes out, only once
    #: it is durable; if it fails, the job is refused with ``unavailable``.
    journaled: asyncio.Future[None] | None = None
    #: The journal write that marks the job ``running``; its work begins once it committed.
    marked: asyncio.Future[None] | None = None
    #: ``accepted`` went out (the record is durable); before that a cancel withdraws the job.
    accepted: bool = False
    #: The task running :meth:`Dispatcher._run_job`.
    runner: asyncio.Task[None] | None = None
    #: Events about this job held back until its ``accepted`` (or refusal) went out.
    after_accepted: list[Callable[[], None]] = field(default_factory=list)
    received: float = field(default_factory=time.monotonic)


def _audit(msg: TaskMessage, entries: list[ResultEntry], duration: float) -> None:
    """The audit trail: one ``info`` line per finished task, when its result goes out (task
    id, kind, VMs, ``success`` or ``error``, the error codes, seconds since it arrived)."""
    codes = sorted({e.code for e in entries if e.code})
    failed = any(e.status != "success" for e in entries)
    log.info(
        "task.finished",
        task_id=msg.id,
        task=msg.kind.value,
        vms=[e.vm_name for e in entries],
        result="error" if failed else "success",
        **({"code": ",".join(codes)} if codes else {}),
        duration=round(duration, 3),
    )


class Dispatcher:
    """Accepts parsed messages and runs them; results go to ``deliver``."""

    def __init__(
        self,
        *,
        hypervisor: Hypervisor,
        settings: Settings,
        events: Events,
        deliver: Deliver,
        on_quit: Callable[[], None],
        journal: Journal | None = None,
        bus: MessageBus | None = None,
        hooks: HookRunner | None = None,
    ) -> None:
        self._hv = hypervisor
        self._bus = bus
        #: The configured hooks (``None``: none), built by ``app``, put on every subtask.
        self._hooks = hooks
        self._journal = journal
        self._settings = settings
        self._events = events
        self._deliver = deliver
        self._on_quit = on_quit
        self._lanes = _Lanes()
        self._slots = asyncio.Semaphore(settings.limits.max_concurrent_tasks)
        # Migrations wait for these (never fail on them): outgoing from this host, and
        # incoming per destination as far as this agent sends them (oVirt's defaults: 2/2).
        self._outgoing = asyncio.Semaphore(settings.migration.max_outgoing)
        #: destination -> (its incoming-migration semaphore, subtasks using it).
        self._incoming: dict[str, tuple[asyncio.Semaphore, int]] = {}
        #: destination -> (vCPUs, KiB) of this agent's evacuation moves on their way there.
        self._inbound: dict[str, tuple[int, int]] = {}
        self._jobs: set[_Job] = set()
        self._by_id: dict[str, list[_Job]] = {}
        #: (id, payload digest) -> the job running it (duplicate detection).
        self._running_keys: dict[tuple[str, str], _Job] = {}
        #: (id, digest) -> (when, result, estimated bytes), oldest first.
        self._finished: dict[tuple[str, str], tuple[float, ResultMessage, int]] = {}
        self._remembered_bytes = 0
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        self._started = time.monotonic()
        self.queued = 0
        self.running = 0
        self.completed = 0
        self.rejected = 0

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """Own the jobs' TaskGroup until :meth:`close`; running jobs finish first."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            await self._stop.wait()
            await self._idle.wait()
        self._tg = None

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
        if msg.kind is TaskKind.CANCEL:
            self._answer_cancel(msg, reply)
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
            # even across a crash.
            written = self._journal.accepted(
                job.key,
                task_id=msg.id,
                payload=payload,
                response_topic=reply.response_topic if reply else None,
                correlation=reply.correlation_data if reply else None,
            )
            job.journaled = written
        job.runner = self._spawn(self._run_job(job), f"job[{msg.id or job.key[:8]}]")

    def _spawn(self, coro: object, name: str) -> asyncio.Task[None]:
        assert self._tg is not None, "Dispatcher.run() is not running"
        return self._tg.create_task(coro, name=f"asyncmigfra.{name}")  # type: ignore[arg-type]

    def _duplicate(self, key: tuple[str, str], msg: TaskMessage, reply: Reply | None) -> bool:
        now = time.monotonic()
        running = self._running_keys.get(key)
        if running is not None:
            log.info("task.duplicate_running", task_id=msg.id)
            details = f"task '{msg.id}' is already running; its result follows once"
            if running.accepted:
                self._events.rejected(msg.id, code="busy", details=details)
            else:  # not before the first copy's ``accepted`` (or its refusal)
                running.after_accepted.append(
                    lambda: self._events.rejected(msg.id, code="busy", details=details)
                )
            return True
        seen = self._finished.get(key)
        if seen is not None and now - seen[0] <= self._settings.limits.dedupe_window:
            log.info("task.duplicate_finished", task_id=msg.id)
            self._deliver(seen[1], reply, None)
            return True
        return False

    def _refuse(self, msg: TaskMessage, reply: Reply | None, code: str, details: str) -> None:
        self.rejected += 1
        self._events.rejected(msg.id, code=code, details=details)
        entries = [
            ResultEntry(vm_name=s.result_name, status="error", code=code, details=details)
            for s in msg.subtasks
        ]
        if msg.kind is TaskKind.STATUS:
            entries = [ResultEntry(vm_name="n/a", status="error", code=code, details=details)]
        self._deliver(self._result(msg, entries), reply, None)

    # ---------------------------------------------------------------- running

    def _result(
        self, msg: TaskMessage, entries: list[ResultEntry], header: dict[str, object] | None = None
    ) -> ResultMessage:
        flat = msg.kind is TaskKind.MIGRATE and len(entries) == 1
        return ResultMessage(
            result=msg.kind.result_name,
            entries=entries,
            id=msg.id,
            flat=flat,
            header={k: v for k, v in (header or {}).items() if v is not None},
        )

    async def _run_job(self, job: _Job) -> None:
        if job.journaled is not None and not await self._journaled(job):
            return
        job.accepted = True
        msg = job.msg
        self._events.accepted(msg.id, task=msg.kind.value, vm_names=msg.vm_names)
        self._flush_after_accepted(job)
        entries_by_run: dict[int, list[ResultEntry]] = {}
        try:
            async with asyncio.TaskGroup() as tg:
                started: list[asyncio.Task[list[ResultEntry]]] = []
                for run in job.runs:
                    if run.sequential and started:
                        await asyncio.wait(started)
                    name = f"asyncmigfra.task[{job.msg.id}/{run.spec.result_name}]"
                    run.task = tg.create_task(self._guarded(job, run), name=name)
                    started.append(run.task)
                    if run.sequential:
                        await asyncio.wait([run.task])
            for run in job.runs:
                assert run.task is not None
                entries_by_run[run.index] = run.task.result()
        finally:
            self._finish(job)
        entries = [e for run in job.runs for e in entries_by_run.get(run.index, [])]
        result = self._result(job.msg, entries, job.header)
        if job.dedupe is not None:
            self._remember(job.dedupe, result)
        _audit(job.msg, entries, time.monotonic() - job.received)
        self._deliver(result, job.reply, job.key)

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

    def _remember(self, key: tuple[str, str], result: ResultMessage) -> None:
        """Keep ``result`` for duplicates of its task, within the window, the count and the
        byte budget (oldest forgotten first)."""
        cost = _estimated_bytes(key, result)
        old = self._finished.pop(key, None)
        if old is not None:
            self._remembered_bytes -= old[2]
        self._finished[key] = (time.monotonic(), result, cost)
        self._remembered_bytes += cost
        window = self._settings.limits.dedupe_window
        now = time.monotonic()
        while self._finished:
            oldest, (when, _, size) = next(iter(self._finished.items()))
            if (
                now - when <= window
                and len(self._finished) <= _MAX_REMEMBERED
                and self._remembered_bytes <= _MAX_REMEMBERED_BYTES
            ):
                break
            del self._finished[oldest]
            self._remembered_bytes -= size

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
        if run.cancel_reason is not None:
            raise asyncio.CancelledError
        spec = run.spec
        lane = spec.lane
        if lane and run.ticket is None:
            run.ticket = self._lanes.reserve(lane)
        if run.ticket is not None:
            await run.ticket.acquire()
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

    async def _reconcile(self, job: _Job, run: _Run, spec: Subtask, vm_name: str) -> ResultEntry:
        ctx = SubtaskContext(
            task_id=job.msg.id,
            vm_name=vm_name,
            events=self._events,
            timer=TimeMeasurement(enabled=spec.time_measurement),
            bus=self._bus,
            hooks=self._hooks,
        )
        run.ctx = ctx
        entry = await reconcile_subtask(
            spec, ctx, hypervisor=self._hv, settings=self._settings, vm_name=vm_name
        )
        self._report(job, entry, time.monotonic() - ctx.started)
        return entry

    async def _one(self, job: _Job, run: _Run, spec: Subtask, vm_name: str) -> ResultEntry:
        if job.recovered:
            # It was running when the agent stopped: find out what happened (adopt a
            # migration that still runs) and do only what is still missing.
            return await self._reconcile(job, run, spec, vm_name)
        ctx = SubtaskContext(
            task_id=job.msg.id,
            vm_name=vm_name,
            events=self._events,
            timer=TimeMeasurement(enabled=spec.time_measurement),
            bus=self._bus,
            hooks=self._hooks,
        )
        run.ctx = ctx
        if isinstance(spec, MigrateSpec):
            dest = spec.destination
            incoming, users = self._incoming.get(dest) or (
                asyncio.Semaphore(self._settings.migration.max_incoming),
                0,
            )
            self._incoming[dest] = (incoming, users + 1)
            if self._outgoing.locked() or incoming.locked():
                ctx.phase("waiting")
            try:
                async with self._outgoing, incoming:
                    entry = await run_subtask(
                        spec, ctx, hypervisor=self._hv, settings=self._settings, vm_name=vm_name
                    )
            finally:
                sem, users = self._incoming[dest]
                if users <= 1:
                    del self._incoming[dest]  # nobody waits for this destination any more
                else:
                    self._incoming[dest] = (sem, users - 1)
        else:
            entry = await run_subtask(
                spec, ctx, hypervisor=self._hv, settings=self._settings, vm_name=vm_name
            )
        self._report(job, entry, time.monotonic() - ctx.started)
        return entry

    def _report(self, job: _Job, entry: ResultEntry, duration: float) -> None:
        if entry.status == "error":
            self._events.error(
                job.msg.id, entry.vm_name, code=entry.code or "", details=entry.details or ""
            )
        self._events.done(job.msg.id, entry.vm_name, status=entry.status, duration=duration)

    def _failed(self, job: _Job, vm_name: str, exc: TaskError) -> ResultEntry:
        entry = entry_for(vm_name, exc)
        self._report(job, entry, 0.0)
        return entry

    async def _stop_regex(self, job: _Job, run: _Run, spec: StopSpec) -> list[ResultEntry]:
        """Stop every active domain whose name fully matches; one entry per VM (protocol §3.3)."""
        assert spec.regex is not None
        try:
            domains = await self._hv.list_domains(active_only=True)
            # RE2 (linear time, bounded memory), in a worker thread: no pattern stalls the loop.
            names = await asyncio.to_thread(matching_names, spec.regex, [d.name for d in domains])
        except TaskError as exc:
            return [self._failed(job, spec.regex[:MAX_PATTERN], exc)]
        if not names:
            return [ResultEntry(vm_name=spec.regex, status="success", details=None)]
        return list(await asyncio.gather(*(self._lane_stop(job, run, spec, n) for n in names)))

    async def _lane_stop(self, job: _Job, run: _Run, spec: StopSpec, name: str) -> ResultEntry:
        ticket = self._lanes.reserve(name)
        try:
            await ticket.acquire()
            return await self._one(job, run, spec, name)
        finally:
            ticket.release()

    async def _evacuate(self, job: _Job, run: _Run, spec: EvacuateSpec) -> list[ResultEntry]:
        """Move every active domain away (protocol §3.7, see ``placement``): measure the
        destinations, place the VMs, then migrate them, at most ``max-parallel`` at once and
        each destination within its incoming limit (waiting, never failing, for a slot).
        A cancel stops what has not started and aborts what runs; finished moves keep their
        results."""
        timer = TimeMeasurement(enabled=spec.time_measurement)
        timer.tick("overall")
        try:
            domains = await self._hv.list_domains(active_only=True)
        except TaskError as exc:
            return [self._failed(job, "n/a", exc)]
        if not domains:
            return []
        run.ctx = SubtaskContext(
            task_id=job.msg.id, vm_name="n/a", events=self._events, timer=timer
        )
        run.ctx.phase("placement")
        with timer.measure("placement"):
            capacities = await self._capacities(spec.destinations)
            plan = place(
                [VmSize(d.name, d.vcpus, d.memory) for d in domains],
                capacities,
                mode=spec.mode,
                overbooking=spec.overbooking,
            )
        log.info(
            "evacuation.placed",
            assignments=dict(plan.assignments),
            unplaced=list(plan.unplaced),
            destinations=[c.host for c in capacities],
        )
        limit = asyncio.Semaphore(spec.max_parallel or self._settings.migration.max_outgoing)
        sizes = {d.name: d for d in domains}

        async def move(name: str, dest: str) -> ResultEntry:
            mspec = MigrateSpec(
                vm_name=name,
                destination=dest,
                parameter=spec.parameter,
                time_measurement=spec.time_measurement,
                driver=spec.driver,
            )
            self._reserve(dest, sizes[name], +1)
            ticket = self._lanes.reserve(name)
            try:
                await ticket.acquire()
                async with limit:
                    entry = await self._one(job, run, mspec, name)
            except asyncio.CancelledError as exc:
                entry = entry_for(name, absorb_cancel(exc, run.cancel_reason))
                self._report(job, entry, 0.0)
            finally:
                ticket.release()
                self._reserve(dest, sizes[name], -1)
            entry.extra.setdefault("destination", dest)
            return entry

        tasks: dict[str, asyncio.Task[ResultEntry]] = {}
        try:
            async with asyncio.TaskGroup() as tg:
                for name, dest in plan.assignments.items():
                    tasks[name] = tg.create_task(
                        move(name, dest), name=f"asyncmigfra.evacuate[{name}->{dest}]"
                    )
        except asyncio.CancelledError as exc:
            absorb_cancel(exc, run.cancel_reason)
        entries: dict[str, ResultEntry] = {}
        for name, t in tasks.items():
            if t.done() and not t.cancelled():
                entries[name] = t.result()
            else:
                entries[name] = entry_for(name, TaskCancelled(run.cancel_reason or "cancelled"))
        for name in plan.unplaced:
            err = NoDestination(
                "No destination host left to evacuate to."
                if capacities
                else "no destination could be reached"
            )
            entries[name] = self._failed(job, name, err)
        timer.tock("overall")
        job.header["time-measurement"] = timer.snapshot()
        return [entries[d.name] for d in domains if d.name in entries]

    async def _capacities(self, destinations: tuple[str, ...]) -> list[Capacity]:
        """Each destination's load now, minus what this agent already sends it."""
        out: list[Capacity] = []
        for dest in dict.fromkeys(destinations):
            if dest == self._settings.hostname:
                continue  # never evacuate onto the host being evacuated
            try:
                load = await self._hv.host_load(dest)
            except TaskError as exc:
                log.warning("evacuation.destination_unreachable", host=dest, error=str(exc))
                continue
            vcpus, memory = self._inbound.get(dest, (0, 0))
            out.append(
                Capacity(
                    host=dest,
                    cpus=load.cpus,
                    vcpus_used=load.vcpus_used + vcpus,
                    free_memory=load.free_memory - memory,
                )
            )
        return out

    def _reserve(self, dest: str, dom: DomainInfo, sign: int) -> None:
        vcpus, memory = self._inbound.get(dest, (0, 0))
        vcpus, memory = vcpus + sign * dom.vcpus, memory + sign * dom.memory
        if vcpus or memory:
            self._inbound[dest] = (vcpus, memory)
        else:
            self._inbound.pop(dest, None)

    # ---------------------------------------------------------------- control tasks

    def _cancel_job(self, job: _Job, reason: str) -> list[_Run]:
        affected = []
        if not job.accepted and job.runner is not None:
            job.runner.cancel()  # still waiting for its journal record: withdrawn
        for run in job.runs:
            if run.state == "done" or run.cancel_reason is not None:
                continue
            run.cancel_reason = reason
            affected.append(run)
            if run.task is not None:
                run.task.cancel()
        return affected

    def _answer_cancel(self, msg: TaskMessage, reply: Reply | None) -> None:
        spec = msg.subtasks[0]
        assert isinstance(spec, CancelSpec)
        jobs = list(self._by_id.get(spec.target, []))
        entries: list[ResultEntry] = []
        for job in jobs:
            for run in self._cancel_job(job, f"cancelled by task '{msg.id or spec.target}'"):
                entries.append(
                    ResultEntry(
                        vm_name=run.spec.result_name,
                        status="success",
                        extra={"state": run.state},
                    )
                )
        if not entries:
            exc = WrongState(f"task '{spec.target}' is not queued or running")
            entries.append(entry_for("n/a", exc))
        self._events.accepted(msg.id, task=msg.kind.value, vm_names=[])
        self._deliver(self._result(msg, entries), reply, None)

    def _answer_quit(self, msg: TaskMessage, reply: Reply | None) -> None:
        if not self._settings.agent.allow_quit:
            details = "quit is disabled on this agent (agent.allow-quit: false)"
            self._refuse(msg, reply, "not-supported", details)
            return
        self._events.accepted(msg.id, task=msg.kind.value, vm_names=[])
        entry = ResultEntry(vm_name="n/a", status="success")
        self._deliver(ResultMessage(result="quit", entries=[entry], id=msg.id), reply, None)
        self._on_quit()

    async def _answer_status(self, msg: TaskMessage, reply: Reply | None) -> None:
        now = time.monotonic()
        tasks: list[dict[str, object]] = []
        for job in list(self._jobs):
            for run in job.runs:
                if run.state == "done":
                    continue
                item: dict[str, object] = {}
                if job.msg.id:
                    item["id"] = job.msg.id
                item["task"] = job.msg.kind.value
                item["vm-name"] = run.spec.result_name
                phase = run.ctx.current_phase if run.ctx and run.ctx.current_phase else run.state
                item["phase"] = phase
                item["elapsed"] = round(now - job.received, 3)
                tasks.append(item)
        header: dict[str, object] = {
            "host": self._settings.hostname,
            "version": __version__,
            "hypervisor": self._hv.kind,
            "state": "draining" if self._draining else "online",
            "journal": journal_state(self._journal),
            "uptime": round(now - self._started, 3),
            "tasks": tasks,
        }
        entries: list[ResultEntry] = []
        try:
            for dom in await self._hv.list_domains():
                entries.append(
                    ResultEntry(
                        vm_name=dom.name,
                        status="success",
                        extra={"state": dom.state.value, "vcpus": dom.vcpus, "memory": dom.memory},
                    )
                )
        except TaskError as exc:
            entries.append(entry_for("n/a", exc))
        self._deliver(
            ResultMessage(result="status", entries=entries, id=msg.id, header=header), reply, None
        )
