"""Task payload -> :class:`~asyncmigfra.model.TaskMessage`, with the original's rules and texts.

Why this module is hand-written instead of ``yaml.safe_load`` + a schema library:

* **yaml-cpp semantics, not YAML 1.1/1.2 resolution.** The original reads every scalar as
  text and converts it per field (protocol §2.1): ``id: 0012`` is the string ``"0012"``, a bool is
  one of ``y n yes no true false on off`` in three case styles (:mod:`asyncmigfra.values`),
  unsigned integers use C++ base auto-detection (``0x1F`` hex, ``017`` octal). A resolving
  loader would already have lost that information, so we compose a *node graph* (text +
  "was it a plain null" + mark) and convert each field ourselves.
* **Wire-compatible error texts.** Schedulers match on the original's ``details`` prefixes
  (protocol §4.7), e.g. ``Exception while parsing message: yaml-cpp: error at line L, column C: bad
  conversion``. We keep those prefixes and append what was wrong in parentheses.
* **Hostile input.** A task topic is writable by anyone on the broker. Size, node count
  (aliases expanded: "billion laughs") and nesting depth are bounded, every failure becomes
  :class:`~asyncmigfra.errors.TaskRejected`, and nothing here recurses on the input's nesting
  without a bound (so 100k ``[`` cannot raise ``RecursionError``).
* **Speed.** ruamel.yaml's pure-Python parser needs about 1.2 ms for a 300-byte message, more
  than half of the agent's 2 ms budget per task. A small line-based *fast path* reads the
  block-style subset that schedulers actually send (block maps/sequences, one-line flow
  sequences, one-line plain and quoted scalars, comments, ``---``/``...``) in a few tens of
  microseconds. Anything outside that subset (anchors, tags, block scalars, flow maps,
  multi-line scalars, tabs, non-ASCII, ...) and every malformed document goes to ruamel.yaml,
  which is the reference: the fast path must return either ``None`` or exactly the node graph
  the ruamel path returns (a property test compares them).

Only the first YAML document is read (like ``YAML::Load``); later documents are never
parsed. Duplicate keys are not an error: the first occurrence wins (what yaml-cpp's
``node["key"]`` returns). Unknown keys are ignored everywhere.

Deliberate differences from the original (every message it accepted with a sane meaning is
still accepted with the same meaning):

* negative unsigned integers (which C++ wraps to ``2**32 - n``) and values over a field's
  range are bad conversions; so are an unknown ``migration-type`` (the original logged it and
  migrated warm) and a malformed ``pscom-hook-procs`` (the original failed at run time);
* a bad-conversion ``details`` ends with ``(<path>: <expected>, <found>)``; the original's
  prefix is kept, so matching on it still works;
* the ``id`` is returned with every rejection whenever it could be read;
* a start item's name from ``xml`` is the first ``<name>`` matched non-greedily, stripped and
  entity-unescaped; when there is none the name is ``""`` (not the whole XML);
* recursive aliases are rejected (yaml-cpp builds a cyclic node).

This module is pure: no I/O, no logging, no global mutable state except a per-thread cached
ruamel.yaml instance.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, NoReturn, TypedDict, TypeVar, cast
from xml.sax.saxutils import unescape as _xml_unescape

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from ruamel.yaml.reader import ReaderError

from asyncmigfra.domxml import first_element_text
from asyncmigfra.errors import TaskRejected
from asyncmigfra.model import (
    CancelSpec,
    EvacuateMode,
    EvacuateSpec,
    Ivshmem,
    MigrateSpec,
    MigrationParams,
    MigrationType,
    PciAddress,
    PciId,
    PscomProcs,
    QuitSpec,
    RepinSpec,
    ResumeSpec,
    StartSpec,
    StatusSpec,
    StopSpec,
    Subtask,
    SuspendSpec,
    SwapWith,
    TaskKind,
    TaskMessage,
    TimeoutAction,
    VcpuMap,
)
from asyncmigfra.values import BOOL_EXPECTED, parse_bool

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_NODES",
    "DEFAULT_MAX_SIZE",
    "load_yaml",
    "parse_task",
]

DEFAULT_MAX_SIZE: Final = 1_048_576
DEFAULT_MAX_NODES: Final = 100_000
DEFAULT_MAX_DEPTH: Final = 64

_INVALID: Final = "invalid-message"
_PARSE_PREFIX: Final = "Exception while parsing message: "
_NOT_A_CONTAINER: Final = "Parsed message not being a Task_container."
_EMPTY_CONTAINER: Final = "Empty task container executed."

# --------------------------------------------------------------------------------------------
# Node graph: what both YAML front ends produce. Marks are 0-based (line, column).


@dataclass(slots=True)
class _Scalar:
    text: str
    #: A plain (unquoted, untagged) empty scalar, ``~``, ``null``, ``Null`` or ``NULL``.
    null: bool
    line: int
    col: int


@dataclass(slots=True)
class _Map:
    #: Scalar keys by text, first occurrence wins; non-scalar keys are dropped.
    items: dict[str, _Node]
    line: int
    col: int


@dataclass(slots=True)
class _Seq:
    items: list[_Node]
    line: int
    col: int


_Node = _Scalar | _Map | _Seq

_NULL_WORDS: Final = frozenset({"", "~", "null", "Null", "NULL"})


class _ComposeError(Exception):
    """A problem with the YAML document itself (syntax, limits); carries a 0-based mark."""

    def __init__(self, problem: str, line: int, col: int) -> None:
        super().__init__(problem)
        self.problem = problem
        self.line = line
        self.col = col


# --------------------------------------------------------------------------------------------
# Slow path: ruamel.yaml events -> node graph (iterative, bounded)

_local = threading.local()


def _ruamel(name: str = "yaml") -> YAML:
    """A per-thread ruamel instance (building one costs ~0.3 ms; instances are not shareable)."""
    yaml: YAML | None = getattr(_local, name, None)
    if yaml is None:
        yaml = YAML(typ="safe", pure=True)
        setattr(_local, name, yaml)
    return yaml


@dataclass(slots=True)
class _Frame:
    node: _Map | _Seq
    anchor: str | None
    size: int = 1
    height: int = 0
    key: _Node | None = None
    has_key: bool = False


@dataclass(slots=True)
class _Composer:
    """Builds the node graph from parser events without recursion.

    Aliases share the anchored node (no copy), but count with the anchored subtree's full
    size and height, so the *expanded* document is what the limits bound.
    """

    max_nodes: int
    max_depth: int
    stack: list[_Frame] = field(default_factory=list)
    anchors: dict[str, tuple[_Node, int, int]] = field(default_factory=dict)
    open_anchors: set[str] = field(default_factory=set)
    root: _Node | None = None
    done: bool = False
    total: int = 0

    def _count(self, size: int, line: int, col: int) -> None:
        self.total += size
        if self.total > self.max_nodes:
            raise _ComposeError(
                f"the document has more than {self.max_nodes} nodes (aliases expanded)",
                line,
                col,
            )

    def _attach(self, node: _Node, size: int, height: int, anchor: str | None) -> None:
        if anchor is not None:
            self.anchors[anchor] = (node, size, height)
        stack = self.stack
        if not stack:
            self.root = node
            return
        frame = stack[-1]
        frame.size += size
        frame.height = max(frame.height, height)
        parent = frame.node
        if isinstance(parent, _Seq):
            parent.items.append(node)
        elif not frame.has_key:
            frame.key = node
            frame.has_key = True
        else:
            key = frame.key
            frame.key = None
            frame.has_key = False
            if isinstance(key, _Scalar) and key.text not in parent.items:
                parent.items[key.text] = node

    def feed(self, event: object) -> None:
        cls = type(event)
        if cls is ScalarEvent:
            ev = cast("ScalarEvent", event)
            mark = ev.start_mark
            self._count(1, mark.line, mark.column)
            value: str = ev.value
            null = ev.style is None and ev.tag is None and value in _NULL_WORDS
            self._attach(_Scalar(value, null, mark.line, mark.column), 1, 0, ev.anchor)
        elif cls is MappingStartEvent or cls is SequenceStartEvent:
            ev2 = cast("MappingStartEvent | SequenceStartEvent", event)
            mark = ev2.start_mark
            if len(self.stack) >= self.max_depth:
                raise _ComposeError(
                    f"the document nests deeper than {self.max_depth} levels",
                    mark.line,
                    mark.column,
                )
            self._count(1, mark.line, mark.column)
            node: _Map | _Seq = (
                _Map({}, mark.line, mark.column)
                if cls is MappingStartEvent
                else _Seq([], mark.line, mark.column)
            )
            if ev2.anchor is not None:
                # The anchor names this node from its start: an alias inside it is recursive.
                self.anchors.pop(ev2.anchor, None)
                self.open_anchors.add(ev2.anchor)
            self.stack.append(_Frame(node, ev2.anchor))
        elif cls is MappingEndEvent or cls is SequenceEndEvent:
            frame = self.stack.pop()
            if frame.anchor is not None:
                self.open_anchors.discard(frame.anchor)
            self._attach(frame.node, frame.size, frame.height + 1, frame.anchor)
        elif cls is AliasEvent:
            ev3 = cast("AliasEvent", event)
            mark = ev3.start_mark
            name: str = ev3.anchor
            target = self.anchors.get(name)
            if target is None:
                problem = (
                    "recursive alias"
                    if name in self.open_anchors
                    else "the referenced anchor is not defined"
                )
                raise _ComposeError(f"{problem} (*{name})", mark.line, mark.column)
            node2, size, height = target
            if len(self.stack) + height > self.max_depth:
                raise _ComposeError(
                    f"the document nests deeper than {self.max_depth} levels (aliases expanded)",
                    mark.line,
                    mark.column,
                )
            self._count(size, mark.line, mark.column)
            self._attach(node2, size, height, None)
        elif cls is DocumentEndEvent or cls is StreamEndEvent:
            self.done = True

    def partial_id(self) -> str | None:
        """The root map's ``id`` when it was read before an error (for the rejection)."""
        root = self.stack[0].node if self.stack else self.root
        if isinstance(root, _Map):
            node = root.items.get("id")
            if isinstance(node, _Scalar) and not node.null and valid_task_id(node.text):
                return node.text
        return None


