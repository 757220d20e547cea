"""Issue 17: ``progress-timeout``, through the engine.

With the ``fake`` back-end's ``migrate-stall`` fault (the stream stops half-way through the
first pass, as a cut network does), and with a controlled job for what the fake cannot show:
samples that fail (a connection hiccup), a job that stalls in post-copy. The limits are in
the agent's (wall-clock) seconds, so they are small here; the fake's simulated time runs
faster than that.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Any

import pytest
from engine_stub import RecordingContext

from asyncmigfra.errors import ConnectionFailed, TaskCancelled, TaskTimeout
from asyncmigfra.hypervisor.base import DomainState, JobStats, MigrationRequest, MigrationResult
from asyncmigfra.hypervisor.fake import FakeHypervisor, create
from asyncmigfra.migration import steering
from asyncmigfra.migration.engine import _migrate_once, migrate
from asyncmigfra.migration.plan import MigrationPlan
from asyncmigfra.model import MigrateSpec, MigrationParams
from asyncmigfra.settings import Settings

MIB = 1 << 20


@dataclass
class EngineCtx(RecordingContext):
    vm_name: str = "v"


def settings(**migration: Any) -> Settings:
    base = Settings()
    return replace(
        base,
        hostname="a",
        agent=replace(base.agent, progress_interval=0.02),
        migration=replace(base.migration, **migration),
    )


@pytest.fixture(autouse=True)
def _quick_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(steering, "STEER_SETTLE", 0.01)


# ------------------------------------------------------------------------ the fake's stall


@pytest.fixture
def a(shared: dict[str, object]) -> FakeHypervisor:
    domains = [{"name": "v", "memory": 256 * 1024, "dirty-rate": 20}]
    hv = create(
        {"time-scale": 100.0, "domains": domains, "peers": {"b": None}},
        hostname="a",
        shared=shared,
    )
    create({"time-scale": 100.0}, hostname="b", shared=shared)
    return hv


def spec(**params: Any) -> MigrateSpec:
    params.setdefault("migration_type", "live")
    return MigrateSpec(vm_name="v", destination="b", parameter=MigrationParams(**params))


async def test_a_stalled_stream_is_aborted_after_progress_timeout(a: FakeHypervisor) -> None:
    a.inject("migrate-stall")
    ctx = EngineCtx()
    started = time.monotonic()
    with pytest.raises(TaskTimeout) as info:
        async with asyncio.timeout(10):
            await migrate(
                spec(progress_timeout=0.3, bandwidth=100), ctx, hypervisor=a, settings=settings()
            )  # type: ignore[arg-type]
    assert str(info.value) == (
        "migration moved no data for 0.3 s (progress-timeout); it was aborted and the VM keeps"
        " running on the source"
    )
    assert info.value.code == "timeout"
    assert a.cluster.locate("v") == ["a"]
    assert a.host.domains["v"].state is DomainState.RUNNING
    (abort,) = ctx.with_action("abort")
    assert abort["reason"] == "progress-timeout"
    assert abort is ctx.events[-1], "no event after the abort's"
    # The stall began ~1.3 simulated seconds (13 ms) in; the limit counts from the last
    # sample whose bytes grew.
    moved = [t for e, t in zip(ctx.events, ctx.times, strict=True) if e.get("transfer-rate")]
    assert moved, "the job moved data before it stalled"
    waited = ctx.times[-1] - moved[-1]
    assert 0.3 <= waited < 1.0
    assert ctx.times[-1] - started < 2.0


async def test_progress_timeout_with_suspend_pauses_then_aborts(a: FakeHypervisor) -> None:
    a.inject("migrate-stall")
    ctx = EngineCtx()
    plan_args = {"progress_timeout": 0.2, "bandwidth": 100, "timeout_action": "suspend"}
    with pytest.raises(TaskTimeout, match="progress-timeout"):
        async with asyncio.timeout(10):
            await migrate(spec(**plan_args), ctx, hypervisor=a, settings=settings())  # type: ignore[arg-type]
    (suspend,) = ctx.with_action("suspend")
    assert suspend["reason"] == "progress-timeout"
    (abort,) = ctx.with_action("abort")
    assert abort["reason"] == "progress-timeout"
    assert "suspended-copy" in ctx.phases
    # Paused for the copy, then resumed when the stalled job was aborted.
    assert a.host.domains["v"].state is DomainState.RUNNING
    between = ctx.times[ctx.events.index(abort)] - ctx.times[ctx.events.index(suspend)]
    assert between >= 0.2, "a full period after the suspend"


async def test_progress_timeout_with_post_copy_that_cannot_start_aborts(
    a: FakeHypervisor,
) -> None:
    """The fake refuses post-copy over a stream that moves nothing: then it acts like abort."""
    a.inject("migrate-stall")
    ctx = EngineCtx()
    params = {
        "migration_type": "post-copy",
        "progress_timeout": 0.2,
        "bandwidth": 100,
        "timeout_action": "post-copy",
    }
    with pytest.raises(TaskTimeout, match="progress-timeout"):
        async with asyncio.timeout(10):
            await migrate(spec(**params), ctx, hypervisor=a, settings=settings())  # type: ignore[arg-type]
    assert "post-copy" not in ctx.phases
    assert ctx.with_action("abort")[0]["reason"] == "progress-timeout"
    assert a.cluster.locate("v") == ["a"]


async def test_a_slow_copy_that_moves_data_is_no_stall(a: FakeHypervisor) -> None:
    a.time_scale = 3.0  # 256 MiB at 100 MiB/s: ~0.9 s real, far above the 0.2 s limit
    ctx = EngineCtx()
    async with asyncio.timeout(10):
        await migrate(
            spec(progress_timeout=0.2, bandwidth=100), ctx, hypervisor=a, settings=settings()
        )  # type: ignore[arg-type]
    assert a.cluster.locate("v") == ["b"]
    assert not ctx.with_action("abort")
    assert ctx.events[-1]["phase"] == "completed"


async def test_progress_timeout_0_is_off_and_the_completion_timeout_says_its_reason(
    a: FakeHypervisor,
) -> None:
    a.inject("migrate-stall")
    ctx = EngineCtx()
    params = {"progress_timeout": 0, "completion_timeout": 0.4, "bandwidth": 100}
    with pytest.raises(TaskTimeout, match=r"did not complete within 0\.4 s \(completion-timeout\)"):
        async with asyncio.timeout(10):
            await migrate(spec(**params), ctx, hypervisor=a, settings=settings())  # type: ignore[arg-type]
    (abort,) = ctx.with_action("abort")
    assert abort["reason"] == "completion-timeout"


async def test_the_config_default_applies(a: FakeHypervisor) -> None:
    a.inject("migrate-stall")
    ctx = EngineCtx()
    with pytest.raises(TaskTimeout, match=r"no data for 0\.25 s"):
        async with asyncio.timeout(10):
            await migrate(
                spec(bandwidth=100), ctx, hypervisor=a, settings=settings(progress_timeout=0.25)
            )  # type: ignore[arg-type]


# -------------------------------------------------------------------- a controlled job


class ControlledJob:
    """A job whose bytes, phase and sample failures the test sets."""

    def __init__(self) -> None:
        self.processed = 0
        self.fail = False
        self.phase = "migrating"
        self.calls: list[str] = []
        self.ended = asyncio.Event()
        self.outcome: MigrationResult | Exception = MigrationResult(iterations=1)
        self._t0 = time.monotonic()

    def finish(self, outcome: MigrationResult | Exception) -> None:
        self.outcome = outcome
        self.ended.set()

    async def stats(self) -> JobStats | None:
        if self.fail:
            self.calls.append("stats-failed")
            raise ConnectionFailed("Error getting job statistics: end of file")
        return JobStats(
            phase=self.phase,
            iteration=1,
            elapsed=time.monotonic() - self._t0,
            memory_total=1 << 30,
            memory_processed=self.processed,
            memory_remaining=(1 << 30) - self.processed,
            data_remaining=(1 << 30) - self.processed,
            dirty_rate=0,
            transfer_rate=0,
        )

    async def wait_iteration(self, after: int) -> int:
        if after < 1:
            return 1
        await self.ended.wait()
        return 1

    async def wait(self) -> MigrationResult:
        await self.ended.wait()
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    async def set_max_downtime(self, ms: int) -> None:
        self.calls.append("set_max_downtime")

    async def set_bandwidth(self, mibs: int, *, post_copy: bool = False) -> None:
        self.calls.append("set_bandwidth")

    async def start_post_copy(self) -> None:
        self.calls.append("start_post_copy")

    async def suspend_source(self) -> None:
        self.calls.append("suspend_source")

    async def abort(self) -> None:
        self.calls.append("abort")
        if not self.ended.is_set():
            self.finish(TaskCancelled("Migration failed: operation aborted"))


def plan(*, progress_timeout: float, mode: str = "live") -> MigrationPlan:
    return MigrationPlan(
        request=MigrationRequest(vm_name="v", destination="b", mode=mode),  # type: ignore[arg-type]
        max_downtime=None,
        completion_timeout=30.0,
        timeout_action="abort",
        retries=0,
        retry_delay=0.0,
        progress_timeout=progress_timeout,
    )


def run(p: MigrationPlan, job: ControlledJob, ctx: EngineCtx) -> asyncio.Task[MigrationResult]:
    return asyncio.ensure_future(
        _migrate_once(p, ctx, hypervisor=None, settings=settings(), adopted=job)  # type: ignore[arg-type]
    )


async def feed(job: ControlledJob, seconds: float, step: int = MIB) -> None:
    """Move data for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        job.processed += step
        await asyncio.sleep(0.01)


