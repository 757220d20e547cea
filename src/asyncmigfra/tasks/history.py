"""The agent's history: what it did, kept beside the journal (``task: history``).

Every result entry of a task the agent accepted (journaled) becomes one row of the
``history`` table in the journal's database: task id, task, VM, status, code, the failure's
``details`` (shortened), when the subtask began, how long it took, its destination and the
measured downtime. The rows are written by the journal's thread in the same group commit as
the task's ``finished`` record, so keeping them costs no fsync and no thread hop of its own;
they outlive the journal's own records (whose payloads go once the result is delivered) and
agent restarts. They are bounded by age (``agent.history-retention``) and count
(``agent.history-max-entries``); queries run in the journal's thread too, on indexes, with
a ``LIMIT``, so a query never blocks the event loop and never holds the writer long.

Not in the history: messages refused before they were accepted (unreadable, ``busy``,
``unavailable``) and the answers that are not journaled (``status``, ``cancel``,
``tune migration``, ``quit``, ``history``).

This module is pure (SQL text, rows in and out); :class:`~asyncmigfra.tasks.journal.Journal`
runs it.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Final

from asyncmigfra.model import ResultMessage

__all__ = ["HistoryItem", "HistoryQuery", "history_rows", "prune_history", "read_history"]

#: Kept in the order of ``started`` (the primary key clusters the rows by it), so a row costs
#: two b-tree inserts: the table and the VM index.
SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS history (
    started REAL NOT NULL,
    key TEXT NOT NULL,
    idx INTEGER NOT NULL,
    task_id TEXT,
    task TEXT NOT NULL,
    vm_name TEXT NOT NULL,
    status TEXT NOT NULL,
    code TEXT,
    details TEXT,
    duration REAL,
    destination TEXT,
    downtime REAL,
    PRIMARY KEY (started, key, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS history_vm ON history(vm_name, started);
"""
#: One row (written once per task: a result published again after a restart writes none).
INSERT: Final = "INSERT OR REPLACE INTO history VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
#: Characters of a failure's ``details`` kept.
MAX_DETAILS: Final = 300

Row = tuple[object, ...]


@dataclass(frozen=True, slots=True)
class HistoryItem:
    """One subtask as the history keeps it."""

    task_id: str | None
    task: str
    vm_name: str
    status: str
    code: str | None
    details: str | None
    #: s since the epoch.
    started: float
    #: s; ``None``: the subtask never began (cancelled or refused while queued).
    duration: float | None
    destination: str | None
    #: ms
    downtime: float | None


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    vm_name: str | None
    #: s since the epoch: subtasks that began at or after it.
    since: float | None
    limit: int


def history_rows(key: str, result: ResultMessage, finished: float) -> list[Row]:
    """The rows of one task's result (``key``: its journal record). A subtask that never
    began is dated ``finished`` (when it was answered), without a duration."""
    task = result.task.value if result.task is not None else result.result
    rows: list[Row] = []
    for idx, entry in enumerate(result.entries):
        destination = entry.extra.get("destination")
        details = entry.details[:MAX_DETAILS] if entry.status == "error" and entry.details else None
        rows.append(
            (
                entry.started if entry.started is not None else finished,
                key,
                idx,
                result.id,
                task,
                entry.vm_name,
                entry.status,
                entry.code,
                details,
                entry.seconds if entry.started is not None else None,
                destination if isinstance(destination, str) else None,
                entry.downtime,
            )
        )
    return rows


_SELECT: Final = (
    "SELECT task_id, task, vm_name, status, code, details, started, duration, destination, "
    "downtime FROM history"
)
_ORDER: Final = " ORDER BY started DESC, key, idx LIMIT ?"
#: (by VM, since) -> the query (fixed texts: each uses its index).
_QUERIES: Final = {
    (False, False): _SELECT + _ORDER,
    (True, False): _SELECT + " WHERE vm_name = ?" + _ORDER,
    (False, True): _SELECT + " WHERE started >= ?" + _ORDER,
    (True, True): _SELECT + " WHERE vm_name = ? AND started >= ?" + _ORDER,
}


def read_history(db: sqlite3.Connection, query: HistoryQuery) -> list[HistoryItem]:
    """The newest ``query.limit`` items that match, newest first (by when they began)."""
    params: list[object] = []
    if query.vm_name is not None:
        params.append(query.vm_name)
    if query.since is not None:
        params.append(query.since)
    params.append(query.limit)
    sql = _QUERIES[query.vm_name is not None, query.since is not None]
    return [HistoryItem(*row) for row in db.execute(sql, params).fetchall()]


def prune_history(db: sqlite3.Connection, *, before: float, keep: int) -> None:
    """Forget rows of subtasks that began before ``before``, and all but the newest
    ``keep``."""
    db.execute("DELETE FROM history WHERE started < ?", (before,))
    if keep <= 0:
        db.execute("DELETE FROM history")
        return
    # Older than the ``keep``-th newest (rows that began at the very same time stay together).
    db.execute(
        "DELETE FROM history WHERE started < "
        "(SELECT started FROM history ORDER BY started DESC LIMIT 1 OFFSET ?)",
        (keep - 1,),
    )
