"""Predictions through MQTT (issue 18): ``plan migration``, ``plan evacuation`` and
``migration-type: auto`` between two agents on the ``fake`` hypervisor over a real
mosquitto; what a scheduler reads is parsed with PyYAML."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_migrate_fake import _cluster, _dom, two_hosts

from asyncmigfra.tasks.linkrates import LinkRates

pytestmark = pytest.mark.broker

GIB = 1024 * 1024  # KiB
MIB = 1 << 20


async def test_plans_answer_and_change_nothing(mosquitto):
    doms = [_dom("idle", memory=GIB // 4), _dom("hot", memory=GIB // 4, dirty=400)]
    async with two_hosts(mosquitto.port, doms, bandwidth=200, migration={"link_rate": 200.0}) as (
        _,
        sched,
        shared,
    ):
        src, dest = shared["names"]
        r = await sched.call(
            f"task: plan migration\nvm-name: hot\ndestination: {dest}\n"
            "parameter: {migration-type: live}\n"
        )
        assert r["result"] == "plan"
        (entry,) = r["list"]
        assert (entry["status"], entry["code"], entry["converges"]) == (
            "error",
            "will-not-converge",
            False,
        )
        assert entry["dirty-rate"] == 400 * MIB
        assert entry["transfer-rate"] == 200 * MIB
        assert entry["blockers"]
        done = sched.events_for(r["id"], "done")
        assert [e["status"] for e in done] == ["error"]
        r = await sched.call(
            f"task: plan evacuation\ndestinations: [{dest}]\nparameter: {{migration-type: auto}}\n"
        )
        assert r["result"] == "plan"
        modes = {e["vm-name"]: (e["status"], e["mode"], e["wave"]) for e in r["list"]}
        assert modes == {"hot": ("success", "post-copy", 1), "idle": ("success", "live", 1)}
        assert {_cluster(shared).locate(n) for n in ("idle", "hot")} == {src}


async def test_auto_moves_an_idle_and_a_hot_guest_each_its_way(mosquitto, tmp_path: Path):
    doms = [_dom("idle", memory=GIB // 4), _dom("hot", memory=GIB // 4, dirty=400)]
    async with two_hosts(
        mosquitto.port,
        doms,
        bandwidth=200,
        time_scale=20.0,
        migration={"link_rate": 200.0},
        agent={"state_dir": str(tmp_path), "progress_interval": 0.05},
        b_sections={"agent": {"state_dir": str(tmp_path / "b"), "progress_interval": 0.05}},
    ) as (_, sched, shared):
        _, dest = shared["names"]
        for vm, mode in (("idle", "live"), ("hot", "post-copy")):
            r = await sched.call(
                f"task: migrate vm\nvm-name: {vm}\ndestination: {dest}\n"
                "parameter: {migration-type: auto}\n",
                timeout=30,
            )
            assert (r["status"], r["destination"]) == ("success", dest), r
            assert r["predicted-duration"] > 0
            kinds = [
                e["phase"] if e["event"] == "phase" else e["event"]
                for e in sched.events_for(r["id"])
            ]
            assert kinds.index("plan") < kinds.index("migrating")
            (plan,) = sched.events_for(r["id"], "plan")
            assert plan["mode"] == mode
            (done,) = sched.events_for(r["id"], "done")
            assert done["predicted-duration"] == r["predicted-duration"]
            assert ("post-copy" in kinds) == (mode == "post-copy")
            assert _cluster(shared).locate(vm) == dest
    # The agent learned the link to the destination and kept it in its state dir.
    store = LinkRates.in_state_dir(tmp_path)
    await store.open()
    assert store.samples(dest) >= 1
    assert store.estimate(dest) == pytest.approx(200 * MIB)


async def test_auto_refuses_a_hot_guest_without_post_copy(mosquitto):
    doms = [_dom("hot", memory=GIB // 4, dirty=400)]
    async with two_hosts(
        mosquitto.port,
        doms,
        bandwidth=200,
        migration={"link_rate": 200.0, "allow_post_copy": False},
    ) as (_, sched, shared):
        src, dest = shared["names"]
        r = await sched.call(
            f"task: migrate vm\nvm-name: hot\ndestination: {dest}\n"
            "parameter: {migration-type: auto}\n"
        )
        assert (r["status"], r["code"]) == ("error", "will-not-converge")
        assert "nothing was started" in r["details"]
        assert "predicted-duration" not in r
        phases = [e["phase"] for e in sched.events_for(r["id"], "phase")]
        assert "migrating" not in phases
        assert _cluster(shared).locate("hot") == src
