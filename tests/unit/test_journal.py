"""The task journal: durable records, group commit, recovery of what a run left."""

from __future__ import annotations

import asyncio

from asyncmigfra.journal import Journal


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
