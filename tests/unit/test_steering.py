"""The engine's steering calls racing the job's end (found on the rig: a swap's idle half
failed ``vm-not-found`` because the downtime was raised just after the domain had left).

A scripted job stands in for the hypervisor: every pass stalls, and the test decides what
each steering call does. The engine is driven through ``_migrate_once`` with that job.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import pytest
from engine_stub import RecordingContext

from asyncmigfra.errors import ConnectionFailed, TaskCancelled, TaskTimeout, VmNotFound, WrongState
from asyncmigfra.hypervisor.base import JobStats, MigrationRequest, MigrationResult
from asyncmigfra.migration import steering
from asyncmigfra.migration.engine import _migrate_once
from asyncmigfra.migration.plan import MigrationPlan, _downtime_schedule
from asyncmigfra.settings import Settings

MIB = 1 << 20


@dataclass
class Context(RecordingContext):
    vm_name: str = "v"


class ScriptedJob:
    """A job whose every pass leaves the same 64 MiB, one pass per ``pass_time`` s.

    ``refuse`` maps a steering call (``set_max_downtime``, ``start_post_copy``,
    ``suspend_source``) to the error it raises; ``end_on`` names a call that ends the job
    (successfully) just before that error, as a domain leaving the source does.
    """

    def __init__(
        self,
        *,
        refuse: dict[str, Exception] | None = None,
        end_on: str | None = None,
        pass_time: float = 0.01,
    ) -> None:
        self.refuse = refuse or {}
        self.end_on = end_on
        self.pass_time = pass_time
        self.calls: list[str] = []
        #: Raised by the next ``stats()`` calls, one each (``end_on="stats"`` ends the job first).
        self.stats_errors: list[Exception] = []
        self.ended = asyncio.Event()
        self.outcome: MigrationResult | Exception = MigrationResult(iterations=1)
        self._started = asyncio.get_running_loop().time()
        self._last_iteration = 1

    @property
    def iteration(self) -> int:
        """One pass per ``pass_time`` s, frozen when the job ends."""
        if not self.ended.is_set():
            now = asyncio.get_running_loop().time()
            self._last_iteration = 1 + int((now - self._started) / self.pass_time)
        return self._last_iteration

    def finish(self, outcome: MigrationResult | Exception) -> None:
        self.outcome = outcome
        self.ended.set()

    async def _steer(self, name: str) -> None:
        self.calls.append(name)
        if name == self.end_on:
            self.finish(MigrationResult(iterations=self.iteration))
        if name in self.refuse:
            raise self.refuse[name]

    async def stats(self) -> JobStats | None:
        if self.stats_errors:
            self.calls.append("stats")
            if self.end_on == "stats":
                self.finish(MigrationResult(iterations=self.iteration))
            raise self.stats_errors.pop(0)
        return JobStats(
            phase="migrating",
            iteration=self.iteration,
            elapsed=self.iteration * self.pass_time,
            memory_total=256 * MIB,
            memory_processed=self.iteration * 64 * MIB,
            memory_remaining=64 * MIB,
            data_remaining=64 * MIB,
            dirty_rate=10 * MIB,
            transfer_rate=100 * MIB,
            expected_downtime=640.0,
        )

    async def wait_iteration(self, after: int) -> int:
        while self.iteration <= after and not self.ended.is_set():
            await asyncio.sleep(self.pass_time / 4)
        return self.iteration

    async def wait(self) -> MigrationResult:
        await self.ended.wait()
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    async def set_max_downtime(self, ms: int) -> None:
        await self._steer("set_max_downtime")

    async def start_post_copy(self) -> None:
        await self._steer("start_post_copy")

    async def suspend_source(self) -> None:
        await self._steer("suspend_source")

    async def abort(self) -> None:
        self.calls.append("abort")
        if not self.ended.is_set():
            self.finish(TaskCancelled("Migration failed: operation aborted"))


def plan(mode: str = "live", *, timeout: float = 30.0, action: str = "abort") -> MigrationPlan:
    return MigrationPlan(
        request=MigrationRequest(vm_name="v", destination="b", mode=mode),  # type: ignore[arg-type]
        max_downtime=300,
        completion_timeout=timeout,
        timeout_action=action,
        retries=0,
        retry_delay=0.0,
    )


def settings() -> Settings:
    defaults = Settings()
    return replace(defaults, agent=replace(defaults.agent, progress_interval=0.02))


GONE = VmNotFound("Domain not found: no domain with matching name 'v'")
NOT_MIGRATING = WrongState("Requested operation is not valid: domain is not being migrated")


@pytest.fixture(autouse=True)
def _quick_settle(monkeypatch):
    monkeypatch.setattr(steering, "STEER_SETTLE", 0.05)


async def run(p: MigrationPlan, job: ScriptedJob, ctx: Context) -> MigrationResult:
    async with asyncio.timeout(10):
        return await _migrate_once(p, ctx, hypervisor=None, settings=settings(), adopted=job)  # type: ignore[arg-type]


@pytest.mark.parametrize("error", [GONE, NOT_MIGRATING], ids=["no-domain", "not-migrating"])
async def test_raising_the_downtime_as_the_job_ends_is_no_failure(error):
    job = ScriptedJob(refuse={"set_max_downtime": error}, end_on="set_max_downtime")
    ctx = Context()
    result = await run(plan(), job, ctx)
    assert job.calls == ["set_max_downtime"]
    assert result.iterations >= 2
    assert ctx.events[-1]["percent"] == 100
    assert all(e.get("action") != "raise-downtime" for e in ctx.events), "it took no effect"


async def test_post_copy_started_as_the_job_ends_is_no_failure():
    job = ScriptedJob(refuse={"start_post_copy": GONE}, end_on="start_post_copy")
    ctx = Context()
    result = await run(replace(plan("post-copy"), max_downtime=None), job, ctx)
    assert job.calls == ["start_post_copy"]
    assert result.iterations >= 2
    assert "post-copy" not in ctx.phases


async def test_a_refused_downtime_step_is_retried_on_the_next_stall():
    """Refused while the job runs: the copy goes on, the step is not counted as taken."""
    job = ScriptedJob(refuse={"set_max_downtime": NOT_MIGRATING})
    ctx = Context()
    task = asyncio.ensure_future(run(plan(), job, ctx))
    while job.calls.count("set_max_downtime") < 3:
        await asyncio.sleep(0.01)
    assert not task.done()
    job.refuse.clear()
    job.end_on = "set_max_downtime"  # the next step is accepted, then the job completes
    await task
    assert job.calls.count("set_max_downtime") == 4
    raised = [e for e in ctx.events if e.get("action") == "raise-downtime"]
    assert len(raised) == 1, "only the accepted step is announced"
    assert raised[0]["max-downtime"] == first_step_above(plan().max_downtime)


async def test_a_refused_post_copy_lets_a_cancel_abort_the_job():
    """post-copy never started, so a cancel must abort (not wait for a post-copy end)."""
    job = ScriptedJob(refuse={"start_post_copy": NOT_MIGRATING})
    ctx = Context()
    task = asyncio.ensure_future(run(replace(plan("post-copy"), max_downtime=None), job, ctx))
    while "start_post_copy" not in job.calls:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "abort" in job.calls
    assert "post-copy" not in ctx.phases


@pytest.mark.parametrize(
    ("mode", "action", "call"),
    [("post-copy", "post-copy", "start_post_copy"), ("live", "suspend", "suspend_source")],
)
async def test_a_timeout_action_refused_while_the_job_runs_aborts_it(mode, action, call):
    job = ScriptedJob(refuse={call: NOT_MIGRATING, "set_max_downtime": NOT_MIGRATING})
    ctx = Context()
    with pytest.raises(TaskTimeout, match="completion-timeout"):
        await run(plan(mode, timeout=0.2, action=action), job, ctx)
    assert call in job.calls
    assert job.calls[-1] == "abort"


@pytest.mark.parametrize(
    ("mode", "action", "call"),
    [("post-copy", "post-copy", "start_post_copy"), ("live", "suspend", "suspend_source")],
)
async def test_a_timeout_action_refused_because_the_job_ended_is_no_failure(mode, action, call):
    job = ScriptedJob(refuse={call: GONE, "set_max_downtime": NOT_MIGRATING}, end_on=call)
    ctx = Context()
    result = await run(plan(mode, timeout=0.2, action=action), job, ctx)
    assert "abort" not in job.calls
    assert result.iterations >= 2


def first_step_above(max_downtime: int | None) -> int:
    assert max_downtime is not None
    return _downtime_schedule(max_downtime)[1]


async def test_a_sample_failing_as_the_job_ends_is_no_failure():
    job = ScriptedJob(end_on="stats")
    job.stats_errors = [GONE]
    ctx = Context()
    result = await run(plan(), job, ctx)
    assert job.calls == ["stats"]
    assert result.iterations >= 1
    assert ctx.events[-1]["percent"] == 100


async def test_samples_failing_while_the_job_runs_neither_fail_it_nor_go_backwards():
    """A connection hiccup: two samples fail, the events repeat the last figures, and the
    policy judges the pass once a sample succeeds again."""
    job = ScriptedJob(pass_time=0.05)
    ctx = Context()
    task = asyncio.ensure_future(run(plan(), job, ctx))
    async with asyncio.timeout(5):
        while not ctx.events:
            await asyncio.sleep(0.01)
        steps = job.calls.count("set_max_downtime")
        assert steps < 4, "a step is left for the policy to take after the hiccup"
        job.stats_errors = [ConnectionFailed("Error getting job statistics: end of file")] * 2
        while job.stats_errors:
            await asyncio.sleep(0.01)
        while job.calls.count("set_max_downtime") == steps:
            await asyncio.sleep(0.01)
    job.finish(MigrationResult(iterations=job.iteration))
    await task
    assert job.calls.count("stats") == 2
    iterations = [e["iteration"] for e in ctx.events if "memory-total" in e]
    assert iterations == sorted(iterations), "no event goes backwards"
    assert all(e["iteration"] != 0 for e in ctx.events[2:]), "a failed sample is no restart"
