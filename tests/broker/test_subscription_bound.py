"""A peer subscription's queue is bounded in bytes (``peers.bus.PeerQueue``), over a real
mosquitto: answers nobody asked for, flooded at an agent's answer topic while it reads
nothing, are dropped beyond the bound instead of filling its memory."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest

from asyncmigfra.peers import bus
from asyncmigfra.peers.bus import PeerQueue
from asyncmigfra.transport.mqtt import MqttTransport, ToolClient
from harness import agent_settings

pytestmark = pytest.mark.broker

PAYLOAD = b"x" * 4000


async def test_a_flood_on_a_peer_topic_is_dropped_beyond_the_bound(mosquitto, monkeypatch):
    monkeypatch.setattr(bus, "SUBSCRIPTION_BYTES", 200_000)
    topic = f"fast/migfra/a-{uuid.uuid4().hex[:6]}/inbound-response/x"
    transport = MqttTransport(agent_settings(mosquitto.port).mqtt, subscriptions=[])
    runner = asyncio.create_task(transport.run(lambda _: None))
    flooder = ToolClient("127.0.0.1", mosquitto.port, client_id=f"x-{uuid.uuid4().hex[:6]}")
    try:
        await asyncio.wait_for(transport.wait_connected(), 10)
        async with transport.subscription(topic, 1) as queue, flooder:
            assert isinstance(queue, PeerQueue)
            for _ in range(500):  # 2 MB, ten times the bound
                await flooder.publish(topic, PAYLOAD, qos=1)
            async with asyncio.timeout(10):
                while queue.qsize() + queue.dropped < 500:
                    await asyncio.sleep(0.05)
            assert queue.held <= 200_000
            assert queue.dropped > 0
            # What was kept is still read, and the queue takes messages again once read.
            while not queue.empty():
                queue.get_nowait()
            assert queue.held == 0
            await flooder.publish(topic, b"after", qos=1)
            async with asyncio.timeout(5):
                assert (await queue.get())[1] == b"after"
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
