"""``accepted`` strictly first (docs/protocol.md §1.4): with the journal on, no event of a
task goes out before its ``accepted``, which goes out only once its record is durable."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections import defaultdict

import pytest

from asyncmigfra.tasks.journal import Journal
from harness import agent_and_scheduler

pytestmark = pytest.mark.broker

TASKS = (
    "task: start vm\nvm-configurations:\n  - vm-name: vm-{i}\n    probe-with-ssh: false\n",
    "task: migrate vm\nvm-name: vm-{i}\ndestination: elsewhere\n"
    "parameter:\n  migration-type: live\n",
    "task: stop vm\nlist:\n  - vm-name: vm-{i}\n",
)


@pytest.mark.parametrize("progress_qos", [0, 1])
async def test_accepted_precedes_every_other_event_across_1000_tasks(
    mosquitto, tmp_path, progress_qos: int
):
    """With ``progress`` at QoS 1 every event is ordered by MQTT, so ``accepted`` is first
    at the scheduler too. At QoS 0 (the default) the broker may hand a ``progress`` to a
    scheduler that falls behind ahead of the QoS 1 messages waiting for its window
    (mosquitto does under this load; protocol.md §1.4): every other event still follows
    ``accepted``."""
    count = 1000
    async with agent_and_scheduler(
        mosquitto.port,
        agent={"state_dir": str(tmp_path / "state")},
        mqtt={"progress_qos": progress_qos},
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
        ordered = seen if progress_qos else [kind for kind in seen if kind != "progress"]
        assert ordered[0] == "accepted", (task_id, seen)
        assert seen.count("accepted") == 1, (task_id, seen)
        assert "done" in seen, (task_id, seen)
    # The results follow their events, one per task.
    assert sorted(str(r["id"]) for r in sched.results) == sorted(kinds)
    # Group commit: far fewer transactions than the records they carried.
    # Each task writes four records (accepted, running, finished, delivered); a burst shares
    # transactions (seen here: 120 commits for the 4000 records on an idle machine, 877 with
    # the other core busy; tests/unit/test_journal.py checks the grouping itself).
    assert commits < 4 * count


class _HeldJournal:
    """Holds every journal transaction until released (a hung disk)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = threading.Event()
        original = Journal._transaction

        def held(journal: Journal, db: object, ops: object, durable: bool) -> object:
            self.release.wait(30)
            return original(journal, db, ops, durable)  # type: ignore[arg-type]

        monkeypatch.setattr(Journal, "_transaction", held)


async def test_a_duplicate_s_rejected_event_never_precedes_the_first_copy_s_accepted(
    mosquitto, tmp_path
):
    async with agent_and_scheduler(
        mosquitto.port, agent={"state_dir": str(tmp_path / "state")}
    ) as (_, sched):
        body = "id: twice\ntask: start vm\nvm-configurations:\n  - vm-name: d1\n"
        await asyncio.gather(sched.publish(body), sched.publish(body))
        await sched.result_for("twice")
        await sched.wait_for(lambda: sched.events_for("twice", "rejected"), 5)
        kinds = [e["event"] for e in sched.events_for("twice")]
        assert kinds[0] == "accepted", kinds
        assert kinds.count("accepted") == 1


async def test_a_hung_journal_refuses_in_time_and_lets_the_agent_stop(
    mosquitto, tmp_path, monkeypatch
):
    monkeypatch.setattr("asyncmigfra.tasks.dispatching.dispatcher.JOURNAL_DEADLINE", 0.5)
    monkeypatch.setattr("asyncmigfra.tasks.journal.STALL_AFTER", 0.2)
    held = None
    async with agent_and_scheduler(
        mosquitto.port, agent={"state_dir": str(tmp_path / "state")}
    ) as (_, sched):
        held = _HeldJournal(monkeypatch)
        # A write that never finishes: refused in time, nothing runs.
        await sched.publish("id: hung\ntask: start vm\nvm-configurations:\n  - vm-name: h1\n")
        r = await sched.result_for("hung", timeout=5)
        assert r["list"][0]["code"] == "unavailable", r
        assert "no write within 0.5 s" in r["list"][0]["details"]
        assert not sched.events_for("hung", "accepted")
        assert (await sched.call("task: status\n"))["journal"] == "failing"
        # A cancel of a task still waiting for its record withdraws it.
        await sched.publish("id: waiting\ntask: start vm\nvm-configurations:\n  - vm-name: h2\n")
        c = await sched.call("task: cancel\ntarget: waiting\n")
        assert c["list"][0]["status"] == "success", c
        r = await sched.result_for("waiting", timeout=5)
        assert r["list"][0]["code"] == "cancelled", r
        assert not sched.events_for("waiting", "accepted")
        # A task still waiting when the agent stops does not hold the shutdown.
        await sched.publish("id: late\ntask: start vm\nvm-configurations:\n  - vm-name: h3\n")
        await asyncio.sleep(0.1)
        # Leaving the block stops the agent (grace 5 s); the harness fails if that hangs.
    # The agent stopped without its hung journal (journal.close_abandoned). Once the disk
    # comes back, the writes land in order: every refused task's record is withdrawn again,
    # so a restart runs none of them.
    assert held is not None
    held.release.set()
    path = tmp_path / "state" / "journal.sqlite"

    def rows() -> list[tuple[str, str]]:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return db.execute("SELECT task_id, state FROM tasks").fetchall()

    async with asyncio.timeout(10):
        while any(t.name == "asyncmigfra-journal" for t in threading.enumerate()):
            await asyncio.sleep(0.05)
    assert rows() == []
