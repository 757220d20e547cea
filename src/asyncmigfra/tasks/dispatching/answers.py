"""Control tasks answered by the dispatcher itself: ``status``, ``cancel``, ``quit`` and
``history``."""

from __future__ import annotations

import asyncio
import time
from typing import Final

from asyncmigfra import __version__
from asyncmigfra.errors import (
    Busy,
    NotSupported,
    TaskError,
    Unavailable,
    WrongState,
)
from asyncmigfra.hypervisor._threads import run_blocking
from asyncmigfra.hypervisor.base import DomainInfo
from asyncmigfra.model import (
    CancelSpec,
    HistorySpec,
    MigrateSpec,
    ResultEntry,
    ResultMessage,
    Status,
    TaskKind,
    TaskMessage,
)
from asyncmigfra.tasks.dispatching.base import _DispatcherBase
from asyncmigfra.tasks.dispatching.jobs import Reply
from asyncmigfra.tasks.history import HistoryItem, HistoryQuery
from asyncmigfra.tasks.journal import journal_state
from asyncmigfra.tasks.outcomes import entry_for
from asyncmigfra.values import iso_instant
from asyncmigfra.wire.rendering import BoundedResult, render_bounded_result

#: ``history`` tasks read at once at most; more are answered ``busy``.
MAX_HISTORY_READS: Final = 8
#: s a history read may take before it is answered ``unavailable`` (a hung disk).
HISTORY_DEADLINE: Final = 10.0
#: Domains a ``status`` answer lists at most before it is built and rendered off the loop
#: (a hundred render in about 0.4 ms; five thousand take 20-30 ms).
STATUS_ON_LOOP: Final = 100


def _history_entry(item: HistoryItem) -> ResultEntry:
    """One ``history`` list item (protocol §3.15): the past subtask's ``status`` and
    ``code``, then what it was and when."""
    extra: dict[str, object] = {}
    if item.task_id:
        extra["id"] = item.task_id
    extra["task"] = item.task
    extra["started"] = iso_instant(item.started)
    if item.duration is not None:
        extra["duration"] = round(item.duration, 3)
    if item.destination is not None:
        extra["destination"] = item.destination
    if item.downtime is not None:
        extra["downtime"] = round(item.downtime, 1)
    status: Status = "success" if item.status == "success" else "error"
    return ResultEntry(
        vm_name=item.vm_name, status=status, details=item.details, code=item.code, extra=extra
    )


def _history_answer(
    msg: TaskMessage, header: dict[str, object], items: list[HistoryItem], limit: int
) -> tuple[ResultMessage, BoundedResult]:
    """The ``history`` result of ``items`` and its payload within ``limit`` bytes (the newest
    entries that fit, ``more: true`` when some were left out). A thousand entries take tens
    of milliseconds to build and render: run in a worker thread, not on the loop."""
    result = ResultMessage(
        result=TaskKind.HISTORY.result_name,
        entries=[_history_entry(item) for item in items],
        id=msg.id,
        header=header,
        task=TaskKind.HISTORY,
    )
    return result, render_bounded_result(result, limit)


def _status_answer(
    msg: TaskMessage,
    header: dict[str, object],
    domains: list[DomainInfo],
    failure: TaskError | None,
    limit: int | None,
) -> tuple[ResultMessage, BoundedResult | None]:
    """The ``status`` result listing ``domains`` (or the entry of ``failure``), and with a
    ``limit`` its payload within that many bytes (``None``: the deliverer renders it)."""
    entries = [
        ResultEntry(
            vm_name=dom.name,
            status="success",
            extra={"state": dom.state.value, "vcpus": dom.vcpus, "memory": dom.memory},
        )
        for dom in domains
    ]
    if failure is not None:
        entries.append(entry_for("n/a", failure))
    result = ResultMessage(result="status", entries=entries, id=msg.id, header=header)
    return result, None if limit is None else render_bounded_result(result, limit)


class _Answers(_DispatcherBase):
    """The answers to ``status``, ``cancel`` and ``quit``."""

    # ---------------------------------------------------------------- control tasks

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
                if isinstance(run.spec, MigrateSpec):  # what ``asyncmigfra follow`` shows
                    item["destination"] = run.spec.destination
                    swap = run.spec.parameter.swap_with
                    if swap is not None:
                        item["swap-with"] = swap.vm_name
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
        domains: list[DomainInfo] = []
        failure: TaskError | None = None
        try:
            domains = await self._hv.list_domains()
        except TaskError as exc:
            failure = exc
        if len(domains) <= STATUS_ON_LOOP:
            result, rendered = _status_answer(msg, header, domains, failure, None)
        else:
            # Built and rendered in the answers' one thread (as ``history``): the loop only
            # hands the bytes over.
            limit = self._settings.limits.max_message_size
            result, rendered = await run_blocking(
                self._answer_thread, _status_answer, msg, header, domains, failure, limit
            )
        self._deliver(result, reply, None, rendered=rendered)

    async def _answer_history(self, msg: TaskMessage, reply: Reply | None) -> None:
        """What this agent did, from its journal (protocol §3.15): read in the journal's
        thread, bounded in time and in reads at once; no journal (or no history kept) is a
        ``not-supported`` entry."""
        spec = msg.subtasks[0]
        assert isinstance(spec, HistorySpec)
        journal = self._journal
        entries: list[ResultEntry]
        header: dict[str, object] = {
            "host": self._settings.hostname,
            "journal": journal_state(journal),
        }
        if journal is None or not journal.keeps_history:
            why = (
                "its journal is off (agent.state-dir: none)"
                if journal is None
                else "agent.history-max-entries is 0"
            )
            entries = [entry_for("n/a", NotSupported(f"this agent keeps no history: {why}"))]
        elif self._history_reads >= MAX_HISTORY_READS:
            busy = Busy(f"{MAX_HISTORY_READS} history reads are under way; ask again later")
            entries = [entry_for("n/a", busy)]
        else:
            query = HistoryQuery(vm_name=spec.vm_name, since=spec.since, limit=spec.limit)
            self._history_reads += 1
            try:
                async with asyncio.timeout(HISTORY_DEADLINE):
                    items = await asyncio.shield(journal.history(query))
                # Built and rendered off the loop, in the answers' one thread, within
                # limits.max-message-size (what operations.md §2 has the broker allow); the
                # loop only hands the bytes over.
                limit = self._settings.limits.max_message_size
                answer, rendered = await run_blocking(
                    self._answer_thread, _history_answer, msg, header, items, limit
                )
            except TimeoutError:
                why = f"the journal did not answer within {HISTORY_DEADLINE:g} s"
                entries = [entry_for("n/a", Unavailable(f"the history cannot be read: {why}"))]
            except Exception as exc:  # noqa: BLE001 - any read failure means the same
                failure = Unavailable(f"the history cannot be read: {exc}")
                entries = [entry_for("n/a", failure)]
            else:
                self._deliver(answer, reply, None, rendered=rendered)
                return
            finally:
                self._history_reads -= 1
        result = ResultMessage(
            result=TaskKind.HISTORY.result_name,
            entries=entries,
            id=msg.id,
            header=header,
            task=TaskKind.HISTORY,
        )
        self._deliver(result, reply, None)
