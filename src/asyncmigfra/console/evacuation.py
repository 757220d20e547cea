"""``evacuate HOST --to ... --follow``: one bar per VM while the host empties, then each
VM's outcome.

An evacuation is one task on the evacuated host (protocol §3.8); its ``phase``, ``progress``
and ``done`` events carry the ``vm-name`` of the VM they concern (``n/a`` for the task's own
``placement`` phase). Each VM gets a :class:`~asyncmigfra.console.lanes.VmLane` the first
time an event names it; where it went is known from the result (its ``destination``). The
live region, Ctrl-C (cancel the evacuation: what has not moved stays) and the plain lines
are those of ``migrate --follow`` (:func:`~asyncmigfra.console.follow.follow_migration`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from asyncmigfra.console.follow import PLAIN_WIDTH
from asyncmigfra.console.lanes import VmLane, footer_rows, lane_rows
from asyncmigfra.console.output import event_fields
from asyncmigfra.console.tasks import succeeded
from asyncmigfra.progresstext import progress_parts
from asyncmigfra.terminal import fit, ljust, safe, safe_text

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderResult

__all__ = ["EvacuationView"]

_TASK_ITSELF = frozenset({"n/a", "None"})


def plan_note(doc: Mapping[str, Any]) -> str:
    """An evacuation's ``plan`` event in one line: its waves, or why there are none."""
    if doc.get("schedule") != "predicted":
        return f"plan: placement order ({doc.get('details', '?')})"
    waves = doc.get("waves")
    count = len(waves) if isinstance(waves, list) else 0
    text = f"plan {doc.get('revision', '?')}: {count} wave{'' if count == 1 else 's'}"
    text += f", {doc.get('makespan', '?')} s predicted"
    unschedulable = doc.get("unschedulable")
    if isinstance(unschedulable, list) and unschedulable:
        names = ", ".join(str(u.get("vm-name")) for u in unschedulable if isinstance(u, Mapping))
        text += f"; predicted not to converge: {names}"
    return text


@dataclass
class EvacuationView:
    """Everything known about one evacuation of ``source``, fed with its events."""

    source: str
    destinations: Sequence[str]
    task_id: str
    max_downtime: object = None
    started: float = field(default_factory=time.monotonic)
    notes: list[str] = field(default_factory=list)
    cancel_id: str | None = None
    cancel_answer: str | None = None
    what: str = "the evacuation"
    #: One lane per VM, in the order the events named them.
    lanes: dict[str, VmLane] = field(default_factory=dict)
    #: The evacuation's own phase (``placement``).
    phase: str = "sent"

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _lane(self, vm: str) -> VmLane:
        lane = self.lanes.get(vm)
        if lane is None:
            lane = self.lanes[vm] = VmLane(vm, self.source, "", max_downtime=self.max_downtime)
        return lane

    def feed(self, doc: Mapping[str, Any]) -> None:
        kind = str(doc.get("event"))
        vm = str(doc.get("vm-name"))
        if kind == "accepted":
            self.phase = "accepted"
        elif kind in {"phase", "progress"}:
            if vm in _TASK_ITSELF:
                self.phase = str(doc.get("phase", self.phase))
            else:
                self._lane(vm).feed(doc)
        elif kind == "done" and vm not in _TASK_ITSELF:
            lane = self._lane(vm)
            if doc.get("status") != "success":
                lane.phase = "failed"
        elif kind in {"error", "rejected"}:
            who = "" if vm in _TASK_ITSELF else f"{vm}: "
            self.notes.append(f"{who}{kind}: {doc.get('code', '?')}: {doc.get('details', '')}")
        elif kind == "plan" and vm in _TASK_ITSELF:  # (a migration's own: its lane shows it)
            self.notes.append(plan_note(doc))

    def header(self) -> str:
        return f"Evacuating {self.source} to {', '.join(self.destinations)}  (id {self.task_id})"

    def plain(self, doc: Mapping[str, Any]) -> str:
        """One line per event, naming the VM ("-" for the evacuation's own events)."""
        vm = str(doc.get("vm-name", "-"))
        who = ljust("-" if vm in _TASK_ITSELF else vm, self._width())
        head = f"{self.elapsed:7.1f} s  {who}  {ljust(doc.get('event', '?'), 8)}  "
        if doc.get("event") == "progress" and vm in self.lanes:
            lane = self.lanes[vm]
            parts = progress_parts(doc, lane.percent, maximum=lane.max_downtime)
            parts = [p for p in parts if not p.startswith("target ")]  # (own line)
            return head + fit(parts, max(20, PLAIN_WIDTH - len(safe(head))))
        if doc.get("event") == "plan" and vm in _TASK_ITSELF:
            return head + safe(plan_note(doc))
        return head + event_fields(doc)

    def plain_lines(self, doc: Mapping[str, Any]) -> list[str]:
        """:meth:`plain`, plus the VM's downtime target when a progress event changed it."""
        lines = [self.plain(doc)]
        vm = str(doc.get("vm-name"))
        if doc.get("event") == "progress" and vm in self.lanes:
            target = self.lanes[vm].target_change()
            if target is not None:
                lines.append(f"{'':11}{ljust(vm, self._width())}  {'downtime':8}  {target}")
        return lines

    def _width(self) -> int:
        return min(16, max([len(safe(v)) for v in self.lanes] + [1]))

    def ok(self, result: Mapping[str, Any]) -> bool:
        return succeeded(result)

    def summary(self, result: Mapping[str, Any], wall: float) -> list[tuple[str, str]]:
        """(text, rich style) lines: each VM's outcome, then the times."""
        lines: list[tuple[str, str]] = []
        entries = result.get("list")
        moved = 0
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, Mapping):
                continue
            vm = entry.get("vm-name", "?")
            if entry.get("status") == "success":
                moved += 1
                lines.append((f"{vm} migrated to {entry.get('destination', '?')}", "green"))
            else:
                why = f"{entry.get('code', 'error')}: {entry.get('details', '')}"
                lines.append((f"{vm} was NOT migrated: {why}", "bold red"))
        count = len(lines)
        style = "bold green" if succeeded(result) else "bold red"
        lines.insert(0, (f"{self.source}: {moved} of {count} VMs migrated", style))
        tm = result.get("time-measurement")
        took = ""
        if isinstance(tm, Mapping) and isinstance(tm.get("overall"), int | float):
            took = f"  (agent: overall {float(tm['overall']):.3f} s)"
        lines.append((f"  total time   {wall:.2f} s{took}", ""))
        if self.cancel_answer:
            lines.append((f"  cancel       {self.cancel_answer}", ""))
        return lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        cols = options.max_width
        yield safe_text(fit([self.header()], cols), style="bold")
        if not self.lanes:
            yield safe_text(f"phase {self.phase}: waiting for the first VM to move", style="blue")
        else:
            yield from lane_rows(self.lanes.values(), cols)
        yield safe_text(f"elapsed {self.elapsed:.1f} s")
        yield from footer_rows(self.notes, self.cancel_id, self.cancel_answer, cols)
