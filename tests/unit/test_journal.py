"""The task journal: durable records, group commit, recovery of what a run left."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import structlog

from asyncmigfra.errors import StartupError
from asyncmigfra.tasks.journal import Journal, JournalWriteFailed


async def test_records_survive_a_reopen_with_their_state(tmp_path):
    j = Journal(tmp_path)
    assert await j.open() == []
    await j.accepted(
        "k1", task_id="t1", payload=b"task: quit", response_topic=None, correlation=None
    )
    await j.accepted("k2", task_id=None, payload=b"p2", response_topic="r/t", correlation=b"c")
    await j.accepted("k3", task_id="t3", payload=b"p3", response_topic=None, correlation=None)
    j.running("k2")
    j.finished("k3", b"result: vm started")
    await j.close()

    again = Journal(tmp_path)
    records = {r.key: r for r in await again.open()}
    await again.close()
    assert {k: r.state for k, r in records.items()} == {
        "k1": "accepted",
        "k2": "running",
        "k3": "finished",
    }
    assert records["k2"].response_topic == "r/t"
    assert records["k2"].correlation == b"c"
    assert records["k3"].result == b"result: vm started"
    assert records["k1"].payload == b"task: quit"


async def test_delivered_records_are_not_recovered(tmp_path):
    j = Journal(tmp_path)
    await j.open()
    await j.accepted("k", task_id="t", payload=b"p", response_topic=None, correlation=None)
    j.finished("k", b"r")
    j.delivered("k")
    await j.close()
    again = Journal(tmp_path)
    assert await again.open() == []
    await again.close()


async def test_a_burst_of_writes_is_grouped_into_few_commits(tmp_path):
    j = Journal(tmp_path)
    await j.open()
    futures = [
        j.accepted(f"k{i}", task_id=str(i), payload=b"p", response_topic=None, correlation=None)
        for i in range(500)
    ]
    await asyncio.gather(*futures)
    await j.close()
    assert j.commits < 100, f"{j.commits} commits for 500 records: no group commit"


async def test_writes_after_close_fail_cleanly(tmp_path):
    j = Journal(tmp_path)
    await j.open()
    await j.close()
    fut = j.accepted("k", task_id="t", payload=b"p", response_topic=None, correlation=None)
    assert fut.done()
    assert isinstance(fut.exception(), RuntimeError)


# --------------------------------------------------------------------------------------------
# One journal, one agent: the lock, and journals that cannot be used


async def test_a_second_journal_on_the_same_directory_names_the_holder(tmp_path):
    first = Journal(tmp_path)
    await first.open()
    second = Journal(tmp_path)
    with pytest.raises(StartupError) as err:
        await second.open()
    message = str(err.value)
    assert str(tmp_path) in message
    assert f"PID {os.getpid()}" in message
    assert "\n" not in message
    await first.close()
    # The lock goes with its holder: the directory can be used again.
    assert await second.open() == []
    await second.close()


async def test_a_damaged_journal_is_refused_with_what_to_do(tmp_path):
    (tmp_path / "journal.sqlite").write_bytes(b"this is no database " * 300)
    with pytest.raises(StartupError, match=r"damaged.*move it aside") as err:
        await Journal(tmp_path).open()
    assert "journal.sqlite" in str(err.value)
    # The refused journal does not keep the lock.
    j = Journal(tmp_path / "other")
    await j.open()
    await j.close()


async def test_a_truncated_journal_is_refused(tmp_path):
    j = Journal(tmp_path)
    await j.open()
    for i in range(50):
        await j.accepted(
            f"k{i}", task_id=None, payload=b"x" * 4000, response_topic=None, correlation=None
        )
    await j.close()
    path = tmp_path / "journal.sqlite"
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\xff" * 4096 + data[4196:])
    with pytest.raises(StartupError, match="damaged"):
        await Journal(tmp_path).open()


async def test_a_read_only_journal_is_refused_with_what_to_do(small_disk):
    state = small_disk.path / "state"
    j = Journal(state)
    await j.open()
    await j.close()
    small_disk.read_only()
    with pytest.raises(StartupError, match="writable for the agent's user") as err:
        await Journal(state).open()
    assert str(state) in str(err.value)


async def test_a_full_disk_fails_only_the_writes_that_need_room_and_recovers(small_disk):
    j = Journal(small_disk.path / "state")
    await j.open()
    await j.accepted("k0", task_id="0", payload=b"p", response_topic=None, correlation=None)
    small_disk.fill()
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(JournalWriteFailed, match="full"):
            await j.accepted(
                "big", task_id="1", payload=b"x" * 300_000, response_topic=None, correlation=None
            )
        assert j.failing
        await asyncio.sleep(4.5)  # two failing test writes: no news, not logged
        small_disk.free()
        # Nobody writes, yet the journal finds out by itself that it can write again.
        async with asyncio.timeout(10):
            while j.failing:
                await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)  # no test writes once it works
    assert [e["event"] for e in logs] == ["journal.write_failed", "journal.write_recovered"]
    await j.accepted(
        "big", task_id="1", payload=b"x" * 300_000, response_topic=None, correlation=None
    )
    await j.close()
    again = Journal(small_disk.path / "state")
    assert {r.key for r in await again.open()} == {"k0", "big"}
    await again.close()


async def test_one_failing_write_does_not_fail_the_others_of_its_batch(small_disk):
    j = Journal(small_disk.path / "state")
    await j.open()
    small_disk.fill(leave=64 * 1024)  # room for a small record, not for a 300 kB one
    big = j.accepted(
        "big", task_id="b", payload=b"x" * 300_000, response_topic=None, correlation=None
    )
    small = j.accepted("small", task_id="s", payload=b"p", response_topic=None, correlation=None)
    outcomes = await asyncio.gather(big, small, return_exceptions=True)
    assert isinstance(outcomes[0], JournalWriteFailed)
    assert outcomes[1] is None
    small_disk.free()
    await j.close()
    again = Journal(small_disk.path / "state")
    assert [r.key for r in await again.open()] == ["small"]
    await again.close()


async def test_a_journal_of_another_agent_is_refused(tmp_path):
    first = Journal(tmp_path, owner="node-a")
    await first.open()
    await first.accepted("k", task_id="t", payload=b"p", response_topic=None, correlation=None)
    await first.close()
    with pytest.raises(StartupError, match="belongs to the agent 'node-a', not to 'node-b'"):
        await Journal(tmp_path, owner="node-b").open()
    again = Journal(tmp_path, owner="node-a")
    assert [r.key for r in await again.open()] == ["k"]
    await again.close()


async def test_a_fresh_journal_on_a_full_disk_says_so_in_one_line(small_disk):
    small_disk.fill()
    with pytest.raises(StartupError) as err:
        await Journal(small_disk.path / "state").open()
    message = str(err.value)
    assert "free disk space" in message
    assert "\n" not in message


async def test_small_writes_fitting_on_a_full_disk_do_not_say_it_works_again(small_disk):
    """The review's flap: a tiny test write fits where task records do not."""
    j = Journal(small_disk.path / "state")
    await j.open()
    small_disk.fill(leave=64 * 1024)
    with structlog.testing.capture_logs() as logs:
        for i in range(2):
            with pytest.raises(JournalWriteFailed):
                await j.accepted(
                    f"big{i}",
                    task_id=None,
                    payload=b"x" * 300_000,
                    response_topic=None,
                    correlation=None,
                )
        await j.accepted("small", task_id=None, payload=b"p", response_topic=None, correlation=None)
        await asyncio.sleep(2.5)  # a test write of the failed size does not fit either
        assert j.failing
        small_disk.free()
        async with asyncio.timeout(10):
            while j.failing:
                await asyncio.sleep(0.05)
    assert [e["event"] for e in logs] == ["journal.write_failed", "journal.write_recovered"]
    await j.close()


