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

One journal belongs to one agent: the agent holds an exclusive lock (``flock`` on
``directory/lock``, which also names the holder's PID) for its whole life, so a second agent
pointed at the same directory refuses to start instead of recovering, and answering, the
first one's tasks. A journal that cannot be used at start-up (locked, corrupt, unreadable,
read-only) raises :class:`~asyncmigfra.errors.StartupError` with a one-line reason and what to
do. A write that fails later (disk full, I/O error) fails only the writes it carried: the
``accepted`` record's future raises :class:`JournalWriteFailed` (the dispatcher refuses that
task with ``unavailable``), :attr:`Journal.failing` says so until a write succeeds again.

All SQLite work happens in one dedicated thread. Writes are batched: everything queued while
the previous transaction committed goes into the next one (group commit), so a burst of
tasks costs one fsync, not one each. Only the ``accepted`` record is fsynced
(``synchronous=FULL``): it is the promise. The later state changes are committed with
``synchronous=NORMAL`` (durable across a crash of the agent, not of the machine). The task's
work begins only once its ``running`` mark is committed (not fsynced, no coalescing wait), so
a restart after a crash of the agent reconciles a task that had begun instead of running it
again; ``finished`` and ``delivered`` are coalesced for a few milliseconds. If the machine
dies before they reach the disk, recovery finds the task ``accepted`` (run again) or
``running`` (reconciled with the hypervisor) and publishes its result. One fsync per task
instead of four (measured: 0.45 ms each).

