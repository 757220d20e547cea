"""Control tasks answered by the dispatcher itself: ``status``, ``cancel`` and ``quit``."""

from __future__ import annotations

import time

from asyncmigfra import __version__
from asyncmigfra.errors import (
    TaskError,
    WrongState,
)
from asyncmigfra.model import (
    CancelSpec,
    ResultEntry,
    ResultMessage,
    TaskMessage,
)
from asyncmigfra.tasks.dispatching.base import _DispatcherBase
from asyncmigfra.tasks.dispatching.jobs import Reply
from asyncmigfra.tasks.journal import journal_state
from asyncmigfra.tasks.outcomes import entry_for


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
