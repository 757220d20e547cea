"""``render_bounded_result``: a result within a byte limit keeps as much as fits, whole entries
in order, and says what it left out (docs/protocol.md §4.1). Through a broker that limits
messages: tests/broker/test_message_size.py."""

from __future__ import annotations

import pytest
import yaml

from asyncmigfra.model import ResultEntry, ResultMessage
from asyncmigfra.wire.rendering import render_bounded_result, render_result


def _entries(count: int) -> list[ResultEntry]:
    return [
        ResultEntry(
            vm_name=f"{i:03d}-\u4e2d" * 3,
            status="error",
            code="vm-not-found",
            details="\u4e2d" * (i % 50) + "\x01\"'",  # multi-byte and escaped characters
            time_measurement={"overall": 0.5},
        )
        for i in range(count)
    ]


def test_a_result_that_fits_is_the_plain_rendering() -> None:
    msg = ResultMessage(result="vm stopped", entries=_entries(3), id="t")
    bounded = render_bounded_result(msg, 1 << 20)
    assert bounded.payload == render_result(msg)
    assert (bounded.size, bounded.left_out) == (len(bounded.payload), 0)


@pytest.mark.parametrize("limit", [1200, 1500, 4096, 10_000, 20_000, 25_000])
def test_a_task_result_keeps_the_first_entries_that_fit_and_says_how_many_were_left_out(
    limit: int,
) -> None:
    entries = _entries(120)
    msg = ResultMessage(
        result="node evacuated",
        entries=entries,
        id="ev-1",
        header={"time-measurement": {"overall": 1.0}},
    )
    whole = len(render_result(msg))
    bounded = render_bounded_result(msg, limit)
    assert len(bounded.payload) <= limit < whole
    doc = yaml.safe_load(bounded.payload)
    *kept, note = doc["list"]
    assert doc["id"] == "ev-1"
    assert doc["time-measurement"] == {"overall": 1.0}
    assert [e["vm-name"] for e in kept] == [e.vm_name for e in entries[: len(kept)]]
    assert [e["details"] for e in kept] == [e.details for e in entries[: len(kept)]]
    assert (note["vm-name"], note["status"], note["code"]) == ("n/a", "error", "not-supported")
    assert f"the result is {whole} bytes" in note["details"]
    assert f"{len(entries) - len(kept)} of {len(entries)} entries were left out" in note["details"]
    assert bounded.left_out == len(entries) - len(kept)
    assert bounded.size == whole
    # As many as fit: one more entry would not.
    if bounded.left_out:
        more = ResultMessage(
            result="node evacuated",
            entries=[*entries[: len(kept) + 1], ResultEntry(**_note_fields(note))],
            id="ev-1",
            header={"time-measurement": {"overall": 1.0}},
        )
        assert len(render_result(more)) > limit


def _note_fields(note: dict[str, str]) -> dict[str, str]:
    return {"vm_name": note["vm-name"], "status": note["status"], "details": note["details"],
            "code": note["code"]}  # fmt: skip


@pytest.mark.parametrize("limit", [800, 4096, 20_000])
def test_a_query_answer_keeps_the_first_entries_and_says_more(limit: int) -> None:
    entries = _entries(120)
    header: dict[str, object] = {"host": "h", "journal": "ok"}
    msg = ResultMessage(result="history", entries=entries, id="h-1", header=header)
    bounded = render_bounded_result(msg, limit)
    assert len(bounded.payload) <= limit
    doc = yaml.safe_load(bounded.payload)
    assert (doc["host"], doc["journal"], doc["more"]) == ("h", "ok", True)
    listed = doc["list"]
    assert [e["vm-name"] for e in listed] == [e.vm_name for e in entries[: len(listed)]]
    assert bounded.left_out == len(entries) - len(listed)
    assert "more" not in header  # the caller's header is left alone


def test_a_status_whose_tasks_do_not_fit_keeps_its_scalar_header_and_says_why() -> None:
    tasks = [{"id": "t" * 200, "task": "migrate vm", "vm-name": "v" * 150}] * 50
    header: dict[str, object] = {"host": "h", "state": "online", "tasks": tasks}
    msg = ResultMessage(result="status", entries=_entries(10), id="s-1", header=header)
    bounded = render_bounded_result(msg, 4096)
    assert len(bounded.payload) <= 4096
    doc = yaml.safe_load(bounded.payload)
    assert (doc["host"], doc["state"], doc["more"]) == ("h", "online", True)
    assert "tasks" not in doc
    (note,) = doc["list"]
    assert note["code"] == "not-supported"
    assert "10 of 10 entries were left out" in note["details"]


def test_a_flat_result_too_large_stays_flat_with_the_code() -> None:
    entry = ResultEntry(vm_name="web-1", status="success", details="\u4e2d" * 2000)
    msg = ResultMessage(result="vm migrated", entries=[entry], id="m-1", flat=True)
    bounded = render_bounded_result(msg, 2048)
    assert len(bounded.payload) <= 2048
    doc = yaml.safe_load(bounded.payload)
    assert (doc["result"], doc["status"], doc["code"], doc["id"]) == (
        "vm migrated", "error", "not-supported", "m-1",
    )  # fmt: skip
    assert "1 of 1 entries were left out" in doc["details"]
