"""The fast path: the block-style subset schedulers send, read line by line.

It returns either ``None`` (not in its subset: ruamel.yaml decides) or exactly the node graph
the slow path in :mod:`asyncmigfra.wire.parsing.nodes` returns; ``_compose`` picks between them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from asyncmigfra.wire.parsing.nodes import (
    _NULL_WORDS,
    _compose_slow,
    _ComposeError,
    _first_document,
    _Map,
    _Node,
    _Scalar,
    _Seq,
    _syntax_error,
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
