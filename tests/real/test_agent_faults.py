"""Faults on real hosts: libvirtd restarted while a task runs, and the rig's link taken down
during a migration. Each time the task gets exactly one result, the VM runs in one known
place, and the agent keeps serving."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from agents import rig_agents
from test_agent_migration import migrate_msg, where

from rig import Rig
from rig.hosts import VETH

pytestmark = [pytest.mark.rig, pytest.mark.broker]


async def test_libvirtd_restarted_during_a_task(
    mosquitto, rig: Rig, start_guest: Callable[..., Any]
):
    """A graceful stop waits (the test guest ignores ACPI) while libvirtd restarts under it;
    the wait survives the reconnect and the stop still finishes (force-after-timeout)."""
    name = start_guest("idle").name()
    async with rig_agents(mosquitto.port, rig) as agents:
        await agents.to_a.publish(
            f"id: stop-during\ntask: stop vm\nlist:\n  - vm-name: {name}\n"
            "    force-after-timeout: true\n"
        )
        await agents.to_a.wait_for(
            lambda: [
                e
                for e in agents.to_a.events_for("stop-during", "phase")
                if e["phase"] == "shutting-down"
            ],
            20,
        )
        await asyncio.to_thread(rig.restart_daemon, rig.a)
        r = await agents.to_a.result_for("stop-during", 40)
        assert r["list"][0]["status"] == "success", r
        assert where(rig, name) == {rig.a.name: (False, True)}
        r = await agents.to_a.call("task: status\n")
        assert r["result"] == "status"
        await asyncio.sleep(0.3)
        assert [x.get("id") for x in agents.to_a.results].count("stop-during") == 1


async def test_link_down_during_a_migration(mosquitto, rig: Rig, start_guest: Callable[..., Any]):
    """The migration stream's network disappears mid-copy: the job cannot finish, the
    completion timeout aborts it, the VM keeps running on the source only."""
    if rig.mode != "netns":
        pytest.skip("needs the rig's network namespaces (the veth)")
    dom = start_guest("dirty16")
    name = dom.name()
    a_ns = rig.a.netns
    assert a_ns is not None
    try:
        async with rig_agents(mosquitto.port, rig, agent={"progress_interval": 0.2}) as agents:
            await agents.to_a.publish(
                "id: cut\n"
                + migrate_msg(
                    name,
                    rig.b.name,
                    **{"migration-type": "live", "bandwidth": 8, "completion-timeout": 6},
                )
            )
            await agents.to_a.wait_for(
                lambda: [
                    e
                    for e in agents.to_a.events_for("cut", "progress")
                    if e.get("iteration", 0) >= 1
                ],
                30,
            )
            subprocess.run(["ip", "-n", a_ns, "link", "set", VETH, "down"], check=True)
            r = await agents.to_a.result_for("cut", 60)
            assert r["status"] == "error", r
            assert r["code"] in {"timeout", "migration-failed"}, r
            subprocess.run(["ip", "-n", a_ns, "link", "set", VETH, "up"], check=True)
            assert where(rig, name) == {rig.a.name: (True, True)}
            status = await agents.to_a.call("task: status\n")
            assert {e["vm-name"]: e["state"] for e in status["list"]}[name] == "running"
            await asyncio.sleep(0.3)
            assert [x.get("id") for x in agents.to_a.results].count("cut") == 1
    finally:
        subprocess.run(["ip", "-n", a_ns, "link", "set", VETH, "up"], check=False)
