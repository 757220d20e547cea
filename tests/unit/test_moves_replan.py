"""A predicted evacuation's moves planning the rest again as they run
(``asyncmigfra.tasks.dispatching.moving``, protocol §3.7): :class:`Moves` driven directly,
with stub moves (each ends when the test says), a stub planner that notes what it is asked
and a clock the test sets (the loop's own waits stay real).

``test_evacuation_waves`` proves the same on the fake back-end end to end; here the cases
that one cannot reach at will: a re-plan that takes long, a move stuck in its setup, moves
planned with an earlier re-plan's slowdown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import pytest

from asyncmigfra.migration.prediction import MigrationCosts, PredictionInputs
from asyncmigfra.model import ResultEntry
from asyncmigfra.tasks.dispatching import moving
from asyncmigfra.tasks.dispatching.moving import Moves
from asyncmigfra.tasks.dispatching.schedule import _Schedule, _Step
from asyncmigfra.tasks.shares import Member
from asyncmigfra.tasks.waves import Observation, WaveVm, slowdown

MIB = 1024 * 1024


class Clock:
    """``time.monotonic`` as :mod:`.moving` sees it: the real one, moved on by ``ahead`` s."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead


class Alone:
    """Reservations of an evacuation whose destinations have no agent: nothing to ask."""

    def __init__(self) -> None:
        self.held: dict[str, float] = {}
        self.short = False

    async def reserve(self, wanted: Mapping[str, float], capacities: Mapping[str, float]) -> None:
        pass

    async def probe(self, destinations: Collection[str]) -> None:
        pass

    def give_up(self, dest: str, why: str) -> None:
        pass


@dataclass
class Run:
    """One evacuation's :class:`Moves` with stubs: a move ends when :meth:`end` says so, a
    move shows data moving once it is in ``moving``, a re-plan notes what it was asked
    (``plans``) and does what the dispatcher's does to the predictions of a cold guest (the
    rest predicted ``slowdown(seen)`` times as long as with the links as told)."""

    schedule: _Schedule
    clock: Clock
    moving: set[str] = field(default_factory=set)
    plans: list[tuple[list[Observation], Observation]] = field(default_factory=list)
    #: s the clock moves on while a re-plan is made (a large evacuation's plan takes seconds).
    planning: float = 0.0
    ends: dict[str, asyncio.Event] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task[ResultEntry]] = field(default_factory=dict)
    told: dict[str, float] = field(default_factory=dict)
    #: Moves that end with an error.
    failing: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.told = {n: s.predicted or 0.0 for n, s in self.schedule.steps.items()}
        self.moves = Moves(
            schedule=self.schedule,
            move=self._move,
            steer=self._steer,
            moving=self._moving,
            replan=self._replan,
            reservations=Alone(),  # type: ignore[arg-type]
            tasks=self.tasks,
        )

    def end(self, name: str) -> None:
        self.ends.setdefault(name, asyncio.Event()).set()

    async def ended(self, name: str) -> None:
        """``name``'s move ends (its task is done)."""
        self.end(name)
        await asyncio.wait({self.tasks[name]})

    async def _move(self, name: str, bandwidth: int | None) -> ResultEntry:
        await self.ends.setdefault(name, asyncio.Event()).wait()
        if name in self.failing:
            return ResultEntry(vm_name=name, status="error", code="refused")
        return ResultEntry(vm_name=name, status="success")

    async def _steer(self, name: str, bandwidth: int | None) -> bool:
        return True

    async def _moving(self, name: str) -> bool:
        return name in self.moving

    async def _replan(
        self,
        pending: list[str],
        running: dict[str, float],
        seen: list[Observation],
        why: Observation,
    ) -> list[str]:
        self.plans.append((list(seen), why))
        self.clock.ahead += self.planning
        factor = slowdown(seen)
        self.schedule.slowdown = factor
        for name in pending:
            step = self.schedule.steps[name]
            self.schedule.steps[name] = replace(step, predicted=self.told[name] * factor)
        return pending


