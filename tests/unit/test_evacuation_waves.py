"""``evacuate node`` with ``schedule: predicted`` (protocol §3.7): the dispatcher gathers the
fake's dirty rates and link rates, plans when each move starts, announces it (``event:
plan``, the moves that start together as one wave) and runs the moves as the links have
room, capping each at its share, re-planning when moves stray from their predictions. Without the
rates it falls back to the placement order. The ``fake`` back-end's NIC (``nic-rate``) makes
the links shared, as they are on real hosts.

Built like ``test_dispatcher`` (no broker): results go to a recorder, events to a list. The
fake runs at ``time-scale`` 1 so predictions (in real seconds) match it; the guests are
small enough that every evacuation takes a second or two.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from evacuation_support import MIB, MIXED, dispatcher, entries, evacuate, fake, plans, vm

from asyncmigfra.console.arguments import build_parser
from asyncmigfra.console.evacuation import EvacuationView, plan_note
from asyncmigfra.console.tasks import evacuate_task
from asyncmigfra.errors import NotSupported, TaskRejected
from asyncmigfra.hypervisor.base import (
    LinkRate,
    MigrationJob,
    MigrationRequest,
    MigrationResult,
    OpContext,
)
from asyncmigfra.hypervisor.fake import FakeHypervisor
from asyncmigfra.model import EvacuateSpec, ResultMessage
from asyncmigfra.tasks import waves
from asyncmigfra.tasks.dispatching import Dispatcher, planner
from asyncmigfra.wire.parsing import parse_task
from harness import DispatchRecorder, submit

# ---- the wire ----------------------------------------------------------------------------


async def test_schedule_is_placement_unless_predicted_is_asked_for() -> None:
    def spec(parameter: str) -> EvacuateSpec:
        text = f"task: evacuate node\ndestinations: [b]\n{parameter}"
        (sub,) = parse_task(text.encode()).subtasks
        assert isinstance(sub, EvacuateSpec)
        return sub

    assert spec("").schedule == "placement"
    assert spec("parameter: {max-parallel: 3}").schedule == "placement"
    assert spec("parameter: {schedule: placement}").schedule == "placement"
    predicted = spec("parameter: {schedule: predicted, max-parallel: 3}")
    assert predicted.schedule == "predicted"
    assert predicted.max_parallel == 3
    with pytest.raises(TaskRejected, match=r"parameter\.schedule"):
        parse_task(b"task: evacuate node\ndestinations: [b]\nparameter: {schedule: fastest}")


async def test_the_cli_asks_for_it_with_schedule_predicted() -> None:
    args = build_parser().parse_args(["evacuate", "a", "--to", "b", "--schedule", "predicted"])
    assert args.schedule == "predicted"
    payload = evacuate_task("e", ["b"], {"schedule": args.schedule, "max-parallel": None})
    (sub,) = parse_task(payload).subtasks
    assert isinstance(sub, EvacuateSpec)
    assert sub.schedule == "predicted"
    assert build_parser().parse_args(["evacuate", "a", "--to", "b"]).schedule is None


async def test_the_live_view_sums_a_plan_up_in_one_line() -> None:
    plan = {
        "event": "plan",
        "schedule": "predicted",
        "revision": 1,
        "makespan": 8.838,
        "waves": [{"wave": 1}, {"wave": 2}],
        "unschedulable": [{"vm-name": "batch-1"}],
    }
    assert plan_note(plan) == (
        "plan 1: 2 waves, 8.838 s predicted; predicted not to converge: batch-1"
    )
    fallback = {"event": "plan", "schedule": "placement", "details": "no dirty rate known for x"}
    assert plan_note(fallback) == "plan: placement order (no dirty rate known for x)"
    view = EvacuationView("a", ["b"], "e")
    view.feed(plan)
    assert view.notes == [plan_note(plan)]
    # A migration's own prediction (the same event kind, with vm-name) is no evacuation plan.
    own = {"event": "plan", "vm-name": "c1", "destination": "b", "mode": "live"}
    view.feed(own)
    assert view.notes == [plan_note(plan)]
    assert "placement order" not in view.plain(own)
    assert "destination" in view.plain(own)


# ---- waves -------------------------------------------------------------------------------


async def test_hot_guests_run_alone_and_cold_ones_together() -> None:
    hv = fake(MIXED, **{"nic-rate": 1000})
    async with dispatcher(hv) as (d, rec):
        evacuate(d, "w", "  schedule: predicted\n  migration-type: live\n")
        result = await rec.result("w")
    got = entries(result)
    assert {n: e["status"] for n, e in got.items()} == dict.fromkeys(got, "success")
    waves = {n: e["wave"] for n, e in got.items()}
    # The hot guests first, one after the other (each needs most of the NIC); the idle ones
    # together once the NIC is free.
    assert [waves["h1"], waves["h2"]] == [1, 2]
    assert waves["c1"] == waves["c2"] == 3
    assert all(isinstance(e["predicted-duration"], float) for e in got.values())
    assert all(e["destination"] in ("b", "c") for e in got.values())
    cluster = hv.cluster
    assert all(cluster.locate(n) == [got[n]["destination"]] for n in got)
    # The plan came first, once (nothing strayed), with the waves the entries name.
    (plan,) = plans(rec)
    assert rec.events.index(plan) < rec.events.index(rec.of("phase")[1])  # after placement
    assert plan["schedule"] == "predicted"
    assert plan["revision"] == 1
    assert plan["link-rate"] == 1000.0
    assert [v["vm-name"] for v in plan["waves"][2]["vms"]] == ["c1", "c2"]
    assert [w["start"] for w in plan["waves"]] == sorted(w["start"] for w in plan["waves"])
    assert plan["makespan"] == pytest.approx(
        max(w["start"] + w["predicted-duration"] for w in plan["waves"])
    )
    # No two moves ran at once whose needs the NIC could not carry together: the hot ones
    # never overlapped, and nothing started beside them.
    order = [(e["event"], e.get("vm-name")) for e in rec.events if e["event"] in ("done", "phase")]
    began = {vm_: i for i, (kind, vm_) in enumerate(order) if kind == "phase" and vm_ in waves}
    ended = {vm_: i for i, (kind, vm_) in enumerate(order) if kind == "done"}
    assert ended["h1"] < began["h2"]
    assert ended["h2"] < min(began["c1"], began["c2"])


async def test_the_same_guests_all_at_once_do_not_converge() -> None:
    """What the waves avoid: with the placement order and 4 at once the hot guests share the
    NIC with each other and time out (3 s), while the predicted schedule moves them all."""
    hv = fake(MIXED, **{"nic-rate": 1000})
    async with dispatcher(hv) as (d, rec):
        evacuate(d, "p", "  migration-type: live\n  completion-timeout: 3\n  max-parallel: 4\n")
        result = await rec.result("p")
    got = entries(result)
    assert got["c1"]["status"] == got["c2"]["status"] == "success"
    assert got["h1"]["code"] == got["h2"]["code"] == "timeout"
    assert "wave" not in got["c1"]
    assert not plans(rec)


class Blind(FakeHypervisor):
    """A fake that cannot measure one guest's dirty rate."""

    async def measure_dirty_rate(self, vm_name: str, *, seconds: int = 1) -> float:
        if vm_name == "c2":
            raise NotSupported("this host cannot measure dirty rates")
        return await super().measure_dirty_rate(vm_name, seconds=seconds)


