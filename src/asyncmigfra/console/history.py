"""``asyncmigfra history [HOST]``: what the agents did, newest first (protocol §3.15).

With HOST, that agent's ``history`` task; without it, every online agent's (as ``status``
without HOST lists them), merged by when each subtask began, with a HOST column: the
fleet's migration list that Nova's ``migration-list`` or KubeVirt's migration objects give,
surviving agent restarts because each agent keeps it in its journal.

``--since`` takes an ISO 8601 time (``2026-12-07T10:00Z``, a date is midnight UTC) or an
age (``90s``, ``30m``, ``12h``, ``7d``: that long ago); the agent gets it as ISO 8601 UTC.
``--limit`` (1 to 1000, default 100) bounds what each agent sends and what is shown; an
agent whose answer would be larger than its ``limits.max-message-size`` sends fewer, says
so (``more: true``), and the command notes it on stderr.

Shown as a table (rich at a terminal, aligned columns in a pipe: every cell escaped by
:class:`~asyncmigfra.console.output.Out`), or with ``--json`` one JSON line per entry with
its ``host`` added. An agent that answers with an error (no journal: ``not-supported``; a
journal it cannot read: ``unavailable``) is named on stderr and makes the exit code 1; so
does an agent that does not answer. A listing with failed tasks in it is still exit 0:
the command succeeded in showing them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from collections.abc import Mapping
from typing import Any, Final

from asyncmigfra.console.connection import Connection
from asyncmigfra.console.exits import FAILED, OK, USAGE, CliError
from asyncmigfra.console.fleet import ASK_TIMEOUT, ask_agents, online_hosts
from asyncmigfra.console.output import Out, number
from asyncmigfra.console.session import open_session
from asyncmigfra.console.tasks import fresh_id, history_task
from asyncmigfra.model import HISTORY_LIMIT_DEFAULT, HISTORY_LIMIT_MAX
from asyncmigfra.values import INSTANT_EXPECTED, iso_instant, parse_instant

__all__ = ["history", "history_items", "since_argument"]

_AGE: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d|w)")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def since_argument(text: str, *, now: float | None = None) -> str:
    """``--since``: an ISO 8601 time or an age (``30m``) as the ISO 8601 UTC text the agent
    reads. Raises ``ValueError`` with what is expected."""
    age = _AGE.fullmatch(text.strip())
    if age is not None:
        seconds = float(age.group(1)) * _UNIT_SECONDS[age.group(2)]
        moment = (time.time() if now is None else now) - seconds
        return iso_instant(max(0.0, moment))
    value = parse_instant(text.strip())
    if value is None:
        raise ValueError(f"{INSTANT_EXPECTED}, or an age such as 30m, 12h or 7d")
    return iso_instant(value)


def history_items(doc: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], list[str]]:
    """A ``history`` result's items, and its own errors (``code: details``): an error entry
    without ``task`` is the answer's, not a past task's (protocol §3.15)."""
    items: list[Mapping[str, Any]] = []
    errors: list[str] = []
    if doc.get("result") != "history":
        errors.append(f"{_first_error(doc)}")
        return items, errors
    entries = doc.get("list")
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, Mapping):
            continue
        if "task" in entry:
            items.append(entry)
        else:
            errors.append(f"{entry.get('code', 'error')}: {entry.get('details', '')}")
    return items, errors


def _first_error(doc: Mapping[str, Any]) -> str:
    entries = doc.get("list")
    first = entries[0] if isinstance(entries, list) and entries else {}
    if isinstance(first, Mapping):
        return f"{first.get('code', 'error')}: {first.get('details', '')}"
    return f"unexpected answer (result: {doc.get('result')})"


async def history(
    conn: Connection,
    out: Out,
    *,
    host: str | None,
    vm: str | None,
    since: str | None,
    count: int | None,
    limit: float | None,
    force: bool,
) -> int:
    """Show the history of ``host`` (``None``: every online agent), newest first: ``count``
    entries at most (default 100); ``limit``: s to wait for the answers."""
    if count is not None and not 1 <= count <= HISTORY_LIMIT_MAX:
        raise CliError(USAGE, f"--limit: must be between 1 and {HISTORY_LIMIT_MAX}")

    def task(task_id: str) -> bytes:
        return history_task(task_id, vm=vm, since=since, limit=count)

    async with open_session(conn) as session:
        if host is not None:
            await session.subscribe_host(host, events=False)
            await session.check_online(host, force=force)
            task_id = fresh_id("history")
            await session.publish_task(host, task(task_id))
            result = await session.wait_result(host, task_id, limit=limit, cancellable=False)
            hosts = [host]
            answers = {host: result.doc}
        else:
            hosts = online_hosts(await session.gather_presence())
            if not hosts:
                out.note(f"no agent is online on {conn.topic('+', 'status')}")
                return FAILED
            deadline = asyncio.get_running_loop().time() + (limit or ASK_TIMEOUT)
            answers = await ask_agents(
                session, hosts, deadline, task=task, kind="history", what="their history"
            )
    rows: list[tuple[str, Mapping[str, Any]]] = []
    failed = False
    for name in hosts:
        doc = answers.get(name)
        if doc is None:
            out.note(f"{name}: no answer")
            failed = True
            continue
        items, errors = history_items(doc)
        for error in errors:
            out.note(f"{name}: {error}")
            failed = True
        if doc.get("more") is True:
            out.note(
                f"{name}: sent its newest {len(items)} entries, all that fit in one answer;"
                " narrow the query with --vm or --since for older ones"
            )
        rows.extend((name, item) for item in items)
    rows.sort(key=lambda row: str(row[1].get("started", "")), reverse=True)
    rows = rows[: count or HISTORY_LIMIT_DEFAULT]
    _show(out, rows, several=host is None, hosts=hosts)
    return FAILED if failed else OK


def _when(stamp: object) -> str:
    """ISO 8601 UTC as local ``YYYY-MM-DD HH:MM:SS``; unreadable stamps as they are."""
    if not isinstance(stamp, str):
        return "?"
    try:
        moment = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except (ValueError, OverflowError):
        return stamp


def _duration(value: object) -> str:
    n = number(value)
    return "-" if n is None else f"{n:.1f} s" if n < 600 else f"{n / 60:.1f} min"


def _downtime(value: object) -> str:
    n = number(value)
    return "-" if n is None else f"{n:g} ms"


def _show(
    out: Out, rows: list[tuple[str, Mapping[str, Any]]], *, several: bool, hosts: list[str]
) -> None:
    if out.json:
        for name, item in rows:
            out.json_line({"host": name, **item})
        return
    if not rows:
        out.note(f"no history on {', '.join(hosts)} for this query")
        return
    columns = ["STARTED", *(["HOST"] if several else []), "ID", "TASK", "VM", "STATUS"]
    columns += ["DURATION", "DOWNTIME", "DESTINATION", "CODE"]
    table = []
    for name, item in rows:
        table.append(
            [
                _when(item.get("started")),
                *([name] if several else []),
                str(item.get("id", "-")),
                str(item.get("task", "?")),
                str(item.get("vm-name", "?")),
                str(item.get("status", "?")),
                _duration(item.get("duration")),
                _downtime(item.get("downtime")),
                str(item.get("destination", "-")),
                str(item.get("code", "-")),
            ]
        )
    status_column = 5 if several else 4
    out.table(
        columns,
        table,
        title=f"History ({len(rows)}, newest first)" if out.tty else None,
        styles={status_column: {"success": "green", "error": "red"}},
    )
    if out.tty:  # why each failed (a pipe gets the table only; --json has the details)
        for name, item in rows:
            if item.get("status") == "error" and item.get("details"):
                who = f"{name} " if several else ""
                text = f"  {who}{item.get('id', '-')} {item.get('vm-name')}: {item['details']}"
                out.line(text, "red")