def _mark_of_position(text: str, position: int) -> tuple[int, int]:
    line_start = text.rfind("\n", 0, position) + 1
    return text.count("\n", 0, position), position - line_start


_LINE_BREAKS: Final = "\n\r\x85\u2028\u2029"
#: ``---`` / ``...`` at the start of a line, followed by white space or the end.
_DOC_MARKER: Final = re.compile(
    rf"(?:^|(?<=[{_LINE_BREAKS}]))(---|\.\.\.)(?=[ \t{_LINE_BREAKS}]|\Z)"
)
_LINE_END: Final = re.compile(rf"[{_LINE_BREAKS}]|\Z")


def _has_content(segment: str) -> bool:
    """Whether a stretch before a marker holds document content (not blanks/comments/%)."""
    for line in re.split(rf"[{_LINE_BREAKS}]", segment):
        body = line.lstrip(" \t")
        if body and body[0] not in "#%":
            return True
    return False


def _first_document(text: str) -> str:
    """The text up to the end of the first document, so later documents are never scanned.

    A document marker at the start of a line always ends the document (inside a scalar it
    is an error), so cutting there cannot change how the first document reads. ruamel.yaml
    would otherwise peek at the token after ``...`` and fail on garbage in a later document.
    """
    started = False
    pos = 0
    for match in _DOC_MARKER.finditer(text):
        if match.group(1) == "...":
            end = _LINE_END.search(text, match.end())
            return text[: end.start() if end is not None else len(text)]
        if started or _has_content(text[pos : match.start()]):
            return text[: match.start()]
        started = True
        pos = match.end()
    return text


def _compose_slow(text: str, max_nodes: int, max_depth: int) -> _Node | None:
    """The reference front end: ruamel.yaml's event parser plus :class:`_Composer`.

    Returns the first document's root (``None`` for a stream without documents). Raises
    :class:`TaskRejected` for every problem.
    """
    composer = _Composer(max_nodes, max_depth)
    yaml = _ruamel()
    text = _first_document(text)
    events = yaml.parse(text)
    try:
        for event in events:
            composer.feed(event)
            if composer.done:
                break
    except _ComposeError as exc:
        raise _syntax_error(exc.problem, exc.line, exc.col, composer.partial_id()) from exc
    except MarkedYAMLError as exc:
        mark = exc.problem_mark if exc.problem_mark is not None else exc.context_mark
        problem = exc.problem if exc.problem is not None else exc.context
        line, col = (mark.line, mark.column) if mark is not None else (0, 0)
        raise _syntax_error(str(problem), line, col, composer.partial_id()) from exc
    except ReaderError as exc:
        line, col = _mark_of_position(text, int(exc.position))
        problem = f"unacceptable character #x{int(exc.character):04x}: {exc.reason}"
        raise _syntax_error(problem, line, col, None) from exc
    except YAMLError as exc:
        raise _syntax_error(str(exc).split("\n", 1)[0], 0, 0, composer.partial_id()) from exc
    except RecursionError as exc:
        raise _syntax_error("the document nests too deeply", 0, 0, composer.partial_id()) from exc
    except Exception as exc:  # parse_task must only ever raise TaskRejected (a ruamel bug)
        raise _syntax_error(f"{type(exc).__name__}: {exc}", 0, 0, composer.partial_id()) from exc
    finally:
        events.close()
        # State ruamel keeps on the instance between calls: YAML.parse() appends one DocInfo
        # per call (unbounded growth), and a "%YAML 1.1" directive sets ``version`` for good.
        yaml.doc_infos.clear()
        yaml.version = None
    return composer.root