async def test_without_a_dirty_rate_it_runs_in_placement_order_and_says_why() -> None:
    base = fake([vm("c1", 100), vm("c2", 100)])
    hv = Blind(cluster=base.cluster, host=base.host)
    async with dispatcher(hv) as (d, rec):
        evacuate(d, "f", "  schedule: predicted\n  migration-type: live\n")
        result = await rec.result("f")
    assert {e.status for e in result.entries} == {"success"}
    assert all("wave" not in e.extra for e in result.entries)
    (plan,) = plans(rec)
    assert plan["schedule"] == "placement"
    assert plan["details"] == (
        "no dirty rate known for c2 (the dirty rate could not be measured: this host cannot"
        " measure dirty rates)"
    )


class Boastful(FakeHypervisor):
    """A fake that tells links four times as fast as they are."""

    async def link_rate(self, destination: str) -> LinkRate | None:
        real = await super().link_rate(destination)
        assert real is not None
        return LinkRate(
            single=real.single * 4, outgoing=real.outgoing * 4, incoming=real.incoming * 4
        )


class TimedJob:
    """A migration job whose end its :class:`Timed` fake notes before it shows."""

    def __init__(self, job: MigrationJob, owner: Timed, name: str) -> None:
        self._job = job
        self._owner = owner
        self._name = name
        self._begun = asyncio.get_running_loop().time()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._job, name)

    async def wait(self) -> MigrationResult:
        try:
            result = await self._job.wait()
        except BaseException:
            self._owner.failed(self._name)
            raise
        final = await self._job.stats()
        assert final is not None
        await self._owner.ended(self._name, self._begun, self._begun + final.elapsed)
        return result


