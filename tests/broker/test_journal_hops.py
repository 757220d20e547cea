"""A task whose work can begin at once is written ``running`` with its ``accepted`` record
(one hand-off to the journal's thread); one that waits for its VM's lane is written
``accepted`` and marked ``running`` only when it starts (docs/reliability.md)."""

from __future__ import annotations

import asyncio

import pytest

from asyncmigfra.tasks.journal import Journal
from harness import agent_and_scheduler

pytestmark = pytest.mark.broker


class _Spy:
    """What the dispatcher asked the journal: ``accepted`` (task id -> running at once) and
    the keys later marked ``running``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.accepted: dict[str | None, bool] = {}
        self.keys: dict[str | None, str] = {}
        self.marked: list[str] = []
        accepted, running = Journal.accepted, Journal.running

        def spy_accepted(journal: Journal, key: str, **kw: object) -> object:
            task_id = kw["task_id"]
            self.accepted[task_id] = bool(kw.get("running", False))  # type: ignore[index]
            self.keys[task_id] = key  # type: ignore[index]
            return accepted(journal, key, **kw)  # type: ignore[arg-type]

        def spy_running(journal: Journal, key: str) -> object:
            self.marked.append(key)
            return running(journal, key)

        monkeypatch.setattr(Journal, "accepted", spy_accepted)
        monkeypatch.setattr(Journal, "running", spy_running)


async def test_running_is_written_with_accepted_only_when_the_work_begins_at_once(
    mosquitto, tmp_path, monkeypatch
):
    spy = _Spy(monkeypatch)
    async with agent_and_scheduler(
        mosquitto.port, agent={"state_dir": str(tmp_path / "state")}
    ) as (agent, sched):
        r = await sched.call("task: start vm\nvm-configurations:\n  - vm-name: free\n")
        assert r["list"][0]["status"] == "success", r
        (first,) = spy.accepted
        assert spy.accepted[first] is True
        assert spy.keys[first] not in spy.marked

        release = agent.dispatcher.hold_lane("held")
        assert callable(release)
        await sched.publish("id: waits\ntask: start vm\nvm-configurations:\n  - vm-name: held\n")
        await sched.wait_for(lambda: sched.events_for("waits", "accepted"))
        assert spy.accepted["waits"] is False
        await asyncio.sleep(0.05)
        assert not sched.events_for("waits", "done")
        assert spy.keys["waits"] not in spy.marked
        release()
        r = await sched.result_for("waits")
        assert r["list"][0]["status"] == "success", r
        assert spy.keys["waits"] in spy.marked