def _syntax_error(problem: str, line: int, col: int, task_id: str | None) -> TaskRejected:
    return TaskRejected(
        _INVALID,
        f"{_PARSE_PREFIX}yaml-cpp: error at line {line + 1}, column {col + 1}: {problem}",
        task_id=task_id,
    )


# --------------------------------------------------------------------------------------------
# Fast path: the block-style subset schedulers send, line by line


class _Fallback(Exception):
    """Not in the fast path's subset: let ruamel.yaml decide."""


#: Only printable ASCII and ``\n``: no tabs, CR, NEL, BOM, control or non-ASCII characters.
_NOT_FAST_CHARS: Final = re.compile(r"[^\n\x20-\x7e]")
#: ``key:`` followed by a space or the end of the line; plain, conservative key characters.
_KEY: Final = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_.-]*):(?: |$)")
#: A plain scalar inside a one-line flow sequence.
_FLOW_PLAIN: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
#: First characters a plain scalar in the subset may not start with (after ``key: ``/``- ``).
_NOT_PLAIN_START: Final = frozenset("[]{}#&*!|>'\"%@`,?:-")
_QUOTES: Final = frozenset("'\"")


class _Line:
    __slots__ = ("dash", "indent", "lineno", "text")

    def __init__(self, lineno: int, indent: int, text: str, dash: bool) -> None:
        self.lineno = lineno
        self.indent = indent
        self.text = text
        #: A sequence entry marker; the item follows as the next logical line.
        self.dash = dash


def _fast_lines(text: str) -> list[_Line]:
    """Logical content lines of the first document; ``- x`` becomes a dash line + ``x``."""
    out: list[_Line] = []
    started = False
    for lineno, raw in enumerate(text.split("\n")):
        body = raw.lstrip(" ")
        if not body or body[0] == "#":
            continue
        indent = len(raw) - len(body)
        if indent == 0 and body.startswith(("---", "...")) and body[3:4] in ("", " "):
            # A document marker: "---" after content (whatever follows it) or "..." ends the
            # first document; a leading bare "---" starts it.
            bare = not body[3:].strip(" ")
            if started and body[0] == "-":
                break
            if not bare:
                raise _Fallback
            if body[0] == ".":
                break
            started = True
            continue
        if indent == 0 and body[0] == "%":
            raise _Fallback
        started = True
        body = body.rstrip(" ")
        if body[0] == "-" and (len(body) == 1 or body[1] == " "):
            out.append(_Line(lineno, indent, "", True))
            rest = body[1:]
            item = rest.lstrip(" ")
            if item and item[0] != "#":
                out.append(_Line(lineno, indent + 1 + len(rest) - len(item), item, False))
            continue
        out.append(_Line(lineno, indent, body, False))
    return out


def _after_value_ok(after: str) -> bool:
    """What may follow a quoted scalar or flow sequence on its line: spaces, a comment."""
    if not after:
        return True
    stripped = after.lstrip(" ")
    return not stripped or (stripped[0] == "#" and len(stripped) < len(after))


@dataclass(slots=True)
class _FastParser:
    lines: list[_Line]
    max_nodes: int
    max_depth: int
    pos: int = 0
    total: int = 0

    def _count(self) -> None:
        self.total += 1
        if self.total > self.max_nodes:
            # The fast path has no aliases: its count is exact, so the verdict is final
            # (handing a 50,000-item list to ruamel only to hit the same limit costs seconds).
            line = self.lines[min(self.pos, len(self.lines) - 1)].lineno
            raise _ComposeError(f"the document has more than {self.max_nodes} nodes", line, 0)

    def parse(self) -> _Node:
        if not self.lines:
            raise _Fallback
        first = self.lines[0]
        node = self._block(first.indent, 1)
        if self.pos != len(self.lines):
            raise _Fallback
        return node

    def _block(self, indent: int, depth: int) -> _Map | _Seq:
        """The node starting at the current line, whose indentation is ``indent``."""
        if depth > self.max_depth:
            raise _Fallback
        line = self.lines[self.pos]
        if line.dash:
            return self._seq(indent, depth)
        if _KEY.match(line.text):
            return self._map(indent, depth)
        raise _Fallback

    def _seq(self, indent: int, depth: int) -> _Seq:
        lines = self.lines
        first = lines[self.pos]
        self._count()
        seq = _Seq([], first.lineno, first.indent)
        n = len(lines)
        while self.pos < n:
            line = lines[self.pos]
            if line.indent != indent or not line.dash:
                if line.indent > indent:
                    raise _Fallback
                break
            self.pos += 1
            if self.pos >= n or lines[self.pos].indent <= indent:
                raise _Fallback  # an empty item
            item_line = lines[self.pos]
            if item_line.dash:
                raise _Fallback  # "- - x" or "-\n  - x": nested sequences
            if _KEY.match(item_line.text):
                seq.items.append(self._map(item_line.indent, depth + 1))
            elif item_line.lineno == line.lineno:
                self.pos += 1
                seq.items.append(
                    self._inline(item_line.text, item_line.lineno, item_line.indent, depth + 1)
                )
                self._expect_dedent(indent)
            else:
                raise _Fallback  # a scalar on the line after the dash
        return seq

    def _map(self, indent: int, depth: int) -> _Map:
        lines = self.lines
        first = lines[self.pos]
        self._count()
        node = _Map({}, first.lineno, first.indent)
        items = node.items
        n = len(lines)
        while self.pos < n:
            line = lines[self.pos]
            if line.indent != indent:
                if line.indent > indent:
                    raise _Fallback
                break
            if line.dash:
                raise _Fallback
            text = line.text
            match = _KEY.match(text)
            if match is None:
                raise _Fallback
            self._count()
            key = match.group(1)
            rest = text[match.end() :].lstrip(" ")
            self.pos += 1
            value: _Node
            if not rest or rest[0] == "#":
                value = self._value_below(indent, line.lineno, indent + len(key) + 1, depth)
            else:
                col = indent + len(text) - len(rest)
                value = self._inline(rest, line.lineno, col, depth + 1)
                self._expect_dedent(indent)
            if key not in items:
                items[key] = value
        return node

    def _value_below(self, indent: int, lineno: int, col: int, depth: int) -> _Node:
        """The value of ``key:`` with nothing after it: a block below, or null."""
        if self.pos < len(self.lines):
            nxt = self.lines[self.pos]
            if nxt.indent > indent:
                return self._block(nxt.indent, depth + 1)
            if nxt.indent == indent and nxt.dash:
                return self._seq(indent, depth + 1)
        self._count()
        return _Scalar("", True, lineno, col)

    def _expect_dedent(self, indent: int) -> None:
        """After a one-line value the next line must not be indented deeper (a continuation)."""
        if self.pos < len(self.lines) and self.lines[self.pos].indent > indent:
            raise _Fallback

    def _inline(self, rest: str, lineno: int, col: int, depth: int) -> _Node:
        """A value that starts (and ends) on this line."""
        first = rest[0]
        if first == "[":
            seq, end = self._flow_seq(rest, 0, lineno, col, depth)
            if not _after_value_ok(rest[end:]):
                raise _Fallback
            return seq
        if first in _QUOTES:
            scalar, end = _quoted(rest, 0, lineno, col)
            if not _after_value_ok(rest[end:]):
                raise _Fallback
            self._count()
            return scalar
        if first in _NOT_PLAIN_START:
            raise _Fallback
        cut = rest.find(" #")
        value = (rest if cut < 0 else rest[:cut]).rstrip(" ")
        if ": " in value or value.endswith(":"):
            raise _Fallback
        self._count()
        return _Scalar(value, value in _NULL_WORDS, lineno, col)

    def _flow_seq(
        self, text: str, start: int, lineno: int, col: int, depth: int
    ) -> tuple[_Seq, int]:
        """``[a, "b", [c]]`` entirely on one line; returns the node and the end offset."""
        if depth > self.max_depth:
            raise _Fallback
        self._count()
        seq = _Seq([], lineno, col + start)
        items = seq.items
        i = start + 1
        n = len(text)
        while True:
            while i < n and text[i] == " ":
                i += 1
            if i >= n:
                raise _Fallback  # continues on the next line
            ch = text[i]
            if ch == "]":
                if items:
                    raise _Fallback  # a trailing comma
                return seq, i + 1
            if ch == "[":
                inner, i = self._flow_seq(text, i, lineno, col, depth + 1)
                items.append(inner)
            elif ch in _QUOTES:
                scalar, i = _quoted(text, i, lineno, col)
                self._count()
                items.append(scalar)
            else:
                match = _FLOW_PLAIN.match(text, i)
                if match is None:
                    raise _Fallback
                value = match.group()
                self._count()
                items.append(_Scalar(value, value in _NULL_WORDS, lineno, col + i))
                i = match.end()
            while i < n and text[i] == " ":
                i += 1
            if i >= n:
                raise _Fallback
            ch = text[i]
            if ch == "]":
                return seq, i + 1
            if ch != ",":
                raise _Fallback
            i += 1


