"""Progress events (protocol §5.5) as words for people: one formatter for the CLI's
``--follow`` view and the demo, so both say the same thing the same way (``pass``,
``remaining``, ``rate``, ``dirty``, ``expected downtime``, ``target``, ``ETA``).

Two things here are not a copy of the wire:

* the **percent shown** never overstates. The event's ``percent`` counts bytes sent over all
  passes and keeps rising while a guest dirties memory as fast as it is sent (67.7 % with
  1.7 of 2.0 GiB still to copy). :class:`ShownPercent` shows 100 * (1 - remaining / total)
  of the current state instead: it does not decrease within a memory pass, falls back at the
  start of a pass to what the guest dirtied again, stays below 100 until the job completed;
* a line is **fitted** to a width (80 columns by default): the parts are listed most
  important first and the least important ones are left out until the line fits, so a
  terminal of 80 columns never wraps it.

A migration that copies storage moves the disks first: while its events report disks and no
memory yet (``disk-total`` > 0, ``memory-total`` 0), the lines say ``disk 1.2/4.0 GiB``
instead of the pass number, and the percent shown is the event's own (which counts the
guest's memory as still to copy); once memory moves, ``remaining`` counts memory and disks.

Values come from the wire and may be anything: numbers are read with :func:`number`, and
the caller escapes the text it prints (``asyncmigfra.terminal``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "ShownPercent",
    "action_text",
    "disk_text",
    "fmt_eta",
    "fmt_part",
    "fmt_size",
    "in_disk_phase",
    "pass_text",
    "number",
    "progress_parts",
    "remaining_of_total",
    "target_text",
]

WIDTH = 80
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def number(value: object) -> float | None:
    """``value`` if it is a finite number (not a bool), else ``None``: wire values are
    whatever the publisher sent, and a string, ``.nan`` or ``.inf`` must not end a command
    with a traceback."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        n = float(value)
    except OverflowError:  # an int beyond any float
        return None
    return n if math.isfinite(n) else None


def fmt_size(value: object) -> str:
    """Bytes with three significant digits at most: ``1.7 GiB``, ``851 MiB``, ``98.5 MiB``."""
    n = number(value)
    if n is None:
        return "?"
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{n:.0f} B"
            return f"{n:.0f} {unit}" if abs(n) >= 100 else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def fmt_part(done: object, total: object) -> str:
    """``1.2/4.0 GiB``: both in the unit of ``total`` (``0.5/150 GiB``)."""
    d, t = number(done), number(total)
    if d is None or t is None:
        return "?"
    d, t = max(0.0, d), max(0.0, t)
    unit, scale = _UNITS[-1], float(1024 ** (len(_UNITS) - 1))
    for i, name in enumerate(_UNITS):
        if abs(t) < 1024 ** (i + 1):
            unit, scale = name, float(1024**i)
            break
    if unit == "B":
        return f"{d:.0f}/{t:.0f} B"

    def short(n: float) -> str:
        return f"{n:.0f}" if abs(n) >= 100 else f"{n:.1f}"

    return f"{short(d / scale)}/{short(t / scale)} {unit}"


def in_disk_phase(doc: Mapping[str, object]) -> bool:
    """The event is from a storage copy before memory moves (see the module)."""
    disks = number(doc.get("disk-total"))
    memory = number(doc.get("memory-total"))
    return disks is not None and disks > 0 and (memory is None or memory <= 0)


def disk_text(doc: Mapping[str, object]) -> str | None:
    """``disk 1.2/4.0 GiB`` (copied of all) when the event reports disks, else ``None``."""
    total = number(doc.get("disk-total"))
    if total is None or total <= 0 or number(doc.get("disk-processed")) is None:
        return None
    return f"disk {fmt_part(doc.get('disk-processed'), total)}"


def pass_text(doc: Mapping[str, object]) -> str:
    """``pass 3``; while the disks are copied, what of them is (``disk 1.2/4.0 GiB``)."""
    if in_disk_phase(doc):
        text = disk_text(doc)
        if text is not None:
            return text
    return f"pass {doc.get('iteration', 0)}"


def fmt_eta(value: object) -> str | None:
    """``ETA 4.2 s``, ``ETA 3m05s``, ``ETA 2h03m``; ``None`` without an estimate."""
    n = number(value)
    if n is None or n < 0:
        return None
    if n < 60:
        return f"ETA {n:.1f} s"
    s = round(n)
    if s < 3600:
        return f"ETA {s // 60}m{s % 60:02d}s"
    return f"ETA {s // 3600}h{s % 3600 // 60:02d}m"


