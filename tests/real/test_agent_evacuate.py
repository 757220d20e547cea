"""Evacuate a real host: three QEMU guests from rig-a to rig-b through MQTT, and an
evacuation cancelled half-way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from agents import rig_agents
from test_agent_migration import where

from rig import Rig

pytestmark = [pytest.mark.rig, pytest.mark.broker]


async def test_evacuate_three_guests_to_the_other_host(
    mosquitto, rig: Rig, start_guest: Callable[..., Any]
):
    names = sorted(start_guest("idle").name() for _ in range(3))
    async with rig_agents(mosquitto.port, rig) as agents:
        r = await agents.to_a.call(
            f"task: evacuate node\ndestinations: [{rig.b.name}]\ntime-measurement: true\n"
            "parameter:\n  mode: auto\n  overbooking: true\n  migration-type: live\n"
            "  max-parallel: 2\n",
            120,
        )
        assert r["result"] == "node evacuated"
        assert sorted(e["vm-name"] for e in r["list"]) == names
        assert {(e["status"], e["destination"]) for e in r["list"]} == {("success", rig.b.name)}
        assert "overall" in r["time-measurement"]
        for name in names:
            assert where(rig, name) == {rig.b.name: (True, True)}


async def test_evacuation_cancelled_half_way(mosquitto, rig: Rig, start_guest: Callable[..., Any]):
    names = sorted(start_guest("dirty16").name() for _ in range(3))
    async with rig_agents(mosquitto.port, rig) as agents:
        await agents.to_a.publish(
            f"id: evac-cancel\ntask: evacuate node\ndestinations: [{rig.b.name}]\n"
            "parameter:\n  migration-type: live\n  bandwidth: 8\n  max-parallel: 1\n"
        )
        await agents.to_a.wait_for(
            lambda: [
                e
                for e in agents.to_a.events_for("evac-cancel", "progress")
                if e.get("iteration", 0) >= 1
            ],
            60,
        )
        r = await agents.to_a.call("task: cancel\ntarget: evac-cancel\n")
        assert r["result"] == "cancelled"
        res = await agents.to_a.result_for("evac-cancel", 60)
        assert sorted(e["vm-name"] for e in res["list"]) == names
        assert {e.get("code") for e in res["list"]} == {"cancelled"}
        for name in names:
            assert where(rig, name) == {rig.a.name: (True, True)}
