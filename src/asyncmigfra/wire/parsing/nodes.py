"""The node graph both YAML front ends produce, and the ruamel.yaml composer (the slow path).

Also the limits and the original's rejection texts every part of the parser shares. The
slow path is the reference: it reads any YAML, iteratively and within the node and depth
bounds, and keeps only the first document.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Final, cast

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

from asyncmigfra.errors import TaskRejected
from asyncmigfra.wire.parsing.names import valid_task_id

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
