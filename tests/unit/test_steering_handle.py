"""Issue 17: :class:`MigrationSteering`, the handle ``tune migration`` reaches, on its own: the
order of the calls, what the policy learns, the announcement for the next progress event,
and the races (the job ending under a call, the engine holding the lock, a half-applied
change)."""

from __future__ import annotations

import asyncio

import pytest

from asyncmigfra.errors import Busy, HypervisorError, NotSupported, VmNotFound, WrongState
from asyncmigfra.hypervisor.base import JobStats, MigrationResult
from asyncmigfra.migration import steering as steering_module
from asyncmigfra.migration.policy import ConvergencePolicy
from asyncmigfra.migration.steering import MigrationSteering, Tuning


class Job:
    """Records the steering calls; ``refuse`` maps a call to the error it raises."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.refuse: dict[str, Exception] = {}

    async def _call(self, name: str, *args: object) -> None:
        self.calls.append((name, *args))
        if name in self.refuse:
            raise self.refuse[name]

    async def stats(self) -> JobStats | None:
        return None

    async def wait_iteration(self, after: int) -> int:
        return after

    async def wait(self) -> MigrationResult:
        raise NotImplementedError

    async def set_max_downtime(self, ms: int) -> None:
        await self._call("set_max_downtime", ms)

    async def set_bandwidth(self, mibs: int, *, post_copy: bool = False) -> None:
        await self._call("set_bandwidth", mibs, post_copy)

    async def start_post_copy(self) -> None:
        await self._call("start_post_copy")

    async def suspend_source(self) -> None:
        await self._call("suspend_source")

    async def abort(self) -> None:
        await self._call("abort")


@pytest.fixture(autouse=True)
def _quick_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(steering_module, "STEER_SETTLE", 0.01)


def handle(
    *, mode: str = "post-copy", max_downtime: int | None = 300
) -> tuple[MigrationSteering, Job, ConvergencePolicy, list[str], asyncio.Future[MigrationResult]]:
    job = Job()
    policy = ConvergencePolicy(max_downtime=max_downtime, post_copy_allowed=mode == "post-copy")
    phases: list[str] = []
    done: asyncio.Future[MigrationResult] = asyncio.get_running_loop().create_future()
    steering = MigrationSteering(
        vm_name="v",
        job=job,
        done=done,
        policy=policy,
        migration_type=mode,
        on_phase=phases.append,
    )
    return steering, job, policy, phases, done


async def test_every_change_in_order_and_announced_once() -> None:
    steering, job, policy, phases, _ = handle()
    applied = await steering.tune(Tuning(bandwidth=0, max_downtime=900, post_copy=True))
    assert applied == {"bandwidth": 0, "max-downtime": 900, "post-copy": True}
    assert job.calls == [
        ("set_bandwidth", 0, False),
        ("set_max_downtime", 900),
        ("start_post_copy",),
    ]
    assert (policy.downtime, policy.operator_downtime, policy.post_copy_started) == (
        900,
        900,
        True,
    )
    assert phases == ["post-copy"]
    assert steering.wake.is_set(), "the engine publishes the event at once"
    assert steering.take_announcement() == {
        "action": "tuned",
        "bandwidth": 0,
        "max-downtime": 900,
        "post-copy": True,
    }
    assert steering.take_announcement() is None


async def test_bandwidth_in_post_copy_is_the_post_copy_cap() -> None:
    steering, job, policy, _, _ = handle()
    policy.post_copy_started = True
    await steering.tune(Tuning(bandwidth=64))
    assert job.calls == [("set_bandwidth", 64, True)]


async def test_force_complete_pauses_the_source_once() -> None:
    steering, job, policy, phases, _ = handle(mode="live")
    assert await steering.tune(Tuning(force_complete=True)) == {"force-complete": True}
    assert await steering.tune(Tuning(force_complete=True)) == {"force-complete": True}
    assert job.calls == [("suspend_source",)]
    assert (policy.force_completed, policy.source_suspended) == (True, True)
    assert phases == ["suspended-copy"]


async def test_post_copy_twice_is_one_switch() -> None:
    steering, job, _, _, _ = handle()
    await steering.tune(Tuning(post_copy=True))
    assert await steering.tune(Tuning(post_copy=True)) == {"post-copy": True}
    assert job.calls == [("start_post_copy",)]


@pytest.mark.parametrize(
    ("setup", "tuning", "error", "text"),
    [
        ("live", Tuning(post_copy=True), NotSupported, "started with migration-type live"),
        ("in-post-copy", Tuning(force_complete=True), WrongState, "is in post-copy"),
        ("suspended", Tuning(post_copy=True), WrongState, "is paused on the source"),
    ],
)
async def test_contradictions_are_refused_before_anything_changes(
    setup: str, tuning: Tuning, error: type[Exception], text: str
) -> None:
    steering, job, policy, _, _ = handle(mode="live" if setup == "live" else "post-copy")
    if setup == "in-post-copy":
        policy.post_copy_started = True
    if setup == "suspended":
        policy.source_suspended = True
    with pytest.raises(error, match=text):
        await steering.tune(Tuning(bandwidth=5, max_downtime=50, **_flags(tuning)))
    assert job.calls == [], "nothing was applied"
    assert steering.take_announcement() is None


def _flags(tuning: Tuning) -> dict[str, bool]:
    return {"post_copy": tuning.post_copy, "force_complete": tuning.force_complete}


async def test_a_tune_after_the_job_ended_is_wrong_state() -> None:
    steering, job, _, _, done = handle()
    done.set_result(MigrationResult())  # the domain left: the job is over
    with pytest.raises(WrongState, match="is ending; it can no longer change"):
        await steering.tune(Tuning(bandwidth=5))
    assert job.calls == []


async def test_a_call_the_job_ends_under_is_wrong_state() -> None:
    steering, job, _, _, done = handle()
    loop = asyncio.get_running_loop()

    async def ends_then_refuses(name: str, *args: object) -> None:
        loop.call_soon(done.set_result, MigrationResult())
        raise VmNotFound("Domain not found: no domain with matching name 'v'")

    job._call = ends_then_refuses  # type: ignore[method-assign]
    with pytest.raises(WrongState, match="ended before the change took effect"):
        await steering.tune(Tuning(max_downtime=500))


async def test_a_half_applied_change_says_what_was_applied() -> None:
    steering, job, policy, _, _ = handle()
    job.refuse["set_max_downtime"] = HypervisorError("invalid argument: downtime too large")
    with pytest.raises(HypervisorError) as info:
        await steering.tune(Tuning(bandwidth=30, max_downtime=10**9))
    assert str(info.value) == "invalid argument: downtime too large (already applied: bandwidth 30)"
    assert policy.operator_downtime is None
    assert steering.take_announcement() == {"action": "tuned", "bandwidth": 30}


async def test_a_refused_post_copy_is_forgotten() -> None:
    steering, job, policy, phases, _ = handle()
    job.refuse["start_post_copy"] = HypervisorError("post-copy can start only once memory moves")
    with pytest.raises(HypervisorError):
        await steering.tune(Tuning(post_copy=True))
    assert not policy.post_copy_started, "a cancel must still abort"
    assert phases == []


async def test_the_engine_holding_the_lock_makes_the_tune_wait_then_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steering, job, _, _, _ = handle()
    monkeypatch.setattr(steering_module, "LOCK_WAIT", 0.05)
    async with steering.lock:
        with pytest.raises(Busy, match="busy changing its job; send the tune again"):
            await steering.tune(Tuning(bandwidth=5))
    assert job.calls == []
    # Released in time: the tune goes through after the engine's call.
    await steering.lock.acquire()
    task = asyncio.ensure_future(steering.tune(Tuning(bandwidth=5)))
    await asyncio.sleep(0.01)
    assert not task.done()
    steering.lock.release()
    assert await task == {"bandwidth": 5}


async def test_nothing_changes_once_the_engine_aborts() -> None:
    steering, job, _, _, _ = handle()
    steering.closing = True
    with pytest.raises(WrongState, match="it can no longer change"):
        await steering.tune(Tuning(bandwidth=5))
    assert job.calls == []
