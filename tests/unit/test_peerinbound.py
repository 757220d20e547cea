"""Reserving shares of another host's inbound NIC (``peers.inbound``, ``peers.reserving``)
over an in-memory bus: the destination's decisions (first come, first served, within its
NIC, fair shares for those that wait long), leases, releases, its answers to junk, to
forged senders and to floods; the asking side's grants, its fallback when nobody answers,
its releases on the way out, and restarts of either side. Between agents on a real mosquitto, with
two evacuations onto shared destinations: tests/broker/test_evacuate_shared.py."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from asyncmigfra.hypervisor.fake import create as create_fake
from asyncmigfra.peers import inbound
from asyncmigfra.peers.bus import MemoryBus
from asyncmigfra.peers.inbound import MAX_PER_SOURCE, InboundServer, inbound_topics
from asyncmigfra.peers.reserving import InboundReservations
from harness import granting, serving_on

MIB = 1024 * 1024
D_TASKS = "fast/migfra/d/task"
D_REQUESTS = "fast/migfra/d/inbound/+"


def request_topic(sender: str) -> str:
    return f"fast/migfra/d/inbound/{sender}"


def answer_topic(sender: str) -> str:
    return f"fast/migfra/{sender}/inbound-response/d"


@asynccontextmanager
async def serving(bus: MemoryBus, **kw: object) -> AsyncIterator[InboundServer]:
    server = InboundServer(bus=bus, hostname="d", task_topic=D_TASKS, **kw)  # type: ignore[arg-type]
    async with serving_on(bus, D_REQUESTS, server.serve()):
        yield server


async def ask(bus: MemoryBus, body: dict[str, object], sender: str = "a") -> dict[str, str]:
    """Send one raw request as agent ``sender`` (its topic level; also its ``source``
    unless the body names one) and return the answer."""
    body = {"source": sender, **body}
    async with bus.subscription(answer_topic(sender), 1) as queue:
        bus.deliver(request_topic(sender), json.dumps(body).encode())
        async with asyncio.timeout(2):
            _, raw = await queue.get()
    answer: dict[str, str] = json.loads(raw)
    return answer


def reserve(rate: float, *, rid: str = "r1", **extra: object) -> dict[str, object]:
    return {
        "op": "reserve",
        "request-id": "q1",
        "reservation-id": rid,
        "rate": f"{rate:.0f}",
    } | extra


async def test_topics() -> None:
    topics = inbound_topics(D_TASKS, "d")
    assert topics is not None
    assert topics.requests == D_REQUESTS
    assert topics.request_to("a") == "fast/migfra/a/inbound/d"
    assert topics.answers_from("a") == "fast/migfra/d/inbound-response/a"
    assert inbound_topics("tasks/all", "d") is None


async def test_first_come_first_served_within_the_nic() -> None:
    bus = MemoryBus()
    async with serving(bus) as server:
        # The destination's back-end does not tell its NIC: the asker's figure counts.
        got = await ask(bus, reserve(1000, capacity="1250"), sender="a")
        assert got == {"request-id": "q1", "status": "reserved", "rate": "1000"}
        got = await ask(bus, reserve(1000, capacity="1250"), sender="b")
        assert got["rate"] == "250"
        # a lowers its share: b, asking again, gets what a left.
        assert (await ask(bus, reserve(200, capacity="1250"), sender="a"))["rate"] == "200"
        assert (await ask(bus, reserve(1000, capacity="1250"), sender="b"))["rate"] == "1000"
        assert server.reservations == {("a", "r1"): 200.0, ("b", "r1"): 1000.0}
        release = {"op": "release", "request-id": "q2", "reservation-id": "r1"}
        assert (await ask(bus, release, sender="a"))["status"] == "released"
        assert server.reservations == {("b", "r1"): 1000.0}
        # c tells no figure: the NIC is what b takes it to be.
        assert (await ask(bus, reserve(5000), sender="c"))["rate"] == "250"
    bus = MemoryBus()
    async with serving(bus):
        # Nobody knows the NIC: nothing to divide, all of it is granted.
        assert (await ask(bus, reserve(5000), sender="c"))["rate"] == "5000"


async def test_who_waits_for_more_is_served_before_a_later_ask() -> None:
    bus = MemoryBus()
    async with serving(bus):
        assert (await ask(bus, reserve(1000, capacity="1250"), sender="a"))["rate"] == "1000"
        assert (await ask(bus, reserve(1000, capacity="1250"), sender="b"))["rate"] == "250"
        # a gives its share back and asks again at once: what b waits for stays b's.
        assert (await ask(bus, reserve(0, capacity="1250"), sender="a"))["rate"] == "0"
        assert (await ask(bus, reserve(1000, capacity="1250"), sender="a"))["rate"] == "250"
        assert (await ask(bus, reserve(1000, capacity="1250"), sender="b"))["rate"] == "1000"
        # Less than held is always granted.
        assert (await ask(bus, reserve(100, capacity="1250"), sender="b"))["rate"] == "100"


async def test_the_destinations_own_nic_bounds_what_it_grants() -> None:
    bus = MemoryBus()
    hv = create_fake({"nic-rate": 1000}, hostname="d", shared={})
    async with serving(bus, hypervisor=hv):
        # The asker takes the NIC to be larger than it is: the destination knows better.
        assert (await ask(bus, reserve(900 * MIB, capacity=f"{2000 * MIB}"), sender="a"))[
            "rate"
        ] == f"{900 * MIB}"
        got = await ask(bus, reserve(900 * MIB, capacity=f"{2000 * MIB}"), sender="b")
        assert got["rate"] == f"{100 * MIB}"


async def test_a_reservation_ends_with_its_lease() -> None:
    bus = MemoryBus()
    async with serving(bus) as server:
        await ask(bus, reserve(1000, capacity="1250", lease="1"), sender="a")
        assert server.reservations
        await asyncio.sleep(1.2)
        assert server.reservations == {}


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (reserve(-1), "rate must be a number"),
        (reserve(1) | {"rate": "NaN"}, "rate must be a number"),
        (reserve(1) | {"rate": "1e400"}, "rate must be a number"),
        (reserve(1) | {"rate": 10**400}, "rate must be a number"),  # an int beyond any float
        (reserve(1) | {"rate": True}, "rate must be a number"),
        (reserve(1, capacity="0"), "capacity must be a number"),
        (reserve(1, lease="inf"), "lease must be a number"),
        (reserve(1) | {"op": "grab"}, "op must be one of"),
        (reserve(1) | {"reservation-id": "../x"}, "reservation-id must be"),
        (reserve(1) | {"source": "b"}, "is not the sender a"),
        (reserve(1) | {"rate": "1" * 65}, "longer than 64"),
    ],
)
async def test_junk_is_answered_with_an_error(body: dict[str, object], why: str) -> None:
    bus = MemoryBus()
    async with serving(bus) as server:
        got = await ask(bus, body, sender="a")
        assert got["status"] == "error"
        assert why in got["details"]
        assert got["details"].startswith("on d: ")
        assert server.reservations == {}


async def test_junk_without_a_request_id_gets_no_answer() -> None:
    bus = MemoryBus()
    async with serving(bus) as server, bus.subscription(answer_topic("a"), 1) as queue:
        bus.deliver(request_topic("a"), b"\xff not json")
        bus.deliver(request_topic("a"), json.dumps({"op": "reserve"}).encode())
        await asyncio.sleep(0.05)
        assert queue.empty()
        assert server.reservations == {}


async def test_reservations_are_bounded_per_sender() -> None:
    bus = MemoryBus()
    async with serving(bus) as server:
        for n in range(MAX_PER_SOURCE):
            assert (await ask(bus, reserve(1, rid=f"r{n}"), sender="a"))["status"] == "reserved"
        got = await ask(bus, reserve(1, rid="one0more"), sender="a")
        assert got["status"] == "error"
        assert len(server.reservations) == MAX_PER_SOURCE
        assert (await ask(bus, reserve(1), sender="b"))["status"] == "reserved"


# ---- hostile sources --------------------------------------------------------------------


async def test_a_source_that_never_lets_go_keeps_no_more_than_its_fair_share(monkeypatch) -> None:
    # h takes the whole NIC and renews it forever; b waits for a share. Once b has waited
    # HOLD s, h's next renewal is cut to its fair share and b gets the rest.
    monkeypatch.setattr(inbound, "HOLD", 0.2)
    bus = MemoryBus()
    async with serving(bus) as server:
        assert (await ask(bus, reserve(1250, capacity="1250"), sender="h"))["rate"] == "1250"
        assert (await ask(bus, reserve(1000, capacity="1250"), sender="b"))["rate"] == "0"
        assert (await ask(bus, reserve(1250, capacity="1250"), sender="h"))["rate"] == "1250"
        await asyncio.sleep(0.3)
        assert (await ask(bus, reserve(1250, capacity="1250"), sender="h"))["rate"] == "625"
        assert (await ask(bus, reserve(1000, capacity="1250"), sender="b"))["rate"] == "625"
        # More reservations of h's own do not add up to more than its share.
        got = await ask(bus, reserve(1250, rid="r2", capacity="1250"), sender="h")
        assert got["rate"] == "0"
        assert (await ask(bus, reserve(1250, capacity="1250"), sender="h"))["rate"] == "625"
        assert server.reservations == {("h", "r1"): 625.0, ("b", "r1"): 625.0, ("h", "r2"): 0.0}


async def test_a_source_cannot_make_the_nic_larger_than_the_others_take_it_to_be() -> None:
    # The back-end tells no NIC: h claims 10 TB/s to take it all; b, who takes it to be
    # 1250, still gets what is left of 1250 beside h's grant, which is at most that.
    bus = MemoryBus()
    async with serving(bus) as server:
        assert (await ask(bus, reserve(1e13, capacity="1e13"), sender="h"))[
            "rate"
        ] == "10000000000000"
        got = await ask(bus, reserve(1000, capacity="1250"), sender="b")
        assert got["rate"] == "0"  # the NIC is h's for now (first come) ...
        # ... but at most the whole NIC as b takes it, at h's next renewal.
        assert (await ask(bus, reserve(1e13, capacity="1e13"), sender="h"))["rate"] == "1250"
        assert max(server.reservations.values()) <= 1250


async def test_a_request_flood_is_answered_at_a_bounded_rate(monkeypatch) -> None:
    monkeypatch.setattr(inbound, "MAX_REQUESTS", 5)
    bus = MemoryBus()
    async with serving(bus) as server, bus.subscription(answer_topic("h"), 1) as answers:
        for n in range(50):
            body = reserve(1, rid=f"r{n % 3}") | {"source": "h", "request-id": f"q{n}"}
            bus.deliver(request_topic("h"), json.dumps(body).encode())
        await asyncio.sleep(0.1)
        assert answers.qsize() == 5
        assert len(server.reservations) <= 3
        # Another source is still answered.
        assert (await ask(bus, reserve(1), sender="b"))["status"] == "reserved"


async def test_a_release_in_another_sources_name_changes_nothing() -> None:
    # The sender is the topic's last level (the broker pins it): h can only release its own.
    bus = MemoryBus()
    async with serving(bus) as server:
        await ask(bus, reserve(1000, capacity="1250"), sender="a")
        release = {"op": "release", "request-id": "q2", "reservation-id": "r1"}
        assert (await ask(bus, release, sender="h"))["status"] == "released"
        assert (await ask(bus, release | {"source": "a"}, sender="h"))["status"] == "error"
        assert server.reservations == {("a", "r1"): 1000.0}


# ---- the asking side ---------------------------------------------------------------------


def reservations(bus: MemoryBus | None, hostname: str, **kw: object) -> InboundReservations:
    return InboundReservations(
        bus,  # type: ignore[arg-type]
        task_topic=f"fast/migfra/{hostname}/task",
        hostname=hostname,
        **kw,  # type: ignore[arg-type]
    )


async def test_two_sources_share_a_destination_and_give_it_back() -> None:
    bus = MemoryBus()
    async with serving(bus) as server:
        async with reservations(bus, "a") as a, reservations(bus, "b") as b:
            await a.reserve({"d": 1000.0 * MIB}, {"d": 1250.0 * MIB})
            await b.reserve({"d": 1000.0 * MIB}, {"d": 1250.0 * MIB})
            assert a.held == {"d": 1000.0 * MIB}
            assert b.held == {"d": 250.0 * MIB}
            # a needs less now; b asks again (what it wants differs from what it holds).
            await a.reserve({"d": 100.0 * MIB}, {"d": 1250.0 * MIB})
            await b.reserve({"d": 1000.0 * MIB}, {"d": 1250.0 * MIB})
            assert b.held == {"d": 1000.0 * MIB}
            # Nothing more into d: released.
            await a.reserve({"d": 0.0}, {"d": 1250.0 * MIB})
            assert a.held == {}
            assert sorted(s for s, _ in server.reservations) == ["b"]
        assert server.reservations == {}  # b released on the way out


async def test_a_probe_tells_which_destinations_answer() -> None:
    bus = MemoryBus()
    async with serving(bus) as server, reservations(bus, "a", answer_within=0.1) as a:
        await a.probe(["d", "x"])
        assert a.coordinated("d")
        assert not a.coordinated("x")
        assert server.reservations == {}
        assert a.held == {}


async def test_a_destination_nobody_answers_for_is_not_coordinated() -> None:
    bus = MemoryBus()
    async with reservations(bus, "a", answer_within=0.1) as a:
        await a.reserve({"d": 1000.0 * MIB}, {"d": math.inf})
        assert a.held == {}
        assert not a.coordinated("d")
        assert "no answer within 0.1 s" in a.uncoordinated["d"]
        sent = len(bus.sent)
        await a.reserve({"d": 2000.0 * MIB}, {})
        assert len(bus.sent) == sent  # not asked again
    async with reservations(None, "a") as nobus:
        await nobus.reserve({"d": 1000.0 * MIB}, {})
        assert not nobus.coordinated("d")


async def test_a_forged_answer_is_ignored() -> None:
    bus = MemoryBus()
    async with reservations(bus, "a", answer_within=0.2) as a:

        async def forge() -> None:
            while not bus.sent:
                await asyncio.sleep(0)
            rid = bus.sent[0][1]["request-id"]
            # From another agent's level, and well-formed but unreadable: both ignored.
            bogus = {"request-id": rid, "status": "reserved", "rate": "1e30"}
            bus.deliver("fast/migfra/a/inbound-response/x", json.dumps(bogus).encode())
            bus.deliver(answer_topic("a"), json.dumps(bogus).encode())

        forger = asyncio.create_task(forge())
        async with asyncio.timeout(5):
            await a.reserve({"d": 1000.0 * MIB}, {})
            await forger
        assert a.held == {}
        assert not a.coordinated("d")


async def test_a_grant_above_what_was_asked_is_believed_only_up_to_the_ask() -> None:
    bus = MemoryBus()
    async with granting(bus, "10000000000000", host="d"), reservations(bus, "a") as a:
        await a.reserve({"d": 1000.0 * MIB}, {"d": 1250.0 * MIB})
        assert a.held == {"d": 1000.0 * MIB}
        assert not a.short


async def test_a_restarted_source_renews_its_reservation_instead_of_adding_one() -> None:
    # a holds 1000 of 1250 for task t1 and dies (no release: its lease still runs). Its
    # evacuation, run again after the restart, asks again under the same name: one
    # reservation, not 2000 counted against b.
    bus = MemoryBus()
    async with serving(bus) as server:
        before = reservations(bus, "a", task_id="t1")
        await before.reserve({"d": 1000.0 * MIB}, {"d": 1250.0 * MIB})
        async with reservations(bus, "a", task_id="t1") as after:
            await after.reserve({"d": 1000.0 * MIB}, {"d": 1250.0 * MIB})
            assert after.held == {"d": 1000.0 * MIB}
            assert list(server.reservations.values()) == [1000.0 * MIB]
            async with reservations(bus, "b", task_id="t1") as b:  # another host's t1
                await b.reserve({"d": 1000.0 * MIB}, {"d": 1250.0 * MIB})
                assert b.held == {"d": 250.0 * MIB}
        assert before._renewing is not None
        before._renewing.cancel()


async def test_a_restarted_destination_gets_the_reservations_back_with_their_renewals() -> None:
    # The destination's agent keeps reservations in memory only: after its restart, each
    # source's next renewal (a third of its lease) reserves again.
    bus = MemoryBus()
    async with reservations(bus, "a", lease=1.2, answer_within=0.2) as a:
        async with serving(bus) as first:
            await a.reserve({"d": 1000.0 * MIB}, {"d": 1250.0 * MIB})
            assert list(first.reservations.values()) == [1000.0 * MIB]
        assert first.reservations == {}  # gone with the agent
        await asyncio.sleep(1.0)  # down for longer than a renewal period
        assert a.coordinated("d")  # it answered before: a silence is no reason to stop
        async with serving(bus) as second:
            async with asyncio.timeout(2):
                while not second.reservations:
                    await asyncio.sleep(0.05)
            assert list(second.reservations.values()) == [1000.0 * MIB]
            assert a.held == {"d": 1000.0 * MIB}
