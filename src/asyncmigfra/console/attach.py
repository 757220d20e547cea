"""``asyncmigfra follow ID [HOST]``: attach to a task started elsewhere (another terminal, a
scheduler), as ``kubectl logs -f`` or ``virsh domjobinfo`` in a loop would, but live.

1. Subscribe to the results and events of HOST (without HOST: of every online agent)
   *before* asking anything, so nothing the task publishes from then on is missed.
2. Ask each agent for its ``status`` (protocol §3.9): the task's subtasks there, their
   ``phase`` and ``elapsed`` time, and for a migration its ``destination`` (and swap
   partner). That is the state so far; the events that follow update it.
3. Show the task with the view ``--follow`` uses for it (:mod:`asyncmigfra.console.follow`):
   a migration's bar (:class:`~asyncmigfra.console.follow.MigrationView`), an evacuation's
   bars (:class:`~asyncmigfra.console.evacuation.EvacuationView`), or for any other task one
   line per VM with its phase (:class:`TaskView`), until its result; then its summary.
   Only what that host publishes counts: a task id is unique per agent, and another agent
   (or anyone who may publish on its topics) can use the same id on its own topics.

Ctrl-C is that of ``migrate --follow``: it asks whether to cancel the task, and leaves it
running unless the answer is ``y`` (a second Ctrl-C at the prompt, or Ctrl-C without a
terminal on stdin, leaves at once). ``follow`` can be run again at any time: it attaches
anew. A task that is no longer queued or running is looked up in the agents' history
(protocol §3.15) and its outcome shown (exit 0 or 1 as for a task's result); one that no
agent knows ends with exit 2 and says which agents were asked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from asyncmigfra.console.connection import Connection
from asyncmigfra.console.evacuation import EvacuationView
from asyncmigfra.console.exits import FAILED, OK, USAGE, CliError
from asyncmigfra.console.fleet import ASK_TIMEOUT, ask_agents, online_hosts
from asyncmigfra.console.follow import PLAIN_WIDTH, FollowedView, MigrationView, follow_migration
from asyncmigfra.console.history import history_items
from asyncmigfra.console.lanes import footer_rows
from asyncmigfra.console.output import Out, event_fields, number
from asyncmigfra.console.session import Message, Session, open_session
from asyncmigfra.console.tasks import failures, history_task, succeeded
from asyncmigfra.model import HISTORY_LIMIT_MAX
from asyncmigfra.terminal import fit, ljust, safe, safe_text

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderResult

__all__ = ["TaskView", "follow"]

#: s: the most ``elapsed`` of a ``status`` answer taken for the time a task has run.
_MOST_ELAPSED = 366 * 86400.0


@dataclass
class TaskView:
    """A task other than a migration or an evacuation (start, stop, repin, a plan ...):
    one line per VM with its phase, fed with the task's events."""

    task: str
    source: str
    task_id: str
    vms: list[str]
    started: float = field(default_factory=time.monotonic)
    notes: list[str] = field(default_factory=list)
    cancel_id: str | None = None
    cancel_answer: str | None = None
    what: str = "the task"
    #: VM -> its phase (``done``, ``failed`` once its ``done`` event came).
    phases: dict[str, str] = field(default_factory=dict)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def feed(self, doc: Mapping[str, Any]) -> None:
        kind = str(doc.get("event"))
        vm = str(doc.get("vm-name", "n/a"))
        if kind == "phase":
            self.phases[vm] = str(doc.get("phase", "?"))
        elif kind == "done":
            self.phases[vm] = "done" if doc.get("status") == "success" else "failed"
        elif kind in {"error", "rejected"}:
            self.notes.append(f"{vm}: {kind}: {doc.get('code', '?')}: {doc.get('details', '')}")
        if vm not in self.vms and vm != "n/a":
            self.vms.append(vm)

    def header(self) -> str:
        return f"{self.task} {', '.join(self.vms) or '-'} on {self.source}  (id {self.task_id})"

    def plain_lines(self, doc: Mapping[str, Any]) -> list[str]:
        head = f"{self.elapsed:7.1f} s  {ljust(doc.get('event', '?'), 8)}  "
        return [fit([head + event_fields(doc)], PLAIN_WIDTH)]

    def ok(self, result: Mapping[str, Any]) -> bool:
        return succeeded(result)

    def summary(self, result: Mapping[str, Any], wall: float) -> list[tuple[str, str]]:
        if succeeded(result):
            lines = [(f"{self.task} {', '.join(self.vms)}: success", "bold green")]
        else:
            lines = [(f"{self.task} failed: {why}", "bold red") for why in failures(result)]
        lines.append((f"  total time   {wall:.2f} s", ""))
        if self.cancel_answer:
            lines.append((f"  cancel       {self.cancel_answer}", ""))
        return lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        cols = options.max_width
        yield safe_text(fit([self.header()], cols), style="bold")
        width = min(24, max([len(safe(vm)) for vm in self.vms] + [2]))
        for vm in self.vms:
            yield safe_text(fit([f"{ljust(vm, width)}  {self.phases.get(vm, 'queued')}"], cols))
        yield safe_text(f"elapsed {self.elapsed:.1f} s")
        yield from footer_rows(self.notes, self.cancel_id, self.cancel_answer, cols)


