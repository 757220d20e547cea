"""One VM's move as the live views show it (``migrate --follow``, a swap's two VMs,
``evacuate --follow``'s one bar per VM), fed by that VM's ``phase`` and ``progress`` events.

The words and the percent come from :mod:`asyncmigfra.progresstext`, shared with the demo:
the percent shown never overstates (1 - remaining/total of the current pass, not the wire's
bytes-sent ``percent``), and each line is fitted to the terminal's width.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from asyncmigfra.progresstext import (
    ShownPercent,
    action_text,
    disk_text,
    fmt_eta,
    fmt_size,
    in_disk_phase,
    number,
    pass_text,
    remaining_of_total,
    target_text,
)
from asyncmigfra.terminal import fit, ljust, safe, safe_text

__all__ = ["VmLane", "bar_value", "footer_rows", "lane_rows"]


@dataclass
class VmLane:
    """One VM's move as its events tell it: phase, progress, the agent's actions. A plain
    migration has one lane; a swap two, an evacuation one per VM, fed by the ``vm-name`` of
    each event."""

    vm: str
    source: str
    destination: str
    phase: str = "sent"
    progress: dict[str, Any] | None = None
    #: Every percent shown so far (see :class:`~asyncmigfra.progresstext.ShownPercent`).
    percents: list[float] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    #: Downtime (ms) from the final ``completed`` progress event.
    final_downtime: float | None = None
    #: The task's ``max-downtime`` (ms), when the client set it: "target 30 ms -> max 300 ms".
    max_downtime: object = None
    shown: ShownPercent = field(default_factory=ShownPercent)
    _last_target: str | None = field(default=None, repr=False)

    @property
    def percent(self) -> float:
        return self.percents[-1] if self.percents else 0.0

    @property
    def passes(self) -> int:
        n = number((self.progress or {}).get("iteration", 0))
        return 0 if n is None else int(n)

    def pass_text(self) -> str:
        """``pass 3``, or ``disk 1.2/4.0 GiB`` while a storage copy's disks move."""
        p = self.progress or {}
        return pass_text({**p, "iteration": self.passes}) if p else "pass 0"

    def feed(self, doc: Mapping[str, Any]) -> None:
        """A ``phase`` or ``progress`` event of this VM."""
        kind = str(doc.get("event"))  # (wire: any type; a list is not hashable)
        if kind == "phase":
            self.phase = str(doc.get("phase", "?"))
            if self.phase == "retry-wait":
                self.actions.append("retry")
        elif kind == "progress":
            self.progress = dict(doc)
            self.phase = str(doc.get("phase", self.phase))
            self.percents.append(self.shown.feed(doc))
            action = doc.get("action")
            if action == "raise-downtime" and "max-downtime" in doc:
                self.actions.append(f"raise-downtime to {doc['max-downtime']} ms")
            elif action:
                self.actions.append(action_text(doc) or str(action))
            downtime = number(doc.get("downtime"))
            if doc.get("phase") == "completed" and downtime is not None:
                self.final_downtime = downtime

    def eta(self) -> str:
        """``ETA 4.2 s``; ``ETA ?`` while the agent has no estimate; empty once completed."""
        if self.phase == "completed":
            return ""
        return fmt_eta((self.progress or {}).get("eta")) or "ETA ?"

    def stats(self, width: int = 80) -> str:
        """Amounts and rates, one line of at most ``width`` columns."""
        p = self.progress or {}
        parts = []
        disks = disk_text(p) if in_disk_phase(p) else None
        if disks is not None:
            parts.append(f"{disks} copied, memory next")
        state = remaining_of_total(p)
        if state is not None:
            parts.append(f"remaining {fmt_size(state[0])} of {fmt_size(state[1])}")
        if "transfer-rate" in p:
            parts.append(f"rate {fmt_size(p['transfer-rate'])}/s")
        if "dirty-rate" in p:
            parts.append(f"dirty {fmt_size(p['dirty-rate'])}/s")
        return fit(parts, width, "   ") if parts else "waiting for the first statistics..."

    def downtime(self, width: int = 80) -> str | None:
        """``downtime  target 30 ms -> max 300 ms   expected 51.2 ms`` (at most ``width``)."""
        p = self.progress or {}
        parts = []
        target = target_text(p, self.max_downtime)
        if target is not None:
            parts.append(target)
        expected = number(p.get("expected-downtime"))
        if expected is not None:
            parts.append(f"expected {expected:g} ms")
        if self.final_downtime is not None:
            parts.append(f"measured {self.final_downtime:g} ms")
        return "downtime  " + fit(parts, width - 10, "   ") if parts else None

    def target_change(self) -> str | None:
        """The downtime target (``target 30 ms -> max 300 ms``) when it differs from the last
        one this returned: plain lines show it when it is first known and when it rises."""
        text = target_text(self.progress or {}, self.max_downtime)
        if text is None or text == self._last_target:
            return None
        self._last_target = text
        return text

    def action_text(self) -> str:
        return ", ".join(self.actions) if self.actions else "none"


def bar_value(percent: float) -> float:
    """A percentage the progress bar can draw (an agent may send -5 or 1e300)."""
    return min(100.0, max(0.0, percent))


def lane_rows(lanes: Iterable[VmLane], cols: int) -> Iterator[Any]:
    """rich renderables for several VMs (a swap, an evacuation): one bar per VM, then the
    statistics of each VM still moving and the actions of each VM that had any; every line
    at most ``cols`` wide."""
    from rich.progress_bar import ProgressBar  # noqa: PLC0415 - only at a terminal
    from rich.table import Table  # noqa: PLC0415

    lanes = list(lanes)
    width = min(16, max((len(safe(lane.vm)) for lane in lanes), default=1))
    bars = Table.grid(padding=(0, 1))
    routes = any(lane.destination for lane in lanes)  # (an evacuation's are not known)
    for lane in lanes:
        bars.add_row(
            safe_text(fit([ljust(lane.vm, width)], width), style="bold"),
            *([safe_text(fit([f"-> {lane.destination}"], 12))] if routes else []),
            ProgressBar(
                total=100.0, completed=bar_value(lane.percent), width=max(6, min(40, cols - 72))
            ),
            safe_text(f"{lane.percent:5.1f} %", style="bold"),
            safe_text(fit([lane.pass_text()], 20)),
            safe_text(fit([lane.eta()], 14)),
            safe_text(fit([lane.phase], 12), style="blue"),
        )
    yield bars
    for lane in lanes:
        if lane.progress is not None and lane.phase != "completed":
            name = fit([ljust(lane.vm, width)], width)
            yield safe_text(f"{name}  {lane.stats(cols - width - 2)}")
            downtime = lane.downtime(cols - width - 2)
            if downtime is not None:
                yield safe_text(f"{ljust('', width)}  {downtime}")
    for lane in lanes:
        if lane.actions:
            yield safe_text(fit([f"{lane.vm}  actions: {lane.action_text()}"], cols))


def footer_rows(
    notes: list[str], cancel_id: str | None, cancel_answer: str | None, cols: int
) -> Iterator[Any]:
    """The last three notes and the state of a cancel, under a live view's bars."""
    for note in notes[-3:]:
        yield safe_text(fit([note], cols), style="red")
    if cancel_id:
        yield safe_text(
            f"cancel requested (task {cancel_id})"
            + (f": {cancel_answer}" if cancel_answer else "; waiting for the agent"),
            style="yellow",
        )
