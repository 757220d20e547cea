"""A ``status`` answer listing many domains is built and rendered off the event loop (five
thousand take 20-30 ms of CPU), as ``history``'s is (``test_history_answer``); a short one
is rendered on the loop as before. Shown by ordering, not by timing: while the long answer is
being built, the loop runs a callback that the build waits for."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import yaml

from asyncmigfra.errors import TaskError
from asyncmigfra.hypervisor.base import DomainInfo
from asyncmigfra.hypervisor.fake import create as create_fake
from asyncmigfra.model import ResultMessage, TaskMessage
from asyncmigfra.settings import default_settings
from asyncmigfra.tasks.dispatching import answers
from asyncmigfra.wire.rendering import BoundedResult
from harness import running_dispatcher, submit


async def _status(domains: int, monkeypatch: Any) -> tuple[list[tuple[int, bool]], Any, int]:
    """Ask a dispatcher on a fake host with ``domains`` guests for its status: (the builds
    as (thread, saw the loop run meanwhile)), the result and its rendered payload, the
    loop's thread."""
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    built: list[tuple[int, bool]] = []
    real = answers._status_answer

    def observed(
        msg: TaskMessage,
        header: dict[str, object],
        doms: list[DomainInfo],
        failure: TaskError | None,
        limit: int | None,
    ) -> tuple[ResultMessage, BoundedResult | None]:
        seen = False
        if threading.get_ident() != loop_thread:
            ran = threading.Event()
            loop.call_soon_threadsafe(ran.set)
            seen = ran.wait(10)
        built.append((threading.get_ident(), seen))
        return real(msg, header, doms, failure, limit)

    monkeypatch.setattr(answers, "_status_answer", observed)
    guests = [{"name": f"vm-{i:04d}", "memory": 64 * 1024} for i in range(domains)]
    hv = create_fake({"domains": guests}, hostname="here", shared={})
    async with running_dispatcher(hv, default_settings(hostname="here"), wait=30) as (d, rec):
        submit(d, "id: s\ntask: status\n")
        result = await rec.result("s")
    return built, (result, rec.rendered[0]), loop_thread


async def test_a_long_status_is_built_while_the_loop_runs_other_callbacks(monkeypatch) -> None:
    built, (result, rendered), loop_thread = await _status(
        answers.STATUS_ON_LOOP + 200, monkeypatch
    )
    ((thread, seen),) = built
    assert thread != loop_thread
    assert seen
    assert rendered is not None  # bytes, rendered in the thread, within the message limit
    doc = yaml.safe_load(rendered.payload)
    assert doc["id"] == "s"
    names = [e["vm-name"] for e in doc["list"]]
    assert names == [f"vm-{i:04d}" for i in range(answers.STATUS_ON_LOOP + 200)]
    assert len(result.entries) == len(names)


async def test_a_short_status_is_rendered_by_the_deliverer(monkeypatch) -> None:
    built, (result, rendered), loop_thread = await _status(3, monkeypatch)
    assert built == [(loop_thread, False)]
    assert rendered is None
    assert [e.vm_name for e in result.entries] == ["vm-0000", "vm-0001", "vm-0002"]