def _quoted(text: str, start: int, lineno: int, col: int) -> tuple[_Scalar, int]:
    """A one-line quoted scalar without escapes at ``text[start]``; returns it and its end."""
    quote = text[start]
    if quote == '"':
        end = text.find('"', start + 1)
        if end < 0 or "\\" in text[start + 1 : end]:
            raise _Fallback
        return _Scalar(text[start + 1 : end], False, lineno, col + start), end + 1
    i = start + 1
    while True:
        end = text.find("'", i)
        if end < 0:
            raise _Fallback
        if text[end + 1 : end + 2] == "'":
            i = end + 2
            continue
        value = text[start + 1 : end].replace("''", "'")
        return _Scalar(value, False, lineno, col + start), end + 1


def _compose_fast(text: str, max_nodes: int, max_depth: int) -> _Node | None:
    """The fast front end: the node graph, or ``None`` when ruamel.yaml must decide."""
    if _NOT_FAST_CHARS.search(text) is not None:
        return None
    try:
        return _FastParser(_fast_lines(text), max_nodes, max_depth).parse()
    except _Fallback:
        return None
    except _ComposeError as exc:
        raise _syntax_error(exc.problem, exc.line, exc.col, _peek_id(text)) from exc


#: A top-level ``id:`` with a plain or simply quoted one-line value.
_TOP_ID: Final = re.compile(
    r"^id:[ \t]+(?:'([^'\n]*)'|\"([^\"\\\n]*)\"|([^\s'\"#&*!|>%@`{\[][^\n#]*?))[ \t]*(?:#.*)?$",
    re.MULTILINE,
)


def _peek_id(text: str) -> str | None:
    """The task id of a message refused before it was composed, when it is easy to see (so
    the rejection can still carry it). Only the first document, only a plain or simply quoted
    value; anything less obvious gives ``None``."""
    match = _TOP_ID.search(_first_document(text))
    if match is None:
        return None
    return next(g for g in match.groups() if g is not None)


def _flow_too_deep(text: str, max_depth: int) -> tuple[int, int] | None:
    """A linear pre-scan for flow nesting (``[[[[...``) deeper than ``max_depth``.

    ruamel.yaml's parser spends about half a second on 1,000 nested ``[`` before our composer
    sees the first event; this rejects such a message in microseconds. It skips quoted
    strings and comments; a bracket inside a plain scalar may count, which only matters for a
    plain scalar with more than ``max_depth`` unbalanced brackets. Returns the 0-based mark.
    """
    if text.count("[") + text.count("{") <= max_depth:
        return None
    depth = line = col = 0
    quote = ""
    prev = "\n"
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 2
                col += 2
                continue
            if ch == quote:
                quote = ""
        elif ch in "\"'" and prev in " \t\n[{,:-":
            quote = ch
        elif ch == "#" and prev in " \t\n":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return line, col
        elif ch in "]}" and depth:
            depth -= 1
        if ch == "\n":
            line += 1
            col = 0
        else:
            col += 1
        prev = ch
        i += 1
    return None


def _compose(text: str, max_nodes: int, max_depth: int) -> _Node | None:
    node = _compose_fast(text, max_nodes, max_depth)
    if node is not None:
        return node
    deep = _flow_too_deep(text, max_depth)
    if deep is not None:
        problem = f"the document nests deeper than {max_depth} levels"
        raise _syntax_error(problem, *deep, _peek_id(text))
    return _compose_slow(text, max_nodes, max_depth)


# --------------------------------------------------------------------------------------------
# Field conversion (yaml-cpp scalar rules)