def schedule(*predicted: float, setup: float = 0.0) -> _Schedule:
    """Cold guests ``v0``, ``v1`` ... to one destination, predicted as given, one at a time."""
    costs = MigrationCosts(setup=setup, min_pass=0.0, pass_overhead=0.0, switchover=0.0)
    inputs = PredictionInputs(memory=MIB, link_rate=10 * MIB, completion_timeout=1e5, costs=costs)
    names = [f"v{i}" for i in range(len(predicted))]
    out = _Schedule(
        vms={n: WaveVm(name=n, destination="b", inputs=inputs) for n in names},
        link_rate=10 * MIB,
        destination_rates={},
        max_parallel=1,
        max_incoming=1,
    )
    out.steps = {
        n: _Step(n, "b", i + 1, None, p, member=Member(n, "b", i, 10 * MIB, MIB, MIB))
        for i, (n, p) in enumerate(zip(names, predicted, strict=True))
    }
    out.order = names
    return out


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(moving, "time", clock)
    return clock


@asynccontextmanager
async def stepping(run: Run) -> AsyncIterator[asyncio.TaskGroup]:
    """A task group for the moves, which are all ended when the test is done."""
    async with asyncio.TaskGroup() as tg:
        try:
            yield tg
        finally:
            for name in run.schedule.order:
                run.end(name)


async def test_a_replan_due_while_the_planner_ran_is_made_without_waiting_for_a_move_to_end(
    clock: Clock,
) -> None:
    # v0 is stuck; v1 waits for it (one move at a time). At 1.5 times v0's prediction the
    # rest is planned again; that plan takes 2 s, and meanwhile v0's time shows the links
    # more than 1.5 times slower again: that step is planned again at once, not when v0
    # ends (a stuck move may never).
    run = Run(schedule(0.5, 0.5), clock, planning=2.0)
    run.moving.update({"v0", "v1"})
    run.end("v1")

    async def main() -> None:
        async with asyncio.TaskGroup() as tg:
            await run.moves.run(tg)

    async def release_v0_after_two_plans() -> None:
        while len(run.plans) < 2:
            await asyncio.sleep(0.05)
        run.end("v0")

    async with asyncio.TaskGroup() as outer:
        outer.create_task(main())
        waiting = outer.create_task(release_v0_after_two_plans())
        # Only a guard: without a wake, run() waits for v0 to end, and v0 ends after it.
        await asyncio.wait({waiting}, timeout=5)
        waiting.cancel()
        run.end("v0")
    assert len(run.plans) >= 2
    assert [(why.name, why.finished) for _, why in run.plans[:2]] == [("v0", False)] * 2
    assert slowdown(run.plans[1][0]) >= 1.5 * slowdown(run.plans[0][0])


async def test_a_move_still_in_its_setup_tells_nothing_of_the_links(clock: Clock) -> None:
    # v0 (predicted 1 s, 0.5 s of it setup) has run 1.6 s and its job shows nothing sent
    # yet (a loaded host's setup can take several times as long): no byte crossed the
    # links, so it says nothing of how fast they are, and the rest is not planned for links
    # (1.6 - 0.5) / (1 - 0.5) = 2.2 times slower.
    run = Run(schedule(1.0, 1.0, setup=0.5), clock)
    async with stepping(run) as tg:
        await run.moves._start(tg)
        await run.moves._setups_ended()
        clock.ahead += 1.6
        await run.moves._setups_ended()
        await run.moves._ended()
        assert run.plans == []
        # Once it moves, it does tell: it has run 2.4 s, far past its prediction.
        run.moving.add("v0")
        clock.ahead += 0.8
        await run.moves._setups_ended()
        await run.moves._ended()
    assert [why.name for _, why in run.plans] == ["v0"]


