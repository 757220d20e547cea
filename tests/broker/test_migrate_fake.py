"""Migration, regex stop and evacuate through MQTT on the ``fake`` hypervisor (two agents, one
simulated cluster): progress events, honest results, cancel and the completion timeout."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from asyncmigfra.app import Agent
from asyncmigfra.hypervisor.base import DomainState
from asyncmigfra.settings import HypervisorSettings
from harness import Scheduler, agent_settings, running_agent, scheduler

pytestmark = pytest.mark.broker

GIB = 1024 * 1024  # KiB


def _dom(name: str, *, memory: int = GIB, dirty: float = 0, state: str = "running") -> dict:
    return {"name": name, "vcpus": 1, "memory": memory, "state": state, "dirty-rate": dirty}


@contextlib.asynccontextmanager
async def two_hosts(
    port: int,
    domains: list[dict[str, Any]],
    *,
    bandwidth: int = 2000,
    time_scale: float = 1.0,
    b_sections: dict[str, Any] | None = None,
    **sections: Any,
) -> AsyncIterator[tuple[Agent, Scheduler, dict[str, object]]]:
    """Agents ``a-*`` (with ``domains``) and ``b-*`` sharing one fake cluster (``b_sections``
    replaces sections for ``b-*`` only); ``shared["agent-b"]`` is the second agent."""
    shared: dict[str, object] = {}
    sa = agent_settings(port, hv_type="fake", **sections)
    name_a = sa.hostname
    name_b = name_a.replace("t-", "b-")
    spec = {"cpus": 64, "memory": 256 * GIB}
    common = {"bandwidth": bandwidth, "time-scale": time_scale}
    opts_a = {"host": name_a, "peers": {name_b: spec}, "domains": domains, **common}
    opts_b = {"host": name_b, "peers": {name_a: spec}, **common}
    sa = replace(sa, hypervisor=HypervisorSettings(type="fake", options=opts_a))
    sb = agent_settings(
        port,
        hostname=name_b,
        hv_type="fake",
        hv_options=opts_b,
        **{**sections, **(b_sections or {})},
    )
    prefix = sa.mqtt.task_topic.rsplit("/", 1)[0]
    async with (
        scheduler(port, prefix) as sched,
        running_agent(sa, shared=shared) as agent_a,
        running_agent(sb, shared=shared) as agent_b,
    ):
        shared["names"] = (name_a, name_b)
        shared["agent-b"] = agent_b
        yield agent_a, sched, shared


class _Where:
    def __init__(self, shared: dict[str, object]) -> None:
        self.cluster: Any = shared["fake-cluster"]

    def locate(self, vm: str) -> str:
        """The one host where ``vm`` is active (fails when it runs in two places)."""
        (host,) = self.cluster.locate(vm)
        return str(host)


def _cluster(shared: dict[str, object]) -> _Where:
    return _Where(shared)


async def test_spec_1_7_live_migration_progress_and_flat_result(mosquitto):
    async with two_hosts(
        mosquitto.port,
        [_dom("v", memory=2 * GIB, dirty=50)],
        bandwidth=1000,
        agent={"progress_interval": 0.1},
    ) as (_, sched, shared):
        _, dest = shared["names"]
        r = await sched.call(
            f"task: migrate vm\nvm-name: v\ndestination: {dest}\ntime-measurement: true\n"
            "parameter:\n  migration-type: live\n  max-downtime: 300\n",
            timeout=30,
        )
        assert r["result"] == "vm migrated"
        assert (r["vm-name"], r["status"], r["destination"]) == ("v", "success", dest)
        assert {"overall", "migrate", "downtime"} <= set(r["time-measurement"])
        assert r["time-measurement"]["downtime"] <= 0.3
        progress = sched.events_for(r["id"], "progress")
        percents = [e["percent"] for e in progress]
        assert len(progress) >= 5
        assert percents == sorted(percents), "percent must never go backwards"
        assert all(p < 100 for p in percents[:-1])
        assert percents[-1] == 100
        assert progress[-1]["phase"] == "completed"
        sample = next(e for e in progress if e.get("iteration", 0) >= 1 and "memory-total" in e)
        for key in (
            "elapsed",
            "memory-total",
            "memory-processed",
            "memory-remaining",
            "data-remaining",
            "dirty-rate",
            "transfer-rate",
            "max-downtime",
        ):
            assert key in sample
        # 50 MiB/s dirtied, 1000 MiB/s sent: the agent estimates the time left.
        assert any(e.get("eta", -1) > 0 for e in progress[:-1])
        assert progress[-1]["eta"] == 0
        assert _cluster(shared).locate("v") == dest


async def test_spec_1_4_stop_regex_reports_each_vm(mosquitto):
    doms = [_dom("web-1"), _dom("web-2"), _dom("db-1")]
    async with two_hosts(mosquitto.port, doms) as (_, sched, _shared):
        r = await sched.call("task: stop vm\nlist:\n  - regex: web-\\d+\n    force: true\n")
        assert sorted(e["vm-name"] for e in r["list"]) == ["web-1", "web-2"]
        assert all(e["status"] == "success" for e in r["list"])
        r = await sched.call("task: status\n")
        states = {e["vm-name"]: e["state"] for e in r["list"]}
        assert states == {"web-1": "shutoff", "web-2": "shutoff", "db-1": "running"}


async def test_spec_1_8_evacuate_moves_every_running_vm(mosquitto):
    doms = [_dom("e1"), _dom("e2"), _dom("e3"), _dom("off", state="shutoff")]
    async with two_hosts(mosquitto.port, doms) as (_, sched, shared):
        _, dest = shared["names"]
        r = await sched.call(
            f"task: evacuate node\ndestinations: [{dest}]\ntime-measurement: true\n"
            "parameter:\n  migration-type: live\n",
            timeout=30,
        )
        assert r["result"] == "node evacuated"
        assert sorted(e["vm-name"] for e in r["list"]) == ["e1", "e2", "e3"]
        assert all(e["status"] == "success" and e["destination"] == dest for e in r["list"])
        assert all("overall" in e["time-measurement"] for e in r["list"])
        assert {_cluster(shared).locate(n) for n in ("e1", "e2", "e3")} == {dest}


async def test_cancel_running_migration_keeps_vm_on_source(mosquitto):
    doms = [_dom("slow", memory=8 * GIB, dirty=10)]
    async with two_hosts(mosquitto.port, doms, bandwidth=200) as (_, sched, shared):
        src, dest = shared["names"]
        await sched.publish(
            f"id: mig\ntask: migrate vm\nvm-name: slow\ndestination: {dest}\n"
            "parameter:\n  migration-type: live\n"
        )
        await sched.wait_for(lambda: sched.events_for("mig", "progress"))
        r = await sched.call("task: cancel\ntarget: mig\n")
        assert r["list"] == [{"vm-name": "slow", "status": "success", "state": "running"}]
        rm = await sched.result_for("mig")
        assert (rm["status"], rm["code"]) == ("error", "cancelled")
        assert _cluster(shared).locate("slow") == src
        status = await sched.call("task: status\n")
        assert status["list"][0]["state"] == "running"


async def test_completion_timeout_aborts_and_reports_timeout(mosquitto):
    doms = [_dom("busy", memory=GIB, dirty=500)]
    async with two_hosts(mosquitto.port, doms, bandwidth=200) as (_, sched, shared):
        src, dest = shared["names"]
        r = await sched.call(
            f"task: migrate vm\nvm-name: busy\ndestination: {dest}\nparameter:\n"
            "  migration-type: live\n  completion-timeout: 1.5\n  timeout-action: abort\n",
            timeout=20,
        )
        assert (r["status"], r["code"]) == ("error", "timeout")
        assert "source" in r["details"]
        assert _cluster(shared).locate("busy") == src


async def test_post_copy_finishes_a_migration_pre_copy_cannot(mosquitto):
    """A guest dirtying faster than the link can never converge in pre-copy: the policy sees
    it on the second pass and switches to post-copy at once (no pointless downtime steps)."""
    doms = [_dom("hot", memory=GIB, dirty=400)]
    async with two_hosts(mosquitto.port, doms, bandwidth=200, time_scale=20) as (_, sched, shared):
        _, dest = shared["names"]
        r = await sched.call(
            f"task: migrate vm\nvm-name: hot\ndestination: {dest}\nparameter:\n"
            "  migration-type: post-copy\n  max-downtime: 200\n",
            timeout=60,
        )
        assert r["status"] == "success", r
        actions = [e.get("action") for e in sched.events_for(r["id"], "progress") if "action" in e]
        assert actions == ["post-copy"]
        phases = [e["phase"] for e in sched.events_for(r["id"], "phase")]
        assert phases[:3] == ["pre-checks", "detach-devices", "migrating"]
        assert "post-copy" in phases
        assert _cluster(shared).locate("hot") == dest


async def test_downtime_is_raised_step_by_step_until_the_copy_converges(mosquitto):
    """A guest dirtying almost as fast as the link stalls at a low downtime target; the policy
    raises the target one step per stalled pass, up to max-downtime, and the copy converges."""
    doms = [_dom("warmish", memory=GIB, dirty=196)]
    async with two_hosts(mosquitto.port, doms, bandwidth=200, time_scale=20) as (_, sched, shared):
        _, dest = shared["names"]
        r = await sched.call(
            f"task: migrate vm\nvm-name: warmish\ndestination: {dest}\ntime-measurement: true\n"
            "parameter:\n  migration-type: live\n  max-downtime: 6000\n",
            timeout=60,
        )
        assert r["status"] == "success", r
        progress = sched.events_for(r["id"], "progress")
        actions = [e["action"] for e in progress if "action" in e]
        assert actions
        assert set(actions) == {"raise-downtime"}
        targets = [e["max-downtime"] for e in progress if "max-downtime" in e]
        assert targets == sorted(targets)
        assert targets[0] == 600
        assert r["time-measurement"]["downtime"] <= 6.0
        assert _cluster(shared).locate("warmish") == dest


async def test_migration_retries_after_failure_that_left_vm_on_source(mosquitto):
    doms = [_dom("flaky")]
    async with two_hosts(mosquitto.port, doms, migration={"retry_delay": 0.05}) as (
        agent,
        sched,
        shared,
    ):
        agent.hypervisor.inject("migrate-midway", 1)  # type: ignore[attr-defined]
        _, dest = shared["names"]
        r = await sched.call(
            f"task: migrate vm\nvm-name: flaky\ndestination: {dest}\n"
            "parameter:\n  migration-type: live\n  retry-counter: 2\n",
            timeout=30,
        )
        assert (r["status"], r["retries"]) == ("success", 1)
        assert _cluster(shared).locate("flaky") == dest


async def test_busy_vm_lane_serialises_migrate_and_stop(mosquitto):
    doms = [_dom("m", memory=GIB)]
    async with two_hosts(mosquitto.port, doms, bandwidth=1000) as (_, sched, shared):
        _, dest = shared["names"]
        await sched.publish(
            f"id: m1\ntask: migrate vm\nvm-name: m\ndestination: {dest}\n"
            "parameter:\n  migration-type: live\n"
        )
        await sched.publish("id: m2\ntask: stop vm\nlist:\n  - vm-name: m\n")
        r1 = await sched.result_for("m1", timeout=20)
        r2 = await sched.result_for("m2", timeout=20)
        assert r1["status"] == "success"
        # The stop waited for the migration, and by then the VM had left this host.
        assert r2["list"][0]["code"] == "vm-not-found"
        await asyncio.sleep(0)


async def test_outgoing_migrations_wait_for_the_per_host_limit(mosquitto):
    """Over ``migration.max-outgoing`` a migration waits its turn (phase ``waiting``)."""
    doms = [_dom(f"q{i}", memory=GIB // 4) for i in range(3)]
    async with two_hosts(mosquitto.port, doms, bandwidth=1000, migration={"max_outgoing": 1}) as (
        _,
        sched,
        shared,
    ):
        _, dest = shared["names"]
        for i in range(3):
            await sched.publish(
                f"id: q{i}\ntask: migrate vm\nvm-name: q{i}\ndestination: {dest}\n"
                "parameter:\n  migration-type: live\n"
            )
        results = [await sched.result_for(f"q{i}", timeout=20) for i in range(3)]
        assert all(r["status"] == "success" for r in results)
        waited = [
            i
            for i in range(3)
            if any(e["phase"] == "waiting" for e in sched.events_for(f"q{i}", "phase"))
        ]
        assert len(waited) == 2
        spans = []
        for i in range(3):
            phases = sched.events_for(f"q{i}", "phase")
            start = next(e["time"] for e in phases if e["phase"] == "migrating")
            end = sched.events_for(f"q{i}", "done")[0]["time"]
            spans.append((start, end))
        spans.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans


async def test_evacuate_without_destinations_answers_no_destination(mosquitto):
    async with two_hosts(mosquitto.port, [_dom("x1"), _dom("x2")]) as (_, sched, _shared):
        r = await sched.call("task: evacuate node\ndestinations: []\n")
        assert sorted(e["vm-name"] for e in r["list"]) == ["x1", "x2"]
        assert {e["code"] for e in r["list"]} == {"no-destination"}
        # ...and the agent keeps serving.
        assert (await sched.call("task: status\n"))["result"] == "status"


async def test_pre_check_failure_leaves_the_vm_untouched(mosquitto):
    """A domain of the same name already active on the destination: ``incompatible-
    destination`` from the pre-checks, before anything is touched."""
    async with two_hosts(mosquitto.port, [_dom("twin")]) as (_, sched, shared):
        src, dest = shared["names"]
        cluster = _cluster(shared).cluster
        cluster.hosts[dest].domains["twin"] = type(cluster.hosts[src].domains["twin"])(
            name="twin", state=DomainState.RUNNING, vcpus=1, memory=1024
        )
        r = await sched.call(
            f"task: migrate vm\nvm-name: twin\ndestination: {dest}\ntime-measurement: true\n"
            "parameter:\n  migration-type: live\n"
        )
        assert (r["status"], r["code"]) == ("error", "incompatible-destination"), r
        assert "already active" in r["details"]
        assert "pre-checks" in r["time-measurement"]
        phases = [e["phase"] for e in sched.events_for(r["id"], "phase")]
        assert phases == ["pre-checks"]  # before anything touches the VM
        assert cluster.hosts[src].domains["twin"].state is DomainState.RUNNING
