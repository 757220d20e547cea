"""The lane-hold protocol between agents (``peerlanes``) over an in-memory bus: the asking
side's outcomes (held, busy, nobody answering, off, no bus, a broker failure). The server's side:
test_peerlanes.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from peerlanes_support import A_TASKS, Keeper, answer_topic, hold, request_topic, serving

from asyncmigfra.errors import Busy, ConnectionFailed
from asyncmigfra.peers import lanes as peerlanes
from asyncmigfra.peers.bus import MemoryBus
from asyncmigfra.peers.lanes import hold_peer_lane
from asyncmigfra.transport.mqtt import TransportError

# --- the asking side ------------------------------------------------------------------------------


async def test_the_asking_side_holds_renews_and_releases():
    bus, keeper = MemoryBus(), Keeper()
    async with serving(bus, keeper):
        async with hold(bus, lease=3.0) as uncoordinated:
            assert uncoordinated is None
            assert keeper.held == ["v2"]
            async with asyncio.timeout(3):  # a renewal every third of the lease
                while not any(m.get("op") == "renew" for _, m in bus.sent):
                    await asyncio.sleep(0.05)
        ops = [m["op"] for topic, m in bus.sent if topic == request_topic("a")]
        assert ops == ["hold", "renew", "release"]
        async with asyncio.timeout(1):
            while keeper.held:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # the answer goes out right after the lane is given back
        assert [m["status"] for topic, m in bus.sent if topic == answer_topic("a")] == [
            "held",
            "renewed",
            "released",
        ]


async def test_the_asking_side_hears_only_the_agent_it_asked():
    """An answer with the right request id from another agent's level is not taken."""
    bus = MemoryBus(deaf={request_topic("a")})  # b never hears the request
    sent = asyncio.Event()
    original = bus.send

    async def send(topic: str, payload: bytes, qos: int) -> None:
        await original(topic, payload, qos)
        rid = json.loads(payload)["request-id"]
        forged = json.dumps({"request-id": rid, "status": "held"}).encode()
        # c answers in its own name, and (as if the ACL let it) on a deeper level of b's.
        bus.deliver("fast/migfra/a/lane-response/c", forged)
        bus.deliver("fast/migfra/a/lane-response/b/x", forged)
        sent.set()

    bus.send = send  # type: ignore[method-assign]
    async with hold(bus, answer_within=0.3) as uncoordinated:
        assert sent.is_set()
        assert uncoordinated == "not coordinated with b's agent (no answer within 0.3 s)"


def test_answers_are_checked():
    mine = "fast/migfra/a/lane-response/b"

    def answer(doc: object, topic: str = mine) -> tuple[str, str] | None:
        return peerlanes._answer_to(topic, json.dumps(doc).encode(), mine, "r1")

    assert answer({"request-id": "r1", "status": "held"}) == ("held", "")
    assert answer({"request-id": "r1", "status": "held"}, "fast/migfra/a/lane-response/c") is None
    assert answer({"request-id": "r2", "status": "held"}) is None
    assert answer({"request-id": "r1", "status": "granted"}) is None
    assert answer({"request-id": "r1", "status": "busy", "details": ["x"]}) is None
    busy = answer({"request-id": "r1", "status": "busy", "details": "x\u202ey\n" + "z" * 900})
    assert busy is not None
    assert busy[1].startswith("x\\u202ey\\u000a")
    assert len(busy[1]) == peerlanes.MAX_DETAILS_CHARS
    assert peerlanes._answer_to(mine, b"\xff", mine, "r1") is None


async def test_the_asking_side_gets_busy_when_the_vm_has_work():
    bus, keeper = MemoryBus(), Keeper(busy={"v2"})
    async with serving(bus, keeper):
        with pytest.raises(Busy, match=r"v2 is busy on b's agent \(on b: a task"):
            async with hold(bus):
                pytest.fail("the block must not run")


@pytest.mark.parametrize("mode", ["best-effort", "required"])
async def test_nobody_answering(mode):
    bus = MemoryBus(deaf={request_topic("a")})
    if mode == "required":
        with pytest.raises(ConnectionFailed, match=r"no answer within 0\.2 s"):
            async with hold(bus, mode, answer_within=0.2):
                pytest.fail("the block must not run")
        return
    async with hold(bus, mode, answer_within=0.2) as uncoordinated:
        assert uncoordinated == "not coordinated with b's agent (no answer within 0.2 s)"


async def test_off_asks_nobody():
    bus = MemoryBus()
    async with hold(bus, "off") as uncoordinated:
        assert uncoordinated is None
    assert bus.sent == []


async def test_no_bus_and_an_unusable_topic_are_reported():
    async with hold_peer_lane(
        None,
        task_topic=A_TASKS,
        hostname="a",
        peer="b",
        vm_name="v2",
        mode="best-effort",
        answer_within=0.2,
    ) as uncoordinated:
        assert uncoordinated == "not coordinated with b's agent (this agent has no MQTT connection)"
    for task_topic, peer in (("site/x/task", "b"), (A_TASKS, "b/c"), (A_TASKS, "+")):
        with pytest.raises(ConnectionFailed, match=r"cannot tell .*'s lane topic"):
            async with hold_peer_lane(
                MemoryBus(),  # type: ignore[arg-type]
                task_topic=task_topic,
                hostname="a",
                peer=peer,
                vm_name="v2",
                mode="required",
                answer_within=0.2,
            ):
                pytest.fail("the block must not run")


class BrokenBus(MemoryBus):
    """A broker connection that fails: on subscribing (``where="subscribe"``) or sending."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    @asynccontextmanager
    async def subscription(self, topic: str, qos: int) -> AsyncIterator[asyncio.Queue]:
        if self.where == "subscribe":
            raise TransportError("not connected")
        async with super().subscription(topic, qos) as queue:
            yield queue

    async def send(self, topic: str, payload: bytes, qos: int) -> None:
        raise TransportError("not connected")


@pytest.mark.parametrize("where", ["subscribe", "send"])
async def test_a_broker_failure_is_reported_not_raised(where):
    async with hold(BrokenBus(where)) as uncoordinated:
        assert uncoordinated == "not coordinated with b's agent (MQTT: not connected)"
    with pytest.raises(ConnectionFailed, match="MQTT: not connected"):
        async with hold(BrokenBus(where), "required"):
            pytest.fail("the block must not run")
