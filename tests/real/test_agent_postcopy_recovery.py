"""Post-copy recovery on real hosts (issue 17): a post-copy migration whose stream is killed
after the switch, while the rig's link is down for 5 s, is resumed by the agent once the link
is back (``VIR_MIGRATE_POSTCOPY_RESUME``), also by an agent SIGKILLed during the failure and
started again. Each time: one result, ``recovered: true``, the guest counting on B.

The break: the veth goes down on A's side, then the migration stream's TCP connection is
killed in both namespaces (``ss -K``; libvirtd's own peer-to-peer connection, port 16510,
is kept: it survives 5 s without a link). Both QEMUs then see the stream fail at once, as they
do when a real connection breaks; a stream killed on one side only while the link is down
leaves the destination waiting for ever (docs/operations.md, "Post-copy recovery").

Post-copy of a 256 MiB guest over the veth takes about 30 ms; the test caps post-copy's
bandwidth on its own connection (``migrateSetMaxSpeed(..., MAX_SPEED_POSTCOPY)``) before the
switch, so that the break happens in post-copy.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from agents import rig_agents
from test_agent_migration import migrate_msg, where
from test_agent_restart import spawn, write_config

import libvirt
from harness import Scheduler, scheduler
from rig import Rig, read_state, wait_counter_above
from rig.hosts import VETH

pytestmark = [pytest.mark.rig, pytest.mark.broker]

#: s the link stays down.
LINK_DOWN = 5.0
#: MiB/s of post-copy before the break (the resume runs at QEMU's unlimited default).
POSTCOPY_CAP = 4
PARAMS = {"migration-type": "post-copy", "bandwidth": 8, "max-downtime": 100}
LIBVIRTD_PORTS = ("16509", "16510")


def _ss_kill(netns: str, peer: str) -> str:
    """Kill every TCP connection to ``peer`` in ``netns`` except libvirtd's."""
    cmd = ["ip", "netns", "exec", netns, "ss", "-tnK", "dst", peer]
    for port in LIBVIRTD_PORTS:
        cmd += ["not", "dport", "=", port, "not", "sport", "=", port]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def link(rig: Rig, up: bool) -> None:
    assert rig.a.netns is not None
    state = "up" if up else "down"
    subprocess.run(["ip", "-n", rig.a.netns, "link", "set", VETH, state], check=True)


def break_stream(rig: Rig) -> None:
    """Link down, then the migration stream killed on both hosts (see the module)."""
    assert rig.a.netns is not None
    assert rig.b.netns is not None
    link(rig, up=False)
    killed = _ss_kill(rig.a.netns, rig.b.ip) + _ss_kill(rig.b.netns, rig.a.ip)
    assert killed.count("ESTAB") == 2, killed  # the stream, seen from each side


def cap_post_copy(rig: Rig, name: str) -> None:
    conn = libvirt.open(rig.a.local_uri)
    try:
        conn.lookupByName(name).migrateSetMaxSpeed(
            POSTCOPY_CAP, libvirt.VIR_DOMAIN_MIGRATE_MAX_SPEED_POSTCOPY
        )
    finally:
        conn.close()


def wait_running_on_b(rig: Rig, name: str, timeout: float = 30.0) -> None:
    """Until the guest runs on B in post-copy (``RUNNING_POSTCOPY``), then 0.5 s more: the
    ``post-copy`` phase event comes when the switch was asked for, and a stream broken
    before the destination has loaded the device state kills the destination's QEMU (the
    guest then stays on A: a plain ``migration-failed``)."""
    conn = libvirt.open(rig.b.local_uri)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                state = tuple(conn.lookupByName(name).state())
            except libvirt.libvirtError:
                state = ()
            if state == (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY):
                break
            assert time.monotonic() < deadline, f"not in post-copy on B: {state}"
            time.sleep(0.02)
        time.sleep(0.5)
    finally:
        conn.close()


def counter_on(rig: Rig, name: str, above: int = 0) -> int:
    conn = libvirt.open(rig.b.local_uri)
    try:
        return wait_counter_above(conn.lookupByName(name), above, timeout=20).counter
    finally:
        conn.close()


def counter_now(dom: Any) -> int:
    return read_state(dom).counter


