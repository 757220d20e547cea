"""The ``history`` answer is built and rendered off the event loop: a thousand entries take
tens of milliseconds of CPU, and a client asking continuously would otherwise keep the loop
from everything else. Shown by ordering, not by timing: while each answer is being built,
the loop runs a callback that the build waits for (a build on the loop would never see it).
The loop's lag itself is measured, before and after, by ``python -m bench.history --lag``.
Real journal; the dispatcher as ``app.Agent`` wires it, minus MQTT."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog
import yaml

from asyncmigfra.hypervisor.dummy import DummyHypervisor
from asyncmigfra.model import ResultMessage
from asyncmigfra.settings import default_settings
from asyncmigfra.tasks.dispatching import Dispatcher, Reply, answers
from asyncmigfra.tasks.history import INSERT
from asyncmigfra.tasks.journal import Journal
from asyncmigfra.wire.events import Events
from asyncmigfra.wire.parsing import parse_task
from asyncmigfra.wire.rendering import BoundedResult

QUERIES = 8  # answers.MAX_HISTORY_READS: all at once
ENTRIES = 1000


class _Sink:
    def emit(self, event: Any, *, terminal: bool = False, qos: int = 1) -> None:
        pass


async def _journal(state: Path) -> Journal:
    journal = Journal(state, owner="here")
    await journal.open()
    await journal.close()
    now = time.time()
    with sqlite3.connect(state / "journal.sqlite") as db:
        db.executemany(
            INSERT,
            [(now - i, f"k{i}", 0, f"migrate-{i:010x}", "migrate vm", f"web-{i % 50}",
              "error", "migration-failed", "the destination went away " * 4, 2.5, "host-b",
              100.0)
             for i in range(ENTRIES)],
        )  # fmt: skip
    journal = Journal(state, owner="here")
    await journal.open()
    return journal


async def test_history_answers_are_built_while_the_loop_runs_other_callbacks(tmp_path, monkeypatch):
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    built: list[tuple[int, bool, object]] = []
    names: set[str] = set()
    real = answers._history_answer

    def observed(*args: Any) -> tuple[ResultMessage, BoundedResult]:
        # The loop must get to run this callback while the answer is being built.
        ran = threading.Event()
        loop.call_soon_threadsafe(ran.set)
        seen = ran.wait(10)
        answer = real(*args)
        task_id = structlog.contextvars.get_contextvars().get("asked_by")
        built.append((threading.get_ident(), seen, task_id))
        names.add(threading.current_thread().name)
        return answer

    monkeypatch.setattr(answers, "_history_answer", observed)
    delivered: list[tuple[ResultMessage, BoundedResult | None, int]] = []
    done = asyncio.Event()

    def deliver(
        result: ResultMessage,
        reply: Reply | None,
        key: str | None,
        /,
        *,
        rendered: BoundedResult | None = None,
    ) -> None:
        delivered.append((result, rendered, threading.get_ident()))
        if len(delivered) == QUERIES:
            done.set()

    settings = default_settings(hostname="here")
    settings = replace(settings, limits=replace(settings.limits, max_message_size=64 * 1024))
    journal = await _journal(tmp_path)
    hv = DummyHypervisor(never_throw=True, hostname="here")
    dispatcher = Dispatcher(
        hypervisor=hv,
        settings=settings,
        events=Events(_Sink(), host="here"),
        deliver=deliver,
        on_quit=lambda: None,
        journal=journal,
    )
    runner = asyncio.create_task(dispatcher.run())
    await asyncio.sleep(0)
    try:
        for i in range(QUERIES):
            payload = f"id: h{i}\ntask: history\nlimit: {ENTRIES}\n".encode()
            with structlog.contextvars.bound_contextvars(asked_by=f"h{i}"):
                dispatcher.submit(parse_task(payload), payload=payload, reply=None)
        async with asyncio.timeout(30):
            await done.wait()
    finally:
        dispatcher.close()
        async with asyncio.timeout(10):
            await runner
        await journal.close()
    # Every answer was built in a worker thread, with the asking task's context, while the
    # loop ran other callbacks; and handed to the delivery, on the loop, as bytes.
    assert sorted(task_id for _, _, task_id in built) == [f"h{i}" for i in range(QUERIES)]
    assert all(thread != loop_thread and seen for thread, seen, _ in built)
    # ... in the dispatcher's one answer thread (one build at a time competes for the GIL).
    assert len(names) == 1
    assert names.pop().startswith("asyncmigfra-answers")
    assert all(thread == loop_thread for _, _, thread in delivered)
    for result, rendered, _ in delivered:
        assert rendered is not None
        assert len(rendered.payload) <= 64 * 1024
        doc = yaml.safe_load(rendered.payload)
        assert doc["id"] == result.id
        assert doc["more"] is True  # 1000 entries of ~250 bytes do not fit in 64 KiB
        assert 0 < len(doc["list"]) == ENTRIES - rendered.left_out
