"""The agent's history in the journal (real SQLite, the journal's own thread), the
``history`` task's parsing, and ``--since``."""

from __future__ import annotations

import sqlite3
import time

import pytest

from asyncmigfra.console.history import history_items, since_argument
from asyncmigfra.errors import TaskRejected
from asyncmigfra.model import HistorySpec, ResultEntry, ResultMessage, TaskKind
from asyncmigfra.tasks.history import HistoryQuery, history_rows
from asyncmigfra.tasks.journal import Journal
from asyncmigfra.values import iso_instant, parse_instant
from asyncmigfra.wire.parsing import parse_task


def _result(
    task_id: str, *entries: ResultEntry, kind: TaskKind = TaskKind.MIGRATE
) -> ResultMessage:
    return ResultMessage(result=kind.result_name, entries=list(entries), id=task_id, task=kind)


def _entry(vm: str, started: float, **kw: object) -> ResultEntry:
    status = "error" if kw.get("code") else "success"
    return ResultEntry(vm_name=vm, status=status, started=started, seconds=2.5, **kw)  # type: ignore[arg-type]


async def _finish(j: Journal, key: str, result: ResultMessage) -> None:
    await j.accepted(key, task_id=result.id, payload=b"p", response_topic=None, correlation=None)
    j.finished(key, b"result", history_rows(key, result, time.time()))


async def test_history_is_newest_first_filtered_and_survives_a_reopen(tmp_path):
    j = Journal(tmp_path)
    await j.open()
    base = time.time() - 100
    await _finish(
        j,
        "k1",
        _result(
            "mig-1",
            _entry("vm1", base, extra={"destination": "b"}, downtime=12.34),
        ),
    )
    await _finish(
        j,
        "k2",
        _result(
            "stop-1",
            _entry("vm2", base + 10, code="vm-not-found", details="x" * 1000),
            kind=TaskKind.STOP,
        ),
    )
    await _finish(j, "k3", _result("mig-2", _entry("vm1", base + 20, extra={"destination": "c"})))
    j.delivered("k1")  # a delivered record loses its payload, not its history
    await j.close()

    again = Journal(tmp_path)
    assert [r.key for r in await again.open()] == ["k2", "k3"]
    every = await again.history(HistoryQuery(vm_name=None, since=None, limit=100))
    assert [(i.task_id, i.vm_name) for i in every] == [
        ("mig-2", "vm1"),
        ("stop-1", "vm2"),
        ("mig-1", "vm1"),
    ]
    oldest = every[-1]
    assert (oldest.task, oldest.status, oldest.destination) == ("migrate vm", "success", "b")
    assert oldest.downtime == pytest.approx(12.34)
    assert oldest.duration == pytest.approx(2.5)
    assert oldest.started == pytest.approx(base)
    failed = every[1]
    assert (failed.task, failed.code) == ("stop vm", "vm-not-found")
    assert failed.details == "x" * 300  # shortened
    vm1 = await again.history(HistoryQuery(vm_name="vm1", since=None, limit=100))
    assert [i.task_id for i in vm1] == ["mig-2", "mig-1"]
    recent = await again.history(HistoryQuery(vm_name=None, since=base + 5, limit=100))
    assert [i.task_id for i in recent] == ["mig-2", "stop-1"]
    one = await again.history(HistoryQuery(vm_name="vm1", since=base + 5, limit=1))
    assert [i.task_id for i in one] == ["mig-2"]
    assert await again.history(HistoryQuery(vm_name="nope", since=None, limit=5)) == []
    await again.close()


async def test_finished_and_delivered_in_one_batch_keep_the_history(tmp_path):
    """``delivered`` drops a ``finished`` update still waiting in the batch; the history rows
    of that task stay and are written."""
    j = Journal(tmp_path)
    await j.open()
    await j.accepted("k", task_id="t", payload=b"p", response_topic=None, correlation=None)
    result = _result("t", _entry("vm", time.time()))
    j.finished("k", b"r", history_rows("k", result, time.time()))
    j.delivered("k")
    items = await j.history(HistoryQuery(vm_name=None, since=None, limit=10))
    await j.close()
    assert [(i.task_id, i.vm_name, i.status) for i in items] == [("t", "vm", "success")]


async def test_history_is_bounded_by_age_and_count(tmp_path):
    j = Journal(tmp_path, history_retention=3600, history_max_entries=5)
    await j.open()
    now = time.time()
    await _finish(j, "old", _result("old", _entry("vm", now - 7200)))
    for i in range(8):
        await _finish(j, f"k{i}", _result(f"t{i}", _entry("vm", now - 100 + i)))
    await j.close()
    # Pruned when the journal opens (and every so many commits while it runs).
    again = Journal(tmp_path, history_retention=3600, history_max_entries=5)
    await again.open()
    items = await again.history(HistoryQuery(vm_name=None, since=None, limit=100))
    await again.close()
    assert [i.task_id for i in items] == ["t7", "t6", "t5", "t4", "t3"]
    rows = sqlite3.connect(tmp_path / "journal.sqlite").execute("SELECT count(*) FROM history")
    assert rows.fetchone() == (5,)