async def until_post_copy(sched: Scheduler, task_id: str, rig: Rig, name: str) -> None:
    """Wait for the first pass, cap post-copy, wait for the switch."""
    await sched.wait_for(
        lambda: [e for e in sched.events_for(task_id, "progress") if e.get("iteration", 0) >= 1],
        30,
    )
    await asyncio.to_thread(cap_post_copy, rig, name)
    await sched.wait_for(
        lambda: [e for e in sched.events_for(task_id, "phase") if e["phase"] == "post-copy"],
        90,
    )
    await asyncio.to_thread(wait_running_on_b, rig, name)


def check_recovered(sched: Scheduler, task_id: str, result: dict[str, Any], rig: Rig) -> None:
    assert result["status"] == "success", result
    assert result["recovered"] is True, result
    assert 0 < result["recovery-time"] < 60, result
    assert result["destination"] == rig.b.name
    phases = [e["phase"] for e in sched.events_for(task_id, "phase")]
    assert "post-copy-recovery" in phases, phases
    actions = [e.get("action") for e in sched.events_for(task_id, "progress")]
    assert "recovering" in actions
    done = sched.events_for(task_id, "done")
    assert done, done
    assert done[-1]["recovered"] is True, done


async def test_a_post_copy_broken_after_the_switch_is_resumed(
    mosquitto, rig: Rig, start_guest: Callable[..., Any]
):
    if rig.mode != "netns":
        pytest.skip("needs the rig's network namespaces (the veth)")
    dom = start_guest("dirty16", memory_mib=256)
    name = dom.name()
    before = await asyncio.to_thread(counter_now, dom)
    migration = {"postcopy_recovery_window": 60.0}
    try:
        async with rig_agents(
            mosquitto.port, rig, agent={"progress_interval": 0.2}, migration=migration
        ) as agents:
            sched = agents.to_a
            await sched.publish("id: pc-broken\n" + migrate_msg(name, rig.b.name, **PARAMS))
            await until_post_copy(sched, "pc-broken", rig, name)
            await asyncio.to_thread(break_stream, rig)
            await asyncio.sleep(LINK_DOWN)
            link(rig, up=True)
            result = await sched.result_for("pc-broken", 90)
            check_recovered(sched, "pc-broken", result, rig)
            assert where(rig, name) == {rig.b.name: (True, True)}
            counted = await asyncio.to_thread(counter_on, rig, name, before)
            await asyncio.to_thread(counter_on, rig, name, counted)  # and it keeps counting
            await asyncio.sleep(0.3)
            assert [r.get("id") for r in sched.results].count("pc-broken") == 1
    finally:
        link(rig, up=True)


async def test_an_agent_killed_during_the_failure_recovers_after_restart(
    mosquitto, rig: Rig, start_guest: Callable[..., Any], tmp_path: Path
):
    if rig.mode != "netns":
        pytest.skip("needs the rig's network namespaces (the veth)")
    dom = start_guest("dirty16", memory_mib=256)
    name = dom.name()
    before = await asyncio.to_thread(counter_now, dom)
    prefix = f"pcr-{uuid.uuid4().hex[:6]}"
    conf = write_config(tmp_path / "agent.yaml", mosquitto.port, rig, prefix)
    config = yaml.safe_load(conf.read_text())
    config["migration"] = {"postcopy-recovery-window": 60}
    conf.write_text(yaml.safe_dump(config))
    log = tmp_path / "agent.log"
    proc = spawn(conf, log)
    try:
        async with scheduler(mosquitto.port, f"{prefix}/rig-a") as sched:
            await sched.state("online", 30)
            await sched.publish("id: pc-restart\n" + migrate_msg(name, rig.b.name, **PARAMS))
            await until_post_copy(sched, "pc-restart", rig, name)
            broke = time.monotonic()
            await asyncio.to_thread(break_stream, rig)
            proc.kill()
            await asyncio.to_thread(proc.wait)
            await asyncio.sleep(max(0.0, LINK_DOWN - (time.monotonic() - broke)))
            link(rig, up=True)
            proc = spawn(conf, log)
            result = await sched.result_for("pc-restart", 120)
            check_recovered(sched, "pc-restart", result, rig)
            phases = [e["phase"] for e in sched.events_for("pc-restart", "phase")]
            assert "reconciling" in phases, phases
            assert where(rig, name) == {rig.b.name: (True, True)}
            counted = await asyncio.to_thread(counter_on, rig, name, before)
            await asyncio.to_thread(counter_on, rig, name, counted)
            await asyncio.sleep(0.5)
            assert [r.get("id") for r in sched.results].count("pc-restart") == 1
    finally:
        link(rig, up=True)
        if proc.poll() is None:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30)
    assert proc.returncode == 0, log.read_text()[-4000:]
