"""Two hosts evacuated at once by prediction onto one shared destination, through MQTT on
the fake back-end (protocol §3.7, *Several sources*): the destination's agent divides its
inbound NIC between the sources' reservations, so their hot guests take turns instead of
splitting it and both failing; without that agent, each source divides the NIC as if it
were alone, and both time out."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from asyncmigfra.settings import HypervisorSettings
from harness import Scheduler, agent_settings, running_agent, scheduler

pytestmark = pytest.mark.broker

GIB_KIB = 1024 * 1024
NIC = 1000  # MiB/s of every host's NIC, and of one migration's stream
#: Dirtying 600 MiB/s, a 400 MiB guest converges with the whole NIC (about 1 s) and never
#: with half of it.
HOT = {"memory": 400 * 1024, "dirty-rate": 600.0, "state": "running"}
PARAMETER = (
    "parameter:\n  schedule: predicted\n  migration-type: live\n  max-downtime: 300\n"
    "  completion-timeout: 6\n"
)


def fake(host: str, **options: Any) -> HypervisorSettings:
    return HypervisorSettings(
        type="fake", options={"host": host, "nic-rate": NIC, "bandwidth": NIC, **options}
    )


@contextlib.asynccontextmanager
async def cluster(
    port: int, *, destination_agent: bool
) -> AsyncIterator[tuple[Scheduler, list[str], str, dict[str, object]]]:
    tag = uuid.uuid4().hex[:6]
    sources, dest = [f"s{i}-{tag}" for i in (1, 2)], f"d-{tag}"
    shared: dict[str, object] = {}
    peers = {dest: {"cpus": 64, "memory": 64 * GIB_KIB, "nic-rate": NIC}}
    hosts = [
        fake(s, peers=peers, domains=[{"name": f"hot-{s}", **HOT}], cpus=8, memory=64 * GIB_KIB)
        for s in sources
    ]
    if destination_agent:
        hosts.append(fake(dest, cpus=64, memory=64 * GIB_KIB))
    names = [*sources, dest][: len(hosts)]
    async with contextlib.AsyncExitStack() as stack:
        sched = await stack.enter_async_context(scheduler(port, "fast/migfra/+"))
        for name, hv in zip(names, hosts, strict=True):
            settings = replace(agent_settings(port, hostname=name), hypervisor=hv)
            await stack.enter_async_context(running_agent(settings, shared=shared))
        yield sched, sources, dest, shared


async def evacuate_both(sched: Scheduler, sources: list[str], dest: str) -> list[dict[str, Any]]:
    ids = [f"ev-{s}" for s in sources]
    for task_id, source in zip(ids, sources, strict=True):
        body = f"id: {task_id}\ntask: evacuate node\ndestinations: [{dest}]\n{PARAMETER}"
        await sched.publish(body, topic=f"fast/migfra/{source}/task")
    return list(await asyncio.gather(*(sched.result_for(i, 40) for i in ids)))


async def test_hot_guests_of_two_sources_take_turns_on_the_shared_destination(mosquitto):
    async with cluster(mosquitto.port, destination_agent=True) as (sched, sources, dest, shared):
        results = await evacuate_both(sched, sources, dest)
        fake_cluster = shared["fake-cluster"]
        for result in results:
            (entry,) = result["list"]
            assert entry["status"] == "success", entry
            assert fake_cluster.locate(entry["vm-name"]) == [dest]  # type: ignore[attr-defined]
        # One after the other: the second guest's migration began once the first had ended.
        began = {
            e["vm-name"]: e["time"]
            for e in sched.events
            if e.get("event") == "phase" and e.get("phase") == "migrating"
        }
        ended = {e["vm-name"]: e["time"] for e in sched.events if e.get("event") == "done"}
        first, second = sorted(began, key=lambda vm: began[vm])
        assert ended[first] <= began[second]


async def test_without_the_destinations_agent_each_source_divides_alone(mosquitto):
    async with cluster(mosquitto.port, destination_agent=False) as (sched, sources, dest, _):
        results = await evacuate_both(sched, sources, dest)
        # Both started at once, each with what it took to be the whole NIC: at half of it,
        # neither converged within its completion timeout.
        codes = sorted(entry["code"] for r in results for entry in r["list"])
        assert codes == ["timeout", "timeout"]
