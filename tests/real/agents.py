"""Agents on the rig: real asyncmigfra agents driving the rig's libvirtds, over a real broker.

``rig_agents`` runs one in-process agent per rig host (``rig-a``, ``rig-b``) with the
``libvirt`` back-end: ``uri`` is the host's own socket and ``hosts:`` tells each agent how to
reach every rig host (unix socket, TCP over the veth for the libvirtd's peer-to-peer
connection, the migration stream address) — exactly the config an operator writes for hosts
that need explicit addresses. ``scheduler`` (tests/harness.py) then talks to them only through MQTT.
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from asyncmigfra.app import Agent
from asyncmigfra.settings import HypervisorSettings, Settings, settings_from_text
from harness import Scheduler, agent_settings, running_agent, scheduler
from rig import Host, Rig, domain_xml


def libvirt_options(rig: Rig, me: Host, **extra: object) -> dict[str, object]:
    # Every host, this one included: a swap's second half is a migration *to* this host,
    # started on the partner's libvirtd, which needs this host's p2p and migration addresses.
    hosts = {
        h.name: {"uri": h.local_uri, "p2p-uri": h.p2p_uri, "migrate-uri": h.migrate_uri}
        for h in rig.hosts
    }
    return {"uri": me.local_uri, "hosts": hosts, "stop-timeout": 5, **extra}


def rig_agent_settings(
    port: int,
    rig: Rig,
    me: Host,
    *,
    run: str,
    hv: Mapping[str, object] | None = None,
    **sections: Any,
) -> Settings:
    """An agent for rig host ``me``. Unique topics per test run (the rig's host names are
    fixed, the broker is shared): ``rig-<run>/<host>/...``. The agents of one run share that
    prefix, as a cluster's agents share ``fast/migfra``, so they find each other's topics
    (a swap's lane hold, ``on: destination`` hooks).

    The agent's name is not configured: as in an original ``migfra.conf``, only its topics
    name it (extensions.md "Identity"), while the machine the agents run on has another host
    name. So every rig test (migrations, swaps, destination hooks) runs on derived names."""
    identity = settings_from_text(
        "communicator:\n"
        f"  id: fast-migfra-<hostname>-{run}\n"
        f"  subscribe-topic: rig-{run}/{me.name}/task\n"
        f"  publish-topic: rig-{run}/{me.name}/result\n"
    )
    assert identity.hostname == me.name != socket.gethostname(), identity.hostname
    settings = agent_settings(port, hostname=identity.hostname, hv_type="dummy", **sections)
    options = libvirt_options(rig, me, **dict(hv or {}))
    settings = replace(settings, hypervisor=HypervisorSettings(type="libvirt", options=options))
    mine = identity.mqtt
    return replace(
        settings,
        mqtt=replace(
            settings.mqtt,
            client_id=mine.client_id,
            task_topic=mine.task_topic,
            result_topic=mine.result_topic,
            event_topic=mine.event_topic,
            status_topic=mine.status_topic,
        ),
    )


@dataclass
class RigAgents:
    a: Agent
    b: Agent
    to_a: Scheduler
    to_b: Scheduler


@contextlib.asynccontextmanager
async def rig_agents(
    port: int, rig: Rig, *, hv: Mapping[str, object] | None = None, **sections: Any
) -> AsyncIterator[RigAgents]:
    run = uuid.uuid4().hex[:6]
    sa = rig_agent_settings(port, rig, rig.a, run=run, hv=hv, **sections)
    sb = rig_agent_settings(port, rig, rig.b, run=run, hv=hv, **sections)
    prefix_a = sa.mqtt.task_topic.rsplit("/", 1)[0]
    prefix_b = sb.mqtt.task_topic.rsplit("/", 1)[0]
    async with (
        scheduler(port, prefix_a) as to_a,
        scheduler(port, prefix_b) as to_b,
        running_agent(sa) as a,
        running_agent(sb) as b,
    ):
        yield RigAgents(a=a, b=b, to_a=to_a, to_b=to_b)


def allow_guests(guests: Mapping[str, Path]) -> dict[str, object]:
    """The ``agent`` section that lets domain XML boot the rig's guest kernels under the
    default ``xml-policy: strict`` (they live in the rig's cache, not a storage pool)."""
    return {"xml_allowed_paths": tuple(sorted({str(p.parent) for p in guests.values()}))}


def start_task(
    name: str,
    kernel: Path,
    *,
    memory_mib: int = 128,
    vcpus: int = 1,
    balloon: bool = False,
    **keys: str,
) -> str:
    """A ``start vm`` message carrying a rig guest's domain XML (as a YAML block scalar)."""
    xml = domain_xml(name, kernel, memory_mib, vcpus, balloon=balloon)
    block = "\n".join("      " + line for line in xml.strip().splitlines())
    extra = "".join(f"    {k}: {v}\n" for k, v in keys.items())
    return (
        "task: start vm\nvm-configurations:\n"
        f"  - xml: |\n{block}\n    probe-with-ssh: false\n{extra}"
    )
