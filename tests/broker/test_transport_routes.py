"""Where the transport puts an incoming message: the task handler, the queues of the extra
subscriptions it matches (both when it matches both), or nowhere (foreign). Routes are
remembered per topic; a subscription that starts or ends changes them at once."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import pytest

from asyncmigfra.settings import default_settings
from asyncmigfra.transport.mqtt import Incoming, MqttTransport, ToolClient

pytestmark = pytest.mark.broker


async def _next(queue: asyncio.Queue[tuple[str, bytes]]) -> tuple[str, bytes]:
    async with asyncio.timeout(10):
        return await queue.get()


async def test_routes_follow_the_extra_subscriptions(mosquitto):
    base = f"routes/{uuid.uuid4().hex[:8]}"
    settings = replace(
        default_settings(hostname="r").mqtt,
        host="127.0.0.1",
        port=mosquitto.port,
        client_id=f"r-{uuid.uuid4().hex[:8]}",
    )
    transport = MqttTransport(settings, subscriptions=[(f"{base}/task", 1)])
    tasks: asyncio.Queue[Incoming] = asyncio.Queue()
    async with (
        ToolClient("127.0.0.1", mosquitto.port, client_id=f"p-{uuid.uuid4().hex[:8]}") as pub,
        asyncio.TaskGroup() as tg,
    ):
        running = tg.create_task(transport.run(tasks.put_nowait))
        await transport.wait_connected()
        async with transport.subscription(f"{base}/+/x", 1) as first:
            await pub.publish(f"{base}/1/x", b"a", qos=1)
            assert await _next(first) == (f"{base}/1/x", b"a")
            await pub.publish(f"{base}/task", b"t1", qos=1)
            assert (await asyncio.wait_for(tasks.get(), 10)).payload == b"t1"
        # The subscription ended: the same topic is not routed to its queue any more.
        async with transport.subscription(f"{base}/#", 1) as second:
            # Task and extra: both (the broker may send one copy per matching filter).
            await pub.publish(f"{base}/task", b"t2", qos=1)
            assert (await asyncio.wait_for(tasks.get(), 10)).payload == b"t2"
            await pub.publish(f"{base}/1/x", b"b", qos=1)
            got = [await _next(second)]
            while got[-1][1] != b"b":
                got.append(await _next(second))
            assert set(got) == {(f"{base}/task", b"t2"), (f"{base}/1/x", b"b")}
        assert first.empty()
        assert all(m.payload == b"t2" for m in [tasks.get_nowait() for _ in range(tasks.qsize())])
        running.cancel()
