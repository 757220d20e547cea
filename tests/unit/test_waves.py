"""The wave planner (``asyncmigfra.tasks.waves``): hand-computed cases, properties that
hold for any input (hypothesis), and re-planning.

The hand-computed cases use costs of 0 (no setup, no shortest pass, no switchover cost)
and pages of one byte, so a pass of ``M`` bytes at ``r`` bytes/s lasts ``M / r`` and a guest
dirtying ``d`` leaves ``d x M / r`` for the next pass.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncmigfra.migration.prediction import MigrationCosts, PredictionInputs, predict
from asyncmigfra.tasks.dispatching.schedule import _Schedule
from asyncmigfra.tasks.waves import (
    Observation,
    PlannedMove,
    WavePlan,
    WaveVm,
    deviates,
    lower_bound,
    plan_waves,
    replan,
    slowdown,
    slowdown_reaches,
)

MIB = 1024 * 1024
FREE = MigrationCosts(setup=0.0, min_pass=0.0, pass_overhead=0.0, switchover=0.0)


def vm(
    name: str,
    mib: int,
    *,
    dirty: float = 0.0,
    stream: float = 100,
    dest: str = "b",
    costs: MigrationCosts = FREE,
    **extra: Any,
) -> WaveVm:
    inputs = PredictionInputs(
        memory=mib * MIB,
        link_rate=stream * MIB,
        dirty_rate=dirty * MIB,
        completion_timeout=extra.pop("completion_timeout", 1e5),
        page_size=1,
        costs=costs,
        **extra,
    )
    return WaveVm(name=name, destination=dest, inputs=inputs)


def names(plan: WavePlan) -> list[list[str]]:
    return [sorted(m.name for m in w.moves) for w in plan.waves]


def running_at(plan: WavePlan, t: float) -> list[PlannedMove]:
    """The moves of ``plan`` that run at ``t`` (started, not ended; a move whose end is
    ``t`` up to float rounding has ended: start + duration need not give back its end)."""
    return [
        m
        for w in plan.waves
        for m in w.moves
        if w.start <= t < w.start + m.predicted_duration - 1e-9 * max(1.0, t) or (w.start == t)
    ]


async def test_cold_vms_share_a_link_their_streams_fill_together() -> None:
    # Four idle 100 MiB guests, each stream 50 MiB/s, on a 100 MiB/s link: idle guests
    # lose nothing sharing, so all four go at once (25 MiB/s each; 400 MiB at 100: 4 s).
    cold = [vm(f"c{i}", 100, stream=50) for i in range(4)]
    plan = plan_waves(cold, link_rate=100 * MIB, max_parallel=4)
    assert [len(w.moves) for w in plan.waves] == [4]
    assert {m.bandwidth for m in plan.moves} == {25 * MIB}
    assert plan.makespan == pytest.approx(4.0)
    # At most two at once: the next two start as the first two end.
    plan = plan_waves(cold, link_rate=100 * MIB, max_parallel=2)
    assert [len(w.moves) for w in plan.waves] == [2, 2]
    assert [w.start for w in plan.waves] == [0.0, pytest.approx(2.0)]
    assert plan.makespan == pytest.approx(4.0)
    assert plan.unschedulable == ()
    # Streams that fill the link alone: no faster together, and no slower.
    plan = plan_waves([vm(f"c{i}", 100) for i in range(4)], link_rate=100 * MIB, max_parallel=4)
    assert plan.makespan == pytest.approx(4.0)


async def test_setups_overlap_with_moves() -> None:
    # With the default 0.3 s setup, a move's setup overlaps another's transfer.
    costs = MigrationCosts()
    cold = [vm(f"c{i}", 100, stream=50, costs=costs) for i in range(4)]
    plan = plan_waves(cold, link_rate=100 * MIB, max_parallel=4)
    one_by_one = plan_waves(cold, link_rate=100 * MIB, max_parallel=1)
    assert [len(w.moves) for w in one_by_one.waves] == [1, 1, 1, 1]
    assert plan.makespan < one_by_one.makespan - 2


async def test_two_hot_vms_that_each_need_more_than_half_the_link_run_apart() -> None:
    # Dirtying 60 MiB/s, neither converges at 50 MiB/s (half of 100): separate waves, each
    # with the whole link.
    hot = [vm("h1", 100, dirty=60), vm("h2", 100, dirty=60)]
    plan = plan_waves(hot, link_rate=100 * MIB, max_parallel=4)
    assert names(plan) == [["h1"], ["h2"]]
    for wave in plan.waves:
        (move,) = wave.moves
        assert move.rate == 100 * MIB
        assert 60 * MIB < move.needed < 70 * MIB
        assert move.bandwidth is None
    # Passes of 1, 0.6 and 0.36 s leave 21.6 MiB (216 ms, under QEMU's 300 ms target),
    # sent in the switchover.
    expected = 1 + 0.6 + 0.36 + 0.216
    assert plan.waves[0].duration == pytest.approx(expected, rel=1e-3)
    assert plan.makespan == pytest.approx(2 * expected, rel=1e-3)


async def test_a_vm_that_cannot_converge_even_alone_is_reported_not_scheduled() -> None:
    plan = plan_waves(
        [vm("ok", 100), vm("runaway", 100, dirty=150)], link_rate=100 * MIB, max_parallel=4
    )
    assert names(plan) == [["ok"]]
    (reported,) = plan.unschedulable
    assert reported.name == "runaway"
    assert reported.destination == "b"
    assert "cannot converge" in reported.reason


async def test_post_copy_when_allowed_needs_only_what_moves_it_in_time() -> None:
    # pc dirties faster than the link: pre-copy never converges, post-copy does at any
    # share that sends its first pass before the completion timeout (100 MiB in 1000 s:
    # 0.1 MiB/s); it is not run alone for want of a share.
    plan = plan_waves(
        [vm("pc", 100, dirty=150, post_copy_allowed=True, max_downtime=300), vm("c", 100)],
        link_rate=100 * MIB,
        max_parallel=4,
    )
    assert plan.unschedulable == ()
    moves = {m.name: m for m in plan.moves}
    assert moves["pc"].mode == "post-copy"
    assert moves["pc"].needed < 1 * MIB
    assert moves["pc"].needed <= moves["pc"].wanted <= moves["pc"].alone == 100 * MIB
    # Without post-copy it converges in no way.
    plan = plan_waves(
        [vm("pc", 100, dirty=150, max_downtime=300)], link_rate=100 * MIB, max_parallel=4
    )
    assert [u.name for u in plan.unschedulable] == ["pc"]


async def test_caps_let_cold_vms_use_what_a_stream_limited_hot_vm_leaves() -> None:
    # A 100 MiB/s NIC, every migration's stream at most 70. The hot guest (dirtying 50)
    # needs more than 50: beside two cold ones sharing fairly it would get 33. Ranked first,
    # it gets its 70 and the cold ones divide the other 30 (caps of 15 MiB/s); they end
    # well before it does.
    plan = plan_waves(
        [vm("hot", 200, dirty=50, stream=70), vm("c1", 100, stream=70), vm("c2", 100, stream=70)],
        link_rate=100 * MIB,
        max_parallel=4,
    )
    assert names(plan) == [["c1", "c2", "hot"]]
    moves = {m.name: m for m in plan.moves}
    assert moves["hot"].rate == 70 * MIB
    assert moves["hot"].bandwidth is None
    assert moves["hot"].rank == 0
    assert moves["c1"].bandwidth == moves["c2"].bandwidth == 15 * MIB
    assert moves["c1"].predicted_duration == pytest.approx(100 / 15)
    assert plan.makespan == moves["hot"].predicted_duration > 100 / 15


async def test_max_incoming_limits_each_destination_at_every_moment() -> None:
    cold = [vm(f"c{i}", 100, stream=25) for i in range(3)] + [vm("other", 100, dest="x")]
    plan = plan_waves(cold, link_rate=100 * MIB, max_parallel=4, max_incoming=2)
    for t in {w.start for w in plan.waves}:
        now = Counter(m.destination for m in running_at(plan, t))
        assert max(now.values()) <= 2
    assert sorted(m.name for m in plan.moves) == ["c0", "c1", "c2", "other"]


async def test_a_slow_destination_is_the_limit_of_what_goes_there() -> None:
    # The source sends 100, destination b takes 20: the VM to b gets 20, the one to c 80.
    plan = plan_waves(
        [vm("to-b", 20), vm("to-c", 80, dest="c")],
        link_rate=100 * MIB,
        max_parallel=2,
        destination_rates={"b": 20 * MIB},
    )
    (wave,) = plan.waves
    rates = {m.name: m.rate for m in wave.moves}
    assert rates == {"to-b": pytest.approx(20 * MIB), "to-c": pytest.approx(80 * MIB)}
    assert wave.duration == pytest.approx(1.0)


async def test_waves_are_numbered_in_start_order_from_first_wave() -> None:
    plan = plan_waves(
        [vm("h1", 100, dirty=60), vm("h2", 100, dirty=60)],
        link_rate=100 * MIB,
        max_parallel=2,
        first_wave=3,
    )
    assert [w.number for w in plan.waves] == [3, 4]
    assert [w.start for w in plan.waves] == [0.0, pytest.approx(plan.waves[0].duration)]
    assert all(m.wave == w.number for w in plan.waves for m in w.moves)


async def test_the_lower_bound_counts_every_byte_through_the_busiest_link() -> None:
    # Two idle 100 MiB guests through a 100 MiB/s NIC: 2 s at least, whatever the schedule;
    # into a destination of 50 MiB/s, 4 s; one guest alone, its own time.
    idle = [vm("a", 100), vm("b", 100)]
    assert lower_bound(idle, link_rate=100 * MIB) == pytest.approx(2.0)
    assert lower_bound(idle, link_rate=100 * MIB, destination_rates={"b": 50 * MIB}) == (
        pytest.approx(4.0)
    )
    assert lower_bound([vm("slow", 100, stream=10)], link_rate=math.inf) == pytest.approx(10.0)
    plan = plan_waves(idle, link_rate=100 * MIB, max_parallel=2)
    assert plan.makespan == pytest.approx(lower_bound(idle, link_rate=100 * MIB))
    # A guest that converges in no way counts for nothing.
    assert lower_bound([vm("runaway", 100, dirty=150)], link_rate=100 * MIB) == 0.0


async def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="max_parallel"):
        plan_waves([], link_rate=1, max_parallel=0)
    with pytest.raises(ValueError, match="max_incoming"):
        plan_waves([], link_rate=1, max_parallel=1, max_incoming=0)
    with pytest.raises(ValueError, match="rates"):
        plan_waves([], link_rate=0, max_parallel=1)
    with pytest.raises(ValueError, match="once"):
        plan_waves([vm("a", 1), vm("a", 2)], link_rate=1, max_parallel=1)
    assert plan_waves([], link_rate=math.inf, max_parallel=1) == WavePlan(
        waves=(), unschedulable=(), makespan=0.0
    )
    with pytest.raises(ValueError, match="running"):
        plan_waves([vm("a", 1)], link_rate=1, max_parallel=1, running={"b": 0.5})


# ---- re-planning -------------------------------------------------------------------------


async def test_deviates() -> None:
    assert deviates(Observation(name="a", predicted=2.0, actual=3.1))
    assert not deviates(Observation(name="a", predicted=2.0, actual=2.9))
    assert deviates(Observation(name="a", predicted=2.0, actual=3.5, finished=False))
    assert deviates(Observation(name="a", predicted=3.0, actual=1.9))
    # A move still running in less than its prediction tells nothing.
    assert not deviates(Observation(name="a", predicted=3.0, actual=1.0, finished=False))
    assert not deviates(Observation(name="a", predicted=0.0, actual=5.0))


async def test_slowdown() -> None:
    assert slowdown([]) == 1.0
    done = [
        Observation(name="a", predicted=2.0, actual=4.0),
        Observation(name="b", predicted=2.0, actual=2.0),
    ]
    assert slowdown(done) == pytest.approx(1.5)
    # Running and within its prediction: left out; running past it: counted as far as it got.
    running = [
        Observation(name="c", predicted=10.0, actual=1.0, finished=False),
        Observation(name="d", predicted=1.0, actual=3.0, finished=False),
    ]
    assert slowdown(done + running) == pytest.approx(9.0 / 5.0)
    # Without the fixed part (the setup) that no link speeds up or slows down.
    fixed = [Observation(name="e", predicted=1.3, actual=2.3, fixed=0.3)]
    assert slowdown(fixed) == pytest.approx(2.0)
    assert slowdown([Observation(name="x", predicted=1.0, actual=100.0)]) == 4.0
    assert slowdown([Observation(name="x", predicted=100.0, actual=1.0)]) == 0.25


async def test_slowdown_reaches() -> None:
    done = [Observation(name="a", predicted=2.0, actual=3.0)]
    running = [
        Observation(name="b", predicted=1.0, actual=2.0, finished=False),
        Observation(name="c", predicted=3.0, actual=4.0, finished=False),
        Observation(name="d", predicted=5.0, actual=1.0, finished=False),  # not past it yet
    ]
    # (3 + 2 + 4) / (2 + 1 + 3) = 1.5 now; b and c each add their time: (9 + 2t) / 6.
    assert slowdown(done + running) == pytest.approx(1.5)
    assert slowdown_reaches(done + running, 1.5) == 0.0
    assert slowdown_reaches(done + running, 2.0) == pytest.approx(1.5)
    assert slowdown(
        [*done, *(replace(o, actual=o.actual + 1.5) for o in running[:2]), running[2]]
    ) == pytest.approx(2.0)
    # Only finished moves, or the running ones not past their prediction: time adds nothing.
    assert slowdown_reaches(done, 2.0) is None
    assert slowdown_reaches([*done, running[2]], 2.0) is None
    # Beyond the slowdown's bound: never.
    assert slowdown_reaches(done + running, 5.0) is None
    # The setup counts in neither total.
    fixed = [Observation(name="e", predicted=1.3, actual=1.8, fixed=0.3, finished=False)]
    assert slowdown_reaches(fixed, 2.0) == pytest.approx(0.5)


async def test_replan_assumes_links_as_slow_as_the_moves_were() -> None:
    # The moves so far took twice their prediction: the remaining hot guest, which needs 61
    # of a 100 MiB/s link, no longer converges on the 50 the link seems to give, and two
    # cold ones (each stream 50: 25 now) take twice as long.
    remaining = [vm("hot", 100, dirty=60), vm("c1", 100, stream=50), vm("c2", 100, stream=50)]
    seen = [Observation(name="done", predicted=1.0, actual=2.0)]
    plan = replan(remaining, seen, link_rate=100 * MIB, max_parallel=2, first_wave=2)
    assert [u.name for u in plan.unschedulable] == ["hot"]
    assert names(plan) == [["c1", "c2"]]
    assert plan.waves[0].number == 2
    assert plan.makespan == pytest.approx(4.0)
    # Without any evidence it is the plan as before.
    assert replan(remaining, [], link_rate=100 * MIB, max_parallel=2) == plan_waves(
        remaining, link_rate=100 * MIB, max_parallel=2
    )


async def test_a_plan_made_while_moves_run_counts_what_they_have_left() -> None:
    # c1 has half of its 100 MiB left (1 s at 50): c2 starts beside it at once, c3 when c1
    # has ended; c1 is in the plan's running moves, not in its waves.
    vms = [vm(f"c{i}", 100, stream=50) for i in (1, 2, 3)]
    plan = plan_waves(vms, link_rate=100 * MIB, max_parallel=2, running={"c1": 0.5})
    (now,) = plan.running
    assert now.name == "c1"
    assert now.predicted_duration == pytest.approx(1.0)
    assert names(plan) == [["c2"], ["c3"]]
    assert [w.start for w in plan.waves] == [0.0, pytest.approx(1.0)]
    assert plan.makespan == pytest.approx(3.0)


# ---- properties --------------------------------------------------------------------------

DESTINATIONS = ("d0", "d1", "d2")


@st.composite
def evacuations(draw: st.DrawFn) -> dict[str, Any]:
    costs = draw(st.sampled_from([FREE, MigrationCosts()]))
    vms = [
        vm(
            f"v{i}",
            draw(st.integers(1, 400)),
            dirty=draw(st.sampled_from([0.0, 1.0, 10.0, 40.0, 80.0, 150.0])),
            stream=draw(st.sampled_from([30.0, 60.0, 100.0, 200.0])),
            dest=draw(st.sampled_from(DESTINATIONS)),
            costs=costs,
            max_downtime=draw(st.sampled_from([None, 50, 500])),
            post_copy_allowed=draw(st.booleans()),
            completion_timeout=draw(st.sampled_from([30.0, 1e4])),
        )
        for i in range(draw(st.integers(0, 7)))
    ]
    rates = {
        d: draw(st.sampled_from([40.0, 100.0, 1000.0])) * MIB
        for d in DESTINATIONS
        if draw(st.booleans())
    }
    return {
        "vms": vms,
        "link_rate": draw(st.sampled_from([50.0, 120.0, 400.0, math.inf])) * MIB,
        "max_parallel": draw(st.integers(1, 5)),
        "max_incoming": draw(st.sampled_from([None, 1, 2])),
        "destination_rates": rates,
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(evacuations())
def test_every_plan_keeps_its_promises(case: dict[str, Any]) -> None:
    plan = plan_waves(**case)
    vms = {v.name: v for v in case["vms"]}
    link, rates = case["link_rate"], case["destination_rates"]
    # Every VM exactly once: in a wave or reported.
    scheduled = [m.name for m in plan.moves] + [u.name for u in plan.unschedulable]
    assert sorted(scheduled) == sorted(vms)
    assert [w.number for w in plan.waves] == list(range(1, len(plan.waves) + 1))
    ends = [w.start + w.duration for w in plan.waves]
    assert plan.makespan == pytest.approx(max(ends, default=0.0))
    slack = 1 + 1e-6
    for wave in plan.waves:
        assert wave.moves
        for move in wave.moves:
            assert move.wave == wave.number
            assert move.needed * (1 - 1e-6) <= move.rate <= vms[move.name].inputs.link_rate
            assert 0 <= move.predicted_duration <= wave.duration
            if move.bandwidth is not None:
                assert move.bandwidth % MIB == 0
                assert move.rate <= move.bandwidth * slack
        # At every start: the moves running then keep the limits, and their needs fit on
        # every link (so each gets at least its need, whatever ends).
        now = running_at(plan, wave.start)
        assert 1 <= len(now) <= case["max_parallel"]
        per_destination = Counter(m.destination for m in now)
        if case["max_incoming"] is not None:
            assert max(per_destination.values()) <= case["max_incoming"]
        assert sum(m.needed for m in now) <= link * slack
        for dest in per_destination:
            into = [m for m in now if m.destination == dest]
            assert sum(m.needed for m in into) <= rates.get(dest, math.inf) * slack
    assert [w.start for w in plan.waves] == sorted(w.start for w in plan.waves)
    # Reported exactly when it converges in no way the model knows, even alone.
    for reported in plan.unschedulable:
        inputs = vms[reported.name].inputs
        alone = min(inputs.link_rate, link, rates.get(reported.destination, math.inf))
        assert not predict(replace(inputs, link_rate=alone)).converges


async def test_a_replan_changes_predictions_not_how_the_links_are_divided() -> None:
    # The running evacuation's bookkeeping (tasks.dispatching.schedule): after a re-plan
    # that fears links four times slower, a VM planned before keeps its share of the links
    # as told (caps lowered by the fear would make the moves as slow as feared).
    vms = [vm("c1", 100, stream=50), vm("c2", 100, stream=50), vm("c3", 100, stream=50)]
    schedule = _Schedule(
        vms={v.name: v for v in vms},
        link_rate=100 * MIB,
        destination_rates={},
        max_parallel=2,
        max_incoming=4,
    )
    schedule.adopt(
        plan_waves(vms, link_rate=100 * MIB, max_parallel=2), started=[], unschedulable=[]
    )
    before = {n: s.member for n, s in schedule.steps.items()}
    seen = [Observation(name="c1", predicted=1.0, actual=4.0)]
    again = replan(vms[1:], seen, link_rate=100 * MIB, max_parallel=2, first_wave=2)
    schedule.adopt(again, started=["c1"], unschedulable=[])
    assert schedule.revision == 2
    assert {n: s.member for n, s in schedule.steps.items()} == before
    assert schedule.steps["c2"].predicted == pytest.approx(4 * before_prediction(vms[1]))
    assert schedule.links.out == 100 * MIB


def before_prediction(one: WaveVm) -> float:
    """``one``'s predicted duration alone on its stream."""
    return plan_waves([one], link_rate=math.inf, max_parallel=1).makespan


async def test_guests_that_converge_only_in_post_copy_rank_before_live_ones() -> None:
    """A post-copy guest needs only what moves its first pass in time, which says nothing of
    how hot it is: it still ranks first. The rig's evacuation (issue 18): with the sampled
    dirty rate's upper bound, two idle guests need a few per cent of the link to converge
    live and outranked dirty16 and dirty64 (post-copy, 0.1 %), which then waited for them."""
    idle = {"dirty_rate_bound": 6 * MIB, "dirty_period": 1.0}
    hot = {"post_copy_allowed": True, "completion_timeout": 120.0, "dirty_period": 1.0}
    vms = [
        vm("idle1", 1, **idle),
        vm("idle2", 1, **idle),
        vm("dirty16", 16, dirty=16, **hot),
        vm("dirty64", 64, dirty=66, **hot),
    ]
    plan = plan_waves(vms, link_rate=30 * MIB, max_parallel=2)
    assert names(plan)[0] == ["dirty16", "dirty64"]
    assert {m.name: m.mode for m in plan.moves}["idle1"] == "live"
