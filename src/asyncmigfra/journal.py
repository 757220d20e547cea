"""The journal: accepted tasks and the results they are owed, kept on disk.

MQTT acknowledges a message when the client receives it, before the agent has done anything
with it; a crash after that would lose the task silently. So every accepted message is
written here (SQLite in WAL mode, ``synchronous=FULL``) and the ``accepted`` event goes out
only once the record is durable: a scheduler that saw ``accepted`` can rely on getting a
result, even across an agent crash or restart. The record follows the task:

    accepted ──► running ──► finished (result owed) ──► delivered (broker acknowledged)

On start-up the agent reads what a previous run left (:meth:`Journal.recover`): tasks that
never started run again; tasks that were running are reconciled with the hypervisor; results
that were owed are published again. Delivered rows are pruned after a retention time.

All SQLite work happens in one dedicated thread. Writes are batched: everything queued while
the previous transaction committed goes into the next one (group commit), so a burst of
tasks costs one fsync, not one each. Only the ``accepted`` record is fsynced
(``synchronous=FULL``): it is the promise. The later state changes (running, finished,
delivered) are committed with ``synchronous=NORMAL`` (durable across a crash of the agent,
not of the machine) and coalesced for a few milliseconds; if the machine dies before they
reach the disk, recovery finds the task ``running`` and reconciles it with the hypervisor,
which gives the same answer. One fsync per task instead of four (measured: 0.45 ms each).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TypeVar

import structlog

__all__ = ["Journal", "JournalRecord"]

log = structlog.stdlib.get_logger(__name__)

T = TypeVar("T")
State = Literal["accepted", "running", "finished", "delivered"]

_SCHEMA = """
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
"""


@dataclass(frozen=True, slots=True)
class JournalRecord:
    key: str
    task_id: str | None
    payload: bytes
    response_topic: str | None
    correlation: bytes | None
    state: State
    result: bytes | None
    accepted_at: float


#: (sql, parameters, future to resolve after the commit, must be fsynced)
_Op = tuple[str, tuple[object, ...], "asyncio.Future[None] | None", bool]
_FINISHED: Final = "UPDATE tasks SET state = 'finished', result = ?, updated_at = ? WHERE key = ?"
#: s to wait for more non-urgent writes before committing them.
_COALESCE = 0.02


class Journal:
    """A durable task journal in ``directory/journal.sqlite``."""

    def __init__(self, directory: Path, *, retention: float = 86400.0) -> None:
        self.path = directory / "journal.sqlite"
        self._directory = directory
        self._retention = retention
        self._ops: list[_Op] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._db: sqlite3.Connection | None = None
        self._durable = True
        self.commits = 0

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> list[JournalRecord]:
        """Open (creating it if needed) and return what a previous run left unfinished."""
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[list[JournalRecord]] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="asyncmigfra-journal", daemon=True
        )
        self._thread.start()
        return await ready

    async def close(self) -> None:
        """Commit what is queued and stop the thread."""
        if self._thread is None:
            return
        with self._cond:
            self._closing = True
            self._cond.notify()
        thread = self._thread
        await asyncio.to_thread(thread.join)
        self._thread = None

    # ------------------------------------------------------------------ writes

    def accepted(
        self,
        key: str,
        *,
        task_id: str | None,
        payload: bytes,
        response_topic: str | None,
        correlation: bytes | None,
    ) -> asyncio.Future[None]:
        """Record an accepted message; the future resolves once it is on disk."""
        now = time.time()
        return self._submit(
            "INSERT OR REPLACE INTO tasks VALUES (?, ?, ?, ?, ?, 'accepted', NULL, ?, ?)",
            (key, task_id, payload, response_topic, correlation, now, now),
            wait=True,
            durable=True,
        )

    def running(self, key: str) -> None:
        self._submit(
            "UPDATE tasks SET state = 'running', updated_at = ? WHERE key = ? "
            "AND state = 'accepted'",
            (time.time(), key),
        )

    def finished(self, key: str, result: bytes) -> None:
        self._submit(_FINISHED, (result, time.time(), key))

    def delivered(self, key: str) -> None:
        """The broker has the result: the record is done. A ``finished`` update of the same
        task still waiting in the batch is dropped (it would be overwritten at once)."""
        with self._cond:
            self._ops = [op for op in self._ops if not (op[0] is _FINISHED and op[1][2] == key)]
        self._submit(
            "UPDATE tasks SET state = 'delivered', payload = x'', result = NULL, updated_at = ? "
            "WHERE key = ?",
            (time.time(), key),
        )

    def _submit(
        self, sql: str, params: tuple[object, ...], *, wait: bool = False, durable: bool = False
    ) -> asyncio.Future[None]:
        assert self._loop is not None, "Journal.open() was not awaited"
        fut: asyncio.Future[None] = self._loop.create_future()
        with self._cond:
            if self._closing:
                fut.set_exception(RuntimeError("the journal is closed"))
                return fut
            self._ops.append((sql, params, fut if wait else None, durable))
            # Wake the writer for what must be on disk now, or when it sleeps with nothing
            # to do; other writes wait in the batch (notifying for each would end the
            # coalescing wait at once).
            if durable or len(self._ops) == 1:
                self._cond.notify()
        if not wait:
            fut.set_result(None)
        return fut

    # ------------------------------------------------------------------ the thread

    def _run(self, ready: asyncio.Future[list[JournalRecord]]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            records = self._open_db()
        except Exception as exc:  # noqa: BLE001 - reported to the awaiting caller
            loop.call_soon_threadsafe(_set_exception, ready, exc)
            return
        loop.call_soon_threadsafe(_set_result, ready, records)
        db = self._db
        assert db is not None
        while True:
            with self._cond:
                while not self._ops and not self._closing:
                    self._cond.wait()
                if not self._closing and not any(op[3] for op in self._ops):
                    # Nothing urgent: let a few more state changes join this transaction.
                    self._cond.wait(_COALESCE)
                ops, self._ops = self._ops, []
                closing = self._closing
            if ops:
                self._commit(db, ops, loop)
            if closing and not self._ops:
                break
        db.close()

    def _open_db(self) -> list[JournalRecord]:
        self._directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        cutoff = time.time() - self._retention
        db.execute("DELETE FROM tasks WHERE state = 'delivered' AND updated_at < ?", (cutoff,))
        rows = db.execute(
            "SELECT key, task_id, payload, response_topic, correlation, state, result, "
            "accepted_at FROM tasks WHERE state != 'delivered' ORDER BY accepted_at"
        ).fetchall()
        self._db = db
        return [JournalRecord(*row) for row in rows]

    def _commit(
        self, db: sqlite3.Connection, ops: list[_Op], loop: asyncio.AbstractEventLoop
    ) -> None:
        error: BaseException | None = None
        durable = any(op[3] for op in ops)
        try:
            if durable != self._durable:
                db.execute("PRAGMA synchronous=" + ("FULL" if durable else "NORMAL"))
                self._durable = durable
            db.execute("BEGIN")
            for sql, params, _, _ in ops:
                db.execute(sql, params)
            db.execute("COMMIT")
            self.commits += 1
        except Exception as exc:  # noqa: BLE001 - the writer thread must survive any bad row
            error = exc
            log.error("journal.write_failed", error=repr(exc), ops=len(ops))  # noqa: TRY400
            if db.in_transaction:
                db.execute("ROLLBACK")
        for _, _, fut, _ in ops:
            if fut is not None:
                if error is None:
                    loop.call_soon_threadsafe(_set_result, fut, None)
                else:
                    loop.call_soon_threadsafe(_set_exception, fut, error)


def _set_result(fut: asyncio.Future[T], value: T) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[T], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
