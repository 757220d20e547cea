"""The one request/serve pair for messages between agents, over the in-memory bus."""

from __future__ import annotations

import asyncio
import json

import pytest

from asyncmigfra.peers import exchange as peers
from asyncmigfra.peers.bus import JunkLog, MemoryBus, PeerTopics

TASKS = "fast/migfra/<host>/task"


def topics(host: str) -> PeerTopics:
    found = PeerTopics.of(TASKS.replace("<host>", host), host, "ping")
    assert found is not None
    return found


def read(topic: str, raw: bytes, request_id: str) -> str | None:
    document = json.loads(raw)
    return document["said"] if document.get("request-id") == request_id else None


async def test_a_request_is_answered_by_the_server_with_the_sender_from_the_topic():
    bus, a, b = MemoryBus(), topics("a"), topics("b")
    heard: list[str] = []

    async def handle(sender: str, raw: bytes) -> dict[str, str]:
        heard.append(sender)
        return {"request-id": json.loads(raw)["request-id"], "said": f"hello {sender}"}

    server = asyncio.create_task(
        peers.serve(bus, b, handle, qos=1, event="ping", junk=JunkLog(), slots=2)
    )
    while b.requests not in bus.queues:
        await asyncio.sleep(0)
    to, answers = a.request_to("b"), a.answers_from("b")
    assert to == "fast/migfra/b/ping/a"
    assert answers == "fast/migfra/a/ping-response/b"
    try:
        said = await peers.request(
            bus, {"request-id": "r1"}, to=to, answers=answers, qos=1, limit=2, read=read
        )
    finally:
        server.cancel()
        await asyncio.wait({server})
    assert said == "hello a"
    assert heard == ["a"]
    assert [topic for topic, _ in bus.sent] == [to, answers]
    assert bus.queues == {}  # every subscription was removed


async def test_a_request_without_an_answer_times_out_and_skips_other_answers():
    bus = MemoryBus()
    answers = "fast/migfra/a/ping-response/b"

    async def late() -> None:
        await asyncio.sleep(0.01)
        bus.deliver(answers, json.dumps({"request-id": "other", "said": "x"}).encode())

    other = asyncio.create_task(late())
    with pytest.raises(TimeoutError):
        await peers.request(
            bus,
            {"request-id": "r1"},
            to="fast/migfra/b/ping/a",
            answers=answers,
            qos=1,
            limit=0.1,
            read=read,
        )
    await other
    assert bus.queues == {}