async def test_failed_samples_are_no_progress_and_the_timer_runs_from_the_last_growth() -> None:
    job = ControlledJob()
    ctx = EngineCtx()
    task = run(plan(progress_timeout=0.4), job, ctx)
    await feed(job, 0.2)
    last_growth = time.monotonic()
    job.processed += MIB  # the last growth, seen by the next good sample
    await asyncio.sleep(0.05)
    job.fail = True  # from now on no sample can be read: the bytes might move or not
    with pytest.raises(TaskTimeout, match="progress-timeout"):
        async with asyncio.timeout(5):
            await task
    aborted_after = ctx.times[-1] - last_growth
    assert 0.4 <= aborted_after < 0.9, aborted_after
    assert job.calls.count("stats-failed") >= 3
    assert job.calls[-1] == "abort"


async def test_a_hiccup_shorter_than_the_limit_does_not_abort() -> None:
    job = ControlledJob()
    ctx = EngineCtx()
    task = run(plan(progress_timeout=0.5), job, ctx)
    await feed(job, 0.1)
    job.fail = True
    await asyncio.sleep(0.3)
    job.fail = False
    await feed(job, 0.4)  # a good sample sees the bytes grown: the timer starts over
    await asyncio.sleep(0.3)  # stalls for less than the limit
    job.finish(MigrationResult(iterations=1))
    async with asyncio.timeout(5):
        await task
    assert "abort" not in job.calls
    assert ctx.events[-1]["phase"] == "completed"


async def test_no_progress_timeout_once_in_post_copy() -> None:
    job = ControlledJob()
    ctx = EngineCtx()
    task = run(plan(progress_timeout=0.15, mode="post-copy"), job, ctx)
    await feed(job, 0.05)
    job.phase = "post-copy"  # nothing can stop post-copy: the stall is waited out
    await asyncio.sleep(0.5)
    assert not task.done()
    job.finish(MigrationResult(iterations=1, post_copy=True))
    async with asyncio.timeout(5):
        result = await task
    assert result.post_copy
    assert "abort" not in job.calls
    assert not ctx.with_action("abort")
