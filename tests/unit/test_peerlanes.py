"""The lane-hold protocol between agents (``peerlanes``) over an in-memory bus: the server's
decisions, leases, renewals, releases and its answers to junk; the asking side's outcomes.
The same exchange over a real mosquitto between two agents: tests/broker/test_swap_lanes.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from asyncmigfra import peerlanes
from asyncmigfra.errors import Busy, ConnectionFailed
from asyncmigfra.mqtt import TransportError
from asyncmigfra.peerlanes import LaneServer, hold_peer_lane, lane_topic_of

A_TASKS = "fast/migfra/a/task"
B_TASKS = "fast/migfra/b/task"
B_LANE = "fast/migfra/b/lane"
A_ANSWERS = "fast/migfra/a/lane/response"


@dataclass
class Bus:
    """Delivers every message to the queues subscribed to exactly its topic."""

    queues: dict[str, list[asyncio.Queue[tuple[str, bytes]]]] = field(default_factory=dict)
    sent: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    #: Topics whose messages are dropped (nobody there).
    deaf: set[str] = field(default_factory=set)

    @asynccontextmanager
    async def subscription(self, topic: str, qos: int) -> AsyncIterator[asyncio.Queue]:
        queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.queues.setdefault(topic, []).append(queue)
        try:
            yield queue
        finally:
            self.queues[topic].remove(queue)

    async def send(self, topic: str, payload: bytes, qos: int) -> None:
        self.sent.append((topic, json.loads(payload)))
        if topic in self.deaf:
            return
        for queue in self.queues.get(topic, []):
            queue.put_nowait((topic, payload))


@dataclass
class Keeper:
    """The dispatcher's side: VMs with work on them, and the lanes given out."""

    busy: set[str] = field(default_factory=set)
    held: list[str] = field(default_factory=list)

    def hold_lane(self, vm_name: str) -> Callable[[], None] | str:
        if vm_name in self.busy or vm_name in self.held:
            return f"a task of this agent runs or waits on {vm_name}"
        self.held.append(vm_name)
        return lambda: self.held.remove(vm_name)


@asynccontextmanager
async def serving(bus: Bus, keeper: Keeper) -> AsyncIterator[LaneServer]:
    server = LaneServer(bus=bus, hostname="b", task_topic=B_TASKS, keeper=keeper)
    task = asyncio.create_task(server.serve())
    while B_LANE not in bus.queues:
        await asyncio.sleep(0)
    try:
        yield server
    finally:
        task.cancel()
        await asyncio.wait({task})


async def ask(bus: Bus, request: dict[str, str]) -> dict[str, str]:
    """Send one raw request as agent ``a`` and return the answer."""
    async with bus.subscription(A_ANSWERS, 1) as queue:
        await bus.send(B_LANE, json.dumps(request).encode(), 1)
        async with asyncio.timeout(2):
            _, raw = await queue.get()
    answer: dict[str, str] = json.loads(raw)
    return answer


def request(op: str, hold_id: str = "h1", vm: str = "v2", **extra: str) -> dict[str, str]:
    return {
        "op": op,
        "request-id": f"r{op}",
        "hold-id": hold_id,
        "vm-name": vm,
        "source": "a",
    } | extra


def hold(bus: Bus, mode: str = "best-effort", **kw: object):  # type: ignore[no-untyped-def]
    return hold_peer_lane(
        bus,  # type: ignore[arg-type]
        task_topic=A_TASKS,
        hostname="a",
        peer="b",
        vm_name="v2",
        mode=mode,  # type: ignore[arg-type]
        answer_within=kw.pop("answer_within", 0.5),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def test_the_lane_topic_is_the_task_topics_sibling():
    assert lane_topic_of("fast/migfra/node1/task") == "fast/migfra/node1/lane"
    assert lane_topic_of("single") == "single/lane"


async def test_a_hold_takes_the_lane_until_it_is_released():
    bus, keeper = Bus(), Keeper()
    async with serving(bus, keeper) as server:
        assert (await ask(bus, request("hold")))["status"] == "held"
        assert keeper.held == ["v2"]
        assert server.holds == {"h1": "v2"}
        # A QoS 1 duplicate of the same hold is answered the same, and takes nothing more.
        assert (await ask(bus, request("hold")))["status"] == "held"
        assert keeper.held == ["v2"]
        assert (await ask(bus, request("renew")))["status"] == "renewed"
        assert (await ask(bus, request("release")))["status"] == "released"
        assert keeper.held == []
        assert (await ask(bus, request("release")))["status"] == "released"  # idempotent


async def test_a_vm_with_work_on_it_is_busy():
    bus, keeper = Bus(), Keeper(busy={"v2"})
    async with serving(bus, keeper):
        answer = await ask(bus, request("hold"))
    assert answer == {
        "request-id": "rhold",
        "status": "busy",
        "details": "on b: a task of this agent runs or waits on v2",
    }


async def test_a_hold_whose_lease_runs_out_is_given_back(monkeypatch):
    bus, keeper = Bus(), Keeper()
    async with serving(bus, keeper) as server:
        assert (await ask(bus, request("hold", lease="1")))["status"] == "held"
        await asyncio.sleep(0.6)
        assert (await ask(bus, request("renew", lease="1")))["status"] == "renewed"
        await asyncio.sleep(0.6)
        assert keeper.held == ["v2"], "the renewal moved the end"
        async with asyncio.timeout(2):
            while keeper.held:
                await asyncio.sleep(0.05)
        assert server.holds == {}
        answer = await ask(bus, request("renew"))
    assert answer["status"] == "error"
    assert "expired, or the agent restarted" in answer["details"]


async def test_stopping_the_server_gives_every_hold_back():
    bus, keeper = Bus(), Keeper()
    async with serving(bus, keeper):
        await ask(bus, request("hold", "h1", "v1"))
        await ask(bus, request("hold", "h2", "v2"))
        assert sorted(keeper.held) == ["v1", "v2"]
    assert keeper.held == []


async def test_another_agent_cannot_release_or_renew_a_hold():
    bus, keeper = Bus(), Keeper()
    async with serving(bus, keeper):
        await ask(bus, request("hold"))
        other = request("release") | {"vm-name": "v9"}
        answer = await ask(bus, other)
        assert answer["status"] == "error"
        assert keeper.held == ["v2"]


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1, 2]",
        json.dumps(
            {"op": "steal", "request-id": "r", "hold-id": "h", "vm-name": "v", "source": "a"}
        ).encode(),
        json.dumps(
            {"op": "hold", "request-id": "r/x", "hold-id": "h", "vm-name": "v", "source": "a"}
        ).encode(),
        json.dumps(
            {"op": "hold", "request-id": "r", "hold-id": "h", "vm-name": "v", "source": "+"}
        ).encode(),
        json.dumps({"op": "hold", "request-id": "r", "hold-id": "h", "vm-name": "v"}).encode(),
        json.dumps(
            {"op": "hold", "request-id": "r", "hold-id": "h", "vm-name": 5, "source": "a"}
        ).encode(),
        b"{" * 100_000,
    ],
    ids=[
        "not-json",
        "not-a-map",
        "unknown-op",
        "bad-id",
        "wildcard-source",
        "no-source",
        "number",
        "huge",
    ],
)
async def test_junk_is_ignored_and_the_server_keeps_serving(payload):
    bus, keeper = Bus(), Keeper()
    async with serving(bus, keeper):
        for queue in bus.queues[B_LANE]:
            queue.put_nowait((B_LANE, payload))
        assert (await ask(bus, request("hold")))["status"] == "held"
    answers = [m for topic, m in bus.sent if topic.endswith("/response")]
    assert [a["request-id"] for a in answers] == ["rhold"], "junk got no answer"


