"""The publisher hands messages over in the order they were queued, whether it hands one
over at once (connected, nothing queued) or its task does (before the connection, behind
queued ones), and reports every acknowledgement, also when the flow stops. Reconnects:
tests/e2e/test_faults_broker.py."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import pytest

from asyncmigfra.settings import default_settings
from asyncmigfra.transport.mqtt import MqttTransport, Outgoing, ToolClient
from asyncmigfra.transport.publishing import Publisher

pytestmark = pytest.mark.broker


async def _drain_until(seen: list[bytes], count: int, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while len(seen) < count:
            await asyncio.sleep(0.01)


async def test_messages_keep_their_order_and_every_ack_is_reported(private_mosquitto):
    port = private_mosquitto.port
    base = default_settings(hostname="pub")
    topic = f"order/{uuid.uuid4().hex[:8]}"
    settings = replace(
        base.mqtt,
        host="127.0.0.1",
        port=port,
        client_id=f"pub-{uuid.uuid4().hex[:8]}",
        reconnect_min_delay=0.05,
        reconnect_max_delay=0.2,
    )
    transport = MqttTransport(settings, subscriptions=[(f"{topic}/in", 2)])
    publisher = Publisher(transport)
    delivered: list[int] = []
    seen: list[bytes] = []

    def put(i: int) -> None:
        publisher.put_nowait(
            Outgoing(topic, str(i).encode(), qos=1), on_delivered=lambda: delivered.append(i)
        )

    async with ToolClient("127.0.0.1", port, client_id=f"sub-{uuid.uuid4().hex[:8]}") as sub:
        await sub.subscribe(topic, qos=1)

        async def pump() -> None:
            async for msg in sub.messages():
                seen.append(msg.payload)

        async with asyncio.TaskGroup() as tg:
            pumping = tg.create_task(pump())
            for i in range(50):  # before the first connection: queued
                put(i)
            running = tg.create_task(publisher.run())
            connection = tg.create_task(transport.run(lambda _: None))
            await transport.wait_connected()
            for i in range(50, 300):  # connected: at once, or behind what is still queued
                put(i)
                if i % 50 == 0:
                    await asyncio.sleep(0)
            await _drain_until(seen, 300)
            # The flow stops: the acknowledgements are still reported.
            async with asyncio.timeout(5):
                while len(delivered) < 300:
                    await asyncio.sleep(0.05)
            for c in (pumping, running, connection):
                c.cancel()
    assert [int(p) for p in seen] == list(range(300))
    assert sorted(delivered) == list(range(300))


async def test_a_message_handed_over_leaves_in_the_next_iteration_and_a_large_one_whole(
    mosquitto,
):
    """Handed over on the loop's thread, a message is written to the socket in the next loop
    iteration (not after the loop was woken through its pipe and watched the socket); a
    large one (16 MiB) arrives whole, and what follows it keeps its place."""
    port = mosquitto.port
    base = default_settings(hostname="pub")
    topic = f"at-once/{uuid.uuid4().hex[:8]}"
    settings = replace(
        base.mqtt, host="127.0.0.1", port=port, client_id=f"pub-{uuid.uuid4().hex[:8]}"
    )
    transport = MqttTransport(settings, subscriptions=[(f"{topic}/in", 2)])
    big = bytes(range(256)) * (16 * 4096)
    seen: list[bytes] = []
    async with ToolClient("127.0.0.1", port, client_id=f"sub-{uuid.uuid4().hex[:8]}") as sub:
        await sub.subscribe(topic, qos=1)

        async def pump() -> None:
            async for msg in sub.messages():
                seen.append(msg.payload)

        async with asyncio.TaskGroup() as tg:
            pumping = tg.create_task(pump())
            connection = tg.create_task(transport.run(lambda _: None))
            await transport.wait_connected()
            paho_client = transport._client._client  # type: ignore[union-attr]
            transport.publish_nowait(Outgoing(topic, b"small", qos=1))
            transport.publish_nowait(Outgoing(topic, b"second", qos=1))
            await asyncio.sleep(0)  # one loop iteration
            assert not paho_client.want_write()  # both on the wire already
            # Mostly more than the socket takes at once: the rest goes through aiomqtt's
            # writer, and what is handed over meanwhile waits behind it.
            transport.publish_nowait(Outgoing(topic, big, qos=1))
            await asyncio.sleep(0)
            transport.publish_nowait(Outgoing(topic, b"after", qos=1))
            await _drain_until(seen, 4)
            for c in (pumping, connection):
                c.cancel()
    assert seen == [b"small", b"second", big, b"after"]
