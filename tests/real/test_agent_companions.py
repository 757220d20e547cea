"""Migration companions on real QEMU guests between the rig's libvirtds, through MQTT: the
vcpu-map repin on the destination (spec 1.7), swap-with and the reduce-memory hook."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest
from agents import rig_agents

import libvirt
from asyncmigfra.settings import settings_from_text
from rig import Rig, wait_counter_above

pytestmark = [pytest.mark.rig, pytest.mark.broker]


async def test_vcpu_map_migrates_paused_repins_on_b_and_resumes(
    mosquitto, rig: Rig, start_guest: Callable[..., Any]
):
    name = start_guest("idle").name()
    async with rig_agents(mosquitto.port, rig) as agents:
        r = await agents.to_a.call(
            f"task: migrate vm\nvm-name: {name}\ndestination: {rig.b.name}\n"
            "time-measurement: true\nparameter:\n  migration-type: live\n  vcpu-map: [[1]]\n",
            60,
        )
        assert (r["status"], r["destination"]) == ("success", rig.b.name), r
        assert "repin" in r["time-measurement"]
        conn = libvirt.open(rig.b.local_uri)
        try:
            dom = conn.lookupByName(name)
            assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            (cpumap,) = dom.vcpuPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE)
            assert [i for i, on in enumerate(cpumap) if on] == [1]
        finally:
            conn.close()
        phases = [e["phase"] for e in agents.to_a.events_for(r["id"], "phase")]
        assert phases.index("migrating") < phases.index("repin")


async def test_swap_with_trades_two_real_guests_between_a_and_b(
    mosquitto, rig: Rig, start_guest: Callable[..., Any]
):
    """Spec 1.7 swap-with on real QEMU: one guest A->B and one B->A at the same time, both
    guests keep counting, the timed result names both halves (spec 9.2's duplicate tag)."""
    one = start_guest("idle")
    two = start_guest("dirty16", host=rig.b)
    before = {
        "one": await asyncio.to_thread(wait_counter_above, one, 0),
        "two": await asyncio.to_thread(wait_counter_above, two, 0),
    }
    async with rig_agents(mosquitto.port, rig) as agents:
        # The agents are named only by their topics (rig-<run>/rig-a/task), and the machine
        # they run on is neither (issue 12: a swap used to look for "this host" by it).
        names = (agents.a.settings.hostname, agents.b.settings.hostname)
        assert names == (rig.a.name, rig.b.name)
        assert socket.gethostname() not in names
        r = await agents.to_a.call(
            f"task: migrate vm\nvm-name: {one.name()}\ndestination: {rig.b.name}\n"
            "time-measurement: true\nparameter:\n  migration-type: post-copy\n"
            f"  swap-with:\n    vm-name: {two.name()}\n",
            90,
        )
    assert (r["status"], r["destination"]) == ("success", rig.b.name), r
    assert r["swap-with"] == {
        "vm-name": two.name(),
        "status": "success",
        "destination": rig.a.name,
        "order": "parallel",
    }
    tags = set(r["time-measurement"])
    assert {f"migrate-{one.name()}", f"migrate-{two.name()}", "migrate", "pre-checks"} <= tags
    # rig-b's agent held the partner's lane for the swap (no "not coordinated" details).
    assert "peer-lane" in tags
    assert "details" not in r, r
    for host, dom, key in ((rig.b, one, "one"), (rig.a, two, "two")):
        conn = libvirt.open(host.local_uri)
        try:
            moved = conn.lookupByName(dom.name())
            assert moved.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            await asyncio.to_thread(wait_counter_above, moved, before[key].counter)
        finally:
            conn.close()
    for host, dom in ((rig.a, one), (rig.b, two)):
        conn = libvirt.open(host.local_uri)
        try:
            active = {
                d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            }
        finally:
            conn.close()
        assert dom.name() not in active  # the old copy is gone


async def test_reduce_memory_balloons_a_real_guest_down_for_its_migration_and_back_on_b(
    mosquitto, rig: Rig, start_guest: Callable[..., Any]
):
    """The built-in ``reduce-memory`` hook on real QEMU: the rig's balloon guest (a cooperative
    virtio balloon, tests/rig/guest.S) is ballooned to half its memory on A before the copy and
    given all of it back on B after."""
    dom = start_guest("balloon")
    name = dom.name()
    await asyncio.to_thread(wait_counter_above, dom, 0)
    config = settings_from_text(
        "hooks:\n  - name: shrink\n    builtin: reduce-memory\n    memory: 50%\n", hostname="h"
    ).hooks
    seen: list[int] = []

    async def watch_a() -> None:
        while True:
            try:
                seen.append(int((await asyncio.to_thread(dom.info))[2]))
            except libvirt.libvirtError:
                return  # gone from A
            await asyncio.sleep(0.02)

    async with rig_agents(mosquitto.port, rig, hooks=config) as agents:
        watcher = asyncio.create_task(watch_a())
        r = await agents.to_a.call(
            f"task: migrate vm\nvm-name: {name}\ndestination: {rig.b.name}\n"
            "time-measurement: true\nparameter:\n  migration-type: live\n",
            60,
        )
        watcher.cancel()
    assert (r["status"], r["destination"]) == ("success", rig.b.name), r
    assert "details" not in r, r  # no warning: the guest gave its memory back in time
    assert "hook-shrink" in r["time-measurement"]
    assert seen[0] == 128 * 1024
    assert min(seen) == 64 * 1024, sorted(set(seen))
    conn = libvirt.open(rig.b.local_uri)
    try:
        moved = conn.lookupByName(name)
        for _ in range(100):  # the guest grows back on its own time (bounded: 10 s)
            if moved.info()[2] == 128 * 1024:
                break
            await asyncio.sleep(0.1)
        assert moved.info()[2] == 128 * 1024
    finally:
        conn.close()
    phases = [e["phase"] for e in agents.to_a.events_for(r["id"], "phase")]
    assert phases.count("hook:shrink") == 2
    assert phases.index("hook:shrink") < phases.index("migrating")