#: C++ ``operator>>`` with base auto-detection, no sign (negative values are rejected) and
#: trailing whitespace allowed, as yaml-cpp's ``(stream >> std::ws).eof()`` check does.
_UINT: Final = re.compile(r"\+?(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))[ \t\n\v\f\r]*")
_DECIMAL_COUNT: Final = re.compile(r"\+?[0-9]+")
_SECONDS: Final = re.compile(r"\+?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_PCI_ADDR: Final = re.compile(
    r"(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])"
)
_XML_ENTITIES: Final = {"&quot;": '"', "&apos;": "'"}

UINT32_MAX: Final = 0xFFFF_FFFF
UINT64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF

_T = TypeVar("_T")


def _describe(node: _Node | None) -> str:
    if node is None:
        return "the key is missing"
    if isinstance(node, _Map):
        return "found a map"
    if isinstance(node, _Seq):
        return "found a sequence"
    if node.null:
        return "found null"
    text = node.text if len(node.text) <= 40 else node.text[:40] + "..."
    # What is echoed shows control and bidirectional characters as escapes, never raw.
    text = _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return f"found '{text}'"


@dataclass(slots=True)
class _Ctx:
    """Where a bad conversion is reported: the current list item, else the top-level map."""

    task_id: str | None
    line: int
    col: int

    def bad(self, path: str, expected: str, node: _Node | None) -> NoReturn:
        raise TaskRejected(
            _INVALID,
            f"{_PARSE_PREFIX}yaml-cpp: error at line {self.line + 1}, column {self.col + 1}: "
            f"bad conversion ({path}: {expected}, {_describe(node)})",
            task_id=self.task_id,
        )


def _scalar_text(ctx: _Ctx, node: _Node, path: str, expected: str) -> str:
    if not isinstance(node, _Scalar) or node.null:
        ctx.bad(path, expected, node)
    return node.text


def _convert_uint(
    ctx: _Ctx, node: _Node, path: str, maximum: int, *, minimum: int = 0, expected: str = ""
) -> int:
    """Unsigned integer with C++ base auto-detection, range-checked.

    Improvement over the original: a negative value (which C++ stream extraction wraps to
    ``2**32 - n``) and a value over the field's range are rejected as bad conversions instead
    of silently becoming a huge number.
    """
    if not expected:
        expected = (
            f"expected an unsigned integer up to {maximum}"
            if minimum == 0
            else f"expected an integer from {minimum} to {maximum}"
        )
    text = _scalar_text(ctx, node, path, expected)
    match = _UINT.fullmatch(text)
    if match is None:
        ctx.bad(path, expected, node)
    hex_digits, octal, decimal = match.groups()
    if hex_digits is not None:
        value = int(hex_digits, 16)
    elif octal is not None:
        value = int(octal, 8)
    else:
        value = int(decimal)
    if not minimum <= value <= maximum:
        ctx.bad(path, expected, node)
    return value


def _convert_bool(ctx: _Ctx, node: _Node, path: str) -> bool:
    expected = f"expected {BOOL_EXPECTED}"
    value = parse_bool(_scalar_text(ctx, node, path, expected))
    if value is None:
        ctx.bad(path, expected, node)
    return value


def _convert_str(ctx: _Ctx, node: _Node, path: str) -> str:
    return _scalar_text(ctx, node, path, "expected a string")


#: Characters no name or id from the wire may hold: C0 and C1 controls (ESC among them), DEL,
#: line and paragraph separators, and the bidirectional controls that make a terminal show
#: text in another order than it is (U+202E "RIGHT-TO-LEFT OVERRIDE" and its kin).
_UNSAFE_CHARS: Final = "\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNSAFE: Final = re.compile(f"[{_UNSAFE_CHARS}]")
#: VM names: libvirt accepts almost anything, but a name also ends up in topics, log lines,
#: file names and URIs. Refused: control and bidirectional characters, ``/``, a leading
#: ``-`` or ``.``, and more than 200 characters.
_VM_NAME: Final = re.compile(f"[^{_UNSAFE_CHARS}/.\\-][^{_UNSAFE_CHARS}/]{{0,199}}")
#: Longest task ``id`` (characters).
MAX_TASK_ID: Final = 256
#: Host names (and IPv4/IPv6 literals) as they go into ``<driver>+<transport>://<host>/``:
#: nothing that could add a path, a query (``?command=...``) or credentials to the URI.
_HOST: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\]")
_DRIVER: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
#: libvirt transports that reach a remote daemon. ``ext`` (runs a program) and ``unix`` are
#: refused: a task must never make libvirt execute something on the host.
TRANSPORTS: Final = ("ssh", "libssh", "libssh2", "tcp", "tls")


_TASK_ID_EXPECTED: Final = (
    f"expected an id of at most {MAX_TASK_ID} characters without control or bidirectional "
    "characters"
)


def valid_task_id(task_id: str) -> bool:
    """A task id can be echoed, remembered and shown: bounded, no control characters."""
    return len(task_id) <= MAX_TASK_ID and _UNSAFE.search(task_id) is None


def valid_vm_name(name: str) -> bool:
    return _VM_NAME.fullmatch(name) is not None


_VM_NAME_EXPECTED: Final = (
    "expected a VM name (1-200 characters, no control or bidirectional characters, no '/')"
)


def _convert_vm_name(ctx: _Ctx, node: _Node, path: str) -> str:
    text = _scalar_text(ctx, node, path, "expected a string")
    if not valid_vm_name(text):
        ctx.bad(path, _VM_NAME_EXPECTED, node)
    return text


def _convert_host(ctx: _Ctx, node: _Node, path: str) -> str:
    text = _scalar_text(ctx, node, path, "expected a string")
    if _HOST.fullmatch(text) is None:
        ctx.bad(path, "expected a host name or IP address", node)
    return text


def _convert_driver(ctx: _Ctx, node: _Node, path: str) -> str:
    text = _scalar_text(ctx, node, path, "expected a string")
    if _DRIVER.fullmatch(text) is None:
        ctx.bad(path, "expected a driver name such as qemu or lxctools", node)
    return text


def _convert_transport(ctx: _Ctx, node: _Node, path: str) -> str:
    return _convert_choice(ctx, node, path, TRANSPORTS)


def _convert_choice(ctx: _Ctx, node: _Node, path: str, choices: tuple[str, ...]) -> str:
    expected = "expected one of " + ", ".join(choices)
    text = _scalar_text(ctx, node, path, expected)
    if text not in choices:
        ctx.bad(path, expected, node)
    return text


