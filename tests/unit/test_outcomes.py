"""The one outcome boundary: every end of a subtask becomes the same result entry."""

from __future__ import annotations

import asyncio

import pytest

from asyncmigfra.errors import HookFailed, TaskCancelled
from asyncmigfra.tasks.outcomes import Outcome, absorb_cancel, entry_for


def test_success_carries_notes_and_keys_in_wire_order() -> None:
    outcome = Outcome(destination="node2", retries=1)
    outcome.note("hook a failed")
    outcome.note("hook b failed")
    entry = entry_for("vm1", None, outcome)
    assert entry.status == "success"
    assert entry.details == "hook a failed; hook b failed"
    assert list(entry.extra.items()) == [("retries", 1), ("destination", "node2")]


def test_task_error_keeps_its_code_and_the_outcome_keys() -> None:
    entry = entry_for("vm1", HookFailed("boom"), Outcome(details="note", state="paused"))
    assert (entry.status, entry.code, entry.details) == ("error", "hook-failed", "boom")
    assert entry.extra == {"state": "paused"}


def test_a_bug_is_an_internal_hypervisor_error_without_keys() -> None:
    entry = entry_for("vm1", KeyError("x"), Outcome(destination="node2"))
    assert entry.code == "hypervisor-error"
    assert entry.details == "internal error: KeyError: 'x'"
    assert entry.extra == {}


async def test_absorb_cancel_takes_back_only_a_requested_cancel() -> None:
    async def victim(reason: str | None) -> TaskCancelled:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError as exc:
            return absorb_cancel(exc, reason)
        raise AssertionError("not cancelled")

    asked = asyncio.create_task(victim("cancelled by task c1"))
    await asyncio.sleep(0)
    asked.cancel()
    cancelled = await asked
    assert (cancelled.code, str(cancelled)) == ("cancelled", "cancelled by task c1")
    shutdown = asyncio.create_task(victim(None))
    await asyncio.sleep(0)
    shutdown.cancel()
    with pytest.raises(asyncio.CancelledError):
        await shutdown
