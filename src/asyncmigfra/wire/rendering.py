"""Results and events -> YAML bytes, read identically by PyYAML, ruamel.yaml and yaml-cpp.

Why a hand-written emitter instead of a YAML library's dumper:

* **One reading everywhere.** Our consumers are schedulers using PyYAML (YAML 1.1 implicit
  types), ruamel.yaml (YAML 1.2) and the original's yaml-cpp. A scalar is emitted plain only
  when it is a string in *all* of them: letters/``_``/``/`` first, then only letters, digits,
  ``_ - . / ( )`` and inner spaces, and not one of the YAML 1.1 bool/null words. Everything
  else (``0012``, ``042``, ``yes``, ``on``, ``null``, ``1e3``, ``12:30``, text with ``: ``
  or `` #``, leading/trailing spaces, the empty string) is double-quoted with JSON-compatible
  escapes (``\\"``, ``\\\\``, ``\\n``, ``\\t``, ``\\uXXXX`` for non-printables and for the
  YAML 1.1 line breaks U+0085/U+2028/U+2029). So ``id: "0012"`` stays a string for a PyYAML
  scheduler, where the original's ``id: 0012`` became the integer 12.
* **The original's shape (docs/protocol.md §4.2, §9.5).** Keys in the order ``result``, header keys,
  then ``list:`` (or, for ``vm migrated``, the single entry's keys at the top level), ``id``
  last; ``details``/``code``/``time-measurement`` only when set; timings as ``%f``.
* **Framing.** ``---\\n<body>...\\n``: one explicit document that ``yaml.safe_load`` accepts
  (the original's trailing bare ``---`` made PyYAML's ``safe_load`` fail with "expected a
  single document").
* **Speed and no dependency**: results are small; building lines and joining them is a few
  microseconds, and only the parsing and settings packages may import ruamel.yaml.

Keys longer than 1000 characters are written as explicit ``? key`` entries (simple keys are
limited to 1024 characters in YAML). Values may be ``str``, ``int``, ``float``, ``bool``,
``None`` (``null``), mappings and lists/tuples of those; anything else raises ``TypeError``.

**Bounded.** :func:`render_bounded_result` keeps a result within the agent's
``limits.max-message-size`` (what the broker lets through, docs/operations.md §2): a query
answer (``status``, ``history``) keeps its first entries that fit and says ``more: true``;
any other result keeps its first entries that fit and ends with one ``not-supported`` entry
saying how many were left out (docs/protocol.md §4.1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from asyncmigfra.errors import NotSupported, TaskRejected
from asyncmigfra.model import ResultEntry, ResultMessage

__all__ = [
    "QUERY_RESULTS",
    "BoundedResult",
    "parse_error_result",
    "render_bounded_result",
    "render_event",
    "render_result",
]

_PLAIN: Final = re.compile(r"[A-Za-z_/][A-Za-z0-9_./()-]*(?: +[A-Za-z0-9_./()-]+)*")
#: YAML 1.1 bool and null words (and everything of that shape in any case).
_RESERVED: Final = frozenset({"y", "n", "yes", "no", "true", "false", "on", "off", "null"})
_ESCAPES: Final[dict[int, str]] = {
    0x22: '\\"',
    0x5C: "\\\\",
    0x08: "\\b",
    0x09: "\\t",
    0x0A: "\\n",
    0x0C: "\\f",
    0x0D: "\\r",
}
#: Characters that are escaped in double quotes: controls, DEL, C1, YAML 1.1 line breaks,
#: BOM, surrogates and the non-characters U+FFFE/U+FFFF.
_NEEDS_ESCAPE: Final = re.compile(
    '["\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ufeff\ud800-\udfff\ufffe\uffff]'
)
#: Simple keys must stay below YAML's 1024-character limit.
_MAX_SIMPLE_KEY: Final = 1000


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return _ESCAPES.get(code) or f"\\u{code:04x}"


#: Short strings rendered before (keys, host and VM names, kinds, statuses repeat in every
#: result and event): their text without the regular expressions. Bounded: emptied when full.
_RENDERED: dict[str, str] = {}
_RENDERED_MAX: Final = 4096
_RENDERED_CHARS: Final = 64


def _string(value: str) -> str:
    done = _RENDERED.get(value)
    if done is not None:
        return done
    if _PLAIN.fullmatch(value) is not None and value.lower() not in _RESERVED:
        text = value
    else:
        text = '"' + _NEEDS_ESCAPE.sub(_escape_char, value) + '"'
    if len(value) <= _RENDERED_CHARS:
        if len(_RENDERED) >= _RENDERED_MAX:
            _RENDERED.clear()
        _RENDERED[value] = text
    return text


def _float(value: float) -> str:
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    text = repr(value)
    if "." not in text and "e" in text:
        # YAML 1.1 floats need a dot: 1e-05 would be a string for PyYAML.
        text = text.replace("e", ".0e", 1)
    return text


class _Fixed(float):
    """A ``time-measurement`` value: printed like the original's ``std::to_string`` (``%f``)."""

    __slots__ = ()