def _view(host: str, task_id: str, items: Sequence[Mapping[str, Any]]) -> FollowedView:
    """The view for the task's subtasks as ``status`` lists them on ``host``."""
    first = items[0]
    task = str(first.get("task", "?"))
    # (A forged answer's ``elapsed`` is any number: kept between 0 and a year.)
    elapsed = max((number(i.get("elapsed")) or 0.0 for i in items), default=0.0)
    elapsed = min(max(elapsed, 0.0), _MOST_ELAPSED)
    started = time.monotonic() - elapsed
    if task == "migrate vm":
        swap = first.get("swap-with")
        view = MigrationView(
            vm=str(first.get("vm-name", "?")),
            source=host,
            destination=str(first.get("destination", "?")),
            task_id=task_id,
            migration_type="attached",
            swap_with=None if swap is None else str(swap),
            started=started,
        )
        view.main.phase = str(first.get("phase", "?"))
        return view
    if task == "evacuate node":
        evacuation = EvacuationView(host, [], task_id, started=started)
        evacuation.phase = str(first.get("phase", "?"))
        return evacuation
    vms = [str(i.get("vm-name", "?")) for i in items]
    return TaskView(
        task=task,
        source=host,
        task_id=task_id,
        vms=vms,
        started=started,
        phases={vm: str(i.get("phase", "?")) for vm, i in zip(vms, items, strict=True)},
    )


def _running(status: Mapping[str, Any], task_id: str) -> list[Mapping[str, Any]]:
    """The subtasks of ``task_id`` that a ``status`` result lists as queued or running."""
    tasks = status.get("tasks")
    if not isinstance(tasks, list):
        return []
    return [t for t in tasks if isinstance(t, Mapping) and str(t.get("id")) == task_id]


