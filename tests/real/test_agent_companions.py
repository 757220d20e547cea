"""Migration companions on real QEMU guests between the rig's libvirtds, through MQTT: the
vcpu-map repin on the destination (spec 1.7) and swap-with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from agents import rig_agents

import libvirt
from rig import Rig

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
