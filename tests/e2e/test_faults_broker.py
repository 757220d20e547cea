"""Fault: the broker is SIGKILLed while tasks are in flight and comes back. Every task accepted
before the fault gets exactly one result (published while the broker was down, delivered after
the reconnect), and the agent keeps serving."""

from __future__ import annotations

import asyncio

import pytest

from harness import agent_settings, running_agent, scheduler

pytestmark = [pytest.mark.e2e, pytest.mark.broker]


async def test_broker_killed_during_a_run(private_mosquitto):
    port = private_mosquitto.port
    opts = {
        "stop-delay": 1.5,
        "domains": [
            {"name": f"v{i}", "vcpus": 1, "memory": 1024, "state": "running"} for i in range(3)
        ],
    }
    # The agent reconnects a little later than the scheduler below, so the scheduler's new
    # subscription exists when the agent hands over what it published during the outage.
    settings = agent_settings(
        port,
        hv_type="fake",
        hv_options=opts,
        mqtt={"reconnect_min_delay": 1.0, "reconnect_max_delay": 2.0},
    )
    prefix = settings.mqtt.task_topic.rsplit("/", 1)[0]
    async with running_agent(settings) as agent:
        async with scheduler(port, prefix) as sched:
            for i in range(3):
                await sched.publish(f"id: k{i}\ntask: stop vm\nlist:\n  - vm-name: v{i}\n")
            await sched.wait_for(
                lambda: all(sched.events_for(f"k{i}", "accepted") for i in range(3)), 10
            )
            assert not sched.results
        private_mosquitto.stop(kill=True)  # all three stops are still running (1.5 s each)
        await asyncio.sleep(2.0)  # they finish, and their results are published, meanwhile
        private_mosquitto.start()
        async with scheduler(port, prefix) as sched:
            results = await sched.wait_for(
                lambda: len({r.get("id") for r in sched.results}) == 3 and sched.results, 20
            )
            assert sorted(r["id"] for r in results) == ["k0", "k1", "k2"]
            assert all(r["list"][0]["status"] == "success" for r in results)
            assert agent.transport.connects >= 2
            # ... and the agent keeps serving.
            r = await sched.call("task: status\n")
            assert {e["state"] for e in r["list"]} == {"shutoff"}
            await asyncio.sleep(0.5)
            assert len([r for r in sched.results if r.get("id", "").startswith("k")]) == 3
