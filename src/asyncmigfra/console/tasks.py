"""Task payloads for the shortcut commands, ids for ``send``, and how a result is judged.

Pure functions, no I/O. Payloads are written as YAML text by hand, not dumped from a dict:
values are JSON-quoted strings (a JSON string is a valid YAML double-quoted scalar, so a VM
named ``on`` or ``0012`` stays a string for the agent's yaml-cpp rules) and plain integers.

``send`` must not rewrite the user's file (comments, ``0x`` numbers, yaml-cpp's octal ``010``
would all change meaning through a load/dump round trip), so a missing id is *inserted* as
the first key of the top-level map — the first occurrence of a key wins (protocol §2.1), so
it also overrides an empty ``id: ""`` — and the agent's own parser then confirms that the
agent will read exactly that id. Without a readable id the result could not be correlated.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from asyncmigfra.console.exits import USAGE, CliError
from asyncmigfra.errors import TaskRejected
from asyncmigfra.parsing import parse_task

__all__ = [
    "cancel_task",
    "ensure_id",
    "evacuate_task",
    "failures",
    "fresh_id",
    "list_task",
    "migrate_task",
    "start_task",
    "status_task",
    "succeeded",
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


def cancel_task(task_id: str, target: str) -> bytes:
    return _finish([*_header("cancel", task_id), f"target: {_q(target)}"])


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


def _parameters(params: Mapping[str, object]) -> list[str]:
    lines = []
    for key, value in params.items():
        if value is None or value is False:
            continue
        if value is True:
            text = "true"
        elif isinstance(value, float):
            text = _seconds(value)
        elif isinstance(value, int):
            text = str(value)
        else:
            text = _q(str(value))
        lines.append(f"  {key}: {text}")
    return ["parameter:", *lines] if lines else []


def migrate_task(task_id: str, vm: str, destination: str, params: Mapping[str, object]) -> bytes:
    """``migrate vm`` with ``time-measurement: true`` (the summary shows the agent's timings
    and the measured downtime) and the given ``parameter`` keys (``None``/``False`` left out,
    so the agent's configured defaults apply)."""
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


# -------------------------------------------------------------------------------- send


def _agent_id(payload: bytes) -> tuple[str | None, TaskRejected | None]:
    """The id the agent will read from ``payload`` (and its rejection, if it rejects it)."""
    try:
        return parse_task(payload).id, None
    except TaskRejected as exc:
        return exc.task_id, exc


def _insert_id(text: str, task_id: str) -> str:
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        s = lines[i].strip()
        if not s or s.startswith(("#", "%", "--- #")) or s == "---":
            i += 1
            continue
        break
    head, rest = "".join(lines[:i]), "".join(lines[i:])
    if head and not head.endswith("\n"):
        head += "\n"
    stripped = rest.lstrip()
    if stripped.startswith("{"):  # a flow map: the id becomes its first key
        at = len(rest) - len(stripped) + 1
        return f"{head}{rest[:at]}id: {_q(task_id)}, {rest[at:]}"
    indent = rest[: len(rest) - len(rest.lstrip(" "))]
    return f"{head}{indent}id: {_q(task_id)}\n{rest}"


def ensure_id(payload: bytes) -> tuple[bytes, str, bool]:
    """(payload to publish, its id, whether the id was added).

    A task that already has an id is sent unchanged. Otherwise a fresh id is inserted and
    the agent's parser must read it back. Raises :class:`CliError` (usage) when no id can be
    read, since the agent's answer could then not be told apart from others: the message of
    the agent's parser says why (for example a YAML syntax error).
    """
    task_id, rejected = _agent_id(payload)
    if task_id:
        return payload, task_id, False
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise CliError(USAGE, "the task file is not UTF-8") from None
    new_id = fresh_id("send")
    changed = _insert_id(text, new_id).encode()
    task_id, rejected = _agent_id(changed)
    if task_id != new_id:
        why = rejected.details if rejected is not None else "the id was not read back"
        raise CliError(USAGE, f"cannot give this task an id the agent would read: {why}")
    return changed, new_id, True


# -------------------------------------------------------------------------------- results


def _entries(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    if "list" in doc:
        items = doc.get("list") or []
        return [e for e in items if isinstance(e, Mapping)] if isinstance(items, list) else []
    return [doc]


def succeeded(doc: Mapping[str, Any]) -> bool:
    """Every entry has ``status: success`` (an empty ``list: []`` is a success, e.g. an
    evacuation of an empty host); ``result: unknown`` never is."""
    if doc.get("result") == "unknown":
        return False
    return all(e.get("status") == "success" for e in _entries(doc))


def failures(doc: Mapping[str, Any]) -> list[str]:
    """``vm: code: details`` for every failed entry, for people."""
    out = []
    for e in _entries(doc):
        if e.get("status") != "success":
            out.append(f"{e.get('vm-name', '?')}: {e.get('code', 'error')}: {e.get('details', '')}")
    return out
