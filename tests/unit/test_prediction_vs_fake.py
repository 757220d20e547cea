"""The prediction model against the ``fake`` back-end driven by the real engine.

Each case runs one migration through ``engine._migrate_once`` (progress, convergence policy,
steering, completion timeout: the engine's own code) on a :class:`FakeMigrationJob`, then
compares the job's outcome with :func:`predict_run` given the fake's constants (setup,
shortest pass, switchover and post-copy costs, its +20 %-per-pass auto-converge, no page
rounding, no per-pass overhead).

Tolerance, and why any is needed: the model is exact where nothing is steered, so there the
completed passes must be equal. Where the engine steers (a downtime step, a post-copy
switch), it does so from a sample taken a few real milliseconds after a pass began, which
the ``time-scale`` stretches to a few simulated hundredths of a second, and the completion
timeout is checked on the wall clock every ``progress-interval``: then the passes may differ
by one. Durations (the job's final ``elapsed``, simulated) must agree within 3 % + 0.15 s
and downtimes within 3 % + 6 ms (the model adds post-copy's 5 ms pause to the duration, the
fake does not).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

import pytest
from engine_stub import RecordingContext

from asyncmigfra.hypervisor.base import MigrationRequest
from asyncmigfra.hypervisor.fake import FakeMigrationJob, create
from asyncmigfra.hypervisor.fake import migration as fake
from asyncmigfra.migration.engine import _migrate_once
from asyncmigfra.migration.plan import MigrationPlan, _downtime_schedule
from asyncmigfra.migration.prediction import (
    AutoConverge,
    MigrationCosts,
    PredictionInputs,
    RunMode,
    predict_run,
)
from asyncmigfra.settings import Settings

MIB = 1 << 20

#: The fake's model in the prediction's terms, read from the fake itself.
FAKE_COSTS = MigrationCosts(
    setup=fake._SETUP_TIME,
    storage_setup=0.0,  # the fake copies disks with no fixed cost
    min_pass=fake._MIN_PASS,
    pass_overhead=0.0,
    switchover=fake._SWITCHOVER_OVERHEAD_MS,
    post_copy_pause=fake._POSTCOPY_DOWNTIME_MS,
)
FAKE_THROTTLE = AutoConverge(
    initial=fake._THROTTLE_STEP,
    increment=fake._THROTTLE_STEP,
    maximum=fake._THROTTLE_MAX,
    trigger=0.0,
    checks_per_step=2,
    restart_count=False,
    period=0.0,
)


@dataclass(frozen=True)
class Case:
    memory_mib: int
    dirty_mib: float
    link_mib: float
    mode: RunMode = "live"
    max_downtime: int | None = None
    auto_converge: bool = False
    copy_storage: bool = False
    #: Simulated s; the engine's wall-clock limit is this over the time scale.
    timeout: float = 3000.0
    #: Simulated s per real s: passes must stay long enough (real ms) for the engine to
    #: judge each one from a sample taken at its start.
    scale: float = 10.0
    #: The engine steers: passes may differ by one (see the module).
    steered: bool = False


CASES = [
    pytest.param(Case(1024, 0, 1000), id="idle-1-pass"),
    pytest.param(Case(512, 50, 100, max_downtime=1000), id="half-the-link-6-passes"),
    pytest.param(Case(64, 95, 100, max_downtime=300, steered=True), id="stalls-raise-the-downtime"),
    pytest.param(
        Case(256, 200, 100, mode="post-copy", max_downtime=300, steered=True),
        id="hopeless-switches-to-post-copy",
    ),
    pytest.param(Case(256, 150, 100, auto_converge=True, scale=20.0), id="auto-converge-throttles"),
    pytest.param(Case(256, 0, 1000, copy_storage=True), id="disks-then-memory"),
    pytest.param(
        Case(256, 50, 100, mode="post-copy", max_downtime=30, timeout=4.0, steered=True),
        id="timeout-switches-to-post-copy",
    ),
]


@dataclass
class Context(RecordingContext):
    vm_name: str = "g"


def prediction_inputs(case: Case) -> PredictionInputs:
    return PredictionInputs(
        memory=case.memory_mib * MIB,
        link_rate=case.link_mib * MIB,
        dirty_rate=case.dirty_mib * MIB,
        completion_timeout=case.timeout,
        disk_bytes=1024 * MIB if case.copy_storage else 0,
        max_downtime=case.max_downtime,
        post_copy_allowed=case.mode == "post-copy",
        auto_converge=case.auto_converge,
        page_size=1,  # the fake dirties bytes, not pages
        costs=FAKE_COSTS,
        throttling=FAKE_THROTTLE,
    )


async def run_on_the_fake(case: Case, shared: dict[str, object]) -> tuple[Any, float]:
    """The engine's outcome and the job's final simulated ``elapsed``."""
    domain = {
        "name": "g",
        "memory": case.memory_mib * 1024,
        "dirty-rate": case.dirty_mib,
        "disks": {"vda": 1024},
    }
    options = {
        "time-scale": case.scale,
        "bandwidth": case.link_mib,
        "domains": [domain],
        "peers": {"b": None},
    }
    hypervisor = create(options, hostname="a", shared=shared)
    request = MigrationRequest(
        vm_name="g",
        destination="b",
        mode=case.mode,
        auto_converge=case.auto_converge,
        initial_downtime=_downtime_schedule(case.max_downtime)[0] if case.max_downtime else None,
        copy_storage="all" if case.copy_storage else "none",
    )
    plan = MigrationPlan(
        request=request,
        max_downtime=case.max_downtime,
        completion_timeout=case.timeout / case.scale,
        timeout_action="post-copy",
        retries=0,
        retry_delay=0.0,
        memory=case.memory_mib * MIB,
    )
    base = Settings()
    settings = replace(base, agent=replace(base.agent, progress_interval=0.02))
    ctx = Context()
    job = await hypervisor.begin_migration(request, ctx)  # type: ignore[arg-type]
    assert isinstance(job, FakeMigrationJob)
    async with asyncio.timeout(30):
        result = await _migrate_once(
            plan,
            ctx,  # type: ignore[arg-type]
            hypervisor=hypervisor,
            settings=settings,
            adopted=job,
        )
    final = await job.stats()
    assert final is not None
    return result, final.elapsed


@pytest.mark.parametrize("case", CASES)
async def test_the_model_agrees_with_the_engine_on_the_fake(
    case: Case, shared: dict[str, object]
) -> None:
    predicted = predict_run(prediction_inputs(case), case.mode)
    assert predicted.converges, predicted.blockers
    assert predicted.duration is not None
    assert predicted.downtime is not None

    result, elapsed = await run_on_the_fake(case, shared)

    assert result.post_copy == (predicted.end == "post-copy")
    passes = len(predicted.passes)
    if case.steered:
        assert abs(result.iterations - passes) <= 1, (result.iterations, passes)
    else:
        assert result.iterations == passes
    assert elapsed == pytest.approx(predicted.duration, rel=0.03, abs=0.15)
    assert result.downtime == pytest.approx(predicted.downtime, rel=0.03, abs=6.0)


async def test_the_cases_cover_what_the_model_distinguishes() -> None:
    """Every way a run converges, with and without steering, is among the cases."""
    runs = [predict_run(prediction_inputs(p.values[0]), p.values[0].mode) for p in CASES]
    assert {r.end for r in runs} == {"switchover", "post-copy"}
    assert {r.post_copy_by for r in runs} == {None, "policy", "timeout"}
    actions = {p.action for r in runs for p in r.passes}
    assert "raise-downtime" in actions
    assert any(p.throttle > 0 for r in runs for p in r.passes)
    assert any(r.disk_time > 0 for r in runs)
    assert max(len(r.passes) for r in runs) >= 6
