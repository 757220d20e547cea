"""An operator's ``tune migration`` on a VM of a predicted evacuation holds (protocol §3.7,
§3.11), through MQTT on the fake back-end: the scheduler re-caps the running moves whenever
one starts or ends, and used to overwrite the operator's bandwidth at the next change."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import pytest

from asyncmigfra.settings import HypervisorSettings
from harness import agent_settings, running_agent, scheduler

pytestmark = pytest.mark.broker

MIB = 1024 * 1024
GIB_KIB = 1024 * 1024


def progress_of(events: list[dict[str, Any]], vm: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "progress" and e.get("vm-name") == vm]


@pytest.mark.parametrize("operator", [120, 0])
async def test_an_operators_bandwidth_holds_when_the_scheduler_caps_again(mosquitto, operator):
    # db-1 (dirtying 450 MiB/s) takes its whole 700 MiB/s stream; web-1 starts beside it,
    # capped at the 300 MiB/s left. The operator then sets web-1's bandwidth. When db-1
    # ends the scheduler caps the running moves again (it lifted web-1's cap): the
    # operator's value must hold, whether a limit (120) or unlimited (0).
    name = f"ev-{uuid.uuid4().hex[:6]}"
    doms = [
        {"name": "db-1", "memory": 400 * 1024, "dirty-rate": 450.0, "state": "running"},
        {"name": "web-1", "memory": 900 * 1024, "state": "running"},
    ]
    opts = {
        "host": name,
        "peers": {"b": {"memory": 64 * GIB_KIB}},
        "domains": doms,
        "bandwidth": 700,
        "nic-rate": 1000,
    }
    settings = agent_settings(mosquitto.port, hostname=name)
    settings = replace(settings, hypervisor=HypervisorSettings(type="fake", options=opts))
    async with (
        scheduler(mosquitto.port, f"fast/migfra/{name}") as sched,
        running_agent(settings),
    ):
        await sched.publish(
            "id: ev\ntask: evacuate node\ndestinations: [b]\nparameter:\n"
            "  schedule: predicted\n  migration-type: live\n"
        )
        # web-1 moves (capped by the scheduler) while db-1 still runs.
        await sched.wait_for(
            lambda: [e for e in progress_of(sched.events, "web-1") if e.get("transfer-rate")]
        )
        await sched.publish(
            f"id: op\ntask: tune migration\ntarget: ev\nvm-name: web-1\nbandwidth: {operator}\n"
        )
        tuned = await sched.result_for("op")
        assert tuned["list"] == [{"vm-name": "web-1", "status": "success", "bandwidth": operator}]
        tuned_at = len(sched.events)
        result = await sched.result_for("ev", 30)
    assert {e["vm-name"]: e["status"] for e in result["list"]} == {
        "db-1": "success",
        "web-1": "success",
    }
    later = progress_of(sched.events[tuned_at:], "web-1")
    # The first tuned event after the operator's tune is the operator's own; no other
    # bandwidth is set on web-1 after it.
    caps = [e["bandwidth"] for e in later if e.get("action") == "tuned" and "bandwidth" in e]
    assert caps == [operator]
    rates = [e["transfer-rate"] for e in later if e.get("transfer-rate")]
    assert rates
    if operator:  # held at the operator's limit, not lifted once db-1 has ended
        ends = [e for e in sched.events if e.get("event") == "done"]
        db_done = sched.events.index(next(e for e in ends if e["vm-name"] == "db-1"))
        assert sched.events.index(later[-1]) > db_done  # web-1 still moved after db-1
        assert max(rates) <= operator * MIB * 1.05
    else:  # unlimited: more than the 300 MiB/s the scheduler had left it
        assert max(rates) > 300 * MIB
