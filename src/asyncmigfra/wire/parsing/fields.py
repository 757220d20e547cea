"""Field conversion with yaml-cpp's scalar rules, and the checks on names, hosts and ids.

``_Fields`` reads one task map's keys; every bad value becomes a bad-conversion
:class:`~asyncmigfra.errors.TaskRejected` naming its path.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NoReturn, TypedDict, TypeVar

from asyncmigfra.errors import TaskRejected
from asyncmigfra.model import (
    PciAddress,
    PscomProcs,
    VcpuMap,
)
from asyncmigfra.values import BOOL_EXPECTED, INSTANT_EXPECTED, parse_bool, parse_instant
from asyncmigfra.wire.parsing.names import (
    _DISK_TARGET_EXPECTED,
    _DRIVER,
    _HOST,
    _UNSAFE,
    _VM_NAME_EXPECTED,
    MAX_MIGRATE_DISKS,
    TRANSPORTS,
    valid_disk_target,
    valid_vm_name,
)
from asyncmigfra.wire.parsing.nodes import _INVALID, _PARSE_PREFIX, _Map, _Node, _Scalar, _Seq

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


def _convert_disk_targets(ctx: _Ctx, node: _Node, path: str) -> tuple[str, ...]:
    """``migrate-disks``: a sequence of distinct target devs, at most
    :data:`~asyncmigfra.wire.parsing.names.MAX_MIGRATE_DISKS` of them."""
    if not isinstance(node, _Seq):
        ctx.bad(path, "expected a sequence of disk targets such as [vda, vdb]", node)
    if len(node.items) > MAX_MIGRATE_DISKS:
        ctx.bad(
            path,
            f"expected at most {MAX_MIGRATE_DISKS} disk targets ({len(node.items)} given)",
            node,
        )
    seen: dict[str, int] = {}
    for i, item in enumerate(node.items):
        text = _scalar_text(ctx, item, f"{path}[{i}]", _DISK_TARGET_EXPECTED)
        if not valid_disk_target(text):
            ctx.bad(f"{path}[{i}]", _DISK_TARGET_EXPECTED, item)
        if text in seen:
            ctx.bad(f"{path}[{i}]", f"expected each disk once (also item {seen[text]})", item)
        seen[text] = i
    return tuple(seen)


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


def _convert_instant(ctx: _Ctx, node: _Node, path: str) -> float:
    """An ISO 8601 point in time (:func:`~asyncmigfra.values.parse_instant`): s since the
    epoch."""
    text = _scalar_text(ctx, node, path, INSTANT_EXPECTED)
    value = parse_instant(text)
    if value is None:
        ctx.bad(path, INSTANT_EXPECTED, node)
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

    def instant(self, key: str) -> float | None:
        return self._opt(key, _convert_instant)

    def disk_targets(self, key: str) -> tuple[str, ...] | None:
        return self._opt(key, _convert_disk_targets)

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
