"""How the loader reads the dataclasses: wire names, allowed ranges, the generic converter.

The field tables (``_RENAMED``, ``_RANGES``, ...), the small helpers every section uses, and
``_convert``/``_section``, which turn one YAML map into a dataclass's keyword arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from asyncmigfra.errors import ConfigError
from asyncmigfra.settings.model import (
    AgentSettings,
    HookSettings,
    HostDevice,
    LimitsSettings,
    MigrationDefaults,
    MqttHookSettings,
    MqttSettings,
    PscomSettings,
    Settings,
    ShutdownSettings,
    TlsSettings,
)
from asyncmigfra.streamoptions import AUTO_CONVERGE_PERCENT, LEVELS, MAX_XBZRLE_CACHE_MIB
from asyncmigfra.values import BOOL_EXPECTED, parse_bool, parse_number

# --------------------------------------------------------------------------------------------
# Loading
#
# How a file becomes a ``Settings``:
#
# 1. The text is parsed once with ruamel's safe loader (duplicate keys are an error).
# 2. The agent's name is resolved (argument, then the file's ``hostname``, then the literal
#    host level of ``communicator.subscribe-topic``, then ``gethostname()``) and every literal
#    ``<hostname>`` is replaced with it. So two agents on one machine configured only with
#    ``subscribe-topic: fast/migfra/node-a/task`` and ``.../node-b/task`` are ``node-a`` and
#    ``node-b`` everywhere, their ``id: fast-migfra-<hostname>`` included. (For every file whose
#    topics use ``<hostname>`` the name is the machine's, as in the original.)
#    The original replaced it in the *text*;
#    we replace it in every string scalar and key of the parsed tree instead, which gives the
#    same result for every file the original accepted (yaml-cpp reads all scalars as text) but
#    cannot change the YAML structure or turn a quoted id into a number when the host name
#    looks like one.
# 3. Each section is converted field by field. The wire key of a field is its name with ``_``
#    turned into ``-`` (plus the original's names in ``_RENAMED``), and its type annotation
#    drives the conversion, so a new dataclass field is configurable without touching the
#    loader; only its allowed range goes into ``_RANGES``.
#
# Leniency compared with the original (all of it documented in the example file):
# missing ``communicator``/``hypervisor`` sections and missing communicator keys get
# defaults, and ``communicator.type`` may be left out. A ``hypervisor`` section with options
# must still name its ``type``: silently falling back to the dummy back-end would make a
# misconfigured agent report success without touching a VM.

_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_HOSTNAME_PLACEHOLDER = "<hostname>"
_MAX_TOPIC_BYTES = 65535

#: Settings field -> top-level section key, where it is not the field name.
_SECTION_NAMES: dict[str, str] = {"mqtt": "communicator", "pscom": "pscom-handler"}

#: (class, field) -> wire key, where it is not the field name with ``-`` for ``_``.
_RENAMED: dict[tuple[type, str], str] = {
    (MqttSettings, "client_id"): "id",
    (MqttSettings, "task_topic"): "subscribe-topic",
    (MqttSettings, "result_topic"): "publish-topic",
}

#: Fields the generic converter leaves alone; their section code reads them.
_HANDLED_ELSEWHERE: frozenset[tuple[type, str]] = frozenset(
    {
        (MqttSettings, "password"),
        (HookSettings, "when"),
        (HookSettings, "command"),
        (HookSettings, "mqtt"),
        (HookSettings, "memory_percent"),
        (HookSettings, "memory_mib"),
    }
)

#: Extra wire keys a section accepts besides its fields.
_PASSWORD_KEYS = ("password", "password-file", "password-env")
_COMMUNICATOR_EXTRA = ("type", *_PASSWORD_KEYS)
#: Wire keys of a ``hooks:`` entry that its own code reads.
_HOOK_EXTRA = ("when", "command", "mqtt", "memory")
#: What a hook runs: exactly one of these keys.
_HOOK_KINDS = ("command", "mqtt", "builtin")
_HOOK_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]*\Z")
_HOOK_NAME_MAX = 64
_PLACEHOLDER_RE = re.compile(r"<[A-Za-z_][A-Za-z0-9_-]*>")
#: ``reduce-memory``'s default target and its smallest absolute one.
_REDUCE_MEMORY_DEFAULT_PERCENT = 50.0
_REDUCE_MEMORY_MIN_MIB = 16


@dataclass(frozen=True, slots=True)
class _Range:
    """The allowed values of one numeric field."""

    low: float | None = None
    high: float | None = None
    #: ``low`` itself is not allowed (delays must be > 0).
    low_exclusive: bool = False

    def check(self, value: float, path: str) -> None:
        """Raise ``ConfigError`` at ``path`` unless ``value`` is in range."""
        low, high = self.low, self.high
        got = _num(value)
        if low is not None and high is not None and not low <= value <= high:
            raise ConfigError(f"must be between {_num(low)} and {_num(high)}, got {got}", path=path)
        if low is not None and self.low_exclusive and value <= low:
            raise ConfigError(f"must be greater than {_num(low)}, got {got}", path=path)
        if low is not None and value < low:
            raise ConfigError(f"must be at least {_num(low)}, got {got}", path=path)
        if high is not None and value > high:
            raise ConfigError(f"must be at most {_num(high)}, got {got}", path=path)


_COUNT = _Range(low=1)
_NON_NEGATIVE = _Range(low=0)
_DELAY = _Range(low=0, low_exclusive=True)
_QOS = _Range(low=0, high=2)

#: The range of every numeric field; a test checks that none is missing.
_RANGES: dict[tuple[type, str], _Range] = {
    (MqttSettings, "port"): _Range(low=1, high=65535),
    (MqttSettings, "keepalive"): _Range(low=0, high=65535),
    (MqttSettings, "reconnect_min_delay"): _DELAY,
    (MqttSettings, "reconnect_max_delay"): _DELAY,
    (MqttSettings, "session_expiry"): _Range(low=0, high=0xFFFFFFFF),
    (MqttSettings, "progress_qos"): _QOS,
    (MqttSettings, "event_qos"): _QOS,
    # 0: log every takeover but never give up.
    (MqttSettings, "takeover_limit"): _NON_NEGATIVE,
    (MqttSettings, "takeover_window"): _DELAY,
    (PscomSettings, "qos"): _QOS,
    (PscomSettings, "timeout"): _DELAY,
    (PscomSettings, "ssh_port"): _Range(low=1, high=65535),
    (PscomSettings, "ssh_timeout"): _DELAY,
    (LimitsSettings, "max_concurrent_tasks"): _COUNT,
    (LimitsSettings, "max_queued_tasks"): _COUNT,
    # An MQTT packet cannot be larger than 256 MiB.
    (LimitsSettings, "max_message_size"): _Range(low=1, high=268_435_455),
    (LimitsSettings, "max_intake_bytes"): _Range(low=1),
    (LimitsSettings, "max_subtasks"): _COUNT,
    (LimitsSettings, "dedupe_window"): _DELAY,
    (LimitsSettings, "max_yaml_nodes"): _COUNT,
    (LimitsSettings, "max_yaml_depth"): _COUNT,
    (AgentSettings, "progress_interval"): _DELAY,
    (AgentSettings, "history_retention"): _DELAY,
    # 0: no history; at most 10 million rows (about 2 GB of journal).
    (AgentSettings, "history_max_entries"): _Range(low=0, high=10_000_000),
    (MigrationDefaults, "max_downtime"): _COUNT,
    (MigrationDefaults, "bandwidth"): _COUNT,
    (MigrationDefaults, "parallel_connections"): _COUNT,
    (MigrationDefaults, "completion_timeout_per_gib"): _DELAY,
    (MigrationDefaults, "completion_timeout_min"): _DELAY,
    (MigrationDefaults, "retry_counter"): _NON_NEGATIVE,
    (MigrationDefaults, "retry_delay"): _DELAY,
    # 0: no post-copy recovery.
    (MigrationDefaults, "postcopy_recovery_window"): _NON_NEGATIVE,
    (MigrationDefaults, "max_outgoing"): _COUNT,
    (MigrationDefaults, "max_incoming"): _COUNT,
    (MigrationDefaults, "device_timeout"): _DELAY,
    (MigrationDefaults, "swap_lock_timeout"): _DELAY,
    # 0: off.
    (MigrationDefaults, "progress_timeout"): _NON_NEGATIVE,
    (MigrationDefaults, "compression_level"): _Range(low=0, high=max(LEVELS.values())),
    (MigrationDefaults, "xbzrle_cache"): _Range(low=1, high=MAX_XBZRLE_CACHE_MIB),
    (MigrationDefaults, "postcopy_bandwidth"): _COUNT,
    (MigrationDefaults, "auto_converge_initial"): _Range(*AUTO_CONVERGE_PERCENT),
    (MigrationDefaults, "auto_converge_increment"): _Range(*AUTO_CONVERGE_PERCENT),
    # MiB/s: from 0.01 (a crawl) to 1 TiB/s.
    (MigrationDefaults, "link_rate"): _Range(low=0.01, high=1_048_576),
    # 0: abort running work at once on SIGTERM.
    (ShutdownSettings, "grace_period"): _NON_NEGATIVE,
    (ShutdownSettings, "hard_exit_after"): _DELAY,
    (HookSettings, "timeout"): _DELAY,
    (MqttHookSettings, "qos"): _QOS,
}


def _protocol_alias(value: object) -> object:
    """Map the spellings people use for MQTT versions to ``"5"`` / ``"3.1.1"``.

    Unknown values are returned unchanged so the ``Literal`` check reports them.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        numbers: dict[float, str] = {5: "5", 311: "3.1.1"}
        return numbers.get(value, value)
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("mqtt").removeprefix("v")
        return {"5": "5", "5.0": "5", "311": "3.1.1", "3.1.1": "3.1.1"}.get(key, value)
    return value


