"""``accepted`` strictly first (docs/protocol.md §1.4): with the journal on, no event of a
task goes out before its ``accepted``, which goes out only once its record is durable."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from harness import agent_and_scheduler

pytestmark = pytest.mark.broker

TASKS = (
    "task: start vm\nvm-configurations:\n  - vm-name: vm-{i}\n    probe-with-ssh: false\n",
    "task: migrate vm\nvm-name: vm-{i}\ndestination: elsewhere\n"
    "parameter:\n  migration-type: live\n",
    "task: stop vm\nlist:\n  - vm-name: vm-{i}\n",
)


async def test_accepted_precedes_every_other_event_across_1000_tasks(mosquitto, tmp_path):
    count = 1000
    async with agent_and_scheduler(
        mosquitto.port, agent={"state_dir": str(tmp_path / "state")}
    ) as (agent, sched):
        assert agent.journal is not None
        sem = asyncio.Semaphore(50)

        async def send(i: int) -> None:
            async with sem:
                await sched.publish(f"id: order-{i}\n" + TASKS[i % len(TASKS)].format(i=i % 40))

        await asyncio.gather(*(send(i) for i in range(count)))
        await sched.wait_for(lambda: len(sched.results) >= count, 120)
        commits = agent.journal.commits

    kinds: dict[str, list[str]] = defaultdict(list)
    for event in sched.events:
        kinds[str(event.get("id"))].append(event["event"])
    assert len(kinds) == count
    for task_id, seen in kinds.items():
        assert seen[0] == "accepted", (task_id, seen)
        assert seen.count("accepted") == 1, (task_id, seen)
        assert "done" in seen, (task_id, seen)
    # The results follow their events, one per task.
    assert sorted(str(r["id"]) for r in sched.results) == sorted(kinds)
    # Group commit: far fewer transactions than the records they carried.
    # Group commit: each task writes four records (accepted, running, finished, delivered);
    # a burst shares transactions (seen here: 120 for the 4000 records).
    assert commits < count // 2
