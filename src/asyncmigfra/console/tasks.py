"""Task payloads for the shortcut commands, fresh ids, and how a result is judged.

Pure functions, no I/O. Payloads are written as YAML text by hand, not dumped from a dict:
values are JSON-quoted strings (a JSON string is a valid YAML double-quoted scalar, so a VM
named ``on`` or ``0012`` stays a string for the agent's yaml-cpp rules) and plain integers.
(``send``'s task files: :mod:`asyncmigfra.console.taskfile`.)
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "cancel_task",
    "evacuate_task",
    "failures",
    "fresh_id",
    "history_task",
    "list_task",
    "migrate_task",
    "repin_task",
    "start_task",
    "status_task",
    "succeeded",
    "tune_task",
]


def fresh_id(kind: str) -> str:
    """``<kind>-<10 hex>``: starts with a letter, so agents publish it unquoted."""
    return f"{kind}-{uuid.uuid4().hex[:10]}"


def _q(text: str) -> str:
    return json.dumps(text)


def _seconds(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def _header(task: str, task_id: str) -> list[str]:
    return ["---", f"task: {task}", f"id: {_q(task_id)}"]


def _finish(lines: list[str]) -> bytes:
    return ("\n".join([*lines, "..."]) + "\n").encode()


def status_task(task_id: str) -> bytes:
    return _finish(_header("status", task_id))


def history_task(
    task_id: str, *, vm: str | None = None, since: str | None = None, limit: int | None = None
) -> bytes:
    """``history``: ``since`` is ISO 8601 text as the agent reads it."""
    lines = _header("history", task_id)
    if vm is not None:
        lines.append(f"vm-name: {_q(vm)}")
    if since is not None:
        lines.append(f"since: {_q(since)}")
    if limit is not None:
        lines.append(f"limit: {int(limit)}")
    return _finish(lines)


def cancel_task(task_id: str, target: str) -> bytes:
    return _finish([*_header("cancel", task_id), f"target: {_q(target)}"])


def tune_task(
    task_id: str,
    target: str,
    *,
    vm: str | None = None,
    bandwidth: int | None = None,
    max_downtime: int | None = None,
    post_copy: bool = False,
    force_complete: bool = False,
) -> bytes:
    """``tune migration`` of the task ``target`` (``vm``: only that VM of it)."""
    lines = [*_header("tune migration", task_id), f"target: {_q(target)}"]
    if vm is not None:
        lines.append(f"vm-name: {_q(vm)}")
    if bandwidth is not None:
        lines.append(f"bandwidth: {int(bandwidth)}")
    if max_downtime is not None:
        lines.append(f"max-downtime: {int(max_downtime)}")
    if post_copy:
        lines.append("post-copy: true")
    if force_complete:
        lines.append("force-complete: true")
    return _finish(lines)


def list_task(task: str, task_id: str, vms: Sequence[str], **flags: bool) -> bytes:
    """``stop vm``, ``suspend vm``, ``resume vm``: one ``list`` item per VM, with ``flags``
    (``force``, ``undefine``: Python names with ``_`` for ``-``) set on each item when true."""
    lines = [*_header(task, task_id), "list:"]
    for vm in vms:
        lines.append(f"  - vm-name: {_q(vm)}")
        lines.extend(f"    {k.replace('_', '-')}: true" for k, v in flags.items() if v)
    return _finish(lines)


def start_task(task_id: str, vms: Sequence[str], xmls: Sequence[str], *, probe: bool) -> bytes:
    """``start vm``: one ``vm-configurations`` item per VM name and per XML text."""
    lines = [*_header("start vm", task_id), "vm-configurations:"]
    items = [f"  - vm-name: {_q(vm)}" for vm in vms] + [f"  - xml: {_q(x)}" for x in xmls]
    for item in items:
        lines.append(item)
        if not probe:
            lines.append("    probe-with-ssh: false")
    return _finish(lines)


def _scalar(value: object) -> str:
    if value is True:
        return "true"
    if isinstance(value, list | tuple):  # (migrate-disks: a flow sequence)
        return "[" + ", ".join(_scalar(item) for item in value) + "]"
    if isinstance(value, float):
        return _seconds(value)
    if isinstance(value, int):
        return str(value)
    return _q(str(value))


def _map_lines(params: Mapping[str, object], indent: int) -> list[str]:
    """``key: value`` lines at ``indent``; a nested map (``swap-with``) becomes a block map
    one level deeper, left out when all its values are left out."""
    pad = " " * indent
    lines = []
    for key, value in params.items():
        if value is None or value is False:
            continue
        if isinstance(value, Mapping):
            inner = _map_lines(value, indent + 2)
            if inner:
                lines.extend([f"{pad}{key}:", *inner])
            continue
        lines.append(f"{pad}{key}: {_scalar(value)}")
    return lines


def _parameters(params: Mapping[str, object]) -> list[str]:
    lines = _map_lines(params, 2)
    return ["parameter:", *lines] if lines else []


def migrate_task(task_id: str, vm: str, destination: str, params: Mapping[str, object]) -> bytes:
    """``migrate vm`` with ``time-measurement: true`` (the summary shows the agent's timings
    and the measured downtime) and the given ``parameter`` keys (``None``/``False`` left out,
    so the agent's configured defaults apply; a map value such as ``swap-with: {vm-name: ...}``
    is written as a nested block map)."""
    lines = [
        *_header("migrate vm", task_id),
        f"vm-name: {_q(vm)}",
        f"destination: {_q(destination)}",
        "time-measurement: true",
        *_parameters(params),
    ]
    return _finish(lines)


def evacuate_task(task_id: str, destinations: Sequence[str], params: Mapping[str, object]) -> bytes:
    lines = [
        *_header("evacuate node", task_id),
        "time-measurement: true",
        "destinations: [" + ", ".join(_q(d) for d in destinations) + "]",
        *_parameters(params),
    ]
    return _finish(lines)


def repin_task(task_id: str, vm: str, vcpu_map: Sequence[Sequence[int]]) -> bytes:
    """``repin vm``: entry *i* of ``vcpu_map`` is the host CPUs vCPU *i* may run on."""
    rows = ", ".join("[" + ", ".join(str(cpu) for cpu in row) + "]" for row in vcpu_map)
    return _finish([*_header("repin vm", task_id), f"vm-name: {_q(vm)}", f"vcpu-map: [{rows}]"])


# -------------------------------------------------------------------------------- results


def _entries(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    if "list" in doc:
        items = doc.get("list") or []
        return [e for e in items if isinstance(e, Mapping)] if isinstance(items, list) else []
    return [doc]


def succeeded(doc: Mapping[str, Any]) -> bool:
    """Every entry has ``status: success`` (an empty ``list: []`` is a success, e.g. an
    evacuation of an empty host); ``result: unknown`` never is. A swap's ``swap-with`` map
    must say ``success`` too (the agent already sets the top-level ``status: error`` when
    either half failed; this does not rely on it)."""
    if doc.get("result") == "unknown":
        return False
    swap = doc.get("swap-with")
    if isinstance(swap, Mapping) and swap.get("status") != "success":
        return False
    return all(e.get("status") == "success" for e in _entries(doc))


def failures(doc: Mapping[str, Any]) -> list[str]:
    """``vm: code: details`` for every failed entry (and a swap's failed ``swap-with``
    half), for people."""
    out = []
    swap = doc.get("swap-with")
    halves = [swap] if isinstance(swap, Mapping) else []
    for e in [*_entries(doc), *halves]:
        if e.get("status") != "success":
            out.append(f"{e.get('vm-name', '?')}: {e.get('code', 'error')}: {e.get('details', '')}")
    return out
