"""The one value vocabulary shared by tasks and configuration: yaml-cpp's boolean spellings.

The original daemon read every scalar with yaml-cpp's ``convert<bool>``: ``y n yes no true
false on off``, each in three case styles (``yes``, ``Yes``, ``YES``; never ``yEs``). The
task parser (wire format), the settings loader and the hypervisor option converters all look
words up here, so a boolean is spelled the same way in a task and in every config section.
"""

from __future__ import annotations

from typing import Final

__all__ = ["BOOL_EXPECTED", "BOOL_WORDS", "parse_bool"]

#: Every accepted spelling and its value: 8 words x 3 case styles (lower, UPPER, Capitalized),
#: as yaml-cpp's ``IsFlexibleCase`` allows them.
BOOL_WORDS: Final[dict[str, bool]] = {
    form: value
    for word, value in (
        ("y", True),
        ("yes", True),
        ("true", True),
        ("on", True),
        ("n", False),
        ("no", False),
        ("false", False),
        ("off", False),
    )
    for form in (word, word.upper(), word.capitalize())
}

#: How an error message names what a boolean field wants.
BOOL_EXPECTED: Final = "a boolean (true/false, yes/no, on/off, y/n)"


def parse_bool(text: str) -> bool | None:
    """The value of a yaml-cpp boolean spelling, or ``None`` when ``text`` is not one."""
    return BOOL_WORDS.get(text)