async def test_moves_predicted_after_a_replan_count_against_the_links_as_told(
    clock: Clock,
) -> None:
    # The links are twice as slow as told. v0 takes 2x its prediction: the rest is planned
    # for links 2x slower. v1 then takes what it was predicted (2 s: 2x the links as told),
    # and v2 crawls on to 5.2 s (2.6 times its 2 s): the moves so far show the links
    # (2 + 2 + 5.2) / 3 = 3.07 times slower than told, over 1.5 times what the plan assumes:
    # the rest is planned again, for links 3.07 times slower (taken together with v1's 2 s predicted
    # after the re-plan, as before this was fixed, they would have looked 1.8 times slower:
    # faster than every move showed).
    run = Run(schedule(1.0, 1.0, 1.0, 1.0), clock)
    run.moving.update(run.schedule.order)
    async with stepping(run) as tg:
        await run.moves._start(tg)
        clock.ahead += 2.0
        await run.ended("v0")
        await run.moves._ended()
        assert run.schedule.steps["v1"].predicted == pytest.approx(2.0, rel=0.01)
        await run.moves._start(tg)
        clock.ahead += 2.0
        await run.ended("v1")
        await run.moves._ended()
        assert [why.name for _, why in run.plans] == ["v0"]  # v1 was on time
        await run.moves._start(tg)
        await run.moves._setups_ended()
        clock.ahead += 4.4
        await run.moves._ended()
        assert [why.name for _, why in run.plans] == ["v0"]  # 2.8x: not 1.5 times 2 yet
        clock.ahead += 0.8
        await run.moves._ended()
    assert [why.name for _, why in run.plans] == ["v0", "v2"]
    seen, why = run.plans[1]
    assert not why.finished
    assert slowdown(seen) == pytest.approx(9.2 / 3, rel=0.01)
    assert run.schedule.steps["v3"].predicted == pytest.approx(9.2 / 3, rel=0.01)


async def test_a_failed_move_tells_nothing_of_the_links(clock: Clock) -> None:
    # v0 fails at once (the destination refused it): that is not a migration four times
    # faster than predicted, and nothing is planned again.
    run = Run(schedule(1.0, 1.0, 1.0), clock)
    run.moving.update(run.schedule.order)
    run.failing.add("v0")
    async with stepping(run) as tg:
        await run.moves._start(tg)
        clock.ahead += 0.1
        await run.ended("v0")
        await run.moves._ended()
    assert run.plans == []


async def test_a_move_an_operator_capped_tells_nothing_of_the_links(clock: Clock) -> None:
    # An operator held v0 to 1 MiB/s with tune migration: it crawls, as asked; the links are
    # not slower for that, and nothing is planned again, while it runs or when it ends.
    run = Run(schedule(1.0, 1.0, 1.0), clock)
    run.moving.update(run.schedule.order)
    run.moves._operator_cap = lambda name: 1 if name == "v0" else None
    async with stepping(run) as tg:
        await run.moves._start(tg)
        await run.moves._setups_ended()
        run.moves._recap()  # (an operator's cap is looked at as the loop goes round)
        clock.ahead += 6.0
        await run.moves._ended()
        await run.ended("v0")
        await run.moves._ended()
    assert run.plans == []


async def test_a_crawling_move_is_not_taken_for_nearly_done(clock: Clock) -> None:
    # v0, predicted 2 s for the links as told, has run 1 s. A re-plan for links as told takes
    # it for half done; one for links four times slower for an eighth done (its work takes
    # four times as long), not for nearly done as its own prediction would have it.
    run = Run(schedule(2.0, 1.0), clock)
    async with stepping(run) as tg:
        await run.moves._start(tg)
        clock.ahead += 1.0
        now = clock.monotonic()
        assert run.moves._progress(now, 1.0) == {"v0": pytest.approx(0.5, rel=0.01)}
        assert run.moves._progress(now, 4.0) == {"v0": pytest.approx(0.125, rel=0.01)}
        clock.ahead += 9.0  # never more than 0.95: it has not ended
        assert run.moves._progress(clock.monotonic(), 1.0) == {"v0": 0.95}
