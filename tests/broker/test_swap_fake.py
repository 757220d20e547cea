"""``swap-with`` through MQTT on two ``fake`` hosts (spec 1.7, fixing spec 9.2-9.4): parallel and
sequential swaps, both halves' errors reported, suffixed time tags, cancel, pre-checks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from test_migrate_fake import GIB, _dom, two_hosts

from asyncmigfra.hypervisor.base import DomainState
from asyncmigfra.hypervisor.fake import FakeDomain

pytestmark = pytest.mark.broker


def _cluster(shared: dict[str, object]) -> Any:
    return shared["fake-cluster"]


def _add(shared: dict[str, object], host: str, name: str, *, memory: int = GIB) -> Any:
    """Define and run ``name`` on ``host`` (the partner VM lives on the other agent's host)."""
    cluster = _cluster(shared)
    dom = FakeDomain(name=name, state=DomainState.RUNNING, vcpus=1, memory=memory)
    cluster.hosts[host].domains[name] = dom
    return dom


def _where(shared: dict[str, object], vm: str) -> str:
    (host,) = _cluster(shared).locate(vm)
    return str(host)


def _swap(vm: str, dest: str, partner: str, extra: str = "", *, timed: bool = True) -> str:
    return (
        f"task: migrate vm\nvm-name: {vm}\ndestination: {dest}\n"
        f"time-measurement: {'true' if timed else 'false'}\nparameter:\n"
        f"  migration-type: live\n  swap-with:\n    vm-name: {partner}\n{extra}"
    )


async def test_spec_1_7_parallel_swap_moves_both_with_suffixed_tags(mosquitto):
    async with two_hosts(mosquitto.port, [_dom("s1")], agent={"progress_interval": 0.05}) as (
        _,
        sched,
        shared,
    ):
        src, dest = shared["names"]
        _add(shared, dest, "s2")
        r = await sched.call(_swap("s1", dest, "s2"), timeout=30)
        assert (r["result"], r["status"], r["vm-name"]) == ("vm migrated", "success", "s1"), r
        assert r["destination"] == dest
        assert r["swap-with"] == {
            "vm-name": "s2",
            "status": "success",
            "destination": src,
            "order": "parallel",
        }
        assert (_where(shared, "s1"), _where(shared, "s2")) == (dest, src)
        # The original's timed swap always failed on a duplicate tag (spec 9.2).
        tags = set(r["time-measurement"])
        for vm in ("s1", "s2"):
            assert {
                f"migrate-{vm}",
                f"detach-ivshmem-devs-{vm}",
                f"detach-pci-devs-{vm}",
                f"reattach-pci-devs-{vm}",
            } <= tags, tags
        assert {"overall", "pre-checks", "migrate"} <= tags
        assert "detach-ivshmem-devs" not in tags
        # Each half streams its own progress under its own name, and they overlap in time.
        spans = {}
        for vm in ("s1", "s2"):
            events = [e for e in sched.events_for(r["id"], "progress") if e["vm-name"] == vm]
            assert events, f"no progress for {vm}"
            assert events[-1]["percent"] == 100.0
            spans[vm] = (events[0]["time"], events[-1]["time"])
        assert spans["s1"][0] < spans["s2"][1], spans
        assert spans["s2"][0] < spans["s1"][1], spans


async def test_swap_without_room_for_both_at_once_runs_in_sequence(mosquitto):
    """B can take s1 only after s2 left it: s2 goes first (KiB on both sides, spec 9.3)."""
    async with two_hosts(mosquitto.port, [_dom("t1", memory=4 * GIB)]) as (_, sched, shared):
        src, dest = shared["names"]
        _add(shared, dest, "t2", memory=4 * GIB)
        cluster = _cluster(shared)
        cluster.hosts[dest].memory = 6 * GIB  # 2 GiB free on B: s1 (4 GiB) does not fit yet
        r = await sched.call(_swap("t1", dest, "t2"), timeout=30)
        assert r["status"] == "success", r
        assert r["swap-with"]["order"] == "sequential"
        assert (_where(shared, "t1"), _where(shared, "t2")) == (dest, src)
        phases = [(e["vm-name"], e["phase"]) for e in sched.events_for(r["id"], "phase")]
        migrating = [vm for vm, phase in phases if phase == "migrating"]
        assert migrating == ["t2", "t1"], phases


async def test_swap_where_neither_host_has_room_is_refused_before_anything_moves(mosquitto):
    async with two_hosts(mosquitto.port, [_dom("u1", memory=4 * GIB)]) as (_, sched, shared):
        src, dest = shared["names"]
        _add(shared, dest, "u2", memory=4 * GIB)
        cluster = _cluster(shared)
        cluster.hosts[dest].memory = 5 * GIB
        cluster.hosts[src].memory = 5 * GIB
        r = await sched.call(_swap("u1", dest, "u2"), timeout=30)
        assert (r["status"], r["code"]) == ("error", "incompatible-destination"), r
        assert "u1 needs 4194304 KiB" in r["details"]
        assert (_where(shared, "u1"), _where(shared, "u2")) == (src, dest)
        phases = {e["phase"] for e in sched.events_for(r["id"], "phase")}
        assert phases == {"peer-lane", "pre-checks"}


async def test_a_failed_partner_half_is_reported_not_swallowed(mosquitto):
    """The original reported a failed half as success (spec 9.4). Here the partner's repin
    fails after it arrived: the task fails ``hook-failed`` and says so for both VMs."""
    async with two_hosts(mosquitto.port, [_dom("w1")]) as (_, sched, shared):
        src, dest = shared["names"]
        _add(shared, dest, "w2")
        r = await sched.call(_swap("w1", dest, "w2", "    vcpu-map: [[999]]\n"), timeout=30)
        assert (r["status"], r["code"]) == ("error", "hook-failed"), r
        assert r["details"].startswith("swap-with w2: ")
        assert r["destination"] == dest  # w1 did move
        sub = r["swap-with"]
        assert (sub["status"], sub["code"], sub["destination"]) == ("error", "hook-failed", src)
        assert (_where(shared, "w1"), _where(shared, "w2")) == (dest, src)


async def test_a_failed_half_stops_the_other_and_both_stay_home(mosquitto):
    async with two_hosts(mosquitto.port, [_dom("x1", dirty=50)], bandwidth=200) as (
        agent,
        sched,
        shared,
    ):
        src, dest = shared["names"]
        _add(shared, dest, "x2", memory=8 * GIB)
        agent.hypervisor.inject("migrate-midway", 1)  # type: ignore[attr-defined]
        r = await sched.call(_swap("x1", dest, "x2", timed=False), timeout=30)
        # The injected fault hits the first job to start: x1's (its task starts first).
        assert (r["status"], r["code"]) == ("error", "migration-failed"), r
        sub = r["swap-with"]
        assert (sub["status"], sub["code"]) == ("error", "cancelled"), r
        assert sub["details"] == f"stopped because the migration of x1 failed; x2 stays on {dest}"
        assert "destination" not in sub
        assert (_where(shared, "x1"), _where(shared, "x2")) == (src, dest)


async def test_cancel_during_a_swap_leaves_both_where_they_were(mosquitto):
    async with two_hosts(mosquitto.port, [_dom("y1", memory=8 * GIB)], bandwidth=100) as (
        _,
        sched,
        shared,
    ):
        src, dest = shared["names"]
        _add(shared, dest, "y2", memory=8 * GIB)
        await sched.publish("id: sw\n" + _swap("y1", dest, "y2"))
        await sched.wait_for(lambda: sched.events_for("sw", "progress"))
        r = await sched.call("task: cancel\ntarget: sw\n")
        assert r["list"][0]["status"] == "success", r
        rm = await sched.result_for("sw", timeout=30)
        assert (rm["status"], rm["code"]) == ("error", "cancelled"), rm
        assert rm["swap-with"] == {
            "vm-name": "y2",
            "status": "error",
            "code": "cancelled",
            "details": f"cancelled; y2 stays on {dest}",
            "order": "parallel",
        }
        assert (_where(shared, "y1"), _where(shared, "y2")) == (src, dest)
        assert not _cluster(shared).jobs  # both jobs aborted, nothing left running


@pytest.mark.parametrize(
    ("build", "code", "words"),
    [
        pytest.param(
            lambda s, d: _swap("v1", s, "v2"), "invalid-message", "another host", id="self"
        ),
        pytest.param(lambda s, d: _swap("v1", d, "v1"), "invalid-message", "itself", id="same-vm"),
        pytest.param(
            lambda s, d: _swap("v1", d, "ghost"), "vm-not-found", "ghost", id="no-partner"
        ),
    ],
)
async def test_bad_swaps_are_refused_before_anything_moves(mosquitto, build, code, words):
    async with two_hosts(mosquitto.port, [_dom("v1")]) as (_, sched, shared):
        src, dest = shared["names"]
        r = await sched.call(build(src, dest), timeout=30)
        assert (r["status"], r["code"]) == ("error", code), r
        assert words in r["details"]
        assert _where(shared, "v1") == src
        await asyncio.sleep(0)
