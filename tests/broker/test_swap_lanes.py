"""A swap holds VM 2's lane on the destination's agent (``peerlanes``), through a real
mosquitto between two agents on one fake cluster: a task that agent already runs on VM 2
makes the swap ``busy`` before anything moves; a task for VM 2 that arrives during the swap
waits for it; an agent that does not answer is reported (``best-effort``) or refuses the
swap (``required``)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from test_migrate_fake import GIB, _dom, two_hosts
from test_swap_fake import _add, _swap, _where

from asyncmigfra.hypervisor.base import DomainState

pytestmark = pytest.mark.broker


async def _listen_to_b(sched: Any, shared: dict[str, object]) -> str:
    """Subscribe the scheduler to B's results and events; B's task topic."""
    src, dest = shared["names"]
    prefix_b = sched.prefix.replace(src, dest)
    for suffix in ("result", "event"):
        await sched.client.subscribe(f"{prefix_b}/{suffix}", qos=1)
    return f"{prefix_b}/task"


async def _send(sched: Any, topic: str, body: str) -> str:
    task_id = f"id-{uuid.uuid4().hex[:10]}"
    await sched.publish(f"id: {task_id}\n{body}", topic=topic)
    return task_id


async def test_a_task_of_the_destination_on_vm2_makes_the_swap_busy(mosquitto):
    async with two_hosts(mosquitto.port, [_dom("p1")]) as (_, sched, shared):
        src, dest = shared["names"]
        _add(shared, dest, "p2")
        b_tasks = await _listen_to_b(sched, shared)
        agent_b: Any = shared["agent-b"]
        agent_b.hypervisor.latency = 1.5  # B's own suspend of p2 takes a while
        suspend = await _send(sched, b_tasks, "task: suspend vm\nlist: [{vm-name: p2}]\n")
        async with asyncio.timeout(5):
            while not agent_b.dispatcher.running:
                await asyncio.sleep(0.01)
        r = await sched.call(_swap("p1", dest, "p2"), timeout=30)
        assert (r["status"], r["code"]) == ("error", "busy"), r
        assert f"p2 is busy on {dest}'s agent" in r["details"]
        assert "nothing was moved" in r["details"]
        assert (_where(shared, "p1"), _where(shared, "p2")) == (src, dest)
        phases = {e["phase"] for e in sched.events_for(r["id"], "phase")}
        assert phases == {"peer-lane"}, "refused before the pre-checks"
        done = await sched.result_for(suspend, timeout=10)
        assert done["list"][0]["status"] == "success", done


async def test_a_task_for_vm2_arriving_during_the_swap_waits_for_it(mosquitto):
    """Without the hold, B would suspend q2 in the middle of its migration."""
    async with two_hosts(mosquitto.port, [_dom("q1", memory=2 * GIB)], bandwidth=1000) as (
        _,
        sched,
        shared,
    ):
        src, dest = shared["names"]
        _add(shared, dest, "q2", memory=2 * GIB)
        b_tasks = await _listen_to_b(sched, shared)
        swap = await _send(sched, f"{sched.prefix}/task", _swap("q1", dest, "q2"))

        def q2_migrating() -> bool:
            return any(
                e["vm-name"] == "q2" and e["phase"] == "migrating"
                for e in sched.events_for(swap, "phase")
            )

        await sched.wait_for(q2_migrating, timeout=10)
        suspend = await _send(sched, b_tasks, "task: suspend vm\nlist: [{vm-name: q2}]\n")
        r = await sched.result_for(swap, timeout=30)
        assert r["status"] == "success", r
        assert "details" not in r, r
        late = await sched.result_for(suspend, timeout=10)
        # It ran once q2 had left B (results of two agents may arrive in either order):
        # nothing was suspended in the middle of the copy.
        entry = late["list"][0]
        assert (entry["status"], entry["code"]) == ("error", "vm-not-found"), late
        assert (_where(shared, "q1"), _where(shared, "q2")) == (dest, src)
        cluster: Any = shared["fake-cluster"]
        assert cluster.domain(src, "q2").state == DomainState.RUNNING


@pytest.mark.parametrize("mode", ["best-effort", "required"])
async def test_a_destination_agent_that_does_not_answer(mosquitto, mode):
    """B's agent listens on another prefix, so nobody answers A's lane request."""
    async with two_hosts(
        mosquitto.port,
        [_dom("r1")],
        migration={"swap_lock": mode, "swap_lock_timeout": 0.3},
        b_sections={"mqtt": {"task_topic": f"elsewhere/{uuid.uuid4().hex[:6]}/task"}},
    ) as (_, sched, shared):
        src, dest = shared["names"]
        _add(shared, dest, "r2")
        r = await sched.call(_swap("r1", dest, "r2"), timeout=30)
        if mode == "best-effort":
            assert r["status"] == "success", r
            assert r["details"] == f"not coordinated with {dest}'s agent (no answer within 0.3 s)"
            assert (_where(shared, "r1"), _where(shared, "r2")) == (dest, src)
        else:
            assert (r["status"], r["code"]) == ("error", "connection-failed"), r
            assert "could not hold r2's lane" in r["details"]
            assert "migration.swap-lock: required" in r["details"]
            assert (_where(shared, "r1"), _where(shared, "r2")) == (src, dest)


async def test_the_hold_is_given_back_after_the_swap(mosquitto):
    """B's lane for the VM is free again: B's own task on it runs at once afterwards."""
    async with two_hosts(mosquitto.port, [_dom("h1")]) as (_, sched, shared):
        _, dest = shared["names"]
        _add(shared, dest, "h2")
        agent_b: Any = shared["agent-b"]
        r = await sched.call(_swap("h1", dest, "h2"), timeout=30)
        assert r["status"] == "success", r
        async with asyncio.timeout(5):
            while agent_b.lanes.holds:
                await asyncio.sleep(0.01)
        release = agent_b.dispatcher.hold_lane("h2")
        assert callable(release), release
        release()
