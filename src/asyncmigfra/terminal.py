"""Untrusted text never reaches a terminal raw: the one escaping function of the CLI.

**Why.** Anyone who can publish on the broker chooses strings the CLI prints: task ids, VM
and host names, ``details``, phases, codes, every field of a retained status message or an
event, even the host part of a topic. Printed as they are, a few bytes take over the
terminal: ``ESC [2J`` clears the screen, ``ESC [1A`` and a CR go back and paint a fake
``migrated`` line over a real failure, ``ESC ] 52 ; c ; ... BEL`` writes the clipboard of
some terminals, ``ESC ] 8`` makes a link, a C1 ``CSI`` (U+009B) does what ``ESC [`` does in
a UTF-8 terminal, and a bidi override (U+202E) makes ``db-\\u202e1pukcab`` read as
``db-backup1``. A newline or a tab inside a value would add a line or shift the columns of
a table. A lone surrogate (YAML ``"\\ud800"``) cannot even be encoded and would crash the
command.

**Convention: the escapes of a Python string literal, without the quotes.** A character is
shown as itself when :meth:`str.isprintable` says it is printable (so: not a control, format,
surrogate, private-use, unassigned or separator character other than the space) and it is not
one of :data:`BIDI_CONTROLS`; every other character is shown as

* ``\\n``, ``\\r``, ``\\t`` for newline, carriage return and tab;
* ``\\xHH`` for the rest of C0 (``ESC`` is ``\\x1b``, ``BEL`` is ``\\x07``), DEL (``\\x7f``),
  C1 (``\\x80``-``\\x9f``) and other non-printable characters below U+0100 (``\\xa0``, the
  no-break space, which would look like a space);
* ``\\uHHHH`` (``\\u202e``, ``\\u200b``, ``\\u2028``) or ``\\UHHHHHHHH`` above, with lower-case
  hex digits.

This is what ``repr()`` shows, and it reads the same way. Printable ASCII passes through
unchanged (so do letters, accents, CJK and emoji), with one exception that keeps the
escaping reversible: a backslash that comes before ``\\``, ``n``, ``r``, ``t``, ``x``, ``u``,
``U`` or before a character that is escaped is doubled (``\\\\``). So a VM named
``a\\x1bb`` (typed with a backslash) is shown as ``a\\\\x1bb`` and one with a real ESC as
``a\\x1bb``: who investigates a forged message can tell them apart, and most Windows paths
(``C:\\data\\vm.img``) still read as they are.

**Which strings.** All of them: every string that the CLI writes to stdout or stderr for
people passes through :func:`safe` exactly once, at the moment it is written, whether it came
from the wire, from the command line or from the CLI itself (the CLI's own text is printable
and comes out unchanged; the user's own arguments may come from a file). The choke points:

* :class:`asyncmigfra.console.output.Out`, the only writer of the client commands: ``line``,
  ``note``, ``error``, ``prompt``, ``table`` (cells, title, headers), ``event`` (each column),
  ``raw`` (a result's YAML, line by line: its own line breaks stay, a CR or a tab in it is
  shown as ``\\r``/``\\t``) and ``json_line`` (see below);
* :func:`safe_text`, the only way the live ``migrate --follow`` view
  (:mod:`asyncmigfra.console.follow`) makes rich text;
* ``asyncmigfra.cli`` prints a :class:`~asyncmigfra.console.exits.CliError` message (which
  may quote a wire value, such as the ``since`` of a retained status) through :func:`safe`.

``tests/console/test_escaping.py`` checks that no other module of the package prints,
writes to a stream or builds a rich ``Text``, so a new output path cannot forget it.

**rich markup.** Text is handed to rich only as ``rich.text.Text`` objects (never a ``str``,
which rich would parse for ``[bold]``, ``[link=...]`` and ``:emoji:`` codes), with
``highlight=False``; so a VM named ``[bold red]x`` is shown as exactly that.

**JSON.** ``--json`` output stays exact JSON: :func:`json_safe` rewrites each character that
:func:`safe` would escape into its JSON escape (``\\u001b``, ``\\u202e``, a surrogate pair for
characters above U+FFFF), which parses back to the same string. ``json.dumps`` alone escapes
only C0 with ``ensure_ascii=False``, not DEL, C1 or bidi controls. Other characters (``ü``)
stay readable.

**Width.** :func:`ljust` pads a value to a column by the width of its escaped form, so a
hostile name does not shift the columns after it; :func:`fit` cuts a line to a width the same
way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from rich.text import Text

__all__ = ["BIDI_CONTROLS", "fit", "json_safe", "ljust", "safe", "safe_text", "shown"]

#: Bidirectional formatting characters (ALM, LRM, RLM, LRE, RLE, PDF, LRO, RLO, LRI, RLI, FSI,
#: PDI). They are format characters (``Cf``) and not printable for Python anyway; listed so
#: that a different Unicode table cannot let them through.
BIDI_CONTROLS: Final = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)

_NAMED: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: What may follow an escape's backslash: a literal backslash before one of these is doubled.
_ESCAPE_LETTERS: Final = frozenset("\\nrtxuU")


def shown(ch: str) -> bool:
    """Whether the character ``ch`` is shown as itself (else it is escaped)."""
    return ch.isprintable() and ch not in BIDI_CONTROLS


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    n = ord(ch)
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def safe(value: object) -> str:
    """``value`` as text that is safe to print to a terminal (see the module docstring).

    Non-strings are converted with ``str()`` first (a number, a list from the wire)."""
    text = value if isinstance(value, str) else str(value)
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to do
    parts: list[str] = []
    last = len(text) - 1
    for i, ch in enumerate(text):
        if ch == "\\":
            nxt = text[i + 1] if i < last else ""
            parts.append("\\\\" if nxt and (nxt in _ESCAPE_LETTERS or not shown(nxt)) else "\\")
        elif shown(ch):
            parts.append(ch)
        else:
            parts.append(_escape(ch))
    return "".join(parts)


def fit(parts: Iterable[str], width: int, sep: str = "  ") -> str:
    """``parts`` joined, the last ones left out until the line is at most ``width`` columns
    wide *as shown* (escaped: one raw control character takes four columns), the first part
    kept and cut if it must. The result is still raw text, to be escaped where it is written."""
    kept = list(parts)
    while len(kept) > 1 and len(safe(sep.join(kept))) > width:
        kept.pop()
    line = sep.join(kept)[: max(0, width)]  # escaping never makes text shorter
    while line and len(safe(line)) > width:
        line = line[:-1]
    return line


def ljust(value: object, width: int) -> str:
    """``value`` as text with spaces after it so that its *escaped* form is ``width`` wide
    (what ``f"{value:<{width}}"`` does for text that needs no escaping). The result is still
    raw text, to be escaped where it is written."""
    text = value if isinstance(value, str) else str(value)
    return text + " " * max(0, width - len(safe(text)))


def json_safe(text: str) -> str:
    """A JSON document (from ``json.dumps``) with each character that :func:`safe` would
    escape written as a JSON ``\\u`` escape: the same JSON value, safe for a terminal.

    Sound because such characters can only occur inside JSON strings (``json.dumps`` writes
    its structure in ASCII and escapes C0 itself), where a ``\\u`` escape means the same.
    """
    if text.isascii() and text.isprintable():
        return text
    parts: list[str] = []
    for ch in text:
        if shown(ch):
            parts.append(ch)
            continue
        n = ord(ch)
        if n > 0xFFFF:  # a surrogate pair, as JSON spells characters beyond the BMP
            n -= 0x10000
            parts.append(f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}")
        else:
            parts.append(f"\\u{n:04x}")
    return "".join(parts)


def safe_text(value: object, style: str = "") -> Text:
    """A rich ``Text`` of ``safe(value)``: never parsed for markup, nothing left to
    interpret. The only way :mod:`asyncmigfra.console` builds rich text."""
    from rich.text import Text  # noqa: PLC0415 - rich only at a terminal

    return Text(safe(value), style=style)
