"""The one value vocabulary shared by tasks and configuration: booleans and number text.

The original daemon read every scalar with yaml-cpp's ``convert<bool>``: ``y n yes no true
false on off``, each in three case styles (``yes``, ``Yes``, ``YES``; never ``yEs``). The
task parser (wire format), the settings loader and the hypervisor option converters all look
words up here, so a boolean is spelled the same way in a task and in every config section.

Numbers given as text in the configuration (``"1883"``, ``"2.5"``: yaml-cpp read every
scalar as text, so original files may quote them) are read by :func:`parse_number`, in the
settings sections and in ``hypervisor:`` options alike. Task fields keep their own, stricter
yaml-cpp/C++ grammars in :mod:`asyncmigfra.wire.parsing` (wire-compatible with the original).

Points in time go over the wire as ISO 8601 in UTC (:func:`iso_instant`, as events carry
them); :func:`parse_instant` reads one strictly (the ``history`` task's ``since``, the CLI's
``--since``).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Final

__all__ = [
    "BOOL_EXPECTED",
    "BOOL_WORDS",
    "INSTANT_EXPECTED",
    "iso_instant",
    "parse_bool",
    "parse_instant",
    "parse_number",
]

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


#: A date, or a date and a time with seconds optional, fractions of a second optional, and
#: a zone (``Z`` or an offset) required: a time without a zone means another instant on
#: every host.
_INSTANT: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
    r"(?:[Tt ]([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:\.([0-9]{1,9}))?)?"
    r"([Zz]|[+-][0-9]{2}:?[0-9]{2}))?"
)
#: 9999-12-31T23:59:59Z
_LAST_INSTANT: Final = 253_402_300_799.0
INSTANT_EXPECTED: Final = (
    "expected an ISO 8601 time with a zone, such as 2026-12-07T10:00:00Z or "
    "2026-12-07T11:00+01:00, or a date (midnight UTC)"
)


def parse_instant(text: str) -> float | None:
    """``text`` as seconds since the epoch, or ``None`` unless it is an ISO 8601 date
    (midnight UTC) or date and time with a zone, from 1970 to the end of 9999 in UTC."""
    m = _INSTANT.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    offset = dt.timedelta(0)
    if zone is not None and zone not in {"Z", "z"}:
        digits = zone[1:].replace(":", "")
        if int(digits[:2]) > 23 or int(digits[2:]) > 59:
            return None
        offset = dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
        if zone[0] == "-":
            offset = -offset
    try:
        moment = dt.datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or "0").ljust(6, "0")[:6]),
            tzinfo=dt.timezone(offset),
        )
    except ValueError:
        return None
    seconds = moment.timestamp()
    return seconds if 0.0 <= seconds <= _LAST_INSTANT else None


def iso_instant(seconds: float) -> str:
    """Seconds since the epoch as ISO 8601 UTC with milliseconds (``2026-12-07T10:00:00.000Z``),
    as events carry their ``time``."""
    moment = dt.datetime.fromtimestamp(seconds, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
