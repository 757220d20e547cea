"""The client commands. Each takes resolved options and returns an exit code
(:mod:`asyncmigfra.console.exits`); failures that end a command early raise
:class:`~asyncmigfra.console.exits.CliError`, which ``asyncmigfra.cli`` prints.

Every command that addresses one agent follows the checklist for scheduler authors
(protocol §10): subscribe to the host's result (and event) topics *before* publishing,
give the task a unique id, publish with QoS 2, correlate the result by id, and watch the
retained presence so a dead agent is reported instead of waited for forever.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from asyncmigfra.console.connection import Connection
from asyncmigfra.console.exits import FAILED, OK, USAGE, CliError
from asyncmigfra.console.follow import MigrationView, follow_migration
from asyncmigfra.console.output import Out, fmt_bytes, number
from asyncmigfra.console.session import Interrupt, Lost, Message, Session, open_session
from asyncmigfra.console.tasks import (
    cancel_task,
    ensure_id,
    evacuate_task,
    fresh_id,
    list_task,
    migrate_task,
    start_task,
    status_task,
    succeeded,
)

__all__ = [
    "read_task_file",
    "read_xml_files",
    "cancel",
    "evacuate",
    "migrate",
    "send",
    "start",
    "status",
    "stop",
    "suspend_resume",
    "watch",
]


# ------------------------------------------------------------------------------ plumbing


def _show_result(out: Out, result: Message) -> int:
    """The result as received (YAML), or as one JSON line; the exit code it implies."""
    if out.json:
        out.json_line(result.doc)
    else:
        out.raw(result.raw)
    return OK if succeeded(result.doc) else FAILED


async def _announce(session: Session, out: Out, host: str, *, force: bool) -> None:
    presence = await session.check_online(host, force=force)
    state = None if presence is None else presence.get("state")
    if state == "draining":
        out.note(f"note: {host} is draining (shutting down); it answers new tasks with busy")
    elif state != "online":
        out.note(
            f"note: {host} is {state or 'unknown'}; the task waits in its session until it"
            " connects (Ctrl-C stops waiting, the task stays queued)"
        )


async def _request(
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
        await _announce(session, out, host, force=force)
        await session.publish_task(host, payload)
        result = await session.wait_result(host, task_id, limit=limit)
    return _show_result(out, result)


# ------------------------------------------------------------------------------ inputs


def read_task_file(path: str) -> bytes:
    """The task file's bytes (``-``: stdin), read before connecting: a typo is a usage error."""
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise CliError(USAGE, f"cannot read the task file: {exc}") from None


def read_xml_files(paths: Sequence[str]) -> list[str]:
    texts = []
    for path in paths:
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(USAGE, f"--xml: {exc}") from None
    return texts


# ------------------------------------------------------------------------------ commands


async def send(
    conn: Connection, out: Out, *, payload: bytes, host: str, limit: float | None, force: bool
) -> int:
    """Publish a task file as it is (a fresh id only when it has none) and print its result."""
    payload, task_id, added = ensure_id(payload)
    if added:
        out.note(f"task id: {task_id}")
    return await _request(conn, out, host, payload, task_id, limit=limit, force=force)


async def migrate(
    conn: Connection,
    out: Out,
    *,
    vm: str,
    source: str,
    destination: str,
    params: Mapping[str, object],
    follow: bool,
    limit: float | None,
    force: bool,
    swap_with: str | None = None,
) -> int:
    """``migrate vm`` on ``source``; with ``follow`` the live view, Ctrl-C and a summary.

    ``swap_with``: a VM on ``destination`` that comes to ``source`` meanwhile
    (``parameter.swap-with``); the view then shows both VMs and the summary both outcomes."""
    if swap_with is not None:
        if swap_with == vm:
            raise CliError(USAGE, f"--swap-with: {vm!r} cannot swap with itself")
        params = {**params, "swap-with": {"vm-name": swap_with}}
    task_id = fresh_id("migrate")
    payload = migrate_task(task_id, vm, destination, params)
    if not follow:
        out.note(f"task id: {task_id}")
        return await _request(conn, out, source, payload, task_id, limit=limit, force=force)
    mtype = params.get("migration-type")
    view = MigrationView(
        vm=vm,
        source=source,
        destination=destination,
        task_id=task_id,
        migration_type=None if mtype is None else str(mtype),
        swap_with=swap_with,
        max_downtime=params.get("max-downtime"),
    )
    async with open_session(conn) as session:
        await session.subscribe_host(source)
        await _announce(session, out, source, force=force)
        await session.publish_task(source, payload)
        view.started = time.monotonic()
        result = await follow_migration(session, out, view, limit=limit)
    wall = view.elapsed
    if out.json:
        out.json_line(result.doc)
    else:
        for text, style in view.summary(result.doc, wall):
            out.line(text, style)
    return OK if view.ok(result.doc) else FAILED