async def test_no_history_is_kept_with_max_entries_0(tmp_path):
    j = Journal(tmp_path, history_max_entries=0)
    await j.open()
    assert not j.keeps_history
    await _finish(j, "k", _result("t", _entry("vm", time.time())))
    items = await j.history(HistoryQuery(vm_name=None, since=None, limit=10))
    await j.close()
    assert items == []


async def test_a_read_of_a_closed_journal_fails(tmp_path):
    j = Journal(tmp_path)
    await j.open()
    await j.close()
    with pytest.raises(RuntimeError):
        await j.history(HistoryQuery(vm_name=None, since=None, limit=1))


def test_a_subtask_that_never_began_is_dated_when_it_was_answered():
    entry = ResultEntry(vm_name="vm", status="error", code="cancelled", details="cancelled")
    ((row),) = history_rows("k", _result("t", entry), 1234.5)
    assert row[0] == 1234.5  # started
    assert row[9] is None  # no duration


# ------------------------------------------------------------------------------ the task


def test_history_task_parses_with_its_defaults():
    msg = parse_task(b"task: history\nid: h1\n")
    assert msg.kind is TaskKind.HISTORY
    assert msg.subtasks == (HistorySpec(),)
    msg = parse_task(
        b"task: history\nid: h2\nvm-name: web-1\nsince: 2026-12-07T11:00+01:00\nlimit: 1000\n"
    )
    assert msg.subtasks == (
        HistorySpec(vm_name="web-1", since=parse_instant("2026-12-07T10:00:00Z"), limit=1000),
    )


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("limit: 1001", "limit: expected an integer from 1 to 1000"),
        ("limit: 0", "limit: expected an integer from 1 to 1000"),
        ("limit: -5", "limit: expected an integer from 1 to 1000"),
        ("limit: 99999999999999999999999", "limit: expected an integer from 1 to 1000"),
        ("limit: [1]", "limit: expected an integer from 1 to 1000"),
        ("limit: ten", "limit: expected an integer from 1 to 1000"),
        ("since: yesterday", "since: expected an ISO 8601 time with a zone"),
        ("since: 2026-12-07T10:00:00", "since: expected an ISO 8601 time with a zone"),
        ("since: 2026-02-30", "since: expected an ISO 8601 time with a zone"),
        ("since: 1765000000", "since: expected an ISO 8601 time with a zone"),
        ("since: {a: b}", "since: expected an ISO 8601 time with a zone"),
        ("since: 10000-01-01T00:00Z", "since: expected an ISO 8601 time with a zone"),
        ("vm-name: [a]", "vm-name: expected a string"),
        ('vm-name: "a/b"', "vm-name: expected a VM name"),
        ('vm-name: "\\u202eevil"', "vm-name: expected a VM name"),
    ],
)
def test_hostile_history_fields_are_refused_with_a_code(field: str, expected: str):
    with pytest.raises(TaskRejected) as info:
        parse_task(f"task: history\nid: h\n{field}\n".encode())
    assert info.value.code == "invalid-message"
    assert info.value.task_id == "h"
    assert expected in info.value.details


def test_since_argument_takes_iso_times_and_ages():
    assert since_argument("2026-12-07") == "2026-12-07T00:00:00.000Z"
    assert since_argument("2026-12-07T11:30+01:00") == "2026-12-07T10:30:00.000Z"
    now = parse_instant("2026-12-07T12:00:00Z")
    assert now is not None
    assert since_argument("90m", now=now) == "2026-12-07T10:30:00.000Z"
    assert since_argument("2d", now=now) == "2026-12-05T12:00:00.000Z"
    assert iso_instant(now) == "2026-12-07T12:00:00.000Z"
    for bad in ("yesterday", "10", "2026-12-07T10:00", "-5m"):
        with pytest.raises(ValueError, match="ISO 8601"):
            since_argument(bad)


def test_history_items_tell_the_answers_own_error_from_failed_tasks():
    doc = {
        "result": "history",
        "list": [
            {"vm-name": "n/a", "status": "error", "code": "not-supported", "details": "off"},
            {"vm-name": "vm", "status": "error", "code": "cancelled", "task": "stop vm"},
        ],
    }
    items, errors = history_items(doc)
    assert [i["vm-name"] for i in items] == ["vm"]
    assert errors == ["not-supported: off"]
    unknown = {"result": "unknown", "list": [{"code": "unknown-task", "details": "old agent"}]}
    assert history_items(unknown) == ([], ["unknown-task: old agent"])
