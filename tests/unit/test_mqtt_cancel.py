"""``honour_cancel``: a cancellation that an aiomqtt call swallowed is raised anyway.

Python 3.11's ``asyncio.wait_for`` (which aiomqtt uses to wait for the broker's
acknowledgement) returns the result and drops a cancellation that arrives as the result does.
Found by the full suite: an agent stopped while its lane server was subscribing never exited,
because that server's task went on waiting for requests. The real case, against mosquitto:
tests/broker/test_agent_mqtt.py::test_an_agent_stopped_while_it_subscribes_stops.
"""

from __future__ import annotations

import asyncio

import pytest

from asyncmigfra.transport.mqtt import honour_cancel


async def swallows_a_cancel() -> str:
    """What ``wait_for`` does when the awaited future completes as the cancel arrives."""
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        return "acknowledged"
    return "not cancelled"


async def test_the_swallowed_cancel_is_raised():
    plain = asyncio.create_task(swallows_a_cancel())
    await asyncio.sleep(0)
    plain.cancel()
    assert await plain == "acknowledged", "the hazard: the task runs on"

    guarded = asyncio.create_task(honour_cancel(swallows_a_cancel()))
    await asyncio.sleep(0)
    guarded.cancel()
    with pytest.raises(asyncio.CancelledError):
        await guarded


async def test_a_call_in_clean_up_after_a_cancel_returns_normally():
    """In a ``finally`` of a cancelled task (an unsubscribe on the way out) the cancel was
    already delivered; the call's own result must come back."""

    async def clean_up() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return await honour_cancel(asyncio.sleep(0, result="unsubscribed"))
        return "not cancelled"

    task = asyncio.create_task(clean_up())
    await asyncio.sleep(0)
    task.cancel()
    assert await task == "unsubscribed"


async def test_an_uncancelled_call_returns_its_result():
    assert await honour_cancel(asyncio.sleep(0, result=7)) == 7