async def start(
    conn: Connection,
    out: Out,
    *,
    vms: Sequence[str],
    xmls: Sequence[str],
    probe: bool,
    host: str,
    limit: float | None,
    force: bool,
) -> int:
    if not vms and not xmls:
        raise CliError(USAGE, "start: name at least one VM or give --xml FILE")
    task_id = fresh_id("start")
    payload = start_task(task_id, vms, xmls, probe=probe)
    return await _request(conn, out, host, payload, task_id, limit=limit, force=force)


async def stop(
    conn: Connection,
    out: Out,
    *,
    vms: Sequence[str],
    host: str,
    flags: Mapping[str, bool],
    limit: float | None,
    force: bool,
) -> int:
    task_id = fresh_id("stop")
    payload = list_task("stop vm", task_id, vms, **flags)
    return await _request(conn, out, host, payload, task_id, limit=limit, force=force)


async def suspend_resume(
    conn: Connection,
    out: Out,
    *,
    task: str,
    vms: Sequence[str],
    host: str,
    limit: float | None,
    force: bool,
) -> int:
    task_id = fresh_id(task.split(maxsplit=1)[0])
    payload = list_task(task, task_id, vms)
    return await _request(conn, out, host, payload, task_id, limit=limit, force=force)


async def cancel(
    conn: Connection, out: Out, *, target: str, host: str, limit: float | None, force: bool
) -> int:
    task_id = fresh_id("cancel")
    payload = cancel_task(task_id, target)
    return await _request(conn, out, host, payload, task_id, limit=limit, force=force)


async def evacuate(
    conn: Connection,
    out: Out,
    *,
    host: str,
    destinations: Sequence[str],
    params: Mapping[str, object],
    limit: float | None,
    force: bool,
    follow: bool = False,
) -> int:
    task_id = fresh_id("evacuate")
    payload = evacuate_task(task_id, destinations, params)
    if not follow:
        out.note(f"task id: {task_id}")
        return await _request(conn, out, host, payload, task_id, limit=limit, force=force)
    from asyncmigfra.console.evacuation import EvacuationView  # noqa: PLC0415

    view = EvacuationView(host, destinations, task_id, max_downtime=params.get("max-downtime"))
    async with open_session(conn) as session:
        await session.subscribe_host(host)
        await _announce(session, out, host, force=force)
        await session.publish_task(host, payload)
        view.started = time.monotonic()
        result = await follow_migration(session, out, view, limit=limit)
    if out.json:
        out.json_line(result.doc)
    else:
        for text, style in view.summary(result.doc, view.elapsed):
            out.line(text, style)
    return OK if view.ok(result.doc) else FAILED


async def status(
    conn: Connection, out: Out, *, host: str | None, limit: float | None, force: bool
) -> int:
    """Without ``host``: the retained presence of every agent. With it: also its ``status``
    task result (running tasks, domains)."""
    if host is None:
        async with open_session(conn) as session:
            agents = await session.gather_presence()
        _show_agents(out, conn, agents)
        return OK
    task_id = fresh_id("status")
    async with open_session(conn) as session:
        await session.subscribe_host(host, events=False)
        await session.check_online(host, force=force)
        await session.publish_task(host, status_task(task_id))
        result = await session.wait_result(host, task_id, limit=limit)
        presence = session.presence.get(host, {})
    if out.json:
        out.json_line(result.doc)
    else:
        _show_host(out, host, result.doc, presence)
    return OK if succeeded(result.doc) else FAILED


