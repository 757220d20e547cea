"""``send FILE``: read a task file, check its YAML, and give it an id without moving a line.

Why not load and dump: ``send`` must not rewrite the user's file (comments, ``0x`` numbers,
yaml-cpp's octal ``010`` would all change meaning through a round trip), and every position
the agent reports (``error at line L, column C``) must be one of the user's file. So the
file is only *walked* (ruamel.yaml's event parser, which gives each node's place in the
text), and the id is written where it moves nothing that the user wrote:

* a top-level ``id:`` that the agent cannot use (``id: ""``, ``id:``) or that ``--new-id``
  replaces: its value is replaced in place;
* no ``id`` key: ``id: "<fresh>"`` becomes the last key of the top-level map (a new last
  line of a block map, so only what follows the map moves: a ``...`` line and later
  documents, which the agent never reads; ``, id: ...`` after a flow map's last value).

The agent's own parser then confirms that it will read exactly that id. A YAML syntax error
is reported here, with the file's own line and column, and nothing is sent; so is a file
that is not a map (it cannot be a task, and an inserted id would make the agent report a
syntax error the user did not write).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import (
    CollectionEndEvent,
    CollectionStartEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    Event,
    MappingStartEvent,
    ScalarEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)
from ruamel.yaml.reader import ReaderError

from asyncmigfra.console.exits import USAGE, CliError
from asyncmigfra.console.tasks import fresh_id
from asyncmigfra.errors import TaskRejected
from asyncmigfra.wire.parsing import parse_task

__all__ = ["TaskFile", "prepare", "read_task_file"]


@dataclass(frozen=True, slots=True)
class TaskFile:
    """What ``send`` publishes."""

    payload: bytes
    id: str
    #: The id was written by us (a fresh one), not the file's own.
    added: bool
    #: The top-level ``task:`` as written (``None`` when it is not a plain string).
    task: str | None


@dataclass(slots=True)
class _Top:
    """The first document's top-level node, as far as placing an id needs it."""

    kind: str = "nothing"  # "map", "sequence", "scalar" or "nothing"
    flow: bool = False
    start: int = 0
    end: int = 0
    indent: int = 0
    #: (start, end) of the first ``id`` key's value; an empty span for ``id:`` (null).
    id_value: tuple[int, int] | None = None
    #: Where the first ``id`` key ends (the value's ``:`` follows).
    id_key_end: int = 0
    #: End of the last value in the map (a flow map's new key goes after it).
    last_end: int | None = None
    task: str | None = None


def read_task_file(path: str) -> bytes:
    """The task file's bytes (``-``: stdin), read before connecting: a typo is a usage error."""
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise CliError(USAGE, f"cannot read the task file: {exc}") from None


