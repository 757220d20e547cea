"""What the dispatcher tracks: a message's reply data, its *job* and the job's subtask
*runs*, and the audit line written when a job's result goes out."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import structlog

from asyncmigfra.logs import would_drop
from asyncmigfra.migration.steering import MigrationSteering
from asyncmigfra.model import (
    ResultEntry,
    ResultMessage,
    Subtask,
    TaskMessage,
)
from asyncmigfra.tasks.dispatching.lanes import _Ticket
from asyncmigfra.tasks.running import SubtaskContext
from asyncmigfra.wire.rendering import BoundedResult

log = structlog.stdlib.get_logger("asyncmigfra.dispatching")
#: The standard library's logger behind ``log``: what its level lets through.
_LOGGER = logging.getLogger("asyncmigfra.dispatching")


@dataclass(frozen=True, slots=True)
class Reply:
    """MQTT 5 request/response data of the message a result answers."""

    response_topic: str | None = None
    correlation_data: bytes | None = None


class Deliver(Protocol):
    """``deliver(result, reply, journal_key)``: publish a result; ``journal_key`` names the
    journal record it settles (``None`` for answers to messages that were never accepted).
    ``rendered``: the result already rendered within ``limits.max-message-size`` (an answer
    of many entries, rendered in a worker thread); otherwise the deliverer renders it."""

    def __call__(
        self,
        result: ResultMessage,
        reply: Reply | None,
        key: str | None,
        /,
        *,
        rendered: BoundedResult | None = None,
    ) -> None: ...


State = Literal["queued", "running", "done"]


@dataclass(slots=True, eq=False)
class _Run:
    """One subtask of a job and its progress through the dispatcher."""

    index: int
    spec: Subtask
    sequential: bool
    state: State = "queued"
    ticket: _Ticket | None = None
    #: The task running the subtask (for a job of one subtask, the job's own task).
    task: asyncio.Task[Any] | None = None
    cancel_reason: str | None = None
    started: float | None = None
    ctx: SubtaskContext | None = None
    #: VM name -> the steering of its running migration job (``tune migration``): filled
    #: by the engine through every context of this run while a job runs.
    steering: dict[str, MigrationSteering] = field(default_factory=dict)
    #: VM name -> (source, destination) of each migration this run started (a swap: both
    #: VMs; an evacuation: every move), for :meth:`Dispatcher.migration_route`.
    routes: dict[str, tuple[str, str]] = field(default_factory=dict)


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
    #: Its record was written ``running`` with its ``accepted``: a slot is kept for it
    #: (``Dispatcher._promised``) until it takes one or ends.
    promised: bool = False
    #: ``accepted`` went out (the record is durable); before that a cancel withdraws the job.
    accepted: bool = False
    #: The task running :meth:`Dispatcher._run_job`.
    runner: asyncio.Task[None] | None = None
    #: Events about this job held back until its ``accepted`` (or refusal) went out.
    after_accepted: list[Callable[[], None]] = field(default_factory=list)
    received: float = field(default_factory=time.monotonic)


def _audit(msg: TaskMessage, entries: list[ResultEntry], duration: float) -> None:
    """The audit trail: one ``info`` line per finished task, when its result goes out (task
    id, kind, VMs, ``success`` or ``error``, the error codes, seconds since it arrived).
    Not even built when ``info`` is not logged (one a task: it shows in the profile)."""
    if would_drop(_LOGGER, logging.INFO):
        return
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
