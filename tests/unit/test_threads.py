"""run_blocking: contextvars reach the thread; a cancelled caller never orphans the thread."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from asyncmigfra.hypervisor._threads import run_blocking

var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")


async def test_result_and_context_reach_the_thread():
    var.set("bound-in-task")
    with ThreadPoolExecutor(1) as pool:
        assert await run_blocking(pool, var.get) == "bound-in-task"


async def test_exceptions_propagate():
    def boom() -> None:
        raise ValueError("from the thread")

    with ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match="from the thread"):
        await run_blocking(pool, boom)


async def test_cancel_waits_for_the_thread_then_raises_cancelled():
    release = threading.Event()
    finished = threading.Event()

    def blocking() -> str:
        release.wait(5)
        finished.set()
        return "done"

    with ThreadPoolExecutor(1) as pool:
        task = asyncio.create_task(run_blocking(pool, blocking))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done(), "the caller must wait while the thread still runs"
        release.set()
        t0 = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished.is_set()
        assert time.monotonic() - t0 < 2


async def test_the_loop_keeps_running_while_a_thread_blocks():
    with ThreadPoolExecutor(1) as pool:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        async with asyncio.TaskGroup() as tg:
            t = tg.create_task(ticker())
            await run_blocking(pool, time.sleep, 0.3)
            t.cancel()
        assert ticks >= 10
