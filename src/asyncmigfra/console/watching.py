"""``watch``: a live stream of what the agents publish — events, results and presence
changes — filtered by host, VM or task id, until Ctrl-C.

Retained presence messages (delivered because we subscribed) are the state before we came,
not something that happened: only changes are shown. Every line goes through
:class:`~asyncmigfra.console.output.Out`, which escapes each field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from asyncmigfra.console.connection import Connection, TopicKind
from asyncmigfra.console.exits import OK
from asyncmigfra.console.output import Out
from asyncmigfra.console.session import Interrupt, Lost, open_session

__all__ = ["watch"]


def _vm_names(doc: Mapping[str, Any]) -> list[str]:
    names = [doc["vm-name"]] if "vm-name" in doc else []
    for key in ("vm-names", "list"):
        value = doc.get(key)
        if isinstance(value, list):
            names.extend(v.get("vm-name") if isinstance(v, Mapping) else v for v in value)
    return [str(n) for n in names if n is not None]


def _matches(doc: Mapping[str, Any], *, vm: str | None, task_id: str | None) -> bool:
    if task_id is not None and str(doc.get("id")) != task_id:
        return False
    return vm is None or vm in _vm_names(doc)


async def watch(
    conn: Connection, out: Out, *, host: str | None, vm: str | None, task_id: str | None
) -> int:
    """Events, results and presence changes across the cluster (or of one host), filtered,
    until Ctrl-C (exit 0). ``vm`` and ``task_id`` filter events and results; presence
    changes of the watched hosts are always shown (an agent going away matters to every
    task it runs)."""
    kinds: tuple[TopicKind, ...] = ("event", "result", "status")
    async with open_session(conn) as session:
        for kind in kinds:
            await session.subscribe(conn.topic(host or "+", kind))
        out.note(
            f"watching {conn.topic(host or '+', 'event')} (Ctrl-C ends),"
            " with the results and presence changes"
        )
        while True:
            item = await session.get()
            if isinstance(item, Interrupt):
                return OK
            if isinstance(item, Lost):
                raise session.lost(item)
            if item.kind == "status":
                if item.retained:
                    continue
            elif item.kind not in kinds or not _matches(item.doc, vm=vm, task_id=task_id):
                continue
            if out.json:
                out.json_line(item.doc)
            elif item.kind == "event":
                out.event(item.host, item.doc)
            elif item.kind == "result":
                out.result(item.host, item.doc)
            else:
                out.presence(item.host, item.doc)
