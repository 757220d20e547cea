"""``evacuate node`` through MQTT on the fake hypervisor: placement by mode and capacity,
``no-destination``, per-VM results with timings, cancel half-way, concurrent evacuations."""

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

GIB = 1024 * 1024


def _dom(name: str, *, vcpus: int = 1, memory: int = GIB) -> dict[str, object]:
    return {"name": name, "vcpus": vcpus, "memory": memory, "state": "running"}


@contextlib.asynccontextmanager
async def evacuating_host(
    port: int,
    domains: list[dict[str, object]],
    peers: dict[str, dict[str, int]],
    *,
    shared: dict[str, object] | None = None,
    bandwidth: int = 4000,
    **sections: Any,
) -> AsyncIterator[tuple[Scheduler, dict[str, object], str]]:
    shared = {} if shared is None else shared
    name = f"ev-{uuid.uuid4().hex[:6]}"
    opts = {"host": name, "peers": peers, "domains": domains, "bandwidth": bandwidth}
    settings = agent_settings(port, hostname=name, hv_type="fake", **sections)
    settings = replace(settings, hypervisor=HypervisorSettings(type="fake", options=opts))
    async with (
        scheduler(port, f"fast/migfra/{name}") as sched,
        running_agent(settings, shared=shared),
    ):
        yield sched, shared, name


def located(shared: dict[str, object], vm: str) -> str:
    (host,) = shared["fake-cluster"].locate(vm)  # type: ignore[attr-defined]
    return str(host)


async def test_scatter_without_overbooking_spreads_and_reports_each_vm(mosquitto):
    peers = {"dst-b": {"cpus": 4, "memory": 64 * GIB}, "dst-c": {"cpus": 4, "memory": 64 * GIB}}
    doms = [_dom(f"s{i}") for i in range(6)]
    async with evacuating_host(mosquitto.port, doms, peers) as (sched, shared, _):
        r = await sched.call(
            "task: evacuate node\ndestinations: [dst-b, dst-c]\ntime-measurement: true\n"
            "parameter:\n  mode: scatter\n  overbooking: false\n  migration-type: live\n",
            30,
        )
        assert r["result"] == "node evacuated"
        assert [e["vm-name"] for e in r["list"]] == [f"s{i}" for i in range(6)]
        assert {e["status"] for e in r["list"]} == {"success"}
        dests = [e["destination"] for e in r["list"]]
        assert dests.count("dst-b") == 3
        assert dests.count("dst-c") == 3
        assert all(located(shared, e["vm-name"]) == e["destination"] for e in r["list"])
        assert all({"overall", "migrate"} <= set(e["time-measurement"]) for e in r["list"])
        # Evacuation-level timings (the original lost time-measurement for evacuate).
        assert {"overall", "placement"} <= set(r["time-measurement"])
        progress_vms = {e["vm-name"] for e in sched.events_for(r["id"], "progress")}
        assert progress_vms == {f"s{i}" for i in range(6)}


async def test_overbooking_false_is_honoured_and_the_rest_gets_no_destination(mosquitto):
    peers = {"dst-b": {"cpus": 2, "memory": 64 * GIB}}
    doms = [_dom(f"o{i}") for i in range(4)]
    async with evacuating_host(mosquitto.port, doms, peers) as (sched, shared, me):
        r = await sched.call(
            "task: evacuate node\ndestinations: [dst-b]\n"
            "parameter:\n  mode: auto\n  overbooking: false\n  migration-type: live\n",
            30,
        )
        by_status = {e["vm-name"]: (e["status"], e.get("code")) for e in r["list"]}
        moved = [n for n, (s, _) in by_status.items() if s == "success"]
        refused = [n for n, (_, c) in by_status.items() if c == "no-destination"]
        assert len(moved) == 2
        assert len(refused) == 2
        assert all(located(shared, n) == me for n in refused)


async def test_overbooking_true_moves_everything_that_fits_in_memory(mosquitto):
    peers = {"dst-b": {"cpus": 2, "memory": 3 * GIB}}
    doms = [_dom(f"m{i}") for i in range(4)]
    async with evacuating_host(mosquitto.port, doms, peers) as (sched, _shared, _):
        r = await sched.call(
            "task: evacuate node\ndestinations: [dst-b]\n"
            "parameter:\n  overbooking: true\n  migration-type: live\n",
            30,
        )
        codes = sorted(e.get("code", "ok") for e in r["list"])
        assert codes == ["no-destination", "ok", "ok", "ok"]


async def test_cancel_half_way_stops_what_has_not_started(mosquitto):
    peers = {"dst-b": {"cpus": 64, "memory": 256 * GIB}}
    doms = [_dom(f"c{i}", memory=2 * GIB) for i in range(4)]
    async with evacuating_host(mosquitto.port, doms, peers, bandwidth=2000) as (
        sched,
        shared,
        me,
    ):
        await sched.publish(
            "id: evac\ntask: evacuate node\ndestinations: [dst-b]\n"
            "parameter:\n  migration-type: live\n  max-parallel: 1\n"
        )
        await sched.wait_for(lambda: sched.events_for("evac", "done"), 20)
        r = await sched.call("task: cancel\ntarget: evac\n")
        assert r["result"] == "cancelled"
        res = await sched.result_for("evac", 30)
        statuses = [(e["status"], e.get("code")) for e in res["list"]]
        assert statuses.count(("success", None)) >= 1
        assert statuses.count(("error", "cancelled")) >= 2
        for e in res["list"]:
            expected = "dst-b" if e["status"] == "success" else me
            assert located(shared, e["vm-name"]) == expected


async def test_concurrent_evacuations_of_two_agents_share_no_state(mosquitto):
    """The original kept one process-wide capacity deque that a second evacuation cleared
    under the first one; here each evacuation measures and reserves on its own."""
    shared: dict[str, object] = {}
    peers = {"dst-b": {"cpus": 64, "memory": 256 * GIB}, "dst-c": {"cpus": 64, "memory": 256 * GIB}}
    doms1 = [_dom(f"x{i}") for i in range(5)]
    doms2 = [_dom(f"y{i}") for i in range(5)]
    async with (
        evacuating_host(mosquitto.port, doms1, peers, shared=shared) as (s1, _, h1),
        evacuating_host(mosquitto.port, doms2, {**peers, h1: {}}, shared=shared) as (s2, _, _),
    ):
        body = (
            "task: evacuate node\ndestinations: [dst-b, dst-c]\n"
            "parameter:\n  mode: scatter\n  migration-type: live\n"
        )
        r1, r2 = await asyncio.gather(s1.call(body, 30), s2.call(body, 30))
        for r in (r1, r2):
            assert len(r["list"]) == 5
            assert {e["status"] for e in r["list"]} == {"success"}
            assert {e["destination"] for e in r["list"]} == {"dst-b", "dst-c"}