async def follow(
    conn: Connection, out: Out, *, task_id: str, host: str | None, limit: float | None
) -> int:
    """Attach to ``task_id`` on ``host`` (``None``: wherever it runs) until its result."""
    loop = asyncio.get_running_loop()
    async with open_session(conn) as session:
        if host is not None:
            await session.subscribe_host(host)
            await session.check_online(host, force=False)
            hosts = [host]
        else:
            hosts = online_hosts(await session.gather_presence())
            if not hosts:
                raise CliError(
                    USAGE,
                    f"follow: no agent is online on {conn.topic('+', 'status')} to ask for"
                    f" task {task_id!r}; give its HOST",
                )
            for name in hosts:
                await session.subscribe_host(name)
        seen: list[Message] = []
        deadline = loop.time() + ASK_TIMEOUT
        statuses = await ask_agents(session, hosts, deadline, others=seen)
        ours = [m for m in seen if m.id == task_id]
        where = {h: found for h, doc in statuses.items() if (found := _running(doc, task_id))}
        if len(where) > 1:
            raise CliError(
                USAGE,
                f"follow: task {task_id!r} runs on more than one host ({', '.join(sorted(where))});"
                " say which: follow ID HOST",
            )
        if not where:
            # Finished while the agents were asked: its result, if one host sent one (a task
            # id is unique per agent only: results from several go to the history's list).
            finished = {m.host: m for m in ours if m.kind == "result"}
            if len(finished) == 1:
                return _show_result(out, *finished.values())
            return await _finished(session, out, task_id, hosts, statuses)
        ((source, items),) = where.items()
        for item in ours:
            if item.host == source:
                session.push_back(item)  # (what it published while the agents answered)
        view = _view(source, task_id, items)
        out.note(
            f"following task {task_id} on {source}; Ctrl-C leaves (it asks before cancelling);"
            f" to attach again: {conn.command('follow', task_id, source)}"
        )
        result = await follow_migration(session, out, view, limit=limit)
    if out.json:
        out.json_line(result.doc)
    else:
        for text, style in view.summary(result.doc, view.elapsed):
            out.line(text, style)
    return OK if view.ok(result.doc) else FAILED


def _show_result(out: Out, result: Message) -> int:
    """A result that came while the agents were asked: the task has just finished."""
    if out.json:
        out.json_line(result.doc)
    else:
        out.note(f"task {result.id} has finished on {result.host}; its result:")
        out.raw(result.raw)
    return OK if succeeded(result.doc) else FAILED


async def _finished(
    session: Session,
    out: Out,
    task_id: str,
    hosts: list[str],
    statuses: Mapping[str, Any],
) -> int:
    """The task is not queued or running: its outcome from the agents' history."""
    deadline = asyncio.get_running_loop().time() + ASK_TIMEOUT
    answers = await ask_agents(
        session,
        hosts,
        deadline,
        task=lambda tid: history_task(tid, limit=HISTORY_LIMIT_MAX),
        kind="history",
        what="their history",
    )
    found: list[tuple[str, Mapping[str, Any]]] = []
    without: list[str] = []
    for name in hosts:
        items, errors = history_items(answers.get(name, {"result": "history", "list": []}))
        if errors or name not in answers:
            without.append(name)
        found.extend((name, i) for i in items if str(i.get("id")) == task_id)
    if not found:
        asked = ", ".join(h for h in hosts if h in statuses) or "none"
        silent = [h for h in hosts if h not in statuses]
        no_history = f"; no history from {', '.join(without)}" if without else ""
        unanswered = f"; no answer from {', '.join(silent)}" if silent else ""
        raise CliError(
            USAGE,
            f"follow: no agent has task {task_id!r} queued or running, and none has it in the"
            f" last {HISTORY_LIMIT_MAX} entries of its history (asked {asked}{unanswered}"
            f"{no_history})",
        )
    if out.json:
        for name, item in found:
            out.json_line({"host": name, **item})
    else:
        for name, item in found:
            out.line(
                _finished_line(name, item), "green" if item.get("status") == "success" else "red"
            )
    return OK if all(i.get("status") == "success" for _, i in found) else FAILED


def _finished_line(host: str, item: Mapping[str, Any]) -> str:
    parts = [f"task {item.get('id')} ({item.get('task')}) finished on {host}:"]
    parts.append(f"{item.get('vm-name')} {item.get('status')}")
    if item.get("code"):
        parts.append(f"{item['code']}: {item.get('details', '')}")
    parts.append(f"started {item.get('started')}")
    duration = number(item.get("duration"))
    if duration is not None:
        parts.append(f"took {duration:.2f} s")
    if item.get("destination"):
        parts.append(f"now on {item['destination']}")
    downtime = number(item.get("downtime"))
    if downtime is not None:
        parts.append(f"downtime {downtime:g} ms")
    return "  ".join(parts)