The same database keeps the agent's history (:mod:`asyncmigfra.tasks.history`): the rows of a
task's result entries go into the transaction of its ``finished`` record, and history
queries (:meth:`Journal.history`) run in the journal's thread between transactions, one at
a time with the writes queued meanwhile committed before the next (a read of 1000 entries
of a full history takes about 9 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import structlog

from asyncmigfra.errors import StartupError
from asyncmigfra.tasks import history as _history
from asyncmigfra.tasks.history import HistoryItem, HistoryQuery
from asyncmigfra.tasks.journaldir import advice, disk_full, lock_directory

__all__ = ["Journal", "JournalRecord", "JournalWriteFailed", "journal_state"]

log = structlog.stdlib.get_logger(__name__)

T = TypeVar("T")
State = Literal["accepted", "running", "finished", "delivered"]

_SCHEMA = (
    """
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
    + _history.SCHEMA
)


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


class JournalWriteFailed(Exception):
    """A journal write did not reach the disk; ``str()`` is SQLite's reason."""


#: (sql, parameters, future to resolve after the commit, must be fsynced)
_Op = tuple[str, tuple[object, ...], "asyncio.Future[None] | None", bool]
_ACCEPTED: Final = "INSERT OR REPLACE INTO tasks VALUES (?, ?, ?, ?, ?, 'accepted', NULL, ?, ?)"
#: The record of a task accepted when its work can begin at once: durable and ``running`` in
#: one write (what ``accepted`` then ``running`` leave, one thread hand-off instead of two).
_ACCEPTED_RUNNING: Final = (
    "INSERT OR REPLACE INTO tasks VALUES (?, ?, ?, ?, ?, 'running', NULL, ?, ?)"
)
_INSERTS: Final = (_ACCEPTED, _ACCEPTED_RUNNING)
_FINISHED: Final = "UPDATE tasks SET state = 'finished', result = ?, updated_at = ? WHERE key = ?"
#: Delivered records kept at most (ids and times, their payloads are already gone).
MAX_DELIVERED: Final = 100_000
#: Commits between two prunings.
_PRUNE_EVERY: Final = 10_000
#: s of history kept by default (``agent.history-retention``): 30 days.
HISTORY_RETENTION: Final = 30 * 86400.0
#: History rows kept at most by default (``agent.history-max-entries``).
HISTORY_MAX_ENTRIES: Final = 100_000
_PRUNE: Final = (
    "DELETE FROM tasks WHERE state = 'delivered' AND (updated_at < ? OR key IN "
    "(SELECT key FROM tasks WHERE state = 'delivered' ORDER BY updated_at DESC "
    "LIMIT -1 OFFSET ?))"
)
#: s :meth:`Journal.close` waits for the writer to commit what is queued.
CLOSE_TIMEOUT: Final = 5.0
#: s a transaction may take before :attr:`Journal.failing` says so (a hung disk).
STALL_AFTER: Final = 5.0
#: SQLite's primary result codes that matter here.
_SQLITE_FULL = 13
_SQLITE_IOERR = 10
_SQLITE_NOT_WRITABLE = frozenset({3, 8, 14})  # PERM, READONLY, CANTOPEN
#: s to wait for more non-urgent writes before committing them.
_COALESCE = 0.02
#: s between test writes while writes fail and no task writes (so ``failing`` clears by
#: itself once the disk has room again).
_PROBE_INTERVAL = 2.0


def _probe(size: int) -> list[_Op]:
    """A test write that needs ``size`` bytes of room and leaves nothing behind."""
    row = ("probe", None, b"\0" * size, None, None, 0.0, 0.0)
    return [
        (_ACCEPTED, row, None, True),
        ("DELETE FROM tasks WHERE key = 'probe'", (), None, True),
    ]


def _payload_size(params: tuple[object, ...]) -> int:
    payload = params[2]
    return len(payload) if isinstance(payload, bytes) else 0


class Journal:
    """A durable task journal in ``directory/journal.sqlite``."""

    def __init__(
        self,
        directory: Path,
        *,
        owner: str | None = None,
        retention: float = 86400.0,
        history_retention: float = HISTORY_RETENTION,
        history_max_entries: int = HISTORY_MAX_ENTRIES,
    ) -> None:
        self.path = directory / "journal.sqlite"
        self._directory = directory
        #: The agent name the journal belongs to (recorded when it is created, checked after).
        self._owner = owner
        self._retention = retention
        self._history_retention = history_retention
        #: History rows kept at most; 0: no history is kept.
        self._history_max = history_max_entries
        #: History rows written since the last pruning: pruned again once they are a tenth
        #: of the maximum, so the table stays near its bound at any task rate.
        self._history_written = 0
        self._ops: list[_Op] = []
        #: Reads waiting for the thread: (function of the connection, its future).
        self._reads: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._durable = True
        self.commits = 0
        #: The last write failed (disk full, I/O error); cleared once one as large works.
        self._write_failed = False
        #: Bytes of the largest ``accepted`` payload that could not be written: the test
        #: write needs that much room before the journal says it works again.
        self._probe_bytes = 0
        #: ``time.monotonic()`` when the transaction under way began (``None``: none).
        self._busy_since: float | None = None
        self._next_prune = _PRUNE_EVERY

    @property
    def failing(self) -> bool:
        """Writes fail (disk full, I/O error), or one has been under way for more than
        ``STALL_AFTER`` s (a hung disk)."""
        busy = self._busy_since
        return self._write_failed or (busy is not None and time.monotonic() - busy > STALL_AFTER)

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> list[JournalRecord]:
        """Lock and open (creating it if needed); return what a previous run left unfinished.

        Raises:
            StartupError: another agent holds the lock, or the journal is corrupt,
                unreadable or read-only (the message says which, and what to do).
        """
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
        await asyncio.to_thread(thread.join, CLOSE_TIMEOUT)
        self._thread = None
        if thread.is_alive():
            # A hung disk: the process ends without it (the thread is a daemon); the lock
            # goes with the process, and what was not written is recovered as documented.
            log.error("journal.close_abandoned", path=str(self.path), waited=CLOSE_TIMEOUT)
            return
        self._unlock()

    # ------------------------------------------------------------------ writes

    def accepted(
        self,
        key: str,
        *,
        task_id: str | None,
        payload: bytes,
        response_topic: str | None,
        correlation: bytes | None,
        running: bool = False,
    ) -> asyncio.Future[None]:
        """Record an accepted message; the future resolves once it is on disk.

        ``running``: its work begins as soon as the record is durable (the dispatcher has
        its lane and a slot for it), so the record is written ``running`` at once, as if
        :meth:`running` had followed: a restart reconciles the task instead of running it
        again, and the task costs one hand-off to the writer thread instead of two.
        """
        now = time.time()
        return self._submit(
            _ACCEPTED_RUNNING if running else _ACCEPTED,
            (key, task_id, payload, response_topic, correlation, now, now),
            wait=True,
            durable=True,
        )

    def running(self, key: str) -> asyncio.Future[None]:
        """Record that the task's work begins; the future resolves once it is committed
        (not fsynced: it must survive a crash of the agent, which is what tells recovery to
        reconcile the task rather than run it again)."""
        return self._submit(
            "UPDATE tasks SET state = 'running', updated_at = ? WHERE key = ? "
            "AND state = 'accepted'",
            (time.time(), key),
            wait=True,
        )

    def withdrawn(self, key: str) -> None:
        """The task was refused before it was accepted (its write failed, took too long, or
        a cancel came first): its record goes, also if a stalled write lands after all
        (writes run in order)."""
        self._submit("DELETE FROM tasks WHERE key = ?", (key,))

    def finished(self, key: str, result: bytes, history: Sequence[tuple[object, ...]] = ()) -> None:
        """The result is owed; ``history``: its rows (:func:`~asyncmigfra.tasks.history.
        history_rows`), written in the same transaction."""
        with self._cond:
            if not self._closing:
                wake = not self._ops  # (as ``_submit``: the batch's first op wakes the writer)
                self._ops.append((_FINISHED, (result, time.time(), key), None, False))
                if self._history_max > 0:
                    self._ops.extend((_history.INSERT, row, None, False) for row in history)
                if wake:
                    self._cond.notify()

    @property
    def keeps_history(self) -> bool:
        """``False`` with ``agent.history-max-entries: 0``."""
        return self._history_max > 0

    def history(self, query: HistoryQuery) -> asyncio.Future[list[HistoryItem]]:
        """Read the history in the journal's thread (between two transactions); the future
        fails with ``sqlite3.Error`` if the database cannot be read."""
        assert self._loop is not None, "Journal.open() was not awaited"
        fut: asyncio.Future[list[HistoryItem]] = self._loop.create_future()
        with self._cond:
            if self._closing:
                fut.set_exception(RuntimeError("the journal is closed"))
            else:
                self._reads.append((lambda db: _history.read_history(db, query), fut))
                self._cond.notify()
        return fut

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
            # Wake the writer for what somebody waits for, or when it sleeps with nothing
            # to do; other writes wait in the batch (notifying for each would end the
            # coalescing wait at once).
            if wait or len(self._ops) == 1:
                self._cond.notify()
        if not wait:
            fut.set_result(None)
        return fut

    # ------------------------------------------------------------------ the thread

    def _run(self, ready: asyncio.Future[list[JournalRecord]]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            self._lock()
            records = self._open_db()
        except Exception as exc:  # noqa: BLE001 - reported to the awaiting caller
            self._unlock()
            loop.call_soon_threadsafe(_set_exception, ready, exc)
            return
        loop.call_soon_threadsafe(_set_result, ready, records)
        db = self._db
        assert db is not None
        while True:
            with self._cond:
                while not self._ops and not self._reads and not self._closing:
                    if not self._cond.wait(_PROBE_INTERVAL if self._write_failed else None):
                        break  # failing and idle: try whether writes work again
                if (
                    not self._closing
                    and not self._reads
                    and self._ops
                    and all(op[2] is None for op in self._ops)
                ):
                    # Nothing urgent: let a few more state changes join this transaction.
                    self._cond.wait(_COALESCE)
                ops, self._ops = self._ops, []
                # One read per turn: a write that comes while it runs (an ``accepted`` record
                # a scheduler waits for) waits for that read only, not for all queued.
                reads, self._reads = self._reads[:1], self._reads[1:]
                closing = self._closing
            if ops:
                self._commit(db, ops, loop)
                self._history_written += sum(1 for op in ops if op[0] is _history.INSERT)
                if self.commits >= self._next_prune or self._history_written >= max(
                    1000, self._history_max // 10
                ):
                    self._next_prune = self.commits + _PRUNE_EVERY
                    with contextlib.suppress(sqlite3.Error):
                        self._prune(db)
            for read, fut in reads:
                self._answer(db, read, fut, loop)
            if not ops and not reads and self._write_failed and not closing:
                self._commit(db, _probe(self._probe_bytes), loop, probe=True)
            if closing and not self._ops:
                break
        db.close()

    def _lock(self) -> None:
        """Take the agent's exclusive lock on the directory, or say who holds it."""
        self._lock_fd = lock_directory(self._directory)

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    def _open_db(self) -> list[JournalRecord]:
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            check = db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check[0] if check else '?'}")
            db.executescript(_SCHEMA)
            self._check_owner(db)
            self._prune(db)
            rows = db.execute(
                "SELECT key, task_id, payload, response_topic, correlation, state, result, "
                "accepted_at FROM tasks WHERE state != 'delivered' ORDER BY accepted_at"
            ).fetchall()
            records = [JournalRecord(*row) for row in rows]
        except sqlite3.Error as exc:
            if db is not None:
                db.close()
            raise StartupError(self._unusable(exc)) from None
        self._db = db
        return records

    def _prune(self, db: sqlite3.Connection) -> None:
        """Forget delivered records past the retention time, and all but the newest
        ``MAX_DELIVERED`` (what the journal keeps stays bounded at any task rate); the same
        for the history with its own retention and bound."""
        now = time.time()
        db.execute(_PRUNE, (now - self._retention, MAX_DELIVERED))
        _history.prune_history(
            db, before=now - self._history_retention, keep=max(0, self._history_max)
        )
        self._history_written = 0

    @staticmethod
    def _answer(
        db: sqlite3.Connection,
        read: Callable[[sqlite3.Connection], T],
        fut: asyncio.Future[T],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        try:
            value = read(db)
        except Exception as exc:  # noqa: BLE001 - reported to the reader, the thread goes on
            loop.call_soon_threadsafe(_set_exception, fut, exc)
            return
        loop.call_soon_threadsafe(_set_result, fut, value)

    def _check_owner(self, db: sqlite3.Connection) -> None:
        """Record the owner in a new journal; refuse one that belongs to another agent (its
        tasks are owed on that agent's topics, by that agent's hypervisor)."""
        if self._owner is None:
            return
        row = db.execute("SELECT value FROM meta WHERE key = 'agent'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta VALUES ('agent', ?)", (self._owner,))
        elif row[0] != self._owner:
            raise StartupError(
                f"the journal {self.path} belongs to the agent {row[0]!r}, not to "
                f"{self._owner!r}; give each agent its own agent.state-dir (or move the "
                "directory aside if that agent is gone for good)"
            )

    def _unusable(self, exc: sqlite3.Error) -> str:
        """One line: why the journal cannot be opened, and what to do."""
        reason = str(exc) or exc.__class__.__name__
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if primary == _SQLITE_FULL or (primary == _SQLITE_IOERR and disk_full(self._directory)):
            return f"the journal {self.path} cannot be written ({reason}); free disk space"
        if primary in _SQLITE_NOT_WRITABLE or primary == _SQLITE_IOERR:
            return f"the journal {self.path} cannot be opened for writing ({reason}); " + advice(
                None, self._directory
            )
        return (
            f"the journal {self.path} is damaged ({reason}); move it aside to start with an "
            "empty journal (the tasks it holds are then not recovered)"
        )

    def _commit(
        self,
        db: sqlite3.Connection,
        ops: list[_Op],
        loop: asyncio.AbstractEventLoop,
        *,
        probe: bool = False,
    ) -> None:
        """One transaction for the batch. If it fails, each write is tried on its own, so
        one that cannot be written (a large payload on a full disk) fails only itself."""
        durable = any(op[3] for op in ops)
        self._busy_since = time.monotonic()
        try:
            error = self._transaction(db, ops, durable)
            if error is None:
                outcomes: list[Exception | None] = [None] * len(ops)
            elif len(ops) == 1 or probe:
                outcomes = [error] * len(ops)
            else:
                outcomes = [self._transaction(db, [op], op[3]) for op in ops]
        finally:
            self._busy_since = None
        failed = [e for e in outcomes if e is not None]
        if failed:
            if not self._write_failed:  # logged when writes start failing, not per write
                log.error(
                    "journal.write_failed", error=str(failed[0]), failed=len(failed), ops=len(ops)
                )
            self._write_failed = True
            for (sql, params, _, _), outcome in zip(ops, outcomes, strict=True):
                if outcome is not None and sql in _INSERTS:
                    self._probe_bytes = max(self._probe_bytes, _payload_size(params))
        elif self._write_failed and (probe or self._fits_again(ops)):
            # Working again once a write as large as the one that failed works (the test
            # write is that large): a small record fitting on a full disk is no news.
            log.info("journal.write_recovered")
            self._write_failed = False
            self._probe_bytes = 0
        settled = [
            (fut, _failure(outcome))
            for (_, _, fut, _), outcome in zip(ops, outcomes, strict=True)
            if fut is not None
        ]
        if settled:
            # One wake-up of the loop for the whole batch, not one per waiting write.
            loop.call_soon_threadsafe(_settle, settled)

    def _fits_again(self, ops: list[_Op]) -> bool:
        return any(
            sql in _INSERTS and _payload_size(params) >= self._probe_bytes
            for sql, params, _, _ in ops
        )

    def _transaction(
        self, db: sqlite3.Connection, ops: list[_Op], durable: bool
    ) -> Exception | None:
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
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            return exc
        return None


def journal_state(journal: Journal | None) -> str:
    """What presence and ``status`` say: ``ok``, ``failing`` (writes fail, so tasks are
    refused with ``unavailable``) or ``off`` (``agent.state-dir: none``)."""
    if journal is None:
        return "off"
    return "failing" if journal.failing else "ok"


def _set_result(fut: asyncio.Future[T], value: T) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[T], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _failure(error: Exception | None) -> JournalWriteFailed | None:
    return None if error is None else JournalWriteFailed(str(error) or type(error).__name__)


def _settle(settled: list[tuple[asyncio.Future[None], JournalWriteFailed | None]]) -> None:
    """Resolve the futures of one committed batch, in the loop's thread, in write order."""
    for fut, failure in settled:
        if fut.done():
            continue
        if failure is None:
            fut.set_result(None)
        else:
            fut.set_exception(failure)
