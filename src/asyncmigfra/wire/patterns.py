"""Name patterns from the wire (``stop vm`` with ``regex``), matched in linear time.

Python's ``re`` backtracks: ``(.*)(.*)...(.*)X`` against a 21-character VM name took 135 s
on the event loop (a hostile review; 12 groups: 4.7 s). So patterns from tasks go to RE2
(``google-re2``), whose matching time is linear in the name's length whatever the pattern,
with a bounded memory budget for compiling it. RE2 is the common ECMAScript/Perl syntax
without backreferences and lookaround; a pattern that needs them is refused with
``invalid-message`` saying so. Matching is a full match, as ``std::regex_match`` in the
original.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import re2  # type: ignore[import-untyped]

from asyncmigfra.errors import InvalidTask

__all__ = ["MAX_PATTERN", "compile_name_pattern", "matching_names"]

#: Longest pattern accepted (characters).
MAX_PATTERN = 1000
#: Bytes RE2 may use for one compiled pattern (larger ones are refused, not slow).
_MAX_MEMORY = 8 << 20


def _options() -> object:
    options = re2.Options()
    options.log_errors = False  # RE2 would print every refused pattern on stderr
    options.never_capture = True
    options.max_mem = _MAX_MEMORY
    return options


def compile_name_pattern(pattern: str) -> Callable[[str], bool]:
    """A full-match test for ``pattern``.

    Raises:
        InvalidTask: too long, or not valid RE2 syntax (the message says which construct).
    """
    if len(pattern) > MAX_PATTERN:
        raise InvalidTask(f"the regex is longer than {MAX_PATTERN} characters")
    try:
        compiled = re2.compile(pattern, _options())
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise InvalidTask(
            f"invalid regex: {reason} (patterns are RE2 syntax, matched in linear time: "
            "no backreferences or lookaround)"
        ) from None

    def matches(name: str) -> bool:
        return compiled.fullmatch(name) is not None

    return matches


def matching_names(pattern: str, names: Iterable[str]) -> list[str]:
    """The names ``pattern`` fully matches, in their order (compile and match in one go, so a
    caller can run it all in a worker thread)."""
    matches = compile_name_pattern(pattern)
    return [name for name in names if matches(name)]
