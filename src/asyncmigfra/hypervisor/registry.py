"""Finding hypervisor back-ends by name, and reading their options.

Back-ends are plug-ins: each is an entry point in the group ``asyncmigfra.hypervisors`` that
names a :class:`~asyncmigfra.hypervisor.base.HypervisorFactory`. The config's
``hypervisor.type`` is looked up here, so a third-party back-end needs no change to the core,
and the core never imports a back-end (or its heavy dependencies such as libvirt-python)
that the configuration does not ask for.

The second half of this module holds small converters that back-end factories share to read
their ``hypervisor:`` options. They accept what the original's yaml-cpp accepted (booleans
as ``y``/``no``/``On``... from :mod:`asyncmigfra.values`, numbers given as strings) as well
as the typed values a YAML 1.2 loader produces, and every error names its key path so the
operator knows what to fix.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from importlib import metadata
from typing import cast

from asyncmigfra.errors import ConfigError
from asyncmigfra.hypervisor.base import HypervisorFactory
from asyncmigfra.values import BOOL_EXPECTED, parse_bool, parse_number

__all__ = [
    "ENTRY_POINT_GROUP",
    "GENERIC_LIBVIRT_KEYS",
    "available",
    "check_keys",
    "load_factory",
    "opt_bool",
    "opt_float",
    "opt_int",
    "opt_list",
    "opt_map",
    "opt_str",
]

ENTRY_POINT_GROUP = "asyncmigfra.hypervisors"

#: Keys of the original's ``hypervisor:`` section that every back-end must tolerate: an old
#: migfra.conf written for libvirt keeps loading when only ``type`` is switched.
GENERIC_LIBVIRT_KEYS: frozenset[str] = frozenset(
    {"driver", "transport", "nodes", "start-timeout", "stop-timeout"}
)

_LIBVIRT_HINT = "pip install 'asyncmigfra[libvirt]'"


def _entry_points() -> list[metadata.EntryPoint]:
    """The installed back-end entry points (a seam for tests)."""
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def available() -> list[str]:
    """Names of the installed back-ends, sorted, for messages and ``--help``."""
    return sorted({ep.name for ep in _entry_points()})


def load_factory(type_name: str) -> HypervisorFactory:
    """Import and return the factory of back-end ``type_name``.

    Raises :class:`ConfigError` (path ``hypervisor.type``) when no such back-end is installed,
    or when its module cannot be imported: the usual cause is a missing optional dependency,
    and the message says how to install it instead of showing a traceback.
    """
    matches = [ep for ep in _entry_points() if ep.name == type_name]
    if not matches:
        names = ", ".join(available()) or "none installed"
        raise ConfigError(
            f"unknown hypervisor type {type_name!r} (available: {names})", path="hypervisor.type"
        )
    entry = matches[0]
    try:
        factory = entry.load()
    except ImportError as exc:
        missing = exc.name or ""
        if type_name == "libvirt" or missing.startswith("libvirt"):
            hint = f"install it with: {_LIBVIRT_HINT}"
        else:
            hint = f"install the package that provides {entry.value!r}"
        raise ConfigError(
            f"hypervisor type {type_name!r} cannot be loaded ({exc}); {hint}",
            path="hypervisor.type",
        ) from exc
    except AttributeError as exc:
        raise ConfigError(
            f"hypervisor type {type_name!r} is broken: entry point {entry.value!r} ({exc})",
            path="hypervisor.type",
        ) from exc
    if not callable(factory):
        raise ConfigError(
            f"hypervisor type {type_name!r} is broken: {entry.value!r} is not callable",
            path="hypervisor.type",
        )
    return cast(HypervisorFactory, factory)


# --------------------------------------------------------------------------------------------
# Option converters for back-end factories


def check_keys(
    options: Mapping[str, object],
    allowed: Collection[str],
    *,
    path: str = "hypervisor",
    ignored: Collection[str] = (),
) -> None:
    """Reject keys that are neither ``allowed`` nor ``ignored``.

    A typo in a config key must stop the agent at startup, not silently fall back to a
    default that the operator did not choose.
    """
    for key in options:
        if key not in allowed and key not in ignored:
            raise ConfigError("unknown key", path=f"{path}.{key}")


def opt_bool(value: object, path: str) -> bool:
    """A boolean: a Python bool or a yaml-cpp spelling (``y``, ``No``, ``ON``), as in tasks.

    The spellings are :data:`asyncmigfra.values.BOOL_WORDS`, the same in every config section;
    surrounding blanks are ignored as for the other option converters.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        parsed = parse_bool(value.strip())
        if parsed is not None:
            return parsed
    raise ConfigError(f"expected {BOOL_EXPECTED}, got {value!r}", path=path)


def opt_float(value: object, path: str, *, minimum: float = 0.0, exclusive: bool = False) -> float:
    """A finite number ``>= minimum`` (``> minimum`` when ``exclusive``); strings accepted."""
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        number = parse_number(value)
    if number is None or not math.isfinite(number):
        raise ConfigError(f"expected a number, got {value!r}", path=path)
    if number < minimum or (exclusive and number == minimum):
        relation = ">" if exclusive else ">="
        raise ConfigError(f"must be {relation} {minimum:g}, got {value!r}", path=path)
    return number


def opt_int(value: object, path: str, *, minimum: int = 0) -> int:
    """An integer ``>= minimum``; strings accepted with base detection (``0x10``) like yaml-cpp."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value.strip(), 0)
        except ValueError:
            number = None
    if number is None:
        raise ConfigError(f"expected an integer, got {value!r}", path=path)
    if number < minimum:
        raise ConfigError(f"must be >= {minimum}, got {value!r}", path=path)
    return number


def opt_str(value: object, path: str) -> str:
    """A non-empty string (numbers are accepted as their text, as yaml-cpp would)."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"expected a non-empty string, got {value!r}", path=path)


def opt_map(value: object, path: str) -> Mapping[str, object]:
    """A map with string keys."""
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return cast(Mapping[str, object], value)
    raise ConfigError(f"expected a map, got {type(value).__name__}", path=path)


def opt_list(value: object, path: str) -> list[object]:
    """A sequence (but not a string)."""
    if isinstance(value, list | tuple):
        return list(cast(list[object] | tuple[object, ...], value))
    raise ConfigError(f"expected a list, got {type(value).__name__}", path=path)