def _scalar(value: object) -> str:
    if type(value) is str:  # the common case: most strings were rendered before
        return _RENDERED.get(value) or _string(value)
    if isinstance(value, str):
        return _string(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, _Fixed):
        return f"{value:f}" if math.isfinite(value) else _float(value)
    if isinstance(value, float):
        return _float(value)
    raise TypeError(f"cannot render a {type(value).__name__} as YAML")


#: Exact types that are scalars, told without the ``Mapping`` check (an ABC's is slow).
_SCALAR_TYPES: Final = frozenset({str, int, float, bool, type(None)})


def _key_head(indent: str, key: str) -> str:
    """The text before a value: ``key:``, or ``? key`` + ``:`` for over-long keys."""
    if len(key) > _MAX_SIMPLE_KEY:
        return f"{indent}? {key}\n{indent}:"
    return f"{indent}{key}:"


def _emit_value(out: list[str], head: str, value: object, indent: str) -> None:
    """``head`` is the line so far (``key:``, ``-``); the value goes after it or below it."""
    if isinstance(value, Mapping):
        if not value:
            out.append(head + " {}")
        else:
            out.append(head)
            _emit_map(out, value.items(), indent + "  ")
    elif isinstance(value, list | tuple):
        if not value:
            out.append(head + " []")
        else:
            out.append(head)
            _emit_seq(out, value, indent + "  ")
    else:
        out.append(head + " " + _scalar(value))


def _emit_map(
    out: list[str], items: Iterable[tuple[object, object]], indent: str, first: str = ""
) -> None:
    """Block map at ``indent``; the first key may share a line with ``first`` (``- ``)."""
    seen: set[str] = set()
    for key, value in items:
        rendered = _scalar(key)
        if rendered in seen:
            continue  # first one wins, as our parser and yaml-cpp read duplicates
        seen.add(rendered)
        if len(rendered) <= _MAX_SIMPLE_KEY:
            head = indent + rendered + ":"
        else:
            head = _key_head(indent, rendered)
        if first:
            head = first + head[len(indent) :]
            first = ""
        if type(value) in _SCALAR_TYPES:  # most values: on the key's line
            out.append(head + " " + _scalar(value))
        else:
            _emit_value(out, head, value, indent)


def _emit_seq(out: list[str], items: Iterable[object], indent: str) -> None:
    dash = indent + "-"
    for item in items:
        if isinstance(item, Mapping) and item:
            _emit_map(out, item.items(), indent + "  ", first=dash + " ")
        else:
            _emit_value(out, dash, item, indent)


def _document(items: Iterable[tuple[object, object]]) -> bytes:
    out: list[str] = ["---"]
    _emit_map(out, items, "")
    if len(out) == 1:
        out.append("{}")
    out.append("...\n")
    return "\n".join(out).encode("utf-8")


