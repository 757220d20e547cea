"""``migrate --follow``: a live view of one migration, Ctrl-C to cancel it, and a summary.

The view is built only from what the source agent publishes for the task's id (protocol
§5.5; what other agents publish on their own topics under the same id is not about this
task): ``progress`` events carry percent, remaining data, rates, pass number, the downtime
estimate and target, and an ``action`` when the agent changed something (raised the
downtime target, switched to post-copy, suspended the guest). The summary adds the result's
``time-measurement`` (``downtime`` is the hypervisor's measured downtime, in seconds) and
the ``downtime`` of the final ``completed`` progress event (ms), so a person sees the real
cost of the switchover, not an estimate.

A swap (``--swap-with``, protocol §3.6) moves two VMs under one task id; each half's
``phase`` and ``progress`` events carry its own ``vm-name``. The view keeps one lane (bar,
statistics, actions) per VM, fed by that name, so the two never mix; plain lines name the VM;
the summary reports VM 1 from the result's top level and VM 2 from its ``swap-with`` map,
with the order (``parallel`` or ``sequential``) and either half's failure.

Ctrl-C does not kill the client: it stops the live display and asks whether to cancel the
migration. "y" publishes ``task: cancel`` with ``target: <id>`` and keeps waiting for the
migration's own result, which then says whether the VM stayed on the source (``cancelled``)
or, in post-copy, had already moved (success, with a note). Anything else resumes the
view; a second Ctrl-C at the prompt leaves without cancelling.

Almost everything shown here comes from the wire (phases, actions, codes, details, VM names
of events, the result). Plain lines and the summary are written with :class:`Out`, which
escapes them; the live view builds its rich text only with
:func:`~asyncmigfra.terminal.safe_text`, and pads names by their escaped width
(:func:`~asyncmigfra.terminal.ljust`).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from asyncmigfra.console.exits import INTERRUPTED, CliError
from asyncmigfra.console.lanes import VmLane, bar_value, footer_rows, lane_rows
from asyncmigfra.console.output import Out, event_fields
from asyncmigfra.console.session import Interrupt, Lost, Message, Session
from asyncmigfra.console.tasks import cancel_task, fresh_id, succeeded
from asyncmigfra.progresstext import progress_parts
from asyncmigfra.terminal import fit, ljust, safe, safe_text

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderResult
    from rich.live import Live

__all__ = ["PLAIN_WIDTH", "FollowedView", "MigrationView", "VmLane", "follow_migration"]

#: The width plain lines (a pipe, a log file) are fitted to.
PLAIN_WIDTH = 80

#: Codes after which the protocol guarantees the guest still runs on the source (§3.6, §6).
_STAYS_ON_SOURCE = frozenset({"cancelled", "timeout", "migration-failed"})


class FollowedView(Protocol):
    """What :func:`follow_migration` needs of a view: a migration's, or an evacuation's
    (:class:`~asyncmigfra.console.evacuation.EvacuationView`)."""

    task_id: str
    source: str
    cancel_id: str | None
    cancel_answer: str | None
    #: What Ctrl-C offers to cancel (``the migration``).
    what: str

    @property
    def elapsed(self) -> float:
        """s since the task began (as far as the view knows)."""
        ...

    def feed(self, doc: Mapping[str, Any]) -> None: ...

    def plain_lines(self, doc: Mapping[str, Any]) -> list[str]: ...

    def header(self) -> str: ...

    def ok(self, result: Mapping[str, Any]) -> bool: ...

    def summary(self, result: Mapping[str, Any], wall: float) -> list[tuple[str, str]]:
        """(text, rich style) lines for the end of the task."""
        ...

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult: ...


@dataclass
class MigrationView:
    """Everything known about one migration (or a swap: ``swap_with`` names the VM that
    comes from ``destination`` to ``source``), fed with its events; renders itself for
    rich."""

    vm: str
    source: str
    destination: str
    task_id: str
    migration_type: str | None = None
    #: The partner of a swap (``parameter.swap-with.vm-name``); ``None``: one VM moves.
    swap_with: str | None = None
    #: The task's ``max-downtime`` (ms) when the client set it (the most the policy raises
    #: the target to).
    max_downtime: object = None
    started: float = field(default_factory=time.monotonic)
    notes: list[str] = field(default_factory=list)
    cancel_id: str | None = None
    cancel_answer: str | None = None
    what: str = "the migration"
    #: One lane per VM in play, VM 1 first.
    lanes: dict[str, VmLane] = field(init=False)

    def __post_init__(self) -> None:
        most = self.max_downtime
        self.lanes = {self.vm: VmLane(self.vm, self.source, self.destination, max_downtime=most)}
        if self.swap_with is not None:
            self.lanes[self.swap_with] = VmLane(
                self.swap_with, self.destination, self.source, max_downtime=most
            )

    # VM 1's lane, under the names the one-VM view has always had.

    @property
    def main(self) -> VmLane:
        return self.lanes[self.vm]

    @property
    def phase(self) -> str:
        return self.main.phase

    @property
    def progress(self) -> dict[str, Any] | None:
        return self.main.progress

    @property
    def percents(self) -> list[float]:
        return self.main.percents

    @property
    def actions(self) -> list[str]:
        return self.main.actions

    @property
    def final_downtime(self) -> float | None:
        return self.main.final_downtime

    @property
    def percent(self) -> float:
        return self.main.percent

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _lane(self, doc: Mapping[str, Any]) -> VmLane:
        """The lane of the event's ``vm-name``; VM 1's for anything else (a one-VM view
        takes every event of the task, whatever it names)."""
        return self.lanes.get(str(doc.get("vm-name")), self.main)

    def feed(self, doc: Mapping[str, Any]) -> None:
        """Take one event of this task into account."""
        kind = str(doc.get("event"))  # (wire: any type; a list is not hashable)
        if kind == "accepted":
            for lane in self.lanes.values():
                lane.phase = "accepted"
        elif kind in {"phase", "progress"}:
            self._lane(doc).feed(doc)
        elif kind in {"error", "rejected"}:
            who = f"{doc['vm-name']}: " if self.swap_with is not None and "vm-name" in doc else ""
            self.notes.append(f"{who}{kind}: {doc.get('code', '?')}: {doc.get('details', '')}")

    # ------------------------------------------------------------------ text

    def header(self) -> str:
        kind = self.migration_type or "agent's default type"
        if self.swap_with is not None:
            return (
                f"Swapping {self.vm} ({self.source} -> {self.destination}) with"
                f" {self.swap_with} ({self.destination} -> {self.source})"
                f"  ({kind}, id {self.task_id})"
            )
        return (
            f"Migrating {self.vm} from {self.source} to {self.destination}"
            f"  ({kind}, id {self.task_id})"
        )

    def stats(self) -> str:
        return self.main.stats()

    def action_text(self) -> str:
        if self.swap_with is None:
            return self.main.action_text()
        return "; ".join(f"{lane.vm}: {lane.action_text()}" for lane in self.lanes.values())

    def _name_width(self) -> int:
        return max(len(safe(vm)) for vm in self.lanes)

    def plain(self, doc: Mapping[str, Any]) -> str:
        """One line per event for a pipe or a log file (with the VM's name in a swap)."""
        who = ""
        if self.swap_with is not None:
            who = f"{ljust(doc.get('vm-name', '-'), self._name_width())}  "
        kind = ljust(doc.get("event", "?"), 8)
        head = f"{self.elapsed:7.1f} s  {who}{kind}  "
        if doc.get("event") == "progress":
            lane = self._lane(doc)
            parts = progress_parts(doc, lane.percent, maximum=lane.max_downtime)
            parts = [p for p in parts if not p.startswith("target ")]  # (own line)
            return head + fit(parts, max(20, PLAIN_WIDTH - len(safe(head))))
        return head + event_fields(doc)

    def plain_lines(self, doc: Mapping[str, Any]) -> list[str]:
        """:meth:`plain`, and for a progress event that set a new downtime target a second
        line with it (``target 30 ms -> max 300 ms``): the progress line has no room for it."""
        lines = [self.plain(doc)]
        if doc.get("event") == "progress":
            target = self._lane(doc).target_change()
            if target is not None:
                who = ""
                if self.swap_with is not None:
                    who = f"{ljust(doc.get('vm-name', '-'), self._name_width())}  "
                lines.append(f"{'':11}{who}{'downtime':8}  {target}")
        return lines

    def ok(self, result: Mapping[str, Any]) -> bool:
        """The migration (both halves of a swap, whose result must report VM 2) succeeded."""
        if self.swap_with is not None and not isinstance(result.get("swap-with"), Mapping):
            return False
        return succeeded(result)

    def summary(self, result: Mapping[str, Any], wall: float) -> list[tuple[str, str]]:
        """(text, rich style) lines for the end of the migration."""
        if self.swap_with is not None:
            return self._swap_summary(result, wall)
        ok = succeeded(result)
        lines: list[tuple[str, str]] = []
        tm = _timings(result)
        if ok:
            dest = result.get("destination", self.destination)
            lines.append((f"{self.vm} migrated from {self.source} to {dest}", "bold green"))
        else:
            why = f"{result.get('code', 'error')}: {result.get('details', '')}"
            lines.append((f"{self.vm} was NOT migrated: {why}", "bold red"))
            if str(result.get("code")) in _STAYS_ON_SOURCE:
                lines.append((f"  {self.vm} stays on {self.source}", "yellow"))
        lines.append(_total_line(tm, wall))
        downtime = tm.get("downtime")
        # One downtime: the result's measurement, else the final progress event's.
        if isinstance(downtime, int | float):
            lines.append((f"  downtime     {float(downtime) * 1000:.1f} ms", ""))
        elif self.final_downtime is not None:
            lines.append((f"  downtime     {self.final_downtime:g} ms", ""))
        if self.progress is not None:
            lines.append((f"  passes       {self.progress.get('iteration', 0)}", ""))
        lines.append((f"  actions      {self.action_text()}", ""))
        if "retries" in result:
            lines.append((f"  retries      {result['retries']}", ""))
        if ok and result.get("details"):
            lines.append((f"  note         {result['details']}", "yellow"))
        if self.cancel_answer:
            lines.append((f"  cancel       {self.cancel_answer}", ""))
        return lines

    def _swap_summary(self, result: Mapping[str, Any], wall: float) -> list[tuple[str, str]]:
        """Both outcomes of a swap: VM 1 from the result's top level, VM 2 from its
        ``swap-with`` map (protocol §3.6)."""
        partner = self.lanes[str(self.swap_with)]
        raw = result.get("swap-with")
        sub: Mapping[str, Any] | None = raw if isinstance(raw, Mapping) else None
        tm = _timings(result)
        lines: list[tuple[str, str]] = []
        # VM 1. The top-level status is ``error`` when either half failed; details starting
        # with ``swap-with <vm2>: `` are VM 2's failure, with VM 1's own note (stopped, not
        # started) after it, if any.
        prefix = f"swap-with {partner.vm}: "
        details = str(result.get("details", ""))
        moved = result.get("destination")
        own: str | None = None
        if result.get("status") != "success":
            if details.startswith(prefix):
                theirs = str((sub or {}).get("details", ""))
                note = details.removeprefix(prefix).removeprefix(theirs).removeprefix("; ")
                if moved is None:
                    own = note or f"stopped because the migration of {partner.vm} failed"
            else:
                mine = details.partition(f"; {prefix}")[0]
                own = f"{result.get('code', 'error')}: {mine}"
        elif moved is None:
            moved = self.destination
        lines.extend(_outcome(self.main, moved, own, str(result.get("code", ""))))
        # VM 2.
        if sub is None:
            lines.extend(self._unreported(partner, result))
        else:
            moved = sub.get("destination")
            own = None
            if sub.get("status") != "success":
                own = f"{sub.get('code', 'error')}: {sub.get('details', '')}"
            elif moved is None:
                moved = partner.destination
            lines.extend(_outcome(partner, moved, own, str(sub.get("code", ""))))
            lines.append((f"  order        {sub.get('order', '?')}", ""))
        lines.append(_total_line(tm, wall))
        parts = []
        for lane in self.lanes.values():
            downtime = tm.get(f"downtime-{lane.vm}")
            if isinstance(downtime, int | float):
                parts.append(f"{lane.vm} {float(downtime) * 1000:.1f} ms")
            elif lane.final_downtime is not None:
                parts.append(f"{lane.vm} {lane.final_downtime:g} ms (final progress event)")
        if parts:
            lines.append(("  downtime     " + "; ".join(parts), ""))
        if any(lane.progress is not None for lane in self.lanes.values()):
            passes = ", ".join(f"{lane.vm} {lane.passes}" for lane in self.lanes.values())
            lines.append((f"  passes       {passes}", ""))
        lines.append((f"  actions      {self.action_text()}", ""))
        retries = [(self.vm, result.get("retries")), (partner.vm, (sub or {}).get("retries"))]
        if any(n is not None for _, n in retries):
            text = ", ".join(f"{vm} {n or 0}" for vm, n in retries)
            lines.append((f"  retries      {text}", ""))
        if self.ok(result) and result.get("details"):
            lines.append((f"  note         {result['details']}", "yellow"))
        if self.cancel_answer:
            lines.append((f"  cancel       {self.cancel_answer}", ""))
        return lines

    @staticmethod
    def _unreported(lane: VmLane, result: Mapping[str, Any]) -> list[tuple[str, str]]:
        """VM 2 of a result without a ``swap-with`` map (a refusal in the pre-checks; a
        cancelled swap): what its own events said is all there is to go on."""
        vm = lane.vm
        if result.get("status") == "success":
            why = "the result reports no outcome for it (does the agent know swap-with?)"
            return [(f"{vm} was NOT migrated: {why}", "bold red")]
        if lane.progress is None and lane.phase in {"sent", "accepted"}:
            return [(f"{vm} was NOT migrated: the swap ended before its half started", "bold red")]
        if lane.phase == "completed":
            return [
                (
                    f"{vm}: the result reports no outcome for it; its last progress event said"
                    f" completed ({lane.source} -> {lane.destination})",
                    "bold yellow",
                )
            ]
        code = str(result.get("code", "error"))
        lines = [(f"{vm} was NOT migrated: the task ended with {code}", "bold red")]
        if code in _STAYS_ON_SOURCE:  # a cancel or failure stops both halves (§3.6)
            lines.append((f"  {vm} stays on {lane.source}", "yellow"))
        return lines

    # ------------------------------------------------------------------ rich

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.progress_bar import ProgressBar  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415

        cols = options.max_width
        yield safe_text(fit([self.header()], cols), style="bold")
        if self.swap_with is None:
            lane = self.main
            bar = Table.grid(padding=(0, 1))
            bar.add_row(
                ProgressBar(
                    total=100.0,
                    completed=bar_value(lane.percent),
                    width=max(10, min(60, cols - 62)),
                ),
                safe_text(f"{lane.percent:5.1f} %", style="bold"),
                safe_text(fit([lane.pass_text()], 20)),
                safe_text(lane.eta()),
                safe_text(f"elapsed {self.elapsed:.1f} s"),
                safe_text(fit([f"phase {lane.phase}"], 16), style="blue"),
            )
            yield bar
            yield safe_text(lane.stats(cols))
            downtime = lane.downtime(cols)
            if downtime is not None:
                yield safe_text(downtime)
            yield safe_text(fit([f"actions: {lane.action_text()}"], cols))
        else:
            yield from lane_rows(self.lanes.values(), cols)
            yield safe_text(f"elapsed {self.elapsed:.1f} s")
        yield from footer_rows(self.notes, self.cancel_id, self.cancel_answer, cols)


def _timings(result: Mapping[str, Any]) -> Mapping[str, Any]:
    tm = result.get("time-measurement")
    return tm if isinstance(tm, Mapping) else {}


def _total_line(tm: Mapping[str, Any], wall: float) -> tuple[str, str]:
    agent = ", ".join(
        f"{k} {float(v):.3f} s"
        for k, v in tm.items()
        if k in {"overall", "migrate"} and isinstance(v, int | float)
    )
    return (f"  total time   {wall:.2f} s" + (f"  (agent: {agent})" if agent else ""), "")


def _outcome(lane: VmLane, moved: object, failure: str | None, code: str) -> list[tuple[str, str]]:
    """The summary line(s) of one VM of a swap: where it went, or why it did not."""
    if moved is not None and failure is None:
        return [(f"{lane.vm} migrated from {lane.source} to {moved}", "bold green")]
    if moved is not None:
        return [(f"{lane.vm} moved from {lane.source} to {moved}, but: {failure}", "bold red")]
    lines = [(f"{lane.vm} was NOT migrated: {failure}", "bold red")]
    stays = f"stays on {lane.source}"
    # A half stopped because the other failed stays where it was (protocol §3.6).
    if (code in _STAYS_ON_SOURCE or "stopped because" in str(failure)) and stays not in str(
        failure
    ):
        lines.append((f"  {lane.vm} {stays}", "yellow"))
    return lines


class _Display:
    """The live region at a terminal; a no-op otherwise."""

    def __init__(self, out: Out, view: FollowedView) -> None:
        self.out = out
        self.view = view
        self._live: Live | None = None

    def start(self) -> None:
        if self.out.tty and self._live is None:
            from rich.live import Live  # noqa: PLC0415

            self._live = Live(
                self.view, console=self.out.console, refresh_per_second=8, transient=False
            )
            self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None

    def event(self, doc: Mapping[str, Any]) -> None:
        if self.out.json:
            self.out.json_line(doc)
        elif self._live is not None:
            self._live.refresh()
        elif not self.out.tty:
            for line in self.view.plain_lines(doc):
                self.out.line(line)


def _read_line() -> asyncio.Future[str]:
    """One line from the terminal without a thread (a pending ``input()`` thread would keep
    the process alive after the migration finished)."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    fut: asyncio.Future[str] = loop.create_future()

    def ready() -> None:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not fut.done():
            fut.set_result(data.decode(errors="replace"))

    loop.add_reader(fd, ready)
    fut.add_done_callback(lambda _: loop.remove_reader(fd))
    return fut


async def follow_migration(
    session: Session, out: Out, view: FollowedView, *, limit: float | None
) -> Message:
    """Show ``view`` live until the migration's (or evacuation's) result arrives; returns the
    result."""
    display = _Display(out, view)
    host = view.source

    def on_item(item: Message) -> None:
        if item.host != host:
            return  # another agent's (a task id is unique per agent, not in the fleet)
        if item.kind == "event" and item.id == view.task_id:
            view.feed(item.doc)
            display.event(item.doc)
        elif item.kind == "result" and view.cancel_id and item.id == view.cancel_id:
            entries = item.doc.get("list")
            first = (
                entries[0]
                if isinstance(entries, list) and entries and isinstance(entries[0], Mapping)
                else {}
            )
            if first.get("status") == "success":
                view.cancel_answer = f"accepted by {host} ({first.get('state', '?')})"
            else:
                view.cancel_answer = f"{first.get('code', '?')}: {first.get('details', '')}"
            if not out.tty and not out.json:
                out.note(f"cancel: {view.cancel_answer}")

    async def on_interrupt(_: Interrupt) -> None:
        display.stop()
        try:
            await _ask_cancel(session, out, view, on_item)
        finally:
            display.start()

    if not out.tty and not out.json:
        out.line(view.header())
    display.start()
    try:
        return await session.wait_result(
            host, view.task_id, limit=limit, on_item=on_item, on_interrupt=on_interrupt
        )
    finally:
        display.stop()


def _news(item: Message, view: FollowedView) -> bool:
    """What ends the Ctrl-C prompt: the task's (or the cancel's) result, or its agent going
    away; not its events, nor what other tasks and agents publish."""
    if item.kind == "result":
        return item.host == view.source and item.id in {view.task_id, view.cancel_id}
    if item.kind == "status":
        return item.host == view.source and not item.retained and item.doc.get("state") != "online"
    return False


async def _ask_cancel(session: Session, out: Out, view: FollowedView, on_item: Any) -> None:
    """The Ctrl-C prompt. Events keep being taken in while it waits; a result, a lost
    broker or a presence change ends the prompt and is handled by the caller."""
    again = session.conn.command("follow", view.task_id, view.source)
    hint = (
        f"task {view.task_id!r} keeps running on {view.source!r} (follow it again with:"
        f" {again}; cancel it with: {session.cancel_command(view.task_id, view.source)})"
    )
    if view.cancel_id is not None:
        out.note(
            "cancel already requested; waiting for the migration's result (Ctrl-C again leaves)"
        )
        return
    if not sys.stdin.isatty():
        raise CliError(INTERRUPTED, f"interrupted: {hint}")
    out.prompt(f"Cancel {view.what}? [y/N] ")
    answer = _read_line()
    try:
        while True:
            getter = asyncio.ensure_future(session.get())
            waiting: set[asyncio.Future[Any]] = {answer, getter}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break
            item = getter.result()
            if isinstance(item, Interrupt):
                out.note("")
                raise CliError(INTERRUPTED, f"left without cancelling: {hint}")
            if isinstance(item, Message) and not _news(item, view):
                on_item(item)  # (its events; anything else is not about this task)
                continue
            if isinstance(item, Lost | Message):
                out.note("")
                out.note("(the migration has news; not cancelling)")
                session.push_back(item)
                return
    finally:
        answer.cancel()
    if answer.result().strip().lower() not in {"y", "yes"}:
        out.note(f"not cancelled; following {view.what} again")
        return
    view.cancel_id = fresh_id("cancel")
    await session.publish_task(view.source, cancel_task(view.cancel_id, view.task_id))
    out.note(f"cancel sent (task {view.cancel_id}); waiting for the migration's result")
