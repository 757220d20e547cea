"""Test harness: a real agent in this event loop, talking to a real broker, and a scheduler.

The scheduler side reads every payload with PyYAML's ``safe_load`` (one document), which is
what the protocol promises clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from asyncmigfra.app import Agent
from asyncmigfra.model import ResultMessage
from asyncmigfra.peers.bus import MemoryBus, MessageBus
from asyncmigfra.settings import HypervisorSettings, Settings, default_settings
from asyncmigfra.tasks.dispatching import Dispatcher, Reply
from asyncmigfra.transport.mqtt import ToolClient
from asyncmigfra.wire.events import Events
from asyncmigfra.wire.parsing import parse_task
from asyncmigfra.wire.rendering import BoundedResult

IN_CI = bool(os.environ.get("CI"))


def need(tool: str, why: str) -> str:
    """Path of ``tool``; skip locally, fail in CI when it is missing (a green CI means the
    real parts ran)."""
    path = shutil.which(tool) or (
        f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None
    )
    if path is None:
        if IN_CI:
            pytest.fail(f"{tool} is required in CI ({why}) but is not installed")
        pytest.skip(f"{tool} not installed ({why})")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def leaked_sockets() -> list[str]:
    """Collect garbage and return what the ResourceWarnings said about unclosed sockets.

    A socket nobody closed is only noticed when it is collected; this makes that happen
    now, inside the test that caused it, instead of failing whichever test runs later.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, ResourceWarning) and "socket" in str(w.message)
    ]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.01)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def agent_settings(
    port: int,
    *,
    hostname: str | None = None,
    hv_type: str = "dummy",
    hv_options: Mapping[str, object] | None = None,
    protocol: str = "5",
    **sections: Any,
) -> Settings:
    """Settings for a test agent on 127.0.0.1:``port`` with a unique host name."""
    name = hostname or f"t-{uuid.uuid4().hex[:8]}"
    base = default_settings(hostname=name)
    mqtt_overrides = {"reconnect_min_delay": 0.05, "reconnect_max_delay": 0.5}
    mqtt_overrides.update(sections.pop("mqtt", {}))
    mqtt = replace(base.mqtt, host="127.0.0.1", port=port, protocol=protocol, **mqtt_overrides)
    options = dict(hv_options or {})
    if hv_type == "dummy":
        options.setdefault("never-throw", True)
    settings = replace(
        base,
        mqtt=mqtt,
        hypervisor=HypervisorSettings(type=hv_type, options=options),
        shutdown=replace(base.shutdown, grace_period=5.0),
        agent=replace(base.agent, state_dir="none"),
    )
    for section, values in sections.items():
        if isinstance(values, tuple):  # a list section (``hooks``): replaced as a whole
            settings = replace(settings, **{section: values})
            continue
        settings = replace(settings, **{section: replace(getattr(settings, section), **values)})
    return settings