#: (class, field) -> function applied to the raw value before conversion.
_NORMALIZERS: dict[tuple[type, str], Callable[[object], object]] = {
    (MqttSettings, "protocol"): _protocol_alias,
}


@dataclass(frozen=True, slots=True)
class _Context:
    """What every section converter needs besides its own map."""

    hostname: str
    #: Relative file names (``password-file``, ``tls.*``) are resolved against this.
    base_dir: Path


# --- small helpers ---------------------------------------------------------------------------


def _num(value: float) -> str:
    """A number as people write it (``1`` rather than ``1.0``)."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _show(value: object) -> str:
    """A short rendering of a bad value for an error message (never used for secrets)."""
    if value is None:
        return "nothing"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _did_you_mean(word: str, known: Collection[str]) -> str:
    """``; did you mean 'x'?`` for a near miss, else nothing.

    difflib finds typos; a shortened key (``pscom`` for ``pscom-handler``) is too far from
    its full name for difflib, so a prefix match is tried next.
    """
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    if not close and len(word) >= 3:
        close = sorted(key for key in known if key.startswith(word) or word.startswith(key))
    return f"; did you mean {close[0]!r}?" if close else ""


def _as_map(raw: object, path: str) -> dict[str, object]:
    """A section's map; ``None`` (an empty section) counts as an empty map."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a map, got {_show(raw)}", path=path)
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError("keys must be strings", path=_join(path, repr(key)))
    return raw