def _convert_vcpu_map(ctx: _Ctx, node: _Node, path: str) -> VcpuMap:
    expected = "expected a sequence of sequences of CPU numbers"
    if not isinstance(node, _Seq):
        ctx.bad(path, expected, node)
    rows: list[tuple[int, ...]] = []
    for i, row in enumerate(node.items):
        if not isinstance(row, _Seq):
            ctx.bad(f"{path}[{i}]", expected, row)
        rows.append(
            tuple(
                _convert_uint(ctx, cpu, f"{path}[{i}][{j}]", UINT32_MAX)
                for j, cpu in enumerate(row.items)
            )
        )
    return tuple(rows)


def _convert_pscom(ctx: _Ctx, node: _Node, path: str) -> PscomProcs:
    expected = "expected a process count or 'auto'"
    text = _scalar_text(ctx, node, path, expected)
    if text == "auto":
        return "auto"
    if _DECIMAL_COUNT.fullmatch(text) is None or int(text) > UINT32_MAX:
        ctx.bad(path, expected, node)
    return int(text)


def _convert_seconds(ctx: _Ctx, node: _Node, path: str) -> float:
    expected = "expected a positive number of seconds"
    text = _scalar_text(ctx, node, path, expected)
    if _SECONDS.fullmatch(text) is None:
        ctx.bad(path, expected, node)
    value = float(text)
    if not 0.0 < value < float("inf"):
        ctx.bad(path, expected, node)
    return value


def _convert_pci_addr(ctx: _Ctx, node: _Node, path: str) -> PciAddress:
    expected = "expected a PCI address [DDDD:]BB:SS.F"
    text = _scalar_text(ctx, node, path, expected)
    match = _PCI_ADDR.fullmatch(text)
    if match is None:
        ctx.bad(path, expected, node)
    domain, bus, slot, function = match.groups()
    slot_value = int(slot, 16)
    if slot_value > 0x1F:
        ctx.bad(path, expected, node)
    return PciAddress(int(domain or "0", 16), int(bus, 16), slot_value, int(function, 16))


@dataclass(slots=True)
class _Fields:
    """Typed access to one YAML map; ``prefix`` names it in error paths."""

    ctx: _Ctx
    node: _Map
    prefix: str

    def _opt(self, key: str, convert: Callable[[_Ctx, _Node, str], _T]) -> _T | None:
        node = self.node.items.get(key)
        if node is None:
            return None
        return convert(self.ctx, node, self.prefix + key)

    def required(self, key: str, convert: Callable[[_Ctx, _Node, str], _T], expected: str) -> _T:
        node = self.node.items.get(key)
        if node is None:
            self.ctx.bad(self.prefix + key, expected, None)
        return convert(self.ctx, node, self.prefix + key)

    def string(self, key: str) -> str | None:
        return self._opt(key, _convert_str)

    def req_string(self, key: str) -> str:
        return self.required(key, _convert_str, "expected a string")

    def vm_name(self, key: str = "vm-name") -> str | None:
        return self._opt(key, _convert_vm_name)

    def req_vm_name(self, key: str = "vm-name") -> str:
        return self.required(key, _convert_vm_name, "expected a string")

    def host(self, key: str) -> str | None:
        return self._opt(key, _convert_host)

    def req_host(self, key: str) -> str:
        return self.required(key, _convert_host, "expected a string")

    def boolean(self, key: str, default: bool) -> bool:
        value = self._opt(key, _convert_bool)
        return default if value is None else value

    def opt_boolean(self, key: str) -> bool | None:
        return self._opt(key, _convert_bool)

    def uint(self, key: str, maximum: int = UINT32_MAX, minimum: int = 0) -> int | None:
        node = self.node.items.get(key)
        if node is None:
            return None
        return _convert_uint(self.ctx, node, self.prefix + key, maximum, minimum=minimum)

    def choice(self, key: str, choices: tuple[str, ...]) -> str | None:
        node = self.node.items.get(key)
        if node is None:
            return None
        return _convert_choice(self.ctx, node, self.prefix + key, choices)

    def vcpu_map(self, key: str) -> VcpuMap | None:
        return self._opt(key, _convert_vcpu_map)

    def req_vcpu_map(self, key: str) -> VcpuMap:
        return self.required(
            key, _convert_vcpu_map, "expected a sequence of sequences of CPU numbers"
        )

    def pscom(self, key: str) -> PscomProcs | None:
        return self._opt(key, _convert_pscom)

    def seconds(self, key: str) -> float | None:
        return self._opt(key, _convert_seconds)

    def sub_map(self, key: str) -> _Fields | None:
        node = self.node.items.get(key)
        if node is None:
            return None
        if not isinstance(node, _Map):
            self.ctx.bad(self.prefix + key, "expected a map", node)
        return _Fields(self.ctx, node, f"{self.prefix}{key}.")

    def sequence(self, key: str, *, required: bool = False) -> list[_Node] | None:
        node = self.node.items.get(key)
        if node is None:
            if required:
                self.ctx.bad(self.prefix + key, "expected a sequence", None)
            return None
        if not isinstance(node, _Seq):
            self.ctx.bad(self.prefix + key, "expected a sequence", node)
        return node.items

    def item_maps(self, key: str) -> list[_Fields]:
        """An optional sequence of maps (``pci-ids``, ``devs``)."""
        out: list[_Fields] = []
        for i, item in enumerate(self.sequence(key) or ()):
            path = f"{self.prefix}{key}[{i}]"
            if not isinstance(item, _Map):
                self.ctx.bad(path, "expected a map", item)
            out.append(_Fields(self.ctx, item, path + "."))
        return out

    def subtask(self) -> _SubtaskKeys:
        """The keys of every subtask (docs/protocol.md §3.1)."""
        return {
            "time_measurement": self.boolean("time-measurement", False),
            "concurrent_execution": self.boolean("concurrent-execution", True),
            "driver": self._opt("driver", _convert_driver),
        }


class _SubtaskKeys(TypedDict):
    time_measurement: bool
    concurrent_execution: bool
    driver: str | None


# --------------------------------------------------------------------------------------------
# Tasks

_MIGRATION_TYPES: Final = ("live", "warm", "offline", "post-copy")
_TIMEOUT_ACTIONS: Final = ("abort", "post-copy", "suspend")
_EVACUATE_MODES: Final = ("auto", "compact", "scatter")


def _resolve_start_name(vm_name: str | None, xml: str | None) -> tuple[str, str | None]:
    """Protocol §3.2, §9.3: the first ``<name>`` matched non-greedily, stripped and unescaped."""
    if vm_name is not None:
        return vm_name, None
    if xml is None:
        return "", "vm-name is not valid."
    text = first_element_text(xml, "name")
    name = _xml_unescape(text, _XML_ENTITIES).strip() if text is not None else ""
    if not name:
        return "", "Could not find vm-name in xml."
    if not valid_vm_name(name):
        return "", "The <name> in the xml is not a valid VM name."
    return name, None


