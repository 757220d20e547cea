"""``evacuate node`` with ``schedule: predicted`` onto destinations that other hosts'
evacuations share (protocol §3.7, *Several sources*): the moves into a destination wait for
its agent's grant of inbound NIC share, never stall on an agent that grants nothing, give
back what they hold when cancelled, and moves to other destinations go on meanwhile.
Built like ``test_evacuation_waves`` (no broker, a :class:`MemoryBus` between the agents)."""

from __future__ import annotations

import asyncio

from evacuation_support import MIB, MIXED, dispatcher, entries, evacuate, fake, vm

from asyncmigfra.peers.bus import MemoryBus
from asyncmigfra.peers.inbound import InboundServer
from asyncmigfra.tasks.dispatching import moving
from harness import granting, submit


async def test_a_destination_that_never_grants_enough_does_not_stall_the_evacuation(
    monkeypatch,
) -> None:
    # b's agent answers every reservation with 0 bytes/s (hostile, or stuck): the moves
    # wait for its grant, but no longer than GRANT_PATIENCE; then b is divided as if this
    # host were alone, and every VM moves.
    monkeypatch.setattr(moving, "GRANT_PATIENCE", 1.0)
    bus = MemoryBus()
    hv = fake([vm("h1", 200, 600), vm("c1", 200)], **{"nic-rate": 1000})
    async with (
        granting(bus, "0", host="b"),
        granting(bus, "0", host="c"),
        dispatcher(hv, bus=bus) as (d, rec),
    ):
        evacuate(d, "stall", "  schedule: predicted\n  migration-type: live\n")
        result = await rec.result("stall")
    assert {e.vm_name: e.status for e in result.entries} == {"h1": "success", "c1": "success"}
    asked = [t for t, _ in bus.sent if "/inbound/" in t]
    assert asked  # it did ask, and waited


async def test_a_cancel_gives_back_the_destinations_shares_and_answers_for_every_vm() -> None:
    # b's agent serves reservations; the evacuation is cancelled while h1 moves and the
    # rest wait: every VM has its entry, nothing moves any more, and b holds no
    # reservation of a's (released, not left to its lease).
    bus = MemoryBus()
    hv = fake(MIXED, peers={"b": {"memory": 64 * MIB, "nic-rate": 1000}}, **{"nic-rate": 1000})
    server = InboundServer(bus=bus, hostname="b", task_topic="fast/migfra/b/task")
    serving = asyncio.create_task(server.serve())
    try:
        async with dispatcher(hv, bus=bus) as (d, rec):
            text = (
                "id: x\ntask: evacuate node\ndestinations: [b]\nparameter:\n"
                "  schedule: predicted\n  migration-type: live\n"
            )
            submit(d, text)
            await rec.until(lambda: server.reservations)
            await rec.until(lambda: [e for e in rec.of("phase") if e.get("phase") == "migrating"])
            submit(d, "task: cancel\ntarget: x\n")
            result = await rec.result("x")
            got = entries(result)
            assert sorted(got) == ["c1", "c2", "h1", "h2"]
            assert "cancelled" in {g["code"] for g in got.values()}
            assert server.reservations == {}
            assert not d._inbound
            moving = [t for t in asyncio.all_tasks() if "asyncmigfra.evacuate" in t.get_name()]
            assert not [t for t in moving if not t.done()]
    finally:
        serving.cancel()
        await asyncio.wait({serving})


async def test_moves_to_other_destinations_go_on_while_one_waits_for_its_grant() -> None:
    # b's agent grants nothing (c has no agent: a is alone there). The moves to b wait for
    # b's grant; those to c run meanwhile, and finish.
    bus = MemoryBus()
    doms = [vm(f"v{i}", 200) for i in range(6)]
    hv = fake(doms, **{"nic-rate": 1000})
    async with granting(bus, "0", host="b"), dispatcher(hv, bus=bus) as (d, rec):
        evacuate(d, "wait", "  schedule: predicted\n  migration-type: live\n  mode: scatter\n")
        done = await rec.until(lambda: len(rec.of("done")) >= 3 and rec.of("done"))
        submit(d, "task: cancel\ntarget: wait\n")
        result = await rec.result("wait")
    got = entries(result)
    to_c = {n for n, e in got.items() if e["destination"] == "c"}
    to_b = {n for n, e in got.items() if e["destination"] == "b"}
    assert to_b
    assert to_c
    assert {e["vm-name"] for e in done} == to_c
    assert {got[n]["status"] for n in to_c} == {"success"}
    assert {got[n]["code"] for n in to_b} == {"cancelled"}
