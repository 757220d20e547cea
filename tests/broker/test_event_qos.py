"""``communicator.event-qos`` (extensions.md, Wave 2): the QoS of every event but ``progress``,
as a subscriber at QoS 2 sees it in the PUBLISH packets the broker forwards (the broker
delivers min(publish QoS, subscription QoS)), over MQTT 5 and 3.1.1; tasks still work."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import yaml

from asyncmigfra.transport.mqtt import Incoming, ToolClient
from harness import agent_settings, running_agent

pytestmark = pytest.mark.broker


@asynccontextmanager
async def qos2_events(port: int, prefix: str, protocol: str) -> AsyncIterator[list[Incoming]]:
    """Every event and result (as received) of ``prefix``, subscribed at QoS 2."""
    seen: list[Incoming] = []
    client = ToolClient(
        "127.0.0.1", port, client_id=f"qos-{uuid.uuid4().hex[:8]}", protocol=protocol
    )
    async with client:
        await client.subscribe(f"{prefix}/event", qos=2)
        await client.subscribe(f"{prefix}/result", qos=2)

        async def pump() -> None:
            async for msg in client.messages():
                seen.append(msg)

        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(pump())
            try:
                yield seen
            finally:
                task.cancel()


async def _until(predicate: object, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
@pytest.mark.parametrize("event_qos", [None, 0, 1, 2])
async def test_events_arrive_with_the_configured_qos_and_the_task_works(
    mosquitto, protocol, event_qos
):
    mqtt = {} if event_qos is None else {"event_qos": event_qos}
    settings = agent_settings(mosquitto.port, protocol=protocol, mqtt=mqtt)
    expected = 1 if event_qos is None else event_qos  # the default
    prefix = settings.mqtt.task_topic.rsplit("/", 1)[0]
    async with (
        qos2_events(mosquitto.port, prefix, protocol) as seen,
        running_agent(settings),
        ToolClient("127.0.0.1", mosquitto.port, protocol=protocol) as sender,
    ):
        for task_id, body in (
            ("s1", "task: start vm\nvm-configurations:\n  - vm-name: q1\n"),
            ("s2", "task: stop vm\nlist:\n  - vm-name: q1\n"),
        ):
            await sender.publish(f"{prefix}/task", f"id: {task_id}\n{body}".encode(), qos=2)

        def results() -> list[dict[str, object]]:
            return [yaml.safe_load(m.payload) for m in seen if m.topic.endswith("/result")]

        await _until(lambda: len(results()) == 2)
    by_id = {str(r["id"]): r for r in results()}
    assert by_id["s1"]["list"][0]["status"] == "success"  # type: ignore[index]
    assert by_id["s2"]["list"][0]["status"] == "success"  # type: ignore[index]
    events = [(yaml.safe_load(m.payload), m.qos) for m in seen if m.topic.endswith("/event")]
    kinds = {(str(ev["id"]), ev["event"]) for ev, _ in events}
    assert {("s1", "accepted"), ("s1", "done"), ("s2", "accepted"), ("s2", "done")} <= kinds
    assert {qos for _, qos in events} == {expected}, events
    # Results keep QoS 1 whatever the events use.
    assert {m.qos for m in seen if m.topic.endswith("/result")} == {1}
