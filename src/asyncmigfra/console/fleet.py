"""Where a VM runs, asked of the fleet: ``migrate VM --to B`` without ``--from``.

The agents' retained presence (``<prefix>/+/status``, what ``status`` without a host shows)
says which agents are up; each of them answers a ``status`` task with its domains
(protocol §3.9), at once even while busy. The VM's source is the one agent that lists it.
When none does, or several do (a shut-off copy defined on a second host, two VMs of the same
name), the command stops with exit 2 and names the candidates: guessing would migrate the
wrong VM, or ask the wrong agent to migrate one it does not have.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, Final

from asyncmigfra.console.connection import Connection
from asyncmigfra.console.exits import INTERRUPTED, USAGE, CliError
from asyncmigfra.console.output import Out
from asyncmigfra.console.session import Interrupt, Lost, Message, Session, open_session
from asyncmigfra.console.tasks import fresh_id, status_task

__all__ = ["ASK_TIMEOUT", "ask_agents", "locate_vm", "online_hosts"]

#: s: how long the agents get to answer the ``status`` task (without ``--timeout``).
ASK_TIMEOUT: Final = 5.0
#: Domain states in which a VM counts as running there (ahead of a shut-off definition).
_ACTIVE: Final = frozenset({"running", "paused", "blocked", "pmsuspended"})


def _domains(doc: Mapping[str, Any]) -> dict[str, str]:
    """``vm-name -> state`` of a ``status`` result's domain list."""
    items = doc.get("list")
    if not isinstance(items, list):
        return {}
    return {
        str(e.get("vm-name")): str(e.get("state", "?"))
        for e in items
        if isinstance(e, Mapping) and e.get("status") == "success"
    }


async def ask_agents(
    session: Session,
    hosts: list[str],
    deadline: float,
    *,
    task: Callable[[str], bytes] = status_task,
    kind: str = "status",
    what: str = "their domains",
    others: list[Message] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each host's result of the task ``task(id)`` builds (``kind`` makes the ids; a
    ``status`` by default), as far as they answer before ``deadline``; every other message
    read meanwhile goes to ``others`` when given."""
    ids: dict[str, str] = {}
    for host in hosts:
        await session.subscribe(session.conn.topic(host, "result"))
    for host in hosts:
        ids[host] = fresh_id(kind)
        await session.publish_task(host, task(ids[host]))
    answers: dict[str, dict[str, Any]] = {}
    while len(answers) < len(hosts):
        item = await session.next(deadline)
        if item is None:
            break
        if isinstance(item, Lost):
            raise session.lost(item)
        if isinstance(item, Interrupt):
            raise CliError(INTERRUPTED, f"interrupted while asking the agents for {what}")
        if item.kind == "result" and ids.get(item.host) == item.id:
            answers[item.host] = item.doc
        elif others is not None:
            others.append(item)
    return answers


def online_hosts(agents: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The hosts whose retained presence is not ``offline``, sorted."""
    return sorted(h for h, doc in agents.items() if doc.get("state") != "offline")


async def locate_vm(
    conn: Connection, out: Out, vm: str, *, destination: str, limit: float | None
) -> str:
    """The host that runs ``vm``, found by asking every online agent for its domains (exit 2
    when it is ``destination``, where it cannot be migrated to)."""
    async with open_session(conn) as session:
        agents = await session.gather_presence()
        hosts = online_hosts(agents)
        if not hosts:
            raise CliError(
                USAGE,
                f"migrate: no --from given, and no agent is online on"
                f" {conn.topic('+', 'status')} to ask where {vm} runs; give --from HOST",
            )
        loop = asyncio.get_running_loop()
        answers = await ask_agents(session, hosts, loop.time() + (limit or ASK_TIMEOUT))
    found = {h: state for h, doc in answers.items() if (state := _domains(doc).get(vm))}
    if len(found) > 1:
        active = [h for h, state in found.items() if state in _ACTIVE]
        if len(active) == 1:
            found = {active[0]: found[active[0]]}
    if len(found) == 1:
        ((host, state),) = found.items()
        if host == destination:
            raise CliError(
                USAGE, f"migrate: {vm} is already on {host} ({state}; --to {destination})"
            )
        out.note(f"{vm} is on {host} ({state}): migrating it from there")
        return host
    if found:
        listed = ", ".join(f"{h} ({s})" for h, s in sorted(found.items()))
        raise CliError(
            USAGE, f"migrate: {vm} is on more than one host: {listed}; say which with --from HOST"
        )
    silent = [h for h in hosts if h not in answers]
    asked = ", ".join(h for h in hosts if h in answers) or "none"
    unanswered = f"; no answer from {', '.join(silent)}" if silent else ""
    raise CliError(
        USAGE,
        f"migrate: no online agent reports a VM named {vm!r} (asked {asked}{unanswered});"
        " give --from HOST",
    )