async def watch(
    conn: Connection, out: Out, *, host: str | None, vm: str | None, task_id: str | None
) -> int:
    """Events across the cluster (or of one host), filtered, until Ctrl-C (exit 0)."""
    topic = conn.topic(host or "+", "event")
    async with open_session(conn) as session:
        await session.subscribe(topic)
        out.note(f"watching {topic} (Ctrl-C ends)")
        while True:
            item = await session.get()
            if isinstance(item, Interrupt):
                return OK
            if isinstance(item, Lost):
                raise session.lost(item)
            if item.kind != "event" or not _matches(item.doc, vm=vm, task_id=task_id):
                continue
            if out.json:
                out.json_line(item.doc)
            else:
                out.event(item.host, item.doc)


# ------------------------------------------------------------------------------ rendering


def _matches(doc: Mapping[str, Any], *, vm: str | None, task_id: str | None) -> bool:
    if task_id is not None and str(doc.get("id")) != task_id:
        return False
    if vm is None:
        return True
    names = doc.get("vm-names")
    return str(doc.get("vm-name")) == vm or (isinstance(names, list) and vm in map(str, names))


def _show_agents(out: Out, conn: Connection, agents: Mapping[str, Mapping[str, Any]]) -> None:
    hosts = sorted(agents)
    if out.json:
        for host in hosts:
            out.json_line({"host": host, **agents[host]})
        return
    if not hosts:
        out.note(f"no agent has a retained status on {conn.topic('+', 'status')}")
        return
    rows = [
        [
            str(agents[h].get("host", h)),
            str(agents[h].get("state", "?")),
            str(agents[h].get("version", "?")),
            str(agents[h].get("hypervisor", "?")),
            str(agents[h].get("tasks", "?")),
            str(agents[h].get("since", "?")),
        ]
        for h in hosts
    ]
    out.table(
        ["HOST", "STATE", "VERSION", "HYPERVISOR", "TASKS", "SINCE"],
        rows,
        title=f"Agents on {conn.where} ({conn.topic('+', 'status')})" if out.tty else None,
        styles={1: out.state_styles()},
    )


def _maps(value: object) -> list[Mapping[str, Any]]:
    """The maps of a list from the wire (anything else: none)."""
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _seconds(value: object) -> str:
    n = number(value)
    return "?" if n is None else f"{n:.1f} s"


def _show_host(out: Out, host: str, doc: Mapping[str, Any], presence: Mapping[str, Any]) -> None:
    uptime = number(doc.get("uptime"))
    up = "" if uptime is None else f"  up {uptime:.1f} s"
    since = f" (since {presence['since']})" if "since" in presence else ""
    out.line(
        f"{doc.get('host', host)}: {doc.get('state', '?')}  asyncmigfra {doc.get('version', '?')}"
        f"  hypervisor {doc.get('hypervisor', '?')}{up}{since}",
        "bold",
    )
    tasks = _maps(doc.get("tasks"))
    if tasks:
        out.table(
            ["ID", "TASK", "VM", "PHASE", "ELAPSED"],
            [
                [
                    str(t.get("id", "-")),
                    str(t.get("task", "?")),
                    str(t.get("vm-name", "-")),
                    str(t.get("phase", "?")),
                    _seconds(t.get("elapsed")),
                ]
                for t in tasks
            ],
            title=f"Tasks ({len(tasks)})",
        )
    else:
        out.line("Tasks: none queued or running")
    entries = _maps(doc.get("list"))
    errors = [e for e in entries if e.get("status") != "success"]
    domains = [e for e in entries if e.get("status") == "success"]
    for e in errors:
        out.line(f"cannot list domains: {e.get('code', '?')}: {e.get('details', '')}", "red")
    if domains:
        out.table(
            ["VM", "STATE", "VCPUS", "MEMORY"],
            [
                [
                    str(e.get("vm-name", "?")),
                    str(e.get("state", "?")),
                    str(e.get("vcpus", "?")),
                    fmt_bytes(e["memory"] * 1024) if isinstance(e.get("memory"), int) else "?",
                ]
                for e in domains
            ],
            title=f"Domains ({len(domains)})",
            styles={1: {"running": "green", "paused": "yellow", "shutoff": "dim"}},
        )
    elif not errors:
        out.line("Domains: none")
