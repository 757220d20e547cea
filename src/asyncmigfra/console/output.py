"""Where command output goes, and how it looks: rich on a terminal, plain text in a pipe,
JSON lines with ``--json``.

Why three modes: people at a terminal want colour, tables and a live bar; ``grep``/``less``
and log files want stable plain lines without escape codes; scripts want one JSON document
per line that they can parse without knowing our layout. Diagnostics and prompts go to
stderr in every mode, so stdout stays machine-readable with ``--json``.

rich is imported only in terminal mode, which keeps the other modes fast to start.

Every string written here goes through :func:`~asyncmigfra.terminal.safe` (or
:func:`~asyncmigfra.terminal.json_safe` for ``--json``) at the moment it is written,
in every mode: anyone who can publish on the broker chooses most of what the CLI prints, and
must not be able to send escape sequences to the user's terminal. :class:`Out` is the only
writer of the client commands; :mod:`asyncmigfra.terminal` says what is escaped, how,
and why.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

from asyncmigfra.progresstext import action_text, disk_text, number
from asyncmigfra.terminal import json_safe, safe

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "Out",
    "event_fields",
    "fmt_bytes",
    "fmt_rate",
    "local_time",
    "number",
    "result_fields",
    "result_ok",
    "result_vms",
]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def fmt_bytes(value: object) -> str:
    """``1073741824`` -> ``1.0 GiB``; ``?`` for anything that is not a finite number."""
    n = number(value)
    if n is None:
        return "?"
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
        return when.astimezone().strftime("%H:%M:%S.%f")[:-3]
    except (ValueError, OverflowError):  # not a time; or year 1 moved out of range
        return stamp


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
    kind = str(doc.get("event"))  # (wire: any type; a list is not hashable)
    if kind == "progress":
        pct = number(doc.get("percent", 0) or 0)
        percent = "    ?" if pct is None else f"{pct:5.1f}"
        parts = [f"{doc.get('phase', '?')} {percent} %"]
        parts.append(f"pass {doc.get('iteration', 0)}")
        disks = disk_text(doc)
        if disks is not None:
            parts.append(disks)
        if "data-remaining" in doc:
            parts.append(f"remaining {fmt_bytes(doc['data-remaining'])}")
        parts.extend(rate_parts(doc))
        if "downtime" in doc:
            parts.append(f"downtime {doc['downtime']} ms")
        action = action_text(doc)
        if action is not None:
            parts.append(f"action {action}")
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


def _entries(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    items = doc.get("list")
    if isinstance(items, list):
        return [e for e in items if isinstance(e, Mapping)]
    return [doc]


def result_vms(doc: Mapping[str, Any]) -> list[str]:
    """The VM names a result is about."""
    return [str(e["vm-name"]) for e in _entries(doc) if "vm-name" in e]


def result_ok(doc: Mapping[str, Any]) -> bool:
    return doc.get("result") != "unknown" and all(
        e.get("status") == "success" for e in _entries(doc)
    )


def result_fields(doc: Mapping[str, Any]) -> str:
    """A result in one line (``watch``): its kind, then each entry's outcome."""
    parts = [str(doc.get("result", "?"))]
    for e in _entries(doc):
        status = str(e.get("status", "?"))
        what = f"{e.get('vm-name', '?')} {status}"
        if status != "success":
            what += f" {e.get('code', '?')}: {e.get('details', '')}"
        parts.append(what)
    return "  ".join(parts)