def remaining_of_total(doc: Mapping[str, object]) -> tuple[float, float] | None:
    """(still to copy, size) in bytes: memory plus disks when the event reports them."""
    total = number(doc.get("memory-total"))
    left = number(doc.get("memory-remaining"))
    if total is None or total <= 0:
        return None
    if left is None:  # (an event with only the total still to send)
        left = number(doc.get("data-remaining"))
        return None if left is None else (min(total, max(0.0, left)), total)
    disk_total, disk_left = number(doc.get("disk-total")), number(doc.get("disk-remaining"))
    if disk_total is not None and disk_left is not None and disk_total > 0:
        total, left = total + disk_total, left + disk_left
    return max(0.0, left), total


@dataclass
class ShownPercent:
    """The percent a person sees: never more than what is really done now (see the module)."""

    value: float = 0.0
    #: The memory pass ``value`` belongs to.
    pass_no: object = None
    #: An event with statistics was seen: events without them change nothing any more.
    measured: bool = False

    def feed(self, doc: Mapping[str, object]) -> float:
        """Take a ``progress`` event; the percent to show."""
        if doc.get("phase") == "completed":
            self.value = 100.0
            return self.value
        state = remaining_of_total(doc)
        if state is None:
            # No statistics (before the first sample, offline): the event's own percent,
            # unless statistics were seen already.
            wire = number(doc.get("percent"))
            if not self.measured and wire is not None:
                self.value = max(self.value, min(99.9, max(0.0, wire)))
            return self.value
        left, total = state
        # (rounded down to the 0.1 shown: rounding up could overstate)
        honest = math.floor(min(99.9, max(0.0, 100.0 * (1.0 - left / total))) * 10) / 10
        same_pass = self.measured and doc.get("iteration") == self.pass_no
        self.value = max(self.value, honest) if same_pass else honest
        self.pass_no = doc.get("iteration")
        self.measured = True
        return self.value


def action_text(doc: Mapping[str, object]) -> str | None:
    """What the agent changed with a progress event, for people: ``raise-downtime``,
    ``abort (progress-timeout)``, ``tuned bandwidth 50 MiB/s, post-copy``; ``None`` when it
    changed nothing."""
    action = doc.get("action")
    if action is None:
        return None
    if action != "tuned":
        reason = doc.get("reason")
        return f"{action}" + (f" ({reason})" if reason is not None else "")
    # (``max-downtime`` is in every event with a target: the views show it as the target.)
    changes = []
    bandwidth = number(doc.get("bandwidth"))
    if bandwidth == 0:
        changes.append("bandwidth unlimited")
    elif bandwidth is not None:
        changes.append(f"bandwidth {bandwidth:g} MiB/s")
    changes += [key for key in ("post-copy", "force-complete") if doc.get(key) is True]
    return "tuned " + ", ".join(changes) if changes else "tuned"


def target_text(doc: Mapping[str, object], maximum: object = None) -> str | None:
    """``target 30 ms -> max 300 ms``: the downtime target set now and, when the caller knows
    it (the task's ``max-downtime``), the most the convergence policy may raise it to."""
    target = number(doc.get("max-downtime"))
    if target is None:
        return None
    most = number(maximum)
    if most is None or most == target:
        return f"target {target:g} ms" + (" (max)" if most is not None else "")
    return f"target {target:g} ms -> max {most:g} ms"


def progress_parts(
    doc: Mapping[str, object], percent: float, *, maximum: object = None, phase: bool = True
) -> list[str]:
    """The parts of a progress line, most important first."""
    parts = [f"{doc.get('phase', '?')} {percent:5.1f} %" if phase else f"{percent:5.1f} %"]
    parts.append(pass_text(doc))
    eta = fmt_eta(doc.get("eta"))
    if eta is not None and doc.get("phase") != "completed":
        parts.append(eta)
    if doc.get("phase") == "completed" and number(doc.get("downtime")) is not None:
        parts.append(f"downtime {number(doc.get('downtime')):g} ms")
    action = action_text(doc)
    if action is not None:
        parts.append(f"action {action}")
    state = remaining_of_total(doc)
    if state is not None:
        parts.append(f"remaining {fmt_size(state[0])}")
    if "transfer-rate" in doc:
        parts.append(f"rate {fmt_size(doc['transfer-rate'])}/s")
    if "dirty-rate" in doc:
        parts.append(f"dirty {fmt_size(doc['dirty-rate'])}/s")
    expected = number(doc.get("expected-downtime"))
    if expected is not None:
        parts.append(f"expected downtime {expected:g} ms")
    target = target_text(doc, maximum)
    if target is not None:
        parts.append(target)
    return parts