def _start(f: _Fields) -> StartSpec:
    vm_name = f.vm_name()
    xml = f.string("xml")
    name, name_error = _resolve_start_name(vm_name, xml)
    pci_ids = tuple(
        PciId(
            item.required("vendor", _convert_pci_id, _PCI_ID_EXPECTED),
            item.required("device", _convert_pci_id, _PCI_ID_EXPECTED),
        )
        for item in f.item_maps("pci-ids")
    )
    devs = tuple(
        item.required("pci-addr", _convert_pci_addr, "expected a PCI address [DDDD:]BB:SS.F")
        for item in f.item_maps("devs")
    )
    ivshmem: Ivshmem | None = None
    shm = f.sub_map("ivshmem")
    if shm is not None:
        ivshmem = Ivshmem(shm.req_string("id"), shm.req_string("size"), shm.string("path"))
    return StartSpec(
        vm_name=name,
        name_error=name_error,
        xml=xml,
        vcpus=f.uint("vcpus"),
        memory=f.uint("memory", UINT64_MAX),
        transient=f.boolean("transient", False),
        pci_ids=pci_ids,
        devs=devs,
        ivshmem=ivshmem,
        probe_with_ssh=f.boolean("probe-with-ssh", True),
        probe_hostname=f.host("probe-hostname"),
        vcpu_map=f.vcpu_map("vcpu-map"),
        memnode_map=f.vcpu_map("memnode-map"),
        **f.subtask(),
    )


_PCI_ID_EXPECTED: Final = "expected an integer from 0 to 0xffff"


def _convert_pci_id(ctx: _Ctx, node: _Node, path: str) -> int:
    return _convert_uint(ctx, node, path, 0xFFFF, expected=_PCI_ID_EXPECTED)


def _stop(f: _Fields) -> StopSpec:
    return StopSpec(
        vm_name=f.vm_name(),
        regex=f.string("regex"),
        force=f.boolean("force", False),
        undefine=f.boolean("undefine", False),
        force_after_timeout=f.boolean("force-after-timeout", False),
        **f.subtask(),
    )


def _suspend(f: _Fields) -> SuspendSpec:
    return SuspendSpec(vm_name=f.req_vm_name(), **f.subtask())


def _resume(f: _Fields) -> ResumeSpec:
    return ResumeSpec(vm_name=f.req_vm_name(), **f.subtask())


def _migration_params(f: _Fields | None, *, migrate: bool) -> MigrationParams:
    """``parameter:`` of migrate (``migrate=True``) or evacuate (no swap-with, no vcpu-map)."""
    if f is None:
        return MigrationParams()
    # None: the agent's configured default (migration.migration-type, itself "warm").
    migration_type = cast("MigrationType | None", f.choice("migration-type", _MIGRATION_TYPES))
    retry_old = f.uint("retry_counter")
    retry_new = f.uint("retry-counter")
    swap_with: SwapWith | None = None
    vcpu_map: VcpuMap | None = None
    if migrate:
        vcpu_map = f.vcpu_map("vcpu-map")
        swap = f.sub_map("swap-with")
        if swap is not None:
            swap_with = SwapWith(
                vm_name=swap.req_vm_name(),
                pscom_hook_procs=swap.pscom("pscom-hook-procs"),
                vcpu_map=swap.vcpu_map("vcpu-map"),
            )
    return MigrationParams(
        migration_type=migration_type,
        rdma_migration=f.boolean("rdma-migration", False),
        pscom_hook_procs=f.pscom("pscom-hook-procs"),
        transport=f._opt("transport", _convert_transport),
        vcpu_map=vcpu_map,
        retry_counter=retry_new if retry_new is not None else retry_old,
        swap_with=swap_with,
        max_downtime=f.uint("max-downtime", UINT64_MAX),
        bandwidth=f.uint("bandwidth", UINT64_MAX),
        auto_converge=f.opt_boolean("auto-converge"),
        compressed=f.opt_boolean("compressed"),
        parallel_connections=f.uint("parallel-connections", UINT32_MAX, 1),
        completion_timeout=f.seconds("completion-timeout"),
        timeout_action=cast("TimeoutAction | None", f.choice("timeout-action", _TIMEOUT_ACTIONS)),
        persist=f.opt_boolean("persist"),
        tls=f.opt_boolean("tls"),
    )


def _migrate(f: _Fields) -> MigrateSpec:
    return MigrateSpec(
        vm_name=f.req_vm_name(),
        destination=f.req_host("destination"),
        parameter=_migration_params(f.sub_map("parameter"), migrate=True),
        **f.subtask(),
    )


def _evacuate(f: _Fields) -> EvacuateSpec:
    destinations: list[str] = []
    for i, item in enumerate(f.sequence("destinations", required=True) or ()):
        destinations.append(_convert_host(f.ctx, item, f"destinations[{i}]"))
    param = f.sub_map("parameter")
    mode: str | None = None
    overbooking = True
    max_parallel: int | None = None
    if param is not None:
        mode = param.choice("mode", _EVACUATE_MODES)
        overbooking = param.boolean("overbooking", True)
        max_parallel = param.uint("max-parallel", UINT32_MAX, 1)
    return EvacuateSpec(
        destinations=tuple(destinations),
        mode=cast("EvacuateMode", mode or "auto"),
        overbooking=overbooking,
        parameter=_migration_params(param, migrate=False),
        max_parallel=max_parallel,
        **f.subtask(),
    )


def _repin(f: _Fields) -> RepinSpec:
    return RepinSpec(
        vm_name=f.req_vm_name(),
        vcpu_map=f.req_vcpu_map("vcpu-map"),
        **f.subtask(),
    )


def _quit(f: _Fields) -> QuitSpec:
    return QuitSpec(**f.subtask())


def _status(f: _Fields) -> StatusSpec:
    return StatusSpec(**f.subtask())


def _cancel(f: _Fields) -> CancelSpec:
    return CancelSpec(target=f.req_string("target"), **f.subtask())


#: List tasks: the key holding the items and how to read one item.
_LIST_TASKS: Final[dict[TaskKind, tuple[str, Callable[[_Fields], Subtask]]]] = {
    TaskKind.START: ("vm-configurations", _start),
    TaskKind.STOP: ("list", _stop),
    TaskKind.SUSPEND: ("list", _suspend),
    TaskKind.RESUME: ("list", _resume),
}

