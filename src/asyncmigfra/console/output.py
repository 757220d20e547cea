"""Where command output goes, and how it looks: rich on a terminal, plain text in a pipe,
JSON lines with ``--json``.

Why three modes: people at a terminal want colour, tables and a live bar; ``grep``/``less``
and log files want stable plain lines without escape codes; scripts want one JSON document
per line that they can parse without knowing our layout. Diagnostics and prompts go to
stderr in every mode, so stdout stays machine-readable with ``--json``.

rich is imported only in terminal mode, which keeps the other modes fast to start.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "Out",
    "event_fields",
    "fmt_bytes",
    "fmt_rate",
    "local_time",
]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def fmt_bytes(value: object) -> str:
    """``1073741824`` -> ``1.0 GiB``; ``?`` for anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "?"
    n = float(value)
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def fmt_rate(value: object) -> str:
    return "?" if fmt_bytes(value) == "?" else f"{fmt_bytes(value)}/s"


def local_time(stamp: object) -> str:
    """An event's ISO 8601 UTC ``time`` as local ``HH:MM:SS.mmm`` (the date is noise in a
    live stream); unreadable stamps are shown as they are."""
    if not isinstance(stamp, str):
        return "--:--:--.---"
    try:
        when = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    return when.astimezone().strftime("%H:%M:%S.%f")[:-3]


def rate_parts(p: Mapping[str, Any]) -> list[str]:
    """Transfer and dirty rate, expected downtime and target of a progress event, as shown
    by both the plain lines and the live view."""
    parts = []
    if "transfer-rate" in p:
        parts.append(f"rate {fmt_rate(p['transfer-rate'])}")
    if "dirty-rate" in p:
        parts.append(f"dirty {fmt_rate(p['dirty-rate'])}")
    if "expected-downtime" in p:
        parts.append(f"expected downtime {p['expected-downtime']} ms")
    if "max-downtime" in p:
        parts.append(f"target {p['max-downtime']} ms")
    return parts


def event_fields(doc: Mapping[str, Any]) -> str:
    """The interesting part of an event, one line (``watch`` and the plain follow view)."""
    kind = doc.get("event")
    if kind == "progress":
        parts = [f"{doc.get('phase', '?')} {float(doc.get('percent', 0) or 0):5.1f} %"]
        parts.append(f"pass {doc.get('iteration', 0)}")
        if "data-remaining" in doc:
            parts.append(f"remaining {fmt_bytes(doc['data-remaining'])}")
        parts.extend(rate_parts(doc))
        if "downtime" in doc:
            parts.append(f"downtime {doc['downtime']} ms")
        if "action" in doc:
            parts.append(f"action {doc['action']}")
        return "  ".join(parts)
    if kind == "accepted":
        names = doc.get("vm-names") or []
        listed = ", ".join(str(n) for n in names) if isinstance(names, list) else str(names)
        return f"{doc.get('task', '?')}" + (f" [{listed}]" if listed else "")
    if kind == "phase":
        return str(doc.get("phase", "?"))
    if kind in {"error", "rejected"}:
        return f"{doc.get('code', '?')}: {doc.get('details', '')}"
    if kind == "done":
        duration = doc.get("duration")
        took = f" in {float(duration):.3f} s" if isinstance(duration, int | float) else ""
        return f"{doc.get('status', '?')}{took}"
    known = {"event", "id", "host", "time", "vm-name"}
    return "  ".join(f"{k}={v}" for k, v in doc.items() if k not in known)


_EVENT_STYLE = {
    "accepted": "cyan",
    "rejected": "bold red",
    "phase": "blue",
    "progress": "",
    "error": "red",
    "done": "green",
}

_STATE_STYLE = {"online": "green", "draining": "yellow", "offline": "red"}


class Out:
    """The output of one command. ``tty`` (rich) only when stdout is a terminal and no
    ``--json`` was asked for."""

    def __init__(
        self,
        *,
        json_mode: bool = False,
        stream: IO[str] | None = None,
        err: IO[str] | None = None,
    ) -> None:
        self.stream = stream or sys.stdout
        self.err = err or sys.stderr
        self.json = json_mode
        self.tty = not json_mode and self.stream.isatty()
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        """The rich console (terminal mode only)."""
        if self._console is None:
            from rich.console import Console  # noqa: PLC0415 - only at a terminal

            self._console = Console(file=self.stream, highlight=False)
        return self._console

    # ------------------------------------------------------------------ primitives

    def line(self, text: str = "", style: str | None = None) -> None:
        if self.tty:
            from rich.text import Text  # noqa: PLC0415

            self.console.print(Text(text, style=style or ""), soft_wrap=True)
        else:
            print(text, file=self.stream, flush=True)

    def json_line(self, obj: object) -> None:
        print(json.dumps(obj, default=str, ensure_ascii=False), file=self.stream, flush=True)

    def raw(self, payload: bytes) -> None:
        """A payload exactly as the agent published it (YAML), ``...`` line included."""
        text = payload.decode("utf-8", errors="replace")
        self.stream.write(text if text.endswith("\n") else text + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A diagnostic for people: stderr in every mode."""
        print(text, file=self.err, flush=True)

    def error(self, text: str) -> None:
        print(f"asyncmigfra: {text}", file=self.err, flush=True)

    # ------------------------------------------------------------------ composites

    def table(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[str]],
        *,
        title: str | None = None,
        styles: Mapping[int, Mapping[str, str]] | None = None,
    ) -> None:
        """A table: rich at a terminal; else space-aligned columns with a header line.

        ``styles`` maps a column index to ``{cell text: rich style}`` (state colours)."""
        if self.tty:
            from rich.table import Table  # noqa: PLC0415
            from rich.text import Text  # noqa: PLC0415

            table = Table(title=title, title_justify="left", header_style="bold")
            for col in columns:
                table.add_column(col)
            for row in rows:
                cells = [
                    Text(cell, style=(styles or {}).get(i, {}).get(cell, ""))
                    for i, cell in enumerate(row)
                ]
                table.add_row(*cells)
            self.console.print(table)
            return
        if title:
            self.line(title)
        widths = [len(c) for c in columns]
        for row in rows:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
        for row in [list(columns), *rows]:
            self.line("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())

    def event(self, host: str, doc: Mapping[str, Any]) -> None:
        """One ``watch`` line: time, host, vm, event, id, details."""
        kind = str(doc.get("event", "?"))
        cols = [
            local_time(doc.get("time")),
            str(doc.get("host", host)),
            str(doc.get("vm-name", "-")),
            kind,
            str(doc.get("id", "-")),
            event_fields(doc),
        ]
        if not self.tty:
            self.line("  ".join(cols))
            return
        from rich.text import Text  # noqa: PLC0415

        text = Text()
        text.append(cols[0], style="dim")
        text.append(f"  {cols[1]:<10}", style="bold")
        text.append(f"  {cols[2]:<12}")
        text.append(f"  {kind:<9}", style=_EVENT_STYLE.get(kind, ""))
        text.append(f"  {cols[4]}", style="dim")
        text.append(f"  {cols[5]}", style=_EVENT_STYLE.get(kind, "") if kind != "done" else "")
        self.console.print(text, soft_wrap=True)

    @staticmethod
    def state_styles() -> Mapping[str, str]:
        return _STATE_STYLE
