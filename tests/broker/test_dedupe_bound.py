"""Results remembered for duplicates are bounded in bytes, not only by count and time."""

from __future__ import annotations

import pytest

from harness import agent_and_scheduler

pytestmark = pytest.mark.broker


async def test_remembered_results_are_bounded_in_bytes(mosquitto, monkeypatch):
    monkeypatch.setattr("asyncmigfra.tasks.dispatching.remembered._MAX_REMEMBERED_BYTES", 20_000)
    async with agent_and_scheduler(mosquitto.port) as (agent, sched):
        body = "task: start vm\nvm-configurations:\n  - vm-name: v{i}\n"
        for i in range(40):
            await sched.publish(f"id: keep-{i}\n" + body.format(i=i))
            await sched.result_for(f"keep-{i}")
        remembered = agent.dispatcher._finished
        assert 0 < len(remembered) < 40
        assert agent.dispatcher._remembered_bytes <= 20_000
        assert agent.dispatcher._remembered_bytes == sum(c for _, _, c in remembered.values())
        # The newest is still answered from memory (no second run) ...
        await sched.publish("id: keep-39\n" + body.format(i=39))
        await sched.wait_for(
            lambda: len([r for r in sched.results if r.get("id") == "keep-39"]) == 2
        )
        assert len(sched.events_for("keep-39", "accepted")) == 1
        # ... the oldest was forgotten, so it runs again.
        await sched.publish("id: keep-0\n" + body.format(i=0))
        await sched.wait_for(lambda: len(sched.events_for("keep-0", "accepted")) == 2)