class Timed(FakeHypervisor):
    """A fake that notes when each migration job began and ended on its own clock (the
    events' times, not when the loop got to them; ``time-scale`` 1): how long the moves took
    as the links carried them, whatever the load on this machine, to compare predictions
    with."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spans: dict[str, tuple[float, float]] = {}

    def took(self, *names: str) -> float:
        """s from the first of these jobs' start to the last one's end."""
        spans = [self.spans[n] for n in names]
        return max(end for _, end in spans) - min(begun for begun, _ in spans)

    async def ended(self, name: str, begun: float, end: float) -> None:
        self.spans[name] = (begun, end)

    def failed(self, name: str) -> None:
        """``name``'s job ended without a result."""

    async def begin_migration(self, request: MigrationRequest, ctx: OpContext) -> MigrationJob:
        job = await super().begin_migration(request, ctx)
        return TimedJob(job, self, request.vm_name)


class EndingTogether(Boastful, Timed):
    """A boastful fake whose moves of ``together`` end together: no job's end shows before
    all of theirs have. Equal moves that start together end together; here one job starts
    a moment after the other, and the agent, on a loaded machine, could note the first end
    alone and plan the rest beside a move that has in fact ended too."""

    def __init__(self, *args: Any, together: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._together = set(together)
        self._gate = asyncio.Event()

    async def ended(self, name: str, begun: float, end: float) -> None:
        await super().ended(name, begun, end)
        if name not in self._together:
            return
        if self._together <= set(self.spans):
            # Opened once every one of them waits for it: they go on in one step of the loop.
            asyncio.get_running_loop().call_soon(self._gate.set)
        await self._gate.wait()

    def failed(self, name: str) -> None:
        self._gate.set()  # no end to wait for: the others' show at once


async def slow_cold_guests(task_id: str) -> tuple[EndingTogether, DispatchRecorder, ResultMessage]:
    """Four idle guests evacuated two at a time on links four times slower than told; the
    first wave (c0, c1) ends together."""
    cold = [vm(f"c{i}", 150) for i in range(4)]
    base = fake(cold, bandwidth=500, **{"nic-rate": 500})
    hv = EndingTogether(cluster=base.cluster, host=base.host, bandwidth=500, together=("c0", "c1"))
    async with dispatcher(hv, max_outgoing=2) as (d, rec):
        evacuate(d, task_id, "  schedule: predicted\n  migration-type: live\n")
        return hv, rec, await rec.result(task_id)


async def test_moves_slower_than_predicted_make_it_plan_the_rest_again() -> None:
    hv, rec, result = await slow_cold_guests("r")
    assert {e.status for e in result.entries} == {"success"}
    first, *again = plans(rec)  # c2 and c3 start together: none is left after them
    assert [len(w["vms"]) for w in first["waves"]] == [2, 2]
    assert again
    assert [p["revision"] for p in again] == list(range(2, 2 + len(again)))
    assert all("planned again" in str(p["reason"]) for p in again)
    # Only what had not started, with the links as slow as the first moves showed (a
    # quarter of what the back-end told, about): now predicted as long as those took.
    last = again[-1]
    assert [w["wave"] for w in last["waves"]] == [2]
    assert first["link-rate"] / last["link-rate"] == pytest.approx(4, rel=0.25)
    assert last["waves"][0]["predicted-duration"] == pytest.approx(hv.took("c0", "c1"), rel=0.25)
    final = {e.vm_name: e.extra for e in result.entries}
    assert {final[v["vm-name"]]["predicted-duration"] for v in last["waves"][0]["vms"]} == {
        v["predicted-duration"] for v in last["waves"][0]["vms"]
    }


async def test_a_replan_that_fails_leaves_the_order_planned_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The planner fails when asked to plan the rest again (its process died, say): a re-plan
    # is advice, so the evacuation goes on in the order planned before, and every VM moves.
    real = planner.Planner.run

    async def failing(self: planner.Planner, size: int, fn: Any, /, *args: Any, **kw: Any) -> Any:
        if fn is waves.replan:
            raise RuntimeError("the planning process died")
        return await real(self, size, fn, *args, **kw)

    monkeypatch.setattr(planner.Planner, "run", failing)
    _, rec, result = await slow_cold_guests("f")
    assert {e.vm_name: e.status for e in result.entries} == dict.fromkeys(
        ["c0", "c1", "c2", "c3"], "success"
    )
    (plan,) = plans(rec)
    assert [[v["vm-name"] for v in w["vms"]] for w in plan["waves"]] == [["c0", "c1"], ["c2", "c3"]]


class Noting(Boastful, Timed):
    """A boastful fake that calls :attr:`noted` with each move's name when its job ends
    (before the end shows to the agent)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.noted: Callable[[str], None] = lambda name: None

    async def ended(self, name: str, begun: float, end: float) -> None:
        await super().ended(name, begun, end)
        self.noted(name)


async def test_a_move_far_past_its_prediction_has_the_rest_planned_again_before_it_ends() -> None:
    # One move at a time; b0 (the largest, first) moves on links four times slower than
    # told: it runs about 2.7 times its prediction. Once it has run 1.5 times as long, the
    # rest is planned again, while it still runs: a scheduler learns at once that the
    # evacuation takes longer, not when the crawling (or stuck) move ends.
    base = fake([vm("b0", 800), vm("c1", 50), vm("c2", 50)], bandwidth=500, **{"nic-rate": 500})
    hv = Noting(cluster=base.cluster, host=base.host, bandwidth=500)
    reasons_at_end: dict[str, list[str]] = {}
    async with dispatcher(hv, max_outgoing=1) as (d, rec):
        hv.noted = lambda name: reasons_at_end.setdefault(
            name, [str(p.get("reason")) for p in plans(rec)[1:]]
        )
        evacuate(d, "s", "  schedule: predicted\n  migration-type: live\n")
        result = await rec.result("s")
    assert {e.status for e in result.entries} == {"success"}
    first, *again = plans(rec)
    assert first["waves"][0]["vms"][0]["vm-name"] == "b0"
    before_b0_ended = reasons_at_end["b0"]
    assert before_b0_ended
    assert before_b0_ended[0].startswith("b0 has run ")
    assert before_b0_ended[0].endswith("the rest planned again")
    assert first["link-rate"] / again[-1]["link-rate"] > 2


async def test_a_cancel_stops_the_waves_not_yet_started() -> None:
    hv = fake(MIXED, **{"nic-rate": 1000})
    async with dispatcher(hv) as (d, rec):
        evacuate(d, "x", "  schedule: predicted\n  migration-type: live\n")
        await rec.until(lambda: rec.of("done"))  # wave 1 (h1) has ended
        submit(d, "task: cancel\ntarget: x\n")
        result = await rec.result("x")
    got = entries(result)
    assert got["h1"]["status"] == "success"
    for name in ("h2", "c1", "c2"):  # running (aborted) or never started
        assert got[name]["code"] == "cancelled"
        assert got[name]["wave"] in (2, 3)
        assert hv.cluster.locate(name) == ["a"]
    # Every VM had its done event, the never-started ones too.
    assert sorted(e["vm-name"] for e in rec.of("done")) == ["c1", "c2", "h1", "h2"]
    assert not d._inbound  # every destination reservation was given back


async def test_caps_keep_the_idle_guests_from_slowing_down_a_hot_one() -> None:
    # One migration's stream carries 700 of the 1000 MiB/s NIC. db-1 (dirtying 450) gets
    # all 700; the idle guests share the other 300, capped at 150 MiB/s each.
    doms = [vm("db-1", 400, 450), vm("web-1", 100), vm("web-2", 100)]
    base = fake(doms, bandwidth=700, **{"nic-rate": 1000})
    hv = Timed(cluster=base.cluster, host=base.host, bandwidth=700)
    async with dispatcher(hv) as (d, rec):
        evacuate(d, "k", "  schedule: predicted\n  migration-type: live\n")
        result = await rec.result("k")
    assert {e.status for e in result.entries} == {"success"}
    (plan,) = plans(rec)
    (wave,) = plan["waves"]
    caps = {v["vm-name"]: v.get("bandwidth") for v in wave["vms"]}
    assert caps == {"db-1": None, "web-1": 150, "web-2": 150}
    rates = {
        (e["vm-name"], e["transfer-rate"])
        for e in rec.of("progress")
        if e["vm-name"] != "db-1" and e.get("phase") == "migrating" and e.get("transfer-rate")
    }
    assert rates
    assert all(rate <= 150 * MIB for _, rate in rates)
    assert hv.took("db-1") == pytest.approx(wave["predicted-duration"], rel=0.2)


async def test_warm_migrations_are_planned_as_guests_that_dirty_nothing() -> None:
    # warm (the default type) pauses the guest for the copy: its dirty rate does not matter,
    # so the "hot" guests join the idle ones, all four in one wave.
    hv = fake(MIXED, **{"nic-rate": 1000})
    async with dispatcher(hv) as (d, rec):
        evacuate(d, "warm", "  schedule: predicted\n")
        result = await rec.result("warm")
    assert {e.status for e in result.entries} == {"success"}
    assert {e.extra["wave"] for e in result.entries} == {1}
    (plan,) = plans(rec)
    assert all(v["needs"] < 100 for w in plan["waves"] for v in w["vms"])


# ---- after the merge with single-migration predictions -----------------------------------


class Unaware(FakeHypervisor):
    """A fake that knows nothing of its links, as libvirt does not: the agent's Forecaster
    gives the rate (learned, else ``migration.link-rate``) for one migration and both NICs."""

    async def link_rate(self, destination: str) -> LinkRate | None:
        return None


async def test_without_link_rates_the_forecasters_rate_stands_for_the_nics() -> None:
    # migration.link-rate 1000 MiB/s (what the NIC really carries) for one and for all: the
    # hot guests (600 MiB/s) need the NIC alone, the idle ones go together, as with the NIC
    # the fake tells.
    base = fake(MIXED, **{"nic-rate": 1000})
    hv = Unaware(cluster=base.cluster, host=base.host)
    async with dispatcher(hv, link_rate=1000.0) as (d, rec):
        evacuate(d, "u", "  schedule: predicted\n  migration-type: live\n")
        result = await rec.result("u")
    got = entries(result)
    assert {n: e["status"] for n, e in got.items()} == dict.fromkeys(got, "success")
    (plan,) = plans(rec)
    assert plan["link-rate"] == 1000.0
    waves = {n: e["wave"] for n, e in got.items()}
    assert [waves["h1"], waves["h2"]] == [1, 2]
    assert waves["c1"] == waves["c2"] == 3
    # Each migration may publish its own prediction too (its dirty rate is known by then):
    # the same event kind, with vm-name.
    assert all(e["vm-name"] in got for e in rec.of("plan") if "vm-name" in e)


def plan_evacuation(d: Dispatcher, task_id: str, parameter: str) -> None:
    submit(
        d, f"id: {task_id}\ntask: plan evacuation\ndestinations: [b, c]\nparameter:\n{parameter}"
    )


async def test_plan_evacuation_tells_the_waves_the_evacuation_runs() -> None:
    hv = fake(MIXED, **{"nic-rate": 1000})
    async with dispatcher(hv) as (d, rec):
        plan_evacuation(d, "pw", "  schedule: predicted\n  migration-type: live\n")
        planned = entries(await rec.result("pw"))
        plan_evacuation(d, "pp", "  migration-type: live\n")
        placement = entries(await rec.result("pp"))
        evacuate(d, "ew", "  schedule: predicted\n  migration-type: live\n")
        moved = entries(await rec.result("ew"))
    assert {n: e["wave"] for n, e in planned.items()} == {n: e["wave"] for n, e in moved.items()}
    assert [planned["h1"]["wave"], planned["h2"]["wave"]] == [1, 2]
    assert planned["c1"]["wave"] == planned["c2"]["wave"] == 3
    assert {e["wave"] for e in placement.values()} == {1}
    assert all(h in ("b", "c") for h in (hv.cluster.locate(n)[0] for n in moved))
    assert not [e for e in rec.events if e.get("id") in ("pw", "pp") and e["event"] == "plan"]


async def test_plan_evacuation_says_why_it_has_no_waves() -> None:
    base = fake([vm("c1", 100), vm("c2", 100)])
    hv = Blind(cluster=base.cluster, host=base.host)
    async with dispatcher(hv) as (d, rec):
        plan_evacuation(d, "pb", "  schedule: predicted\n  migration-type: live\n")
        result = await rec.result("pb")
    assert {e.extra["wave"] for e in result.entries} == {1}
    why = (
        "no waves planned, placement order: no dirty rate known for c2 (the dirty rate could"
        " not be measured: this host cannot measure dirty rates)"
    )
    assert all(why in (e.details or "") for e in result.entries)


async def test_a_running_move_gets_the_link_a_hot_one_leaves_when_it_ends() -> None:
    # db-1 (dirtying 450) takes its whole 700 MiB/s stream; web-1, large and idle, starts
    # beside it capped at the 300 left. When db-1 has ended, web-1's cap is lifted at once
    # (tune migration's steering: a progress event with action tuned), and it moves faster.
    doms = [vm("db-1", 400, 450), vm("web-1", 3000)]
    hv = fake(doms, bandwidth=700, **{"nic-rate": 1000})
    async with dispatcher(hv) as (d, rec):
        evacuate(d, "lift", "  schedule: predicted\n  migration-type: live\n")
        result = await rec.result("lift")
    assert {e.status for e in result.entries} == {"success"}
    (plan,) = plans(rec)
    (wave,) = plan["waves"]
    assert {v["vm-name"]: v.get("bandwidth") for v in wave["vms"]} == {"db-1": None, "web-1": 300}
    db_done = rec.events.index(next(e for e in rec.of("done") if e["vm-name"] == "db-1"))
    web = [e for e in rec.events[db_done:] if e["event"] == "progress" and e["vm-name"] == "web-1"]
    tuned = [e for e in web if e.get("action") == "tuned"]
    assert tuned
    assert tuned[0]["bandwidth"] == 0
    before = [
        e["transfer-rate"]
        for e in rec.events[:db_done]
        if e["event"] == "progress" and e["vm-name"] == "web-1" and e.get("transfer-rate")
    ]
    after = [e["transfer-rate"] for e in web if e.get("transfer-rate")]
    assert before
    assert max(before) <= 300 * MIB
    assert after
    assert max(after) > 300 * MIB


async def test_a_move_in_a_long_setup_leaves_its_share_to_the_hot_one() -> None:
    # db-1 (dirtying 100 MiB/s) and web-1 (idle) share a 700 MiB/s NIC, planned at caps of
    # about 590 and 110. web-1's setup takes 4 s here (a loaded host) while the prediction
    # counts 0.3 s; until its job shows data moving it sends nothing, so db-1 is lifted to
    # (nearly) the whole NIC once it moves, and never put back down while web-1 sets up.
    web = {**vm("web-1", 200), "setup-time": 4}
    hv = fake([vm("db-1", 400, 100), web], bandwidth=700, **{"nic-rate": 700})
    async with dispatcher(hv) as (d, rec):
        evacuate(d, "slow", "  schedule: predicted\n  migration-type: live\n")
        result = await rec.result("slow")
    assert {e.status for e in result.entries} == {"success"}
    (plan,) = plans(rec)
    (wave,) = plan["waves"]
    planned = {v["vm-name"]: v.get("bandwidth") for v in wave["vms"]}
    assert planned["db-1"] is not None
    web_moves = next(
        i
        for i, e in enumerate(rec.events)
        if e["event"] == "progress" and e["vm-name"] == "web-1" and e.get("transfer-rate")
    )
    db = [e for e in rec.events[:web_moves] if e["event"] == "progress" and e["vm-name"] == "db-1"]
    tuned = [e["bandwidth"] for e in db if e.get("action") == "tuned"]
    assert tuned
    assert all(cap == 0 or cap > planned["db-1"] for cap in tuned)
    rates = [e["transfer-rate"] for e in db if e.get("transfer-rate")]
    assert rates[-1] > planned["db-1"] * MIB
