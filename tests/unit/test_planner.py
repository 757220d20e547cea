"""Where a predicted evacuation's plan is computed (``tasks.dispatching.planner``): a few VMs
in a thread, many in a process of their own (the same plan), bounded in time, ended when
nobody waits for it; and the planner's window keeps a large plan's cost bounded."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from asyncmigfra.migration.prediction import PredictionInputs
from asyncmigfra.tasks import shares
from asyncmigfra.tasks.dispatching.planner import Planner
from asyncmigfra.tasks.waves import WaveVm, plan_waves, replan

MIB = 1024 * 1024


def guests(n: int, seed: int = 3) -> list[WaveVm]:
    rnd = random.Random(seed)
    return [
        WaveVm(
            name=f"vm{i:03d}",
            destination=f"d{i % 3}",
            inputs=PredictionInputs(
                memory=rnd.choice((256, 512, 1024)) * MIB,
                link_rate=1000 * MIB,
                dirty_rate=rnd.choice((0, 0, 20, 400)) * MIB,
                completion_timeout=600.0,
            ),
        )
        for i in range(n)
    ]


LIMITS = {"link_rate": 1250 * MIB, "max_parallel": 4, "max_incoming": 2}


async def test_a_large_plan_is_computed_in_a_process_and_is_the_same_plan() -> None:
    vms = guests(40)
    planner = Planner(in_thread_up_to=8)
    seen: list[int] = []
    ticks = asyncio.create_task(_count(seen))
    in_process = await planner.run(len(vms), plan_waves, vms, **LIMITS)
    ticks.cancel()
    assert in_process == plan_waves(vms, **LIMITS)
    assert len(in_process.moves) == 40
    assert seen  # the loop ran meanwhile


async def test_a_replan_too() -> None:
    vms = guests(12)
    got = await Planner(in_thread_up_to=1).run(len(vms), replan, vms, [], **LIMITS)
    assert got == replan(vms, [], **LIMITS)


async def test_what_the_plan_raises_is_raised() -> None:
    vms = guests(4)
    with pytest.raises(ValueError, match="max_parallel must be >= 1"):
        await Planner(in_thread_up_to=1).run(4, plan_waves, vms, link_rate=1.0, max_parallel=0)


async def test_only_the_planners_functions_run_in_the_process() -> None:
    with pytest.raises(ValueError, match="cannot be planned in a process"):
        await Planner(in_thread_up_to=0).run(1, time.sleep, 0)


async def test_a_plan_that_takes_too_long_is_given_up() -> None:
    vms = guests(300)
    planner = Planner(within=0.2, in_thread_up_to=1)
    with pytest.raises(TimeoutError):
        await planner.run(len(vms), plan_waves, vms, **LIMITS)


async def test_the_window_bounds_what_one_moment_weighs() -> None:
    queue = [shares.Member(f"m{i}", "d", i, 100.0, 1.0, 1.0) for i in range(100)]
    window = shares._window(queue)
    assert len(window) == 2 * shares.WINDOW
    assert window[0] is queue[0]  # the hottest ...
    assert window[-1] is queue[-1]  # ... and the coldest
    assert shares._window(queue[:10]) == queue[:10]


async def _count(seen: list[int]) -> None:
    while True:
        await asyncio.sleep(0.01)
        seen.append(1)
