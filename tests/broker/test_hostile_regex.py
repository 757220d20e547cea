"""A hostile stop regex never stalls the agent (issue 13): the pattern that froze it for
135 s is answered at once, and a status task sent right behind it is answered at once too
(within 2 s: a backtracking match of this pattern takes minutes; the bound leaves room for a
loaded 2-core machine, where 100 ms was seen to flake)."""

from __future__ import annotations

import time

import pytest

from harness import agent_and_scheduler

pytestmark = pytest.mark.broker

DOMAINS = [{"name": f"vm-compute-node-{i:05d}", "vcpus": 1, "memory": 1024} for i in range(50)]


@pytest.mark.parametrize("groups", [15, 64])
async def test_catastrophic_regex_does_not_stall_the_agent(mosquitto, groups):
    async with agent_and_scheduler(
        mosquitto.port, hv_type="fake", hv_options={"domains": DOMAINS}
    ) as (_, sched):
        regex = "(.*)" * groups + "X"
        await sched.publish(f"id: evil\ntask: stop vm\nlist:\n  - regex: '{regex}'\n")
        t0 = time.perf_counter()
        status = await sched.call("task: status\n", timeout=5)
        status_s = time.perf_counter() - t0
        evil = await sched.result_for("evil", timeout=5)
        assert status["result"] == "status"
        assert status_s < 2.0, f"status answered after {status_s * 1000:.0f} ms"
        # Nothing matched (no name ends in X): one success entry named after the regex.
        assert evil["list"] == [{"vm-name": regex, "status": "success"}]


async def test_a_backreference_is_refused_with_a_reason(mosquitto):
    async with agent_and_scheduler(
        mosquitto.port, hv_type="fake", hv_options={"domains": DOMAINS}
    ) as (_, sched):
        r = await sched.call("task: stop vm\nlist:\n  - regex: '(vm)\\1.*'\n")
        (entry,) = r["list"]
        assert entry["code"] == "invalid-message"
        assert "no backreferences" in entry["details"]
        # The agent serves on.
        assert (await sched.call("task: status\n"))["result"] == "status"