@dataclass
class Scheduler:
    """A client like a scheduler: publishes tasks, collects results and events."""

    client: ToolClient
    prefix: str
    results: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    raw_results: list[bytes] = field(default_factory=list)
    other: list[Any] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def pump(self) -> None:
        async for msg in self.client.messages():
            doc = yaml.safe_load(msg.payload)
            if msg.topic.endswith("/result"):
                self.raw_results.append(msg.payload)
                self.results.append(doc)
            elif msg.topic.endswith("/event"):
                self.events.append(doc)
            elif msg.topic.endswith("/status"):
                self.statuses.append(doc)
            else:
                self.other.append(msg)
            async with self._changed:
                self._changed.notify_all()

    async def publish(self, body: str | bytes, *, topic: str | None = None, **kw: Any) -> None:
        payload = body.encode() if isinstance(body, str) else body
        await self.client.publish(topic or f"{self.prefix}/task", payload, qos=2, **kw)

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> Any:
        async with asyncio.timeout(timeout), self._changed:
            while True:
                found = predicate()
                if found:
                    return found
                await self._changed.wait()

    async def state(self, state: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until the agent's presence has reported ``state``; every such status."""
        found: list[dict[str, Any]] = await self.wait_for(
            lambda: [s for s in self.statuses if s["state"] == state], timeout
        )
        return found

    async def result_for(self, task_id: str, timeout: float = 10.0) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            return next((r for r in self.results if str(r.get("id")) == task_id), None)

        result: dict[str, Any] = await self.wait_for(find, timeout)
        return result

    async def call(self, body: str, timeout: float = 10.0) -> dict[str, Any]:
        """Publish a task with a fresh id and return its result."""
        task_id = f"id-{uuid.uuid4().hex[:10]}"
        await self.publish(f"id: {task_id}\n{body}")
        return await self.result_for(task_id, timeout)

    def events_for(self, task_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if str(e.get("id")) == task_id and (kind is None or e.get("event") == kind)
        ]


@contextlib.asynccontextmanager
async def scheduler(port: int, prefix: str, *, protocol: str = "5") -> AsyncIterator[Scheduler]:
    client = ToolClient(
        "127.0.0.1", port, client_id=f"sched-{uuid.uuid4().hex[:8]}", protocol=protocol
    )
    async with client:
        for suffix in ("result", "event", "status"):
            await client.subscribe(f"{prefix}/{suffix}", qos=1)
        sched = Scheduler(client=client, prefix=prefix)
        async with asyncio.TaskGroup() as tg:
            pump = tg.create_task(sched.pump(), name="test.scheduler-pump")
            try:
                yield sched
            finally:
                pump.cancel()


@contextlib.asynccontextmanager
async def running_agent(
    settings: Settings, *, shared: dict[str, object] | None = None
) -> AsyncIterator[Agent]:
    """Run an agent until the block ends, then stop it gracefully and check it exited 0."""
    agent = Agent(settings, shared=shared)
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(agent.run(), name="test.agent")
        async with asyncio.timeout(10):
            await agent.ready.wait()
        try:
            yield agent
        finally:
            agent.request_stop()
            async with asyncio.timeout(15):
                code = await run
            assert code == 0


@contextlib.asynccontextmanager
async def agent_and_scheduler(
    port: int, *, shared: dict[str, object] | None = None, **kw: Any
) -> AsyncIterator[tuple[Agent, Scheduler]]:
    settings = agent_settings(port, **kw)
    prefix = settings.mqtt.task_topic.rsplit("/", 1)[0]
    async with (
        scheduler(port, prefix, protocol=settings.mqtt.protocol) as sched,
        running_agent(settings, shared=shared) as agent,
    ):
        yield agent, sched


@dataclass
class RecordingContext:
    """Records ``phase`` and ``measure`` calls in order (a ``HookContext`` for unit tests)."""

    calls: list[tuple[str, str]] = field(default_factory=list)

    def phase(self, name: str) -> None:
        self.calls.append(("phase", name))

    @contextmanager
    def measure(self, tag: str) -> Iterator[None]:
        self.calls.append(("start", tag))
        try:
            yield
        finally:
            self.calls.append(("stop", tag))


class RecordingOpContext:
    """Records what a back-end operation tells its task (an ``OpContext``): the phases and
    the tags measured, each in order."""

    def __init__(self) -> None:
        self.phases: list[str] = []
        self.measured: list[str] = []

    def phase(self, name: str) -> None:
        self.phases.append(name)

    @contextmanager
    def measure(self, tag: str) -> Iterator[None]:
        self.measured.append(tag)
        yield


class DispatchRecorder:
    """A ``Dispatcher``'s ``deliver`` callback and its events' sink, without a broker:
    records both and wakes whoever waits, at most ``wait`` s, for one (:meth:`until`)."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self.results: list[ResultMessage] = []
        self.replies: list[Reply | None] = []
        #: Each result's payload when it came rendered (``None``: the deliverer renders it).
        self.rendered: list[BoundedResult | None] = []
        self.events: list[Mapping[str, object]] = []
        self._changed = asyncio.Event()

    def deliver(
        self,
        result: ResultMessage,
        reply: Reply | None,
        key: str | None,
        /,
        *,
        rendered: BoundedResult | None = None,
    ) -> None:
        self.results.append(result)
        self.replies.append(reply)
        self.rendered.append(rendered)
        self._changed.set()

    def emit(self, event: Mapping[str, object], *, terminal: bool = False, qos: int = 1) -> None:
        self.events.append(event)
        self._changed.set()

    async def until(self, predicate: Callable[[], Any]) -> Any:
        """The first true value of ``predicate``, asked again after each result or event."""
        async with asyncio.timeout(self.wait):
            while not (value := predicate()):
                self._changed.clear()
                await self._changed.wait()
        return value

    def results_for(self, task_id: str) -> list[ResultMessage]:
        return [r for r in self.results if r.id == task_id]

    async def result(self, task_id: str) -> ResultMessage:
        found: list[ResultMessage] = await self.until(lambda: self.results_for(task_id))
        return found[0]

    def of(self, kind: str) -> list[Mapping[str, object]]:
        """The events of this ``kind`` (``event: <kind>``), of every task."""
        return [e for e in self.events if e["event"] == kind]

    def events_for(self, task_id: str, kind: str) -> list[Mapping[str, object]]:
        return [e for e in self.of(kind) if e.get("id") == task_id]

    def assert_one_result_each(self, *task_ids: str) -> None:
        counts = {t: len(self.results_for(t)) for t in task_ids}
        assert counts == dict.fromkeys(task_ids, 1), counts
        assert len(self.results) == len(task_ids), [r.id for r in self.results]


@contextlib.asynccontextmanager
async def running_dispatcher(
    hv: Any, settings: Settings, *, wait: float, bus: MessageBus | None = None
) -> AsyncIterator[tuple[Dispatcher, DispatchRecorder]]:
    """A running ``Dispatcher`` on back-end ``hv`` as ``app.Agent`` wires it, minus MQTT and
    the journal, its results and events going to a :class:`DispatchRecorder`; at the end
    every task is cancelled and the dispatcher stops within ``wait`` s."""
    rec = DispatchRecorder(wait)
    d = Dispatcher(
        hypervisor=hv,
        settings=settings,
        events=Events(rec, host=settings.hostname),
        deliver=rec.deliver,
        on_quit=lambda: None,
        bus=bus,
    )
    await hv.open()
    runner = asyncio.create_task(d.run())
    await asyncio.sleep(0)  # let the dispatcher open its TaskGroup (as app does)
    try:
        yield d, rec
    finally:
        d.cancel_all("the test is over")
        d.close()
        async with asyncio.timeout(wait):
            await runner
        await hv.aclose()


def submit(d: Dispatcher, text: str, reply: Reply | None = None) -> None:
    """Hand the task ``text`` to ``d`` as the agent's intake does."""
    payload = text.encode()
    d.submit(parse_task(payload), payload=payload, reply=reply)


@contextlib.asynccontextmanager
async def serving_on(
    bus: MemoryBus, requests: str, serve: Coroutine[Any, Any, Any]
) -> AsyncIterator[None]:
    """Run ``serve`` (a peer server of the bus) as a task once it subscribed to ``requests``;
    cancel it at the end."""
    task = asyncio.create_task(serve)
    while requests not in bus.queues:
        await asyncio.sleep(0)
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait({task})


@contextlib.asynccontextmanager
async def granting(bus: MemoryBus, rate: str, *, host: str) -> AsyncIterator[None]:
    """An agent on ``host`` that grants ``rate`` bytes/s to every inbound reservation (a
    hostile or stuck one, with a rate such as ``0``) and answers a release."""
    requests = f"fast/migfra/{host}/inbound/+"

    async def answer() -> None:
        async with bus.subscription(requests, 1) as queue:
            while True:
                topic, raw = await queue.get()
                body = json.loads(raw)
                reply = {"request-id": body["request-id"], "status": "reserved", "rate": rate}
                if body["op"] == "release":
                    reply = {"request-id": body["request-id"], "status": "released"}
                source = topic.rsplit("/", 1)[1]
                to = f"fast/migfra/{source}/inbound-response/{host}"
                await bus.send(to, json.dumps(reply).encode(), 1)

    async with serving_on(bus, requests, answer()):
        yield
