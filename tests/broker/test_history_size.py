"""A ``history`` answer is bounded in bytes, not only in entries: a history of long names,
ids and failure details (what any client can fill it with) must still reach the client
through a broker that limits messages to the agent's own ``limits.max-message-size``, as
docs/operations.md §2 recommends (mosquitto drops a larger message silently)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from asyncmigfra import cli
from asyncmigfra.tasks.history import INSERT, MAX_DETAILS
from asyncmigfra.tasks.journal import Journal
from asyncmigfra.wire.parsing.names import MAX_TASK_ID
from harness import agent_settings, running_agent, scheduler

pytestmark = pytest.mark.broker

LIMIT = 1024 * 1024


@pytest.fixture
def limited_mosquitto(private_mosquitto):  # type: ignore[no-untyped-def]
    """A broker of the test's own that drops messages over :data:`LIMIT` bytes."""
    with private_mosquitto.conf.open("a") as conf:
        conf.write(f"message_size_limit {LIMIT}\n")
    private_mosquitto.restart()
    return private_mosquitto


async def _fill(state: Path, owner: str, rows: int) -> None:
    """``rows`` history entries as long as the wire lets a client make them (3-byte UTF-8
    characters), in the agent's own journal."""
    journal = Journal(state, owner=owner)
    await journal.open()
    await journal.close()
    vm = "\u4e2d" * 200
    with sqlite3.connect(state / "journal.sqlite") as db:
        now = time.time()
        db.executemany(
            INSERT,
            [
                (now - i, f"k{i}", 0, f"{i:08d}" + "\u4e2d" * (MAX_TASK_ID - 8), "migrate vm",
                 vm, "error", "migration-failed", "\u4e2d" * MAX_DETAILS, 1.0,
                 "d" * 253, None)
                for i in range(rows)
            ],
        )  # fmt: skip


async def test_a_history_of_long_entries_reaches_the_client(limited_mosquitto, tmp_path, capsys):
    settings = agent_settings(limited_mosquitto.port, protocol="3.1.1")
    settings = replace(settings, agent=replace(settings.agent, state_dir=str(tmp_path / "state")))
    await _fill(tmp_path / "state", settings.hostname, 1000)
    prefix = settings.mqtt.task_topic.rsplit("/", 1)[0]
    async with (
        scheduler(limited_mosquitto.port, prefix, protocol="3.1.1") as sched,
        running_agent(settings),
    ):
        task_id = f"h-{uuid.uuid4().hex[:8]}"
        await sched.publish(f"id: {task_id}\ntask: history\nlimit: 1000\n")
        result = await sched.result_for(task_id, timeout=20)
        print({k: v for k, v in result.items() if k != "list"}, len(result["list"]))
        assert result["result"] == "history"
        assert 0 < len(result["list"]) <= 1000
        # The newest entries, in order; and the answer says when it holds fewer than asked.
        ids = [item["id"][:8] for item in result["list"]]
        assert ids == [f"{i:08d}" for i in range(len(ids))]
        if len(ids) < 1000:
            assert result["more"] is True
        # The agent still answers.
        status = await sched.call("task: status\n")
        assert status["result"] == "status"
        # The CLI says that there is more (exit 0: nothing failed).
        args = ["history", settings.hostname, "--limit", "1000", "--json", "--mqtt-protocol",
                "3.1.1", "--broker", f"127.0.0.1:{limited_mosquitto.port}"]  # fmt: skip
        code = await asyncio.to_thread(cli.main, args)
        out = capsys.readouterr()
        assert code == 0, out.err
        listed = [line for line in out.out.splitlines() if line.startswith('{"host"')]  # (not logs)
        assert len(listed) == len(ids)
        assert f"sent its newest {len(ids)} entries, all that fit in one answer" in out.err
