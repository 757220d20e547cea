"""The client commands. Each takes resolved options and returns an exit code
(:mod:`asyncmigfra.console.exits`); failures that end a command early raise
:class:`~asyncmigfra.console.exits.CliError`, which ``asyncmigfra.cli`` prints.

Every command that addresses one agent follows the checklist for scheduler authors
(protocol §10): subscribe to the host's result (and event) topics *before* publishing,
give the task a unique id, publish with QoS 2, correlate the result by id, and watch the
retained presence so a dead agent is reported instead of waited for forever.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncmigfra.console.connection import Connection
from asyncmigfra.console.evacuation import EvacuationView
from asyncmigfra.console.exits import FAILED, OK, USAGE, CliError
from asyncmigfra.console.fleet import locate_vm
from asyncmigfra.console.follow import MigrationView, follow_migration
from asyncmigfra.console.output import Out, fmt_bytes, number
from asyncmigfra.console.session import Message, Session, open_session
from asyncmigfra.console.taskfile import TaskFile, read_task_file
from asyncmigfra.console.tasks import (
    cancel_task,
    evacuate_task,
    fresh_id,
    list_task,
    migrate_task,
    repin_task,
    start_task,
    status_task,
    succeeded,
    tune_task,
)
from asyncmigfra.console.watching import watch

__all__ = [
    "read_task_file",
    "read_xml_files",
    "cancel",
    "evacuate",
    "migrate",
    "repin",
    "send",
    "start",
    "status",
    "stop",
    "suspend_resume",
    "tune",
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


#: Tasks that cannot be cancelled (answered at once): no cancel hint for them.
_NOT_CANCELLABLE = frozenset({"status", "cancel", "quit", "tune migration", "history"})
#: Tasks answered without events (no ``accepted``): no duplicate note for them.
_WITHOUT_EVENTS = frozenset({"status", "history"})


@dataclass(slots=True)
class _Seen:
    """What the agent said about *this* send of a task before its result."""

    accepted: bool = False
    rejected: Mapping[str, Any] | None = None

    def take(self, item: Message, host: str, task_id: str) -> None:
        if item.kind != "event" or item.host != host or item.id != task_id:
            return
        if item.doc.get("event") == "accepted":
            self.accepted = True
        elif item.doc.get("event") == "rejected" and self.rejected is None:
            self.rejected = item.doc

    def earlier(self, result: Mapping[str, Any]) -> str | None:
        """Whether ``result`` answers an earlier message with the same id (protocol §7.4):
        ``"finished"`` (the agent's remembered result, re-sent without running anything),
        ``"running"`` (this copy was refused as busy; the first one's result), or ``None``."""
        if self.accepted:
            return None
        if self.rejected is None:
            return "finished"
        code = self.rejected.get("code")
        own = result.get("result") == "unknown" or any(
            e.get("code") == code for e in _entries(result)
        )
        return None if own else "running"


def _entries(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    items = doc.get("list")
    if isinstance(items, list):
        return [e for e in items if isinstance(e, Mapping)]
    return [doc]


async def _request(
    conn: Connection,
    out: Out,
    host: str,
    payload: bytes,
    task_id: str,
    *,
    limit: float | None,
    force: bool,
    show_id: bool = False,
    kind: str | None = None,
    follow: bool = False,
    again: str | None = None,
) -> int:
    """Publish one task to ``host`` and print its result.

    ``show_id``: print the id once the task was published. ``kind``: the task (no cancel hint
    for one that cannot be cancelled). ``follow``: print the task's events as they come.
    ``again``: a command that runs the task again with a fresh id, for when the result turns
    out to be the remembered one of an earlier message with this id (``send``)."""
    seen = _Seen()

    def on_item(item: Message) -> None:
        seen.take(item, host, task_id)
        if follow and item.kind == "event" and item.host == host and item.id == task_id:
            if out.json:
                out.json_line(item.doc)
            else:
                out.event(host, item.doc)

    events = follow or (again is not None and kind not in _WITHOUT_EVENTS)
    async with open_session(conn) as session:
        await session.subscribe_host(host, events=events)
        await _announce(session, out, host, force=force)
        await session.publish_task(host, payload)
        if show_id:
            out.note(f"task id: {task_id}")
        result = await session.wait_result(
            host,
            task_id,
            limit=limit,
            on_item=on_item,
            cancellable=kind not in _NOT_CANCELLABLE,
        )
    code = _show_result(out, result)
    if events and again is not None:
        _tell_replay(out, seen.earlier(result.doc), task_id, host, again)
    return code


def _tell_replay(out: Out, earlier: str | None, task_id: str, host: str, again: str) -> None:
    if earlier == "finished":
        out.note(
            f"note: this is the remembered result of an earlier task with id {task_id!r}:"
            f" {host} already ran this task (same id and content) and did not run it again"
            " (duplicates, protocol §7.4)"
        )
    elif earlier == "running":
        out.note(
            f"note: an earlier task with id {task_id!r} (same id and content) was still"
            f" running on {host}: this result is that task's; yours was not run again"
            " (duplicates, protocol §7.4)"
        )
    else:
        return
    out.note(f"to run it again, with a fresh id: {again}")


# ------------------------------------------------------------------------------ inputs


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
    conn: Connection,
    out: Out,
    *,
    task: TaskFile,
    host: str,
    limit: float | None,
    force: bool,
    again: str,
) -> int:
    """Publish a task file as it is (a fresh id only when it has none, or with ``--new-id``)
    and print its result; say so when the agent answers with the remembered result of an
    earlier message with the same id. ``again``: the command that sends it with a new id."""
    return await _request(
        conn,
        out,
        host,
        task.payload,
        task.id,
        limit=limit,
        force=force,
        show_id=task.added,
        kind=task.task,
        again=again,
    )


async def migrate(
    conn: Connection,
    out: Out,
    *,
    vm: str,
    source: str | None,
    destination: str,
    params: Mapping[str, object],
    follow: bool,
    limit: float | None,
    force: bool,
    swap_with: str | None = None,
) -> int:
    """``migrate vm`` on ``source``; with ``follow`` the live view, Ctrl-C and a summary.

    ``source`` ``None``: the one online agent whose domains include ``vm`` (exit 2 when
    none or several do). ``swap_with``: a VM on ``destination`` that comes to ``source``
    meanwhile (``parameter.swap-with``); the view then shows both VMs and the summary both
    outcomes."""
    if swap_with is not None:
        if swap_with == vm:
            raise CliError(USAGE, f"--swap-with: {vm!r} cannot swap with itself")
        params = {**params, "swap-with": {"vm-name": swap_with}}
    if source == destination:
        raise CliError(
            USAGE, f"migrate: {vm} cannot be migrated from {source} to itself (--to {destination})"
        )
    if params.get("copy-storage") == "none":
        for key in ("migrate-disks", "copy-storage-synchronous-writes"):
            if params.get(key):
                raise CliError(USAGE, f"--{key} needs --copy-storage all or inc, not none")
    if source is None:
        source = await locate_vm(conn, out, vm, destination=destination, limit=limit)
    task_id = fresh_id("migrate")
    payload = migrate_task(task_id, vm, destination, params)
    if not follow:
        return await _request(
            conn, out, source, payload, task_id, limit=limit, force=force, show_id=True
        )
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
    return await _request(
        conn, out, host, payload, task_id, limit=limit, force=force, kind="cancel"
    )


async def tune(
    conn: Connection,
    out: Out,
    *,
    target: str,
    host: str,
    vm: str | None,
    bandwidth: int | None,
    max_downtime: int | None,
    post_copy: bool,
    force_complete: bool,
    limit: float | None,
    force: bool,
) -> int:
    """``tune migration``: change the running migrations of task ``target`` on ``host``."""
    task_id = fresh_id("tune")
    payload = tune_task(
        task_id,
        target,
        vm=vm,
        bandwidth=bandwidth,
        max_downtime=max_downtime,
        post_copy=post_copy,
        force_complete=force_complete,
    )
    return await _request(
        conn, out, host, payload, task_id, limit=limit, force=force, kind="tune migration"
    )


async def repin(
    conn: Connection,
    out: Out,
    *,
    vm: str,
    vcpu_map: Sequence[Sequence[int]],
    host: str,
    follow: bool,
    limit: float | None,
    force: bool,
) -> int:
    """``repin vm``: pin vCPU *i* of ``vm`` to the host CPUs ``vcpu_map[i]``; with ``follow``
    the task's events as they come."""
    task_id = fresh_id("repin")
    payload = repin_task(task_id, vm, vcpu_map)
    return await _request(
        conn, out, host, payload, task_id, limit=limit, force=force, show_id=True, follow=follow
    )


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
        return await _request(
            conn, out, host, payload, task_id, limit=limit, force=force, show_id=True
        )
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
        result = await session.wait_result(host, task_id, limit=limit, cancellable=False)
        presence = session.presence.get(host, {})
    if out.json:
        out.json_line(result.doc)
    else:
        _show_host(out, host, result.doc, presence)
    return OK if succeeded(result.doc) else FAILED


# ------------------------------------------------------------------------------ rendering


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
    elif "tasks" not in doc and doc.get("more") is True:
        out.line("Tasks: left out, the answer would be larger than the agent sends", "yellow")
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
    if doc.get("more") is True:
        out.note(
            f"{host}: sent its first {len(domains)} domains, all that fit in one answer"
            " (the agent's limits.max-message-size)"
        )
