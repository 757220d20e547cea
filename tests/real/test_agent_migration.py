"""The migration engine on real QEMU guests between the rig's two libvirtds, all through MQTT:
live there and back with the guest's state continuing, warm, offline, post-copy finishing what
pre-copy cannot, cancel, the completion timeout, rising progress and a pre-check failure."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from agents import rig_agents

import libvirt
from rig import Rig, read_state, wait_counter_above

pytestmark = [pytest.mark.rig, pytest.mark.broker]


def where(rig: Rig, name: str) -> dict[str, tuple[bool, bool]]:
    """host -> (active, persistent) for every host that knows the domain."""
    out = {}
    for host in rig.hosts:
        conn = libvirt.open(host.local_uri)
        try:
            dom = conn.lookupByName(name)
            out[host.name] = (bool(dom.isActive()), bool(dom.isPersistent()))
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()
    return out


def migrate_msg(name: str, dest: str, **params: object) -> str:
    lines = "".join(f"  {k}: {v}\n" for k, v in params.items())
    return (
        f"task: migrate vm\nvm-name: {name}\ndestination: {dest}\ntime-measurement: true\n"
        f"parameter:\n{lines}"
    )


async def test_live_migration_there_and_back_keeps_the_guest_running(
    mosquitto, rig: Rig, start_guest: Callable[..., Any]
):
    dom = start_guest("dirty16")
    name = dom.name()
    before = await asyncio.to_thread(wait_counter_above, dom, 0)
    async with rig_agents(mosquitto.port, rig, agent={"progress_interval": 0.1}) as agents:
        r = await agents.to_a.call(migrate_msg(name, rig.b.name, **{"migration-type": "live"}), 60)
        assert (r["result"], r["status"], r["destination"]) == ("vm migrated", "success", "rig-b")
        assert {"overall", "migrate", "pre-checks", "downtime"} <= set(r["time-measurement"])
        # The persistent definition moved with it (persist defaults to true).
        assert where(rig, name) == {"rig-b": (True, True)}
        conn_b = libvirt.open(rig.b.local_uri)
        try:
            on_b = conn_b.lookupByName(name)
            after = await asyncio.to_thread(wait_counter_above, on_b, before.counter)
            assert after.counter > before.counter, "the guest's memory state continued on B"
        finally:
            conn_b.close()
        progress = agents.to_a.events_for(r["id"], "progress")
        percents = [e["percent"] for e in progress]
        assert percents == sorted(percents)
        assert percents[-1] == 100
        assert all(p < 100 for p in percents[:-1])

        back = await agents.to_b.call(
            migrate_msg(name, rig.a.name, **{"migration-type": "live"}), 60
        )
        assert back["status"] == "success", back
        assert where(rig, name) == {"rig-a": (True, True)}


async def test_warm_migration_pauses_during_copy_and_runs_on_the_destination(
    mosquitto, rig: Rig, start_guest: Callable[..., Any]
):
    name = start_guest("idle").name()
    async with rig_agents(mosquitto.port, rig) as agents:
        r = await agents.to_a.call(migrate_msg(name, rig.b.name, **{"migration-type": "warm"}), 60)
        assert r["status"] == "success", r
        assert where(rig, name) == {"rig-b": (True, True)}


async def test_offline_migration_moves_the_definition(
    mosquitto, rig: Rig, start_guest: Callable[..., Any]
):
    """The original never set PERSIST_DEST, so libvirt refused every offline migration."""
    dom = start_guest("idle")
    name = dom.name()
    dom.destroy()
    async with rig_agents(mosquitto.port, rig) as agents:
        r = await agents.to_a.call(
            migrate_msg(name, rig.b.name, **{"migration-type": "offline"}), 60
        )
        assert r["status"] == "success", r
        assert where(rig, name) == {"rig-b": (False, True)}


async def test_post_copy_completes_what_pre_copy_cannot(
    mosquitto, rig: Rig, start_guest: Callable[..., Any]
):
    """dirty16 at 8 MiB/s never converges in pre-copy (rig README: 11 min, 1278 iterations);
    the policy switches to post-copy and it completes."""
    name = start_guest("dirty16").name()
    async with rig_agents(mosquitto.port, rig) as agents:
        r = await agents.to_a.call(
            migrate_msg(
                name,
                rig.b.name,
                **{"migration-type": "post-copy", "bandwidth": 8, "max-downtime": 300},
            ),
            90,
        )
        assert r["status"] == "success", r
        actions = [e.get("action") for e in agents.to_a.events_for(r["id"], "progress")]
        assert "post-copy" in actions
        assert where(rig, name) == {"rig-b": (True, True)}


async def test_cancel_during_migration_leaves_the_vm_running_on_the_source(
    mosquitto, rig: Rig, start_guest: Callable[..., Any]
):
    dom = start_guest("dirty16")
    name = dom.name()
    async with rig_agents(mosquitto.port, rig, agent={"progress_interval": 0.2}) as agents:
        await agents.to_a.publish(
            "id: mig-cancel\n"
            + migrate_msg(name, rig.b.name, **{"migration-type": "live", "bandwidth": 8})
        )
        await agents.to_a.wait_for(
            lambda: [
                e
                for e in agents.to_a.events_for("mig-cancel", "progress")
                if e.get("iteration", 0) >= 1
            ],
            30,
        )
        r = await agents.to_a.call("task: cancel\ntarget: mig-cancel\n")
        assert r["list"] == [{"vm-name": name, "status": "success", "state": "running"}]
        result = await agents.to_a.result_for("mig-cancel", 40)
        assert (result["status"], result["code"]) == ("error", "cancelled")
        assert where(rig, name) == {"rig-a": (True, True)}
        counter = read_state(dom).counter
        await asyncio.to_thread(wait_counter_above, dom, counter)


async def test_completion_timeout_aborts_and_reports_timeout(
    mosquitto, rig: Rig, start_guest: Callable[..., Any]
):
    name = start_guest("dirty16").name()
    async with rig_agents(mosquitto.port, rig) as agents:
        r = await agents.to_a.call(
            migrate_msg(
                name,
                rig.b.name,
                **{"migration-type": "live", "bandwidth": 8, "completion-timeout": 3},
            ),
            60,
        )
        assert (r["status"], r["code"]) == ("error", "timeout"), r
        assert where(rig, name) == {"rig-a": (True, True)}


async def test_pre_check_failure_touches_nothing(
    mosquitto, rig: Rig, start_guest: Callable[..., Any]
):
    """A domain of the same name already runs on the destination."""
    name = start_guest("idle").name()
    start_guest("idle", host=rig.b, name=name)
    async with rig_agents(mosquitto.port, rig) as agents:
        r = await agents.to_a.call(migrate_msg(name, rig.b.name, **{"migration-type": "live"}), 60)
        assert (r["status"], r["code"]) == ("error", "incompatible-destination"), r
        phases = [e["phase"] for e in agents.to_a.events_for(r["id"], "phase")]
        assert phases == ["pre-checks"]
        assert where(rig, name) == {"rig-a": (True, True), "rig-b": (True, True)}


async def test_migration_to_the_same_host_under_another_name_is_refused(
    mosquitto, rig: Rig, start_guest: Callable[..., Any]
):
    """``rig-a-alias`` reaches rig-a's libvirtd: libvirt's host UUIDs tell it is the same host,
    so the pre-checks refuse before anything moves (libvirt itself would fail later)."""
    name = start_guest("idle").name()
    hosts = {
        h.name: {"uri": h.local_uri, "p2p-uri": h.p2p_uri, "migrate-uri": h.migrate_uri}
        for h in rig.hosts
    }
    hosts["rig-a-alias"] = hosts[rig.a.name]
    async with rig_agents(mosquitto.port, rig, hv={"hosts": hosts}) as agents:
        for dest in (rig.a.name, "rig-a-alias"):
            r = await agents.to_a.call(migrate_msg(name, dest, **{"migration-type": "live"}), 60)
            assert (r["status"], r["code"]) == ("error", "incompatible-destination"), r
            phases = [e["phase"] for e in agents.to_a.events_for(r["id"], "phase")]
            assert phases == ["pre-checks"]
        assert where(rig, name) == {"rig-a": (True, True)}
