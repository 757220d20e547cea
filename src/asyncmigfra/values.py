"""The one value vocabulary shared by tasks and configuration: booleans and number text.

The original daemon read every scalar with yaml-cpp's ``convert<bool>``: ``y n yes no true
false on off``, each in three case styles (``yes``, ``Yes``, ``YES``; never ``yEs``). The
task parser (wire format), the settings loader and the hypervisor option converters all look
words up here, so a boolean is spelled the same way in a task and in every config section.

Numbers given as text in the configuration (``"1883"``, ``"2.5"``: yaml-cpp read every
scalar as text, so original files may quote them) are read by :func:`parse_number`, in the
settings sections and in ``hypervisor:`` options alike. Task fields keep their own, stricter
yaml-cpp/C++ grammars in :mod:`asyncmigfra.wire.parsing` (wire-compatible with the original).
"""

from __future__ import annotations

import math
import re
from typing import Final

__all__ = ["BOOL_EXPECTED", "BOOL_WORDS", "parse_bool", "parse_number"]

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


#: A decimal number as configuration text: optional sign, digits with an optional fraction,
#: an optional exponent. No ``inf``/``nan``, no ``_`` separators, no non-ASCII digits.
_NUMBER: Final = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_number(text: str) -> float | None:
    """The finite number ``text`` spells (surrounding blanks ignored), else ``None``."""
    stripped = text.strip()
    if _NUMBER.fullmatch(stripped) is None:
        return None
    value = float(stripped)
    return value if math.isfinite(value) else None