def _check_keys(mapping: Mapping[str, object], known: Collection[str], path: str) -> None:
    """Refuse any key that is not in ``known``: a typo must never be silently ignored."""
    for key in mapping:
        if key not in known:
            hint = _did_you_mean(key, known) or f" (known keys: {', '.join(sorted(known))})"
            raise ConfigError(f"unknown key{hint}", path=_join(path, key))


def _wire_name(cls: type, name: str) -> str:
    return _RENAMED.get((cls, name), name.replace("_", "-"))


@cache
def _field_table(cls: type) -> dict[str, tuple[str, Any]]:
    """Wire key -> (field name, resolved type) for a settings dataclass."""
    hints = get_type_hints(cls)
    return {
        _wire_name(cls, f.name): (f.name, hints[f.name])
        for f in dataclasses.fields(cls)
        if (cls, f.name) not in _HANDLED_ELSEWHERE
    }


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    if get_origin(tp) in (Union, types.UnionType):
        args = get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
    return tp, False


def _expected(tp: Any) -> str:
    """How an error message names what a field wants."""
    if tp is bool:
        return BOOL_EXPECTED
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return "a map"


# --- conversion --------------------------------------------------------------------------------


def _convert(value: object, tp: Any, path: str, ctx: _Context) -> object:
    """Check ``value`` against the annotation ``tp`` and return it in the field's type.

    Quoted numbers are accepted for numeric fields, as yaml-cpp (which reads every scalar as
    text) accepted them in original migfra.conf files. Booleans are YAML 1.2 ``true`` or
    ``false`` or any yaml-cpp spelling (``yes``, ``Off``, ``Y``: :mod:`asyncmigfra.values`),
    which YAML 1.2 loads as strings: the same words as in tasks and ``hypervisor:`` options.
    """
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"expected {_expected(inner)}, got nothing", path=path)
    if inner is bool:
        if isinstance(value, bool):
            return value
        parsed = parse_bool(value.strip()) if isinstance(value, str) else None
        if parsed is None:
            raise ConfigError(f"expected {BOOL_EXPECTED}, got {_show(value)}", path=path)
        return parsed
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INT_RE.match(value.strip()):
            return int(value)
        raise ConfigError(f"expected an integer, got {_show(value)}", path=path)
    if inner is float:
        candidate = parse_number(value) if isinstance(value, str) else value
        if (
            isinstance(candidate, int | float)
            and not isinstance(candidate, bool)
            and math.isfinite(candidate)
        ):
            return float(candidate)
        raise ConfigError(f"expected a number, got {_show(value)}", path=path)
    if inner is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"expected a string, got {_show(value)}", path=path)
    if get_origin(inner) is Literal:
        choices: tuple[str, ...] = get_args(inner)
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        hint = _did_you_mean(value.lower(), choices) if isinstance(value, str) else ""
        raise ConfigError(
            f"expected {_expected(inner)}, got {_show(value)}{hint}",
            path=path,
        )
    if get_origin(inner) is tuple:
        (item_type, _) = get_args(inner)
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {_show(value)}", path=path)
        if item_type is HostDevice:
            return tuple(_host_device(item, f"{path}[{i}]") for i, item in enumerate(value))
        return tuple(_convert(item, item_type, f"{path}[{i}]", ctx) for i, item in enumerate(value))
    if inner is TlsSettings:
        if isinstance(value, str) and parse_bool(value.strip()) is not None:
            value = parse_bool(value.strip())
        if value is False:
            return None
        return _tls({} if value is True else value, path, ctx)
    raise AssertionError(f"no converter for {tp!r} at {path}")  # pragma: no cover