def _now() -> str:
    return dt.datetime.now().astimezone().strftime("%H:%M:%S.%f")[:-3]


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
        """One line on stdout (``text`` is escaped; ``style`` is the CLI's own)."""
        self._line(safe(text), style)

    def _line(self, shown: str, style: str | None = None) -> None:
        """A line that is already escaped."""
        if self.tty:
            from rich.text import Text  # noqa: PLC0415

            self.console.print(Text(shown, style=style or ""), soft_wrap=True)
        else:
            print(shown, file=self.stream, flush=True)

    def json_line(self, obj: object) -> None:
        """One JSON document on one line; every character a terminal could take for a
        control is a JSON ``\\u`` escape (the same value for a JSON parser)."""
        text = json.dumps(obj, default=str, ensure_ascii=False)
        print(json_safe(text), file=self.stream, flush=True)

    def raw(self, payload: bytes) -> None:
        """A payload as the agent published it (YAML), ``...`` line included; each line
        escaped (its line breaks stay, a CR, tab or bidi control in it is shown escaped)."""
        text = payload.decode("utf-8", errors="replace").removesuffix("\n")
        shown = "\n".join(safe(line) for line in text.split("\n"))
        self.stream.write(shown + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A diagnostic for people: stderr in every mode."""
        print(safe(text), file=self.err, flush=True)

    def error(self, text: str) -> None:
        print(f"asyncmigfra: {safe(text)}", file=self.err, flush=True)

    def prompt(self, question: str) -> None:
        """A question on stderr on a line of its own, the answer typed after it."""
        self.err.write("\n" + safe(question))
        self.err.flush()

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

        Every cell is escaped, so a newline or a tab in a value cannot add a row or shift a
        column. ``styles`` maps a column index to ``{cell text: rich style}`` (state
        colours)."""
        shown = [[safe(cell) for cell in row] for row in rows]
        if self.tty:
            from rich.table import Table  # noqa: PLC0415
            from rich.text import Text  # noqa: PLC0415

            table = Table(
                title=None if title is None else Text(safe(title)),
                title_justify="left",
                header_style="bold",
            )
            for col in columns:
                table.add_column(Text(safe(col)))
            for raw, row in zip(rows, shown, strict=True):
                cells = [
                    Text(cell, style=(styles or {}).get(i, {}).get(raw[i], ""))
                    for i, cell in enumerate(row)
                ]
                table.add_row(*cells)
            self.console.print(table)
            return
        if title:
            self.line(title)
        header = [safe(c) for c in columns]
        widths = [len(c) for c in header]
        for row in shown:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
        for row in [header, *shown]:
            self._line("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())

    def event(self, host: str, doc: Mapping[str, Any]) -> None:
        """One ``watch`` line: time, host, vm, event, id, details (each escaped)."""
        kind = str(doc.get("event", "?"))
        self._watch_line(
            [
                local_time(doc.get("time")),
                doc.get("host", host),
                doc.get("vm-name", "-"),
                kind,
                doc.get("id", "-"),
                event_fields(doc),
            ],
            _EVENT_STYLE.get(kind, ""),
            detail_style=_EVENT_STYLE.get(kind, "") if kind != "done" else "",
        )

    def result(self, host: str, doc: Mapping[str, Any]) -> None:
        """A ``watch`` line for a result (results carry no time: the time it arrived)."""
        ok = result_ok(doc)
        self._watch_line(
            [_now(), host, ", ".join(result_vms(doc)) or "-", "result", doc.get("id", "-"),
             result_fields(doc)],
            "bold green" if ok else "bold red",
            detail_style="" if ok else "red",
        )  # fmt: skip

    def presence(self, host: str, doc: Mapping[str, Any]) -> None:
        """A ``watch`` line for a presence change (an agent started, drains, went away)."""
        state = str(doc.get("state", "?"))
        parts = [state]
        parts.extend(f"{k} {doc[k]}" for k in ("version", "hypervisor", "since") if k in doc)
        self._watch_line(
            [_now(), doc.get("host", host), "-", "presence", "-", "  ".join(parts)],
            _STATE_STYLE.get(state, ""),
            detail_style=_STATE_STYLE.get(state, ""),
        )

    def _watch_line(self, values: Sequence[object], style: str, *, detail_style: str) -> None:
        cols = [safe(v) for v in values]
        if not self.tty:
            self._line("  ".join(cols))
            return
        from rich.text import Text  # noqa: PLC0415

        text = Text()
        text.append(cols[0], style="dim")
        text.append(f"  {cols[1]:<10}", style="bold")
        text.append(f"  {cols[2]:<12}")
        text.append(f"  {cols[3]:<9}", style=style)
        text.append(f"  {cols[4]}", style="dim")
        text.append(f"  {cols[5]}", style=detail_style)
        self.console.print(text, soft_wrap=True)

    @staticmethod
    def state_styles() -> Mapping[str, str]:
        return _STATE_STYLE