#: Tasks whose subtask map is the top-level map itself (docs/protocol.md §3.1).
_SINGLE_TASKS: Final[dict[TaskKind, Callable[[_Fields], Subtask]]] = {
    TaskKind.MIGRATE: _migrate,
    TaskKind.REPIN: _repin,
    TaskKind.EVACUATE: _evacuate,
    TaskKind.QUIT: _quit,
    TaskKind.STATUS: _status,
    TaskKind.CANCEL: _cancel,
}

_KINDS: Final[dict[str, TaskKind]] = {kind.value: kind for kind in TaskKind}


def parse_task(
    payload: bytes,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    max_nodes: int = DEFAULT_MAX_NODES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> TaskMessage:
    """Parse one MQTT task payload.

    Raises :class:`TaskRejected` (and nothing else, for any bytes) when the payload cannot
    become a task; ``task_id`` is set whenever the ``id`` could be read. Checks, in order:

    1. size over ``max_size`` (before any parsing), not UTF-8, malformed YAML, more than
       ``max_nodes`` nodes with aliases expanded or deeper than ``max_depth``:
       ``invalid-message``;
    2. not a map, no ``task`` key, empty document: ``Parsed message not being a
       Task_container.``;
    3. a bad ``id``, a non-string ``task``: bad conversion; an unknown ``task``:
       ``unknown-task``;
    4. the list key of start/stop/suspend/resume missing: ``Exception: Error loading
       YAML-node: Node is not valid. (missing '<key>')``;
    5. any field of a wrong type, null, or a required one missing: ``... bad conversion
       (<path>: <expected>, <found>)``, reported at the failing list item's mark (list tasks)
       or the top-level map's mark; one bad field rejects the whole message;
    6. an empty list: ``Empty task container executed.``

    Per-VM problems that are not parse errors (a start item without a usable name) are not
    rejections: they are carried in :attr:`StartSpec.name_error` for the runner to report.
    """
    if len(payload) > max_size:
        raise TaskRejected(
            _INVALID, f"Message of {len(payload)} bytes exceeds the limit of {max_size} bytes."
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskRejected(
            _INVALID,
            f"{_PARSE_PREFIX}the message is not valid UTF-8 "
            f"(byte 0x{payload[exc.start]:02x} at offset {exc.start}).",
        ) from exc
    root = _compose(text, max_nodes, max_depth)
    if _SURROGATE_ESCAPE.search(text) is not None and _has_surrogate(root):
        raise TaskRejected(
            _INVALID,
            f"{_PARSE_PREFIX}a string contains a lone UTF-16 surrogate escape (\\uD800-\\uDFFF), "
            "which is not a character",
        )
    return _build(root)


#: ``\uD800``-``\uDFFF`` (or the ``\U0000D800`` form) in a double-quoted scalar: the only
#: way a surrogate gets into a string (UTF-8 input cannot carry one). Such a string cannot be
#: encoded again (SQLite, logs, libyaml reject it), so the message is refused.
_SURROGATE_ESCAPE: Final = re.compile(r"\\(?:u|U0000)[dD][89a-fA-F][0-9a-fA-F]{2}")


def _has_surrogate(root: _Node | None) -> bool:
    stack: list[_Node] = [] if root is None else [root]
    while stack:
        node = stack.pop()
        if isinstance(node, _Scalar):
            if any("\ud800" <= ch <= "\udfff" for ch in node.text):
                return True
        elif isinstance(node, _Map):
            if any(any("\ud800" <= ch <= "\udfff" for ch in key) for key in node.items):
                return True
            stack.extend(node.items.values())
        else:
            stack.extend(node.items)
    return False


def _build(root: _Node | None) -> TaskMessage:
    if not isinstance(root, _Map):
        raise TaskRejected(_INVALID, _NOT_A_CONTAINER)
    ctx = _Ctx(None, root.line, root.col)
    id_node = root.items.get("id")
    if isinstance(id_node, _Scalar) and not id_node.null:
        if not valid_task_id(id_node.text):
            # Not echoed: it is the id itself that cannot be shown or remembered.
            ctx.bad("id", _TASK_ID_EXPECTED, id_node)
        ctx.task_id = id_node.text
    task_node = root.items.get("task")
    if task_node is None:
        raise TaskRejected(_INVALID, _NOT_A_CONTAINER, task_id=ctx.task_id)
    if id_node is not None and ctx.task_id is None:
        ctx.bad("id", "expected a string", id_node)
    task = _scalar_text(ctx, task_node, "task", "expected a string")
    kind = _KINDS.get(task)
    if kind is None:
        shown = task if len(task) <= 100 else task[:100] + "..."
        raise TaskRejected(
            "unknown-task",
            f"Exception: Unknown type of Task while loading. (task: '{shown}')",
            task_id=ctx.task_id,
        )
    top = _Fields(ctx, root, "")
    container_concurrent = top.boolean("concurrent-execution", True)
    single = _SINGLE_TASKS.get(kind)
    if single is not None:
        return TaskMessage(
            kind=kind,
            id=ctx.task_id,
            concurrent_execution=container_concurrent,
            subtasks=(single(top),),
        )
    list_key, load_item = _LIST_TASKS[kind]
    if list_key not in root.items:
        raise TaskRejected(
            _INVALID,
            f"Exception: Error loading YAML-node: Node is not valid. (missing '{list_key}')",
            task_id=ctx.task_id,
        )
    items = top.sequence(list_key, required=True) or []
    subtasks: list[Subtask] = []
    for i, item in enumerate(items):
        ctx.line, ctx.col = item.line, item.col
        if not isinstance(item, _Map):
            ctx.bad(f"{list_key}[{i}]", "expected a map", item)
        subtasks.append(load_item(_Fields(ctx, item, f"{list_key}[{i}].")))
    if not subtasks:
        raise TaskRejected(_INVALID, _EMPTY_CONTAINER, task_id=ctx.task_id)
    return TaskMessage(
        kind=kind,
        id=ctx.task_id,
        concurrent_execution=container_concurrent,
        subtasks=tuple(subtasks),
    )


def load_yaml(data: bytes | str) -> object:
    """The first YAML document of ``data`` as plain Python values, or ``None`` if unreadable.

    A tooling helper for reading what agents publish (results, events, status), e.g. in the
    demo client: YAML 1.2 core types (``"0012"`` quoted stays a string, ``0.020156`` is a
    float). It never raises for bad input (not UTF-8, malformed YAML, duplicate keys): it
    returns ``None``, which callers treat like any other non-map. Tasks go through
    :func:`parse_task`, never through this.
    """
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    yaml = _ruamel("loader")
    try:
        return cast("object", yaml.load(_first_document(data)))
    except Exception:  # noqa: BLE001 - documented: unreadable input gives None
        return None
    finally:
        yaml.doc_infos.clear()
        yaml.version = None