_PCI_ADDRESS_RE = re.compile(
    r"(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])\Z"
)


def _pci_id(value: object, path: str) -> int:
    """A vendor or device id: hex text as ``lspci -nn`` prints it (``'8086'``), or ``0x8086``."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        text = value.strip().lower().removeprefix("0x")
        if re.fullmatch(r"[0-9a-f]{1,4}", text):
            number = int(text, 16)
    if number is None or not 0 <= number <= 0xFFFF:
        raise ConfigError(
            f"expected a PCI id as lspci prints it ('8086' or 0x8086), got {_show(value)}",
            path=path,
        )
    return number


def _host_device(raw: object, path: str) -> HostDevice:
    """``{vendor, device}`` or ``{address}``."""
    mapping = _as_map(raw, path)
    _check_keys(mapping, ["vendor", "device", "address"], path)
    if "address" in mapping:
        if len(mapping) != 1:
            raise ConfigError("an address entry has no vendor or device", path=path)
        text = mapping["address"]
        match = _PCI_ADDRESS_RE.match(text.strip()) if isinstance(text, str) else None
        if match is None or int(match.group(3), 16) > 0x1F:
            raise ConfigError(
                f"expected a PCI address [DDDD:]BB:SS.F, got {_show(text)}",
                path=_join(path, "address"),
            )
        domain, bus, slot, function = match.groups()
        address = f"{int(domain or '0', 16):04x}:{int(bus, 16):02x}:{int(slot, 16):02x}.{function}"
        return HostDevice(address=address)
    if set(mapping) != {"vendor", "device"}:
        raise ConfigError("expected {vendor, device} or {address}", path=path)
    return HostDevice(
        vendor=_pci_id(mapping["vendor"], _join(path, "vendor")),
        device=_pci_id(mapping["device"], _join(path, "device")),
    )


def _section(
    cls: type, raw: object, path: str, ctx: _Context, *, extra: Collection[str] = ()
) -> tuple[dict[str, Any], dict[str, object]]:
    """Convert one section's map into constructor kwargs for ``cls``.

    Returns the kwargs of the keys that were given (absent keys keep the dataclass default)
    and, separately, the raw values of the ``extra`` keys the caller handles itself.
    """
    mapping = _as_map(raw, path)
    table = _field_table(cls)
    _check_keys(mapping, [*table, *extra], path)
    kwargs: dict[str, Any] = {}
    extras: dict[str, object] = {}
    for key, value in mapping.items():
        if key not in table:
            extras[key] = value
            continue
        attr, tp = table[key]
        sub = _join(path, key)
        normalize = _NORMALIZERS.get((cls, attr))
        converted = _convert(normalize(value) if normalize else value, tp, sub, ctx)
        limits = _RANGES.get((cls, attr))
        if limits is not None and isinstance(converted, int | float):
            limits.check(converted, sub)
        kwargs[attr] = converted
    return kwargs, extras


def _existing_file(value: str, path: str, ctx: _Context) -> str:
    """Resolve a configured file name (``~``, relative to the config file) and require it."""
    if not value.strip():
        raise ConfigError("expected a file name, got an empty string", path=path)
    resolved = ctx.base_dir / Path(value).expanduser()
    if not resolved.is_file():
        raise ConfigError(f"file not found: {resolved}", path=path)
    return str(resolved)


def _tls(raw: object, path: str, ctx: _Context) -> TlsSettings:
    """``communicator.tls``: the files must exist now, not at the first connect attempt."""
    kwargs, _ = _section(TlsSettings, raw, path, ctx)
    for attr in ("ca_file", "cert_file", "key_file"):
        if kwargs.get(attr) is not None:
            kwargs[attr] = _existing_file(
                kwargs[attr], _join(path, _wire_name(TlsSettings, attr)), ctx
            )
    if kwargs.get("key_file") is not None and kwargs.get("cert_file") is None:
        raise ConfigError("needs cert-file as well", path=_join(path, "key-file"))
    return TlsSettings(**kwargs)


def _top_level_keys() -> dict[str, str]:
    """Top-level wire key -> ``Settings`` field."""
    return {
        _SECTION_NAMES.get(f.name, f.name.replace("_", "-")): f.name
        for f in dataclasses.fields(Settings)
    }