def _first_wins(items: Iterable[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in items:
        out.setdefault(key, value)
    return out


def _entry_items(entry: ResultEntry) -> list[tuple[str, object]]:
    items: list[tuple[str, object]] = [("vm-name", entry.vm_name), ("status", entry.status)]
    if entry.details:
        items.append(("details", entry.details))
    if entry.code:
        items.append(("code", entry.code))
    if entry.time_measurement:
        items.append(
            (
                "time-measurement",
                {tag: _Fixed(seconds) for tag, seconds in entry.time_measurement.items()},
            )
        )
    items.extend(entry.extra.items())
    return items


def _header_items(header: Mapping[str, object]) -> list[tuple[str, object]]:
    """The message's top-level keys; its own ``time-measurement`` (an evacuation's) printed
    with six decimals like every entry's."""
    items: list[tuple[str, object]] = []
    for key, value in header.items():
        if key == "time-measurement" and isinstance(value, Mapping):
            fixed = {
                tag: _Fixed(seconds) if isinstance(seconds, float) else seconds
                for tag, seconds in value.items()
            }
            items.append((key, fixed))
        else:
            items.append((key, value))
    return items


def render_result(msg: ResultMessage) -> bytes:
    """The one result payload of a task message (§4.2 shape, §2.2 ``---``/``...`` framing).

    ``flat`` puts the single entry's keys at the top level (``vm migrated``); a flat message
    without exactly one entry falls back to ``list:``. ``id`` is omitted when ``None`` or
    empty. A key already written to the same map is skipped (first one wins).
    """
    items: list[tuple[object, object]] = [("result", msg.result)]
    items.extend(_header_items(msg.header))
    if msg.flat and len(msg.entries) == 1:
        items.extend(_entry_items(msg.entries[0]))
    else:
        items.append(("list", [_first_wins(_entry_items(entry)) for entry in msg.entries]))
    if msg.id:
        items.append(("id", msg.id))
    return _document(items)


def render_event(fields: Mapping[str, object]) -> bytes:
    """An event payload: ``fields`` in their order, as one YAML document."""
    return _document(fields.items())


def parse_error_result(exc: TaskRejected) -> ResultMessage:
    """The reply to a rejected message: ``result: unknown`` (§4.7) plus ``code`` and ``id``."""
    return ResultMessage(
        result="unknown",
        entries=[
            ResultEntry(vm_name="unknown", status="error", details=exc.details, code=exc.code)
        ],
        id=exc.task_id,
    )


#: Results that answer a question and changed nothing: when their entries do not fit, the
#: first that do are sent with the header key ``more: true`` (the client asks again narrower).
QUERY_RESULTS: Final = frozenset({"status", "history"})


@dataclass(frozen=True, slots=True)
class BoundedResult:
    """A result rendered within a byte limit."""

    payload: bytes
    #: Bytes of the whole result (``len(payload)`` when nothing was left out).
    size: int
    #: Entries left out (0: the whole result).
    left_out: int


def render_bounded_result(msg: ResultMessage, limit: int) -> BoundedResult:
    """``msg`` rendered in at most ``limit`` bytes (docs/protocol.md §4.1).

    The whole result when it fits (one rendering: the common case). Otherwise the first
    entries that fit, whole and in order: a query answer (:data:`QUERY_RESULTS`) adds
    ``more: true`` to its header; any other result ends with one ``not-supported`` entry
    (``vm-name: n/a``) saying how many entries were left out. If even no entry fits, the
    header's lists and maps (``status``'s ``tasks``) go too and that entry is added to a query
    answer as well. A ``limit`` too small for that (a few hundred bytes) gets the shortest
    such result, over ``limit``: the publisher refuses it (and logs it).
    Renders two or three times what fits: in a worker thread for answers of many entries.
    """
    payload = render_result(msg)
    size = len(payload)
    if size <= limit:
        return BoundedResult(payload, size, 0)
    query = msg.result in QUERY_RESULTS
    header = dict(msg.header)
    if query:
        header["more"] = True
    shortest = _shortened(msg, header, 0, size, limit, note=not query)
    if len(shortest) > limit:
        scalars = {k: v for k, v in header.items() if not isinstance(v, Mapping | list | tuple)}
        shortest = _shortened(msg, scalars, 0, size, limit, note=True)
        return BoundedResult(shortest, size, len(msg.entries))
    # The entries add their own lines (a list of none is written ``list: []``).
    room = limit - len(shortest) + (3 if query else 0)
    kept = 0
    for entry in msg.entries:
        room -= _item_bytes(entry)
        if room < 0:
            break
        kept += 1
    while kept > 0:
        payload = _shortened(msg, header, kept, size, limit, note=not query)
        if len(payload) <= limit:
            return BoundedResult(payload, size, len(msg.entries) - kept)
        kept -= 1  # the note's counts grew by a digit
    return BoundedResult(shortest, size, len(msg.entries))


def _item_bytes(entry: ResultEntry) -> int:
    """Bytes that ``entry`` adds to a result's ``list:``, with its line breaks."""
    out: list[str] = []
    _emit_seq(out, [_first_wins(_entry_items(entry))], "  ")
    return sum(len(line.encode("utf-8")) + 1 for line in out)


def _shortened(
    msg: ResultMessage,
    header: dict[str, object],
    kept: int,
    size: int,
    limit: int,
    *,
    note: bool,
) -> bytes:
    """``msg`` with ``header``, its first ``kept`` entries and (``note``) the entry saying
    what was left out."""
    entries = msg.entries[:kept]
    if note:
        total = len(msg.entries)
        details = (
            f"the result is {size} bytes, more than this agent sends in one message "
            f"(limits.max-message-size: {limit} bytes, the broker's limit): "
            f"{total - kept} of {total} entries were left out; the agent's log has every "
            "outcome (and its history, task: history, when it keeps one)"
        )
        note_entry = ResultEntry(
            vm_name="n/a", status="error", details=details, code=NotSupported.code
        )
        entries = [*entries, note_entry]
    return render_result(
        ResultMessage(
            result=msg.result,
            entries=entries,
            id=msg.id,
            flat=msg.flat,
            header=header,
            task=msg.task,
        )
    )
