"""``asyncmigfra plan VM --to B`` and ``asyncmigfra plan evacuate HOST --to B``: ask an agent
what a migration or an evacuation would do (``plan migration``/``plan evacuation``, issue 18)
and print its answer as a table, the blockers under it. Every wire value is escaped
(``Out.table``, ``Out.line``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from asyncmigfra.console.connection import Connection
from asyncmigfra.console.exits import FAILED, OK, USAGE, CliError
from asyncmigfra.console.fleet import locate_vm
from asyncmigfra.console.output import Out, fmt_bytes, fmt_rate, number
from asyncmigfra.console.session import open_session
from asyncmigfra.console.tasks import evacuate_task, fresh_id, migrate_task, succeeded

__all__ = ["plan_evacuation", "plan_migration", "show_plan"]


async def plan_migration(
    conn: Connection,
    out: Out,
    *,
    vm: str,
    source: str | None,
    destination: str,
    params: Mapping[str, object],
    limit: float | None,
    force: bool,
) -> int:
    """``plan migration`` of ``vm`` (on ``source``, else the one online agent that has it)."""
    if source == destination:
        raise CliError(USAGE, f"plan: {vm} cannot move from {source} to itself (--to {source})")
    if source is None:
        source = await locate_vm(conn, out, vm, destination=destination, limit=limit)
    task_id = fresh_id("plan")
    payload = migrate_task(task_id, vm, destination, params).replace(
        b"task: migrate vm", b"task: plan migration", 1
    )
    return await _ask(conn, out, source, payload, task_id, limit=limit, force=force)


async def plan_evacuation(
    conn: Connection,
    out: Out,
    *,
    host: str,
    destinations: Sequence[str],
    params: Mapping[str, object],
    limit: float | None,
    force: bool,
) -> int:
    """``plan evacuation`` of ``host`` onto ``destinations``."""
    task_id = fresh_id("plan")
    payload = evacuate_task(task_id, destinations, params).replace(
        b"task: evacuate node", b"task: plan evacuation", 1
    )
    return await _ask(conn, out, host, payload, task_id, limit=limit, force=force)


async def _ask(
    conn: Connection,
    out: Out,
    host: str,
    payload: bytes,
    task_id: str,
    *,
    limit: float | None,
    force: bool,
) -> int:
    async with open_session(conn) as session:
        await session.subscribe_host(host, events=False)
        presence = await session.check_online(host, force=force)
        if presence is None or presence.get("state") != "online":
            state = "unknown" if presence is None else presence.get("state", "unknown")
            out.note(f"note: {host} is {state}; the plan waits in its session until it connects")
        await session.publish_task(host, payload)
        result = await session.wait_result(host, task_id, limit=limit, cancellable=False)
    if out.json:
        out.json_line(result.doc)
    else:
        show_plan(out, result.doc, host=host)
    return OK if succeeded(result.doc) else FAILED


_COLUMNS = (
    "VM",
    "TO",
    "MODE",
    "CONVERGES",
    "DURATION",
    "DOWNTIME",
    "PASSES",
    "MEMORY",
    "DISK",
    "DIRTY",
    "LINK",
)


def show_plan(out: Out, doc: Mapping[str, Any], *, host: str) -> None:
    """The ``plan`` result as a table (a ``WAVE`` column for an evacuation), then each VM's
    blockers or notes, then anything that was not a plan (``result: unknown``) as it came."""
    entries = doc.get("list")
    if doc.get("result") != "plan" or not isinstance(entries, list):
        out.line(f"{host} answered {doc.get('result')!s}: {doc.get('list')!s}")
        return
    items = [e for e in entries if isinstance(e, Mapping)]
    waves = any("wave" in e for e in items)
    columns = [*_COLUMNS, "WAVE"] if waves else list(_COLUMNS)
    rows = []
    for e in items:
        row = [
            str(e.get("vm-name", "?")),
            str(e.get("destination", "-")),
            str(e.get("mode", "-")),
            _yes_no(e),
            _seconds(e.get("predicted-duration")),
            _ms(e.get("predicted-downtime")),
            str(e.get("passes", "-")),
            fmt_bytes(e.get("memory")),
            fmt_bytes(e.get("disk")),
            fmt_rate(e.get("dirty-rate")) if "dirty-rate" in e else "unknown",
            fmt_rate(e.get("transfer-rate")),
        ]
        if waves:
            row.append(str(e.get("wave", "-")))
        rows.append(row)
    if not rows:
        out.line(f"{host} has no active VM to plan for")
        return
    out.table(columns, rows, title=f"Plan from {host}" if out.tty else None)
    for e in items:
        name = str(e.get("vm-name", "?"))
        blockers = e.get("blockers")
        if e.get("status") == "error":
            out.line(f"{name}: {e.get('code', 'error')!s}")
            texts = blockers if isinstance(blockers, list) and blockers else [e.get("details")]
            for text in texts:
                out.line(f"  - {text!s}")
        elif e.get("details"):
            out.line(f"{name}: note: {e.get('details')!s}")


def _yes_no(entry: Mapping[str, Any]) -> str:
    value = entry.get("converges")
    if value is True:
        return "yes"
    if value is False:
        return "NO"
    return "?"


def _seconds(value: object) -> str:
    n = number(value)
    return "-" if n is None else f"{n:.1f} s"


def _ms(value: object) -> str:
    n = number(value)
    return "-" if n is None else f"{n:.0f} ms"
