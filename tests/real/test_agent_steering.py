"""Stuck migrations and steering a running one (issue 17), on real QEMU guests between the
rig's two libvirtds, all through MQTT:

* the migration stream cut in pre-copy (the veth taken down in A's namespace: the TCP
  connection stays, nothing moves) is aborted by ``progress-timeout``, with its reason, and
  the VM keeps running on A;
* a ``dirty16`` guest capped at 2 MiB/s, which would never converge, is tuned to unlimited
  (``bandwidth: 0``) mid-flight and completes;
* a ``migration-type: post-copy`` migration that would not converge is switched to post-copy
  by ``tune migration`` (before the policy could) and completes;
* ``compression``: ``zstd`` over four multifd connections (libvirt 9.4 and later; an older
  libvirt refuses it in the pre-checks, before the VM is touched), and ``xbzrle``.

``ss -K`` (killing the stream's sockets) is not used for the cut: a reset connection fails
the job at once (``migration-failed``); a link that is down leaves it stalled, which is what
the progress timeout is for.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
from agents import rig_agents
from test_agent_migration import migrate_msg, where

import libvirt
from rig import Rig, read_state, wait_counter_above
from rig.hosts import VETH

pytestmark = [pytest.mark.rig, pytest.mark.broker]


def libvirt_version(rig: Rig) -> int:
    conn = libvirt.open(rig.a.local_uri)
    try:
        return int(conn.getLibVersion())
    finally:
        conn.close()


async def first_pass(agents: Any, task_id: str) -> None:
    await agents.to_a.wait_for(
        lambda: [
            e for e in agents.to_a.events_for(task_id, "progress") if e.get("iteration", 0) >= 1
        ],
        30,
    )


async def settled_on(
    rig: Rig, name: str, expected: dict[str, tuple[bool, bool]], limit: float = 40.0
) -> None:
    """Wait (bounded) until ``where`` says ``expected``: after a job aborted over a dead link,
    the source libvirtd finishes it only when its peer connection to the destination gives
    up (keepalive, about 30 s), and shows the domain transient until then."""
    deadline = time.monotonic() + limit
    while (seen := await asyncio.to_thread(where, rig, name)) != expected:
        assert time.monotonic() < deadline, seen
        await asyncio.sleep(0.5)


async def test_a_cut_stream_is_aborted_by_the_progress_timeout(
    mosquitto, rig: Rig, start_guest: Callable[..., Any]
):
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
                    **{
                        "migration-type": "live",
                        "bandwidth": 4,
                        "progress-timeout": 5,
                        "completion-timeout": 300,
                    },
                )
            )
            await first_pass(agents, "cut")
            cut_at = time.monotonic()
            subprocess.run(["ip", "-n", a_ns, "link", "set", VETH, "down"], check=True)

            def aborts() -> list[dict[str, Any]]:
                return [
                    e
                    for e in agents.to_a.events_for("cut", "progress")
                    if e.get("action") == "abort"
                ]

            # 5 s after the bytes processed last grew (the socket buffers may take a second
            # more after the cut) the agent decides: the abort's progress event comes first.
            await agents.to_a.wait_for(aborts, 20)
            took = time.monotonic() - cut_at
            assert 5.0 <= took <= 15.0, took
            assert [e["reason"] for e in aborts()] == ["progress-timeout"]
            # The job's end may wait for libvirtd's peer connection (over the dead link) to
            # give up: the result comes after that.
            r = await agents.to_a.result_for("cut", 90)
            assert (r["status"], r["code"]) == ("error", "timeout"), r
            assert r["details"] == (
                "migration moved no data for 5 s (progress-timeout); it was aborted and the VM"
                " keeps running on the source"
            )
            assert aborts()[0] is agents.to_a.events_for("cut", "progress")[-1]
            subprocess.run(["ip", "-n", a_ns, "link", "set", VETH, "up"], check=True)
            await settled_on(rig, name, {rig.a.name: (True, True)})
            status = await agents.to_a.call("task: status\n")
            assert {e["vm-name"]: e["state"] for e in status["list"]}[name] == "running"
            counter = read_state(dom).counter
            await asyncio.to_thread(wait_counter_above, dom, counter)
            await asyncio.sleep(0.3)
            assert [x.get("id") for x in agents.to_a.results].count("cut") == 1
    finally:
        subprocess.run(["ip", "-n", a_ns, "link", "set", VETH, "up"], check=False)


async def test_a_capped_migration_tuned_to_unlimited_completes(
    mosquitto, rig: Rig, start_guest: Callable[..., Any]
):
    """dirty16 dirties faster than 2 MiB/s can send: pre-copy alone never converges."""
    name = start_guest("dirty16").name()
    async with rig_agents(mosquitto.port, rig, agent={"progress_interval": 0.2}) as agents:
        await agents.to_a.publish(
            "id: capped\n"
            + migrate_msg(
                name, rig.b.name, **{"migration-type": "live", "bandwidth": 2, "max-downtime": 300}
            )
        )
        await first_pass(agents, "capped")
        await asyncio.sleep(2)  # well under way at 2 MiB/s
        rates = [
            e["transfer-rate"]
            for e in agents.to_a.events_for("capped", "progress")
            if e.get("transfer-rate")
        ]
        assert rates, "the job reported its rate"
        assert max(rates) <= 3 * 1024 * 1024, rates
        t = await agents.to_a.call("task: tune migration\ntarget: capped\nbandwidth: 0\n")
        assert (t["result"], t["list"]) == (
            "tuned",
            [{"vm-name": name, "status": "success", "bandwidth": 0}],
        )
        r = await agents.to_a.result_for("capped", 120)
        assert (r["status"], r["destination"]) == ("success", rig.b.name), r
        events = agents.to_a.events_for("capped", "progress")
        tuned = [e for e in events if e.get("action") == "tuned"]
        assert [e["bandwidth"] for e in tuned] == [0]
        after = events[events.index(tuned[0]) + 1 :]
        assert any(e.get("transfer-rate", 0) > 8 * 1024 * 1024 for e in after), after
        assert where(rig, name) == {rig.b.name: (True, True)}


async def test_post_copy_through_tune_completes_what_pre_copy_cannot(
    mosquitto, rig: Rig, start_guest: Callable[..., Any]
):
    """The tune comes during the first pass (about a minute at 2 MiB/s for 128 MiB), before
    the convergence policy could judge any pass and switch by itself."""
    name = start_guest("dirty16").name()
    async with rig_agents(mosquitto.port, rig, agent={"progress_interval": 0.2}) as agents:
        await agents.to_a.publish(
            "id: pc\n"
            + migrate_msg(name, rig.b.name, **{"migration-type": "post-copy", "bandwidth": 2})
        )
        await first_pass(agents, "pc")
        t = await agents.to_a.call("task: tune migration\ntarget: pc\npost-copy: true\n")
        assert t["list"] == [{"vm-name": name, "status": "success", "post-copy": True}], t
        r = await agents.to_a.result_for("pc", 120)
        assert (r["status"], r["destination"]) == ("success", rig.b.name), r
        phases = [e["phase"] for e in agents.to_a.events_for("pc", "phase")]
        assert "post-copy" in phases
        events = agents.to_a.events_for("pc", "progress")
        (tuned,) = [e for e in events if e.get("action") == "tuned"]
        assert tuned["post-copy"] is True
        assert not [e for e in events if e.get("action") == "post-copy"], "the tune switched"
        # Post-copy's switchover is short: the guest ran on B while its pages followed.
        downtime = r["time-measurement"].get("downtime")
        if downtime is not None:  # (when libvirt reports it)
            assert downtime < 1.0, r
        assert where(rig, name) == {rig.b.name: (True, True)}


async def test_zstd_on_four_connections(mosquitto, rig: Rig, start_guest: Callable[..., Any]):
    dom = start_guest("dirty16")
    name = dom.name()
    params = {
        "migration-type": "live",
        "parallel-connections": 4,
        "compression": "[zstd]",
        "compression-level": 3,
    }
    async with rig_agents(mosquitto.port, rig) as agents:
        r = await agents.to_a.call(migrate_msg(name, rig.b.name, **params), 90)
        if libvirt_version(rig) < 9_004_000:
            # libvirt 9.0 (the rig's Debian 12) knows only xbzrle and mt: refused before
            # anything was touched.
            assert (r["status"], r["code"]) == ("error", "not-supported"), r
            assert "compression zstd needs libvirt 9.4 or later" in r["details"]
            assert "pre-checks" in r["time-measurement"]
            assert "migrate" not in r["time-measurement"], "no job was started"
            assert where(rig, name) == {rig.a.name: (True, True)}
            counter = read_state(dom).counter
            await asyncio.to_thread(wait_counter_above, dom, counter)
        else:
            assert (r["status"], r["destination"]) == ("success", rig.b.name), r
            assert where(rig, name) == {rig.b.name: (True, True)}


async def test_xbzrle(mosquitto, rig: Rig, start_guest: Callable[..., Any]):
    dom = start_guest("dirty16")
    name = dom.name()
    before = await asyncio.to_thread(wait_counter_above, dom, 0)
    params = {"migration-type": "live", "compression": "[xbzrle]", "xbzrle-cache": 64}
    async with rig_agents(mosquitto.port, rig) as agents:
        r = await agents.to_a.call(migrate_msg(name, rig.b.name, **params), 90)
        assert (r["status"], r["destination"]) == ("success", rig.b.name), r
        assert where(rig, name) == {rig.b.name: (True, True)}
        conn_b = libvirt.open(rig.b.local_uri)
        try:
            on_b = conn_b.lookupByName(name)
            after = await asyncio.to_thread(wait_counter_above, on_b, before.counter)
            assert after.counter > before.counter, "the guest's memory state continued on B"
            stats = on_b.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        finally:
            conn_b.close()
        # libvirt reports the xbzrle cache of a completed job when QEMU used it.
        if "compression_cache" in stats:
            assert stats["compression_cache"] == 64 * 1024 * 1024, stats
