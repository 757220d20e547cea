"""The dispatcher's state and the steps its parts share.

:class:`_DispatcherBase` holds everything a :class:`~asyncmigfra.tasks.dispatching.Dispatcher`
owns (built in ``__init__``) and the steps used by more than one part: running one subtask
(``_one``, ``_reconcile``), reporting its entry (``_report``, ``_failed``), building a result
(``_result``, ``_refuse``) and cancelling a job (``_cancel_job``). The parts subclass it:
:mod:`.remembered`, :mod:`.expansion`, :mod:`.answers`, and :mod:`.dispatcher`, which combines
them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from asyncmigfra.errors import (
    TaskError,
)
from asyncmigfra.hypervisor.base import Hypervisor
from asyncmigfra.migration.forecast import Forecaster
from asyncmigfra.model import (
    MigrateSpec,
    ResultEntry,
    ResultMessage,
    Subtask,
    TaskKind,
    TaskMessage,
)
from asyncmigfra.peers.bus import MessageBus
from asyncmigfra.peers.userhooks import HookRunner
from asyncmigfra.settings import Settings
from asyncmigfra.tasks.dispatching.jobs import Deliver, Reply, _Job, _Run
from asyncmigfra.tasks.dispatching.lanes import _Lanes
from asyncmigfra.tasks.dispatching.planner import Planner
from asyncmigfra.tasks.journal import Journal
from asyncmigfra.tasks.outcomes import entry_for
from asyncmigfra.tasks.running import SubtaskContext, reconcile_subtask, run_subtask
from asyncmigfra.timing import TimeMeasurement
from asyncmigfra.wire.events import Events

#: Result entry keys that the ``done`` event repeats (a recovered post-copy, protocol §5.7).
_DONE_KEYS = ("recovered", "recovery-time")


class _DispatcherBase:
    """The state of a dispatcher and the steps its parts share."""

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
        forecaster: Forecaster | None = None,
    ) -> None:
        self._hv = hypervisor
        #: The agent's predictions (plans, ``migration-type: auto``, learned link rates).
        self._forecaster = forecaster if forecaster is not None else Forecaster(settings=settings)
        self._bus = bus
        #: The configured hooks (``None``: none), built by ``app``, put on every subtask.
        self._hooks = hooks
        self._journal = journal
        self._settings = settings
        self._events = events
        self._deliver = deliver
        self._on_quit = on_quit
        self._lanes = _Lanes()
        #: Computes predicted evacuations' wave plans off the event loop.
        self._planner = Planner()
        self._slots = asyncio.Semaphore(settings.limits.max_concurrent_tasks)
        #: Slots kept for jobs whose record was written ``running`` with their ``accepted``.
        self._promised = 0
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
        #: ``history`` reads under way (bounded: ``answers.MAX_HISTORY_READS``).
        self._history_reads = 0
        #: The one thread that builds large answers (``history``), one at a time: the loop
        #: then competes for the GIL with one such thread, not with eight. Started at its
        #: first use; shut down when :meth:`Dispatcher.run` ends.
        self._answer_thread = ThreadPoolExecutor(1, thread_name_prefix="asyncmigfra-answers")
        self.queued = 0
        self.running = 0
        self.completed = 0
        self.rejected = 0

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
            task=msg.kind,
        )

    def _context(self, job: _Job, run: _Run, spec: Subtask, vm_name: str) -> SubtaskContext:
        """The context ``spec`` runs in on ``vm_name``, kept on its run (``run.ctx``)."""
        ctx = SubtaskContext(
            task_id=job.msg.id,
            vm_name=vm_name,
            events=self._events,
            timer=TimeMeasurement(enabled=spec.time_measurement),
            bus=self._bus,
            hooks=self._hooks,
            steering=run.steering,
            forecaster=self._forecaster,
        )
        run.ctx = ctx
        return ctx

    async def _reconcile(self, job: _Job, run: _Run, spec: Subtask, vm_name: str) -> ResultEntry:
        ctx = self._context(job, run, spec, vm_name)
        entry = await reconcile_subtask(
            spec, ctx, hypervisor=self._hv, settings=self._settings, vm_name=vm_name
        )
        self._report(job, entry, time.monotonic() - ctx.started)
        return entry

    async def _one(self, job: _Job, run: _Run, spec: Subtask, vm_name: str) -> ResultEntry:
        if isinstance(spec, MigrateSpec):
            here, there = self._settings.hostname, spec.destination
            run.routes[vm_name] = (here, there)
            if spec.parameter.swap_with is not None:
                run.routes[spec.parameter.swap_with.vm_name] = (there, here)
        if job.recovered:
            # It was running when the agent stopped: find out what happened (adopt a
            # migration that still runs) and do only what is still missing.
            return await self._reconcile(job, run, spec, vm_name)
        ctx = self._context(job, run, spec, vm_name)
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
        """The ``error`` and ``done`` events of a finished subtask (one VM); its times go on
        the entry for the journal's history."""
        entry.seconds = duration
        entry.started = time.time() - duration
        if entry.status == "error":
            self._events.error(
                job.msg.id, entry.vm_name, code=entry.code or "", details=entry.details or ""
            )
        extra = {k: entry.extra[k] for k in _DONE_KEYS if k in entry.extra}
        self._events.done(
            job.msg.id,
            entry.vm_name,
            status=entry.status,
            duration=duration,
            extra=extra,
            predicted_duration=entry.extra.get("predicted-duration"),
        )

    def _failed(self, job: _Job, vm_name: str, exc: TaskError) -> ResultEntry:
        entry = entry_for(vm_name, exc)
        self._report(job, entry, 0.0)
        return entry

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