async def test_the_asking_side_holds_renews_and_releases():
    bus, keeper = Bus(), Keeper()
    async with serving(bus, keeper):
        async with hold(bus, lease=3.0) as uncoordinated:
            assert uncoordinated is None
            assert keeper.held == ["v2"]
            async with asyncio.timeout(3):  # a renewal every third of the lease
                while not any(m.get("op") == "renew" for _, m in bus.sent):
                    await asyncio.sleep(0.05)
        ops = [m["op"] for topic, m in bus.sent if topic == B_LANE]
        assert ops == ["hold", "renew", "release"]
        async with asyncio.timeout(1):
            while keeper.held:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # the answer goes out right after the lane is given back
        assert [m["status"] for topic, m in bus.sent if topic == A_ANSWERS] == [
            "held",
            "renewed",
            "released",
        ]


async def test_the_asking_side_gets_busy_when_the_vm_has_work():
    bus, keeper = Bus(), Keeper(busy={"v2"})
    async with serving(bus, keeper):
        with pytest.raises(Busy, match=r"v2 is busy on b's agent \(on b: a task"):
            async with hold(bus):
                pytest.fail("the block must not run")


@pytest.mark.parametrize("mode", ["best-effort", "required"])
async def test_nobody_answering(mode):
    bus = Bus(deaf={B_LANE})
    if mode == "required":
        with pytest.raises(ConnectionFailed, match=r"no answer within 0\.2 s"):
            async with hold(bus, mode, answer_within=0.2):
                pytest.fail("the block must not run")
        return
    async with hold(bus, mode, answer_within=0.2) as uncoordinated:
        assert uncoordinated == "not coordinated with b's agent (no answer within 0.2 s)"


async def test_off_asks_nobody():
    bus = Bus()
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
    with pytest.raises(ConnectionFailed, match="cannot tell b's lane topic"):
        async with hold_peer_lane(
            Bus(),  # type: ignore[arg-type]
            task_topic="site/x/task",
            hostname="a",
            peer="b",
            vm_name="v2",
            mode="required",
            answer_within=0.2,
        ):
            pytest.fail("the block must not run")


def test_leases_are_bounded():
    assert LaneServer._lease({"lease": "0.01"}) == 1.0
    assert LaneServer._lease({"lease": "1e9"}) == peerlanes.MAX_LEASE
    assert LaneServer._lease({"lease": "nan"}) == peerlanes.LEASE
    assert LaneServer._lease({"lease": "x"}) == peerlanes.LEASE
    assert LaneServer._lease({}) == peerlanes.LEASE


class BrokenBus(Bus):
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


@given(st.binary(max_size=600) | st.text(max_size=300).map(str.encode))
@hyp_settings(max_examples=300, deadline=None)
def test_any_bytes_are_a_request_or_nothing_never_an_exception(raw):
    parsed = peerlanes._request(raw)
    if parsed is not None:
        assert parsed["op"] in ("hold", "renew", "release")
        assert parsed["request-id"].isalnum()


@given(
    st.dictionaries(
        st.sampled_from(["op", "request-id", "hold-id", "vm-name", "source", "lease", "x"]),
        st.one_of(st.text(max_size=20), st.integers(), st.none(), st.lists(st.text(), max_size=2)),
    )
)
@hyp_settings(max_examples=300, deadline=None)
def test_any_json_map_is_a_checked_request_or_nothing(document):
    parsed = peerlanes._request(json.dumps(document).encode())
    if parsed is not None:
        assert all(isinstance(v, str) for v in parsed.values())
        assert parsed["vm-name"]
        assert parsed["source"]