def _where(text: str, index: int) -> tuple[int, int]:
    """1-based line and column of ``index``."""
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def _syntax(name: str, exc: YAMLError, text: str) -> CliError:
    if isinstance(exc, ReaderError):
        line, col = _where(text, int(exc.position))
        what = f"unacceptable character #x{int(exc.character):04x}: {exc.reason}"
    elif isinstance(exc, MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        what = str(exc.problem or exc.context)
        if exc.problem and exc.context and exc.context_mark is not None:
            cm = exc.context_mark
            what += f" ({exc.context} at line {cm.line + 1}, column {cm.column + 1})"
    else:  # pragma: no cover - ruamel raises marked errors for syntax
        line, col, what = 1, 1, str(exc).split("\n", 1)[0]
    return CliError(
        USAGE, f"{name}: line {line}, column {col}: not valid YAML: {what}; nothing was sent"
    )


def _walk(text: str, name: str) -> _Top:
    """The first document's top-level node; a YAML syntax error in it is a usage error."""
    top = _Top()
    depth = 0
    key_next = True  # in the top map: the next node is a key
    key: str | None = None
    id_seen = False
    node_start = 0

    def node_end(event: Event, end: int) -> None:
        nonlocal key_next, key, id_seen
        if top.kind != "map":
            return
        if key_next:
            key = event.value if isinstance(event, ScalarEvent) else None
            if key == "id" and not id_seen:
                id_seen, top.id_key_end = True, end
        else:
            if key == "id" and top.id_value is None:
                top.id_value = (node_start, end)
            if key == "task" and top.task is None and isinstance(event, ScalarEvent):
                top.task = event.value
            top.last_end = end
        key_next = not key_next

    events = YAML(typ="safe", pure=True).parse(text)
    try:
        for event in events:
            if isinstance(event, DocumentEndEvent):
                break  # the agent reads the first document only
            if isinstance(event, StreamStartEvent | DocumentStartEvent | StreamEndEvent):
                continue
            if isinstance(event, CollectionEndEvent):
                depth -= 1
                if depth == 0:
                    top.end = event.start_mark.index
                elif depth == 1:
                    node_end(event, event.end_mark.index)
                continue
            if depth == 0:
                _top_node(top, event)
            elif depth == 1:
                node_start = event.start_mark.index
            if isinstance(event, CollectionStartEvent):
                depth += 1
            elif depth == 1:
                node_end(event, event.end_mark.index)
    except YAMLError as exc:
        raise _syntax(name, exc, text) from None
    finally:
        events.close()
    return top


def _top_node(top: _Top, event: Event) -> None:
    if isinstance(event, MappingStartEvent):
        top.kind = "map"
    elif isinstance(event, SequenceStartEvent):
        top.kind = "sequence"
    else:
        top.kind = "scalar"
    top.flow = bool(getattr(event, "flow_style", False))
    top.start = event.end_mark.index if top.flow else event.start_mark.index
    top.indent = event.start_mark.column


def _with_id(text: str, top: _Top, task_id: str) -> str:
    value = json.dumps(task_id)
    if top.id_value is not None:
        start, end = top.id_value
        if start == end:  # ``id:`` with nothing: the id goes after its colon
            colon = text.index(":", top.id_key_end) + 1
            return f"{text[:colon]} {value}{text[colon:]}"
        old = text[start:end]
        # A multi-line value keeps its lines (as blank ones), so nothing after it moves.
        return f"{text[:start]}{value}{chr(10) * old.count(chr(10))}{text[end:]}"
    if top.flow:
        if top.last_end is None:
            return f"{text[: top.start]}id: {value}{text[top.start :]}"
        at = top.last_end
        return f"{text[:at]}, id: {value}{text[at:]}"
    at = top.end
    line = f"{' ' * top.indent}id: {value}\n"
    if at > 0 and text[at - 1] != "\n":  # the map ends without a line break (end of file)
        line = "\n" + line
    return f"{text[:at]}{line}{text[at:]}"


def _agent_id(payload: bytes) -> tuple[str | None, TaskRejected | None]:
    """The id the agent will read from ``payload`` (and its rejection, if it rejects it)."""
    try:
        return parse_task(payload).id, None
    except TaskRejected as exc:
        return exc.task_id, exc


def prepare(payload: bytes, *, name: str = "the task file", new_id: bool = False) -> TaskFile:
    """Check ``payload`` and give it an id when it has none the agent would read (or always,
    with ``new_id``). Raises :class:`CliError` (usage) for a file that is not UTF-8, not YAML
    (with the file's own line and column), not a map, or that cannot be given an id."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(USAGE, f"{name}: not UTF-8 (byte {exc.start}); nothing was sent") from None
    top = _walk(text, name)
    if top.kind != "map":
        found = {"nothing": "no YAML document"}.get(top.kind, f"a YAML {top.kind}")
        raise CliError(
            USAGE,
            f"{name}: not a task: a task is a YAML map with a 'task:' key (see examples/tasks/),"
            f" this file holds {found}; nothing was sent",
        )
    if not new_id:
        task_id, _ = _agent_id(payload)
        if task_id:
            return TaskFile(payload, task_id, added=False, task=top.task)
    fresh = fresh_id("send")
    changed = _with_id(text, top, fresh).encode()
    task_id, rejected = _agent_id(changed)
    if task_id != fresh:
        why = rejected.details if rejected is not None else "the id was not read back"
        raise CliError(USAGE, f"cannot give this task an id the agent would read: {why}")
    return TaskFile(changed, fresh, added=True, task=top.task)
