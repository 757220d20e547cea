"""Issue 17: ``task: tune migration`` through the dispatcher, on the ``fake`` cluster.

Each change is checked where it lands: the fake job's transfer rate and downtime limit, the
guest's state on the source, the migration's phases and progress events, and the result
entries. Error entries: an unknown, finished or non-migration target, a migration not
started yet, a VM the target does not move, post-copy for a migration without it allowed.
(The helpers are test_dispatcher.py's.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from test_dispatcher import GIB, GatedDummy, dispatcher, statuses

from asyncmigfra.hypervisor.base import DomainState
from asyncmigfra.hypervisor.fake import FakeHypervisor, FakeMigrationJob
from asyncmigfra.hypervisor.fake import create as create_fake
from asyncmigfra.model import ResultMessage
from asyncmigfra.settings import Settings, default_settings
from harness import DispatchRecorder, submit

MIB = 1 << 20


def fake(
    *domains: dict[str, Any], peers: dict[str, Any] | None = None, **options: Any
) -> FakeHypervisor:
    hv = create_fake(
        {
            "host": "here",
            "domains": list(domains),
            "peers": peers or {"there": {}},
            **options,
        },
        hostname="here",
        shared={},
    )
    assert isinstance(hv, FakeHypervisor)
    return hv


def dom(name: str, *, memory: int = 8 * GIB, dirty: float = 10) -> dict[str, Any]:
    return {"name": name, "memory": memory, "vcpus": 1, "dirty-rate": dirty}


def settings(**migration: Any) -> Settings:
    return default_settings(
        hostname="here",
        agent={"progress_interval": 0.05},
        migration={"swap_lock": "off", **migration},
    )


def migrate(task_id: str, vm: str, **params: object) -> str:
    lines = [f"id: {task_id}", "task: migrate vm", f"vm-name: {vm}", "destination: there"]
    lines.append("parameter:")
    params.setdefault("migration-type", "live")
    lines += [f"  {key}: {value}" for key, value in params.items()]
    return "\n".join(lines) + "\n"


def tune(task_id: str, target: str, **keys: object) -> str:
    lines = [f"id: {task_id}", "task: tune migration", f"target: {target}"]
    lines += [f"{key.replace('_', '-')}: {value}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def job_of(hv: FakeHypervisor, vm: str) -> FakeMigrationJob:
    (job,) = [j for j in hv.cluster.jobs if j.domain.name == vm]
    assert isinstance(job, FakeMigrationJob)
    return job


async def migrating(rec: DispatchRecorder, task_id: str, vm: str | None = None) -> None:
    """Until the job of ``task_id`` (of ``vm``) reported a memory pass."""
    await rec.until(
        lambda: any(
            e.get("iteration", 0) >= 1 and (vm is None or e.get("vm-name") == vm)
            for e in rec.events_for(task_id, "progress")
        )
    )


def tuned_events(rec: DispatchRecorder, task_id: str) -> list[Mapping[str, object]]:
    return [e for e in rec.events_for(task_id, "progress") if e.get("action") == "tuned"]


def entries(result: ResultMessage) -> list[tuple[str, str, str | None, dict[str, object]]]:
    return [(e.vm_name, e.status, e.code, e.extra) for e in result.entries]


async def test_bandwidth_changes_the_running_transfer_and_unlimited_finishes_it() -> None:
    hv = fake(dom("big"), **{"time-scale": 10})
    async with dispatcher(hv, settings()) as (d, rec):
        submit(d, migrate("mig", "big", bandwidth=10))  # 8 GiB at 10 MiB/s: ~80 s real
        await migrating(rec, "mig")
        assert job_of(hv, "big").bandwidth == 10 * MIB
        submit(d, tune("t1", "mig", bandwidth=50))
        r = await rec.result("t1")
        assert r.result == "tuned"
        assert entries(r) == [("big", "success", None, {"bandwidth": 50})]
        assert job_of(hv, "big").bandwidth == 50 * MIB
        (event,) = await rec.until(lambda: tuned_events(rec, "mig"))
        assert (event["vm-name"], event["bandwidth"]) == ("big", 50)
        await rec.until(
            lambda: rec.events_for("mig", "progress")[-1].get("transfer-rate") == 50 * MIB
        )
        # 0: unlimited, the link's 1000 MiB/s: the copy ends within a second.
        submit(d, tune("t2", "mig", bandwidth=0))
        assert entries(await rec.result("t2")) == [("big", "success", None, {"bandwidth": 0})]
        rm = await rec.result("mig")
        assert statuses(rm) == [("big", "success", None)]
        assert hv.cluster.locate("big") == ["there"]
        assert [e["event"] for e in rec.events if e.get("id") == "t1"] == ["accepted"]
        rec.assert_one_result_each("mig", "t1", "t2")


async def test_max_downtime_is_set_and_the_policy_never_goes_below_it() -> None:
    hv = fake(dom("big", dirty=200), **{"time-scale": 10})
    async with dispatcher(hv, settings()) as (d, rec):
        submit(d, migrate("mig", "big", bandwidth=100, **{"max-downtime": 300}))
        await migrating(rec, "mig")
        submit(d, tune("t", "mig", max_downtime=4000))
        assert entries(await rec.result("t")) == [("big", "success", None, {"max-downtime": 4000})]
        assert job_of(hv, "big").max_downtime == 4000.0
        (event,) = await rec.until(lambda: tuned_events(rec, "mig"))
        assert event["max-downtime"] == 4000
        start = len(rec.events_for("mig", "progress"))
        await rec.until(lambda: len(rec.events_for("mig", "progress")) > start + 5)
        later = rec.events_for("mig", "progress")[start:]
        assert all(e["max-downtime"] >= 4000 for e in later if "max-downtime" in e)
        d.cancel_all("enough")
        await rec.result("mig")


async def test_post_copy_now_moves_the_guest() -> None:
    hv = fake(dom("big", dirty=2000), **{"time-scale": 10})  # never converges at 100 MiB/s
    async with dispatcher(hv, settings()) as (d, rec):
        submit(d, migrate("mig", "big", bandwidth=100, **{"migration-type": "post-copy"}))
        await migrating(rec, "mig")
        submit(d, tune("t", "mig", post_copy="true", bandwidth=1000))
        assert entries(await rec.result("t")) == [
            ("big", "success", None, {"bandwidth": 1000, "post-copy": True})
        ]
        rm = await rec.result("mig")
        assert statuses(rm) == [("big", "success", None)]
        phases = [e["phase"] for e in rec.events_for("mig", "phase")]
        assert "post-copy" in phases
        (event,) = tuned_events(rec, "mig")
        assert (event["post-copy"], event["bandwidth"], event["phase"]) == (
            True,
            1000,
            "post-copy",
        )
        assert hv.cluster.locate("big") == ["there"]


async def test_post_copy_for_a_migration_started_without_it_is_not_supported() -> None:
    hv = fake(dom("big"), **{"time-scale": 10})
    async with dispatcher(hv, settings()) as (d, rec):
        submit(d, migrate("mig", "big", bandwidth=10))
        await migrating(rec, "mig")
        submit(d, tune("t", "mig", post_copy="true", bandwidth=20))
        ((vm, status, code, _),) = entries(r := await rec.result("t"))
        assert (vm, status, code) == ("big", "error", "not-supported")
        assert r.entries[0].details == (
            "the migration of big cannot switch to post-copy: it was started with"
            " migration-type live, and only a migration-type post-copy migration can switch"
        )
        assert job_of(hv, "big").bandwidth == 10 * MIB, "nothing was applied"
        assert not tuned_events(rec, "mig")
        d.cancel_all("enough")
        await rec.result("mig")


async def test_force_complete_pauses_the_guest_so_the_copy_finishes() -> None:
    hv = fake(dom("big", dirty=500), **{"time-scale": 10})
    async with dispatcher(hv, settings()) as (d, rec):
        submit(d, migrate("mig", "big", bandwidth=200, **{"max-downtime": 100}))
        await migrating(rec, "mig")
        submit(d, tune("t", "mig", force_complete="true"))
        assert entries(await rec.result("t")) == [
            ("big", "success", None, {"force-complete": True})
        ]
        assert hv.cluster.hosts["here"].domains["big"].state is DomainState.PAUSED
        rm = await rec.result("mig")
        assert statuses(rm) == [("big", "success", None)]
        assert "suspended-copy" in [e["phase"] for e in rec.events_for("mig", "phase")]
        (event,) = tuned_events(rec, "mig")
        assert event["force-complete"] is True
        assert hv.cluster.hosts["there"].domains["big"].state is DomainState.RUNNING


async def test_targets_that_cannot_be_tuned() -> None:
    hv = fake(dom("big"), dom("other", memory=GIB), **{"time-scale": 10})
    async with dispatcher(hv, settings()) as (d, rec):
        submit(d, tune("t0", "nothing", bandwidth=5))
        r0 = await rec.result("t0")
        assert (r0.result, entries(r0)) == (
            "tuned",
            [("n/a", "error", "wrong-state", {})],
        )
        assert r0.entries[0].details == "task 'nothing' is not queued or running"

        submit(d, migrate("mig", "big", bandwidth=10))
        submit(d, migrate("later", "big"))  # waits in big's lane
        submit(d, "id: st\ntask: suspend vm\nlist:\n  - vm-name: big\n")  # waits too
        await migrating(rec, "mig")
        submit(d, tune("t1", "later", bandwidth=5))
        r1 = await rec.result("t1")
        assert entries(r1) == [("big", "error", "wrong-state", {})]
        assert r1.entries[0].details == (
            "the migration of big has not started yet (queued); tune it once it runs"
        )
        submit(d, tune("t2", "st", bandwidth=5))
        r2 = await rec.result("t2")
        assert entries(r2) == [("n/a", "error", "invalid-message", {})]
        assert r2.entries[0].details == (
            "task 'st' is a 'suspend vm' task: tune migration changes the running migrations"
            " of a 'migrate vm' or 'evacuate node' task"
        )
        submit(d, tune("t3", "mig", bandwidth=5, vm_name="other"))
        r3 = await rec.result("t3")
        assert entries(r3) == [("other", "error", "vm-not-found", {})]
        assert r3.entries[0].details == (
            "task 'mig' migrates no running or queued VM named 'other'"
        )
        d.cancel_all("enough")
        for task_id in ("mig", "later", "st"):
            await rec.result(task_id)
        submit(d, tune("t4", "mig", bandwidth=5))
        r4 = await rec.result("t4")
        assert entries(r4) == [("n/a", "error", "wrong-state", {})], "finished: gone"


async def test_a_migration_in_its_pre_checks_has_not_started_yet() -> None:
    hv = fake(dom("big"), **{"time-scale": 10, "latency": 0.3})  # every call takes 0.3 s
    async with dispatcher(hv, settings()) as (d, rec):
        submit(d, migrate("mig", "big"))
        await rec.until(lambda: rec.events_for("mig", "accepted"))
        await asyncio.sleep(0.05)
        submit(d, tune("t", "mig", bandwidth=5))
        r = await rec.result("t")
        assert entries(r) == [("big", "error", "wrong-state", {})]
        details = r.entries[0].details or ""
        assert details.startswith("the migration of big has not started yet")
        assert details.endswith("; tune it once it runs")
        d.cancel_all("enough")
        await rec.result("mig")


async def test_an_evacuation_tunes_every_running_move_or_the_one_named() -> None:
    hv = fake(
        dom("e1", memory=4 * GIB),
        dom("e2", memory=4 * GIB),
        peers={"there": {"memory": 64 * GIB, "cpus": 16}},
        **{"time-scale": 10},
    )
    async with dispatcher(hv, settings()) as (d, rec):
        submit(
            d,
            "id: ev\ntask: evacuate node\ndestinations: [there]\n"
            "parameter:\n  migration-type: live\n  bandwidth: 10\n  max-parallel: 2\n",
        )
        await migrating(rec, "ev", "e1")
        await migrating(rec, "ev", "e2")
        submit(d, tune("t1", "ev", bandwidth=20))
        r1 = await rec.result("t1")
        assert sorted(entries(r1)) == [
            ("e1", "success", None, {"bandwidth": 20}),
            ("e2", "success", None, {"bandwidth": 20}),
        ]
        submit(d, tune("t2", "ev", bandwidth=40, vm_name="e2"))
        assert entries(await rec.result("t2")) == [("e2", "success", None, {"bandwidth": 40})]
        assert (job_of(hv, "e1").bandwidth, job_of(hv, "e2").bandwidth) == (20 * MIB, 40 * MIB)
        submit(d, tune("t3", "ev", bandwidth=0))
        await rec.result("t3")
        rev = await rec.result("ev")
        assert {e.vm_name: e.status for e in rev.entries} == {"e1": "success", "e2": "success"}


async def test_a_swap_tunes_both_halves() -> None:
    hv = fake(
        dom("one", memory=4 * GIB),
        peers={"there": {"domains": [dom("two", memory=4 * GIB)]}},
        **{"time-scale": 10},
    )
    async with dispatcher(hv, settings()) as (d, rec):
        submit(
            d,
            "id: sw\ntask: migrate vm\nvm-name: one\ndestination: there\n"
            "parameter:\n  migration-type: live\n  bandwidth: 10\n  swap-with:\n"
            "    vm-name: two\n",
        )
        await migrating(rec, "sw", "one")
        await migrating(rec, "sw", "two")
        submit(d, tune("t1", "sw", bandwidth=0, vm_name="two"))
        assert entries(await rec.result("t1")) == [("two", "success", None, {"bandwidth": 0})]
        submit(d, tune("t2", "sw", bandwidth=0))
        r2 = await rec.result("t2")
        assert [e.vm_name for e in r2.entries] in (["one"], ["one", "two"], ["two", "one"])
        r = await rec.result("sw")
        assert statuses(r) == [("one", "success", None)]
        assert {e["vm-name"] for e in tuned_events(rec, "sw")} >= {"two"}


async def test_tune_is_answered_at_once_while_the_agent_is_busy() -> None:
    """No slot, no lane, no queue place: the only slot is taken, the queue is full."""
    hv = fake(dom("big"), **{"time-scale": 10})
    s = default_settings(
        hostname="here",
        agent={"progress_interval": 0.05},
        limits={"max_concurrent_tasks": 1, "max_queued_tasks": 1},
    )
    async with dispatcher(hv, s) as (d, rec):
        submit(d, migrate("mig", "big", bandwidth=10))
        await migrating(rec, "mig")
        submit(d, "id: st\ntask: suspend vm\nlist:\n  - vm-name: big\n")  # fills the queue
        submit(d, "id: full\ntask: suspend vm\nlist:\n  - vm-name: x\n")
        assert statuses(await rec.result("full")) == [("x", "error", "busy")]
        submit(d, tune("t", "mig", bandwidth=0))
        assert entries(await rec.result("t")) == [("big", "success", None, {"bandwidth": 0})]
        await rec.result("mig")
        await rec.result("st")


async def test_tune_is_answered_while_draining() -> None:
    hv = GatedDummy()
    async with dispatcher(hv) as (d, rec):
        draining = asyncio.create_task(d.drain(grace=1.0))
        await asyncio.sleep(0)
        submit(d, tune("t", "nothing", bandwidth=1))
        assert entries(await rec.result("t")) == [("n/a", "error", "wrong-state", {})]
        await draining


async def test_a_bug_in_a_tune_is_an_entry_not_a_dead_agent(monkeypatch) -> None:
    from asyncmigfra.migration.steering import MigrationSteering  # noqa: PLC0415

    async def broken(self: MigrationSteering, tuning: object) -> dict[str, object]:
        raise RuntimeError("boom")

    monkeypatch.setattr(MigrationSteering, "tune", broken)
    hv = fake(dom("big"), **{"time-scale": 10})
    async with dispatcher(hv, settings()) as (d, rec):
        submit(d, migrate("mig", "big", bandwidth=10))
        await migrating(rec, "mig")
        submit(d, tune("t", "mig", bandwidth=0))
        r = await rec.result("t")
        assert [(e.vm_name, e.status, e.code) for e in r.entries] == [
            ("big", "error", "hypervisor-error")
        ]
        assert (r.entries[0].details or "").startswith("internal error")
        submit(d, "id: s\ntask: status\n")  # the dispatcher still answers
        assert (await rec.result("s")).result == "status"
        d.cancel_all("enough")
        await rec.result("mig")