async def test_a_hung_write_is_reported_as_failing(tmp_path, monkeypatch):
    j = Journal(tmp_path)
    await j.open()
    release = threading.Event()
    original = Journal._transaction

    def slow(self, db, ops, durable):
        release.wait(10)
        return original(self, db, ops, durable)

    monkeypatch.setattr(Journal, "_transaction", slow)
    monkeypatch.setattr("asyncmigfra.tasks.journal.STALL_AFTER", 0.2)
    fut = j.accepted("k", task_id=None, payload=b"p", response_topic=None, correlation=None)
    await asyncio.sleep(0.5)
    assert j.failing
    assert not fut.done()
    release.set()
    await fut
    assert not j.failing
    await j.close()


async def test_a_withdrawn_record_is_gone_even_if_its_write_lands_late(tmp_path):
    j = Journal(tmp_path)
    await j.open()
    written = j.accepted("k", task_id="t", payload=b"p", response_topic=None, correlation=None)
    j.withdrawn("k")
    await written
    await j.close()
    again = Journal(tmp_path)
    assert await again.open() == []
    await again.close()


async def test_delivered_records_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr("asyncmigfra.tasks.journal.MAX_DELIVERED", 10)
    j = Journal(tmp_path)
    await j.open()
    for i in range(30):
        await j.accepted(
            f"k{i}", task_id=str(i), payload=b"p", response_topic=None, correlation=None
        )
        j.delivered(f"k{i}")
    await j.close()
    again = Journal(tmp_path)
    await again.open()
    await again.close()
    import sqlite3  # noqa: PLC0415

    with sqlite3.connect(tmp_path / "journal.sqlite") as db:
        kept = [row[0] for row in db.execute("SELECT task_id FROM tasks ORDER BY updated_at")]
    assert kept == [str(i) for i in range(20, 30)]


async def test_a_record_accepted_to_run_at_once_is_recovered_as_running(tmp_path):
    j = Journal(tmp_path)
    await j.open()
    await j.accepted(
        "k", task_id="t", payload=b"p", response_topic=None, correlation=None, running=True
    )
    await j.close()
    again = Journal(tmp_path)
    records = await again.open()
    await again.close()
    assert [(r.key, r.state) for r in records] == [("k", "running")]
