"""History reads share the journal's thread with the writes: a burst of reads must not hold
back an ``accepted`` record (the promise a scheduler waits for) behind all of them, and a
journal written by the release before the history existed opens and keeps one."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import pytest
from test_history import _entry, _finish, _result

from asyncmigfra.tasks import history as history_module
from asyncmigfra.tasks.history import HistoryItem, HistoryQuery
from asyncmigfra.tasks.journal import Journal


async def test_an_accepted_write_waits_for_one_history_read_not_for_all(
    tmp_path, monkeypatch: pytest.MonkeyPatch
):
    j = Journal(tmp_path)
    await j.open()
    first_read, go_on = threading.Event(), threading.Event()
    real = history_module.read_history

    def read(db: sqlite3.Connection, query: HistoryQuery) -> list[HistoryItem]:
        if not first_read.is_set():  # the first read lasts until the task is accepted
            first_read.set()
            go_on.wait(10)
        return real(db, query)

    monkeypatch.setattr(history_module, "read_history", read)
    done: list[str] = []
    reads = [j.history(HistoryQuery(None, None, 1000)) for _ in range(8)]
    for i, fut in enumerate(reads):
        fut.add_done_callback(lambda _, i=i: done.append(f"read {i}"))
    # The writer is reading; now a task is accepted.
    assert await asyncio.to_thread(first_read.wait, 10)
    accepted = j.accepted("k", task_id="t", payload=b"p", response_topic=None, correlation=None)
    accepted.add_done_callback(lambda _: done.append("accepted"))
    go_on.set()
    await asyncio.gather(accepted, *reads)
    print(done)
    # At most the read under way when it came went first.
    assert done.index("accepted") <= 1, done
    await j.close()


#: The journal's schema of the release before the history (``git show 30d6e7b:src/...``).
_OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    key TEXT PRIMARY KEY,
    task_id TEXT,
    payload BLOB NOT NULL,
    response_topic TEXT,
    correlation BLOB,
    state TEXT NOT NULL,
    result BLOB,
    accepted_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state);
CREATE INDEX IF NOT EXISTS tasks_updated ON tasks(updated_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


async def test_a_journal_of_the_release_before_opens_and_keeps_a_history(tmp_path):
    with sqlite3.connect(tmp_path / "journal.sqlite") as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_OLD_SCHEMA)
        db.execute("INSERT INTO meta VALUES ('agent', 'host-a')")
        now = time.time()
        db.execute(
            "INSERT INTO tasks VALUES ('old', 't0', x'00', NULL, NULL, 'finished', x'01', ?, ?)",
            (now, now),
        )
    j = Journal(tmp_path, owner="host-a")
    records = await j.open()
    assert [(r.key, r.state) for r in records] == [("old", "finished")]  # still owed
    await _finish(j, "k1", _result("t1", _entry("vm1", time.time())))
    items = await j.history(HistoryQuery(None, None, 10))
    assert [(i.task_id, i.vm_name) for i in items] == [("t1", "vm1")]
    await j.close()
