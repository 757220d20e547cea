"""The ``fake`` back-end: the checks before a migration, and the simulated migration.

Migrations run with a large ``time-scale`` so the simulated seconds pass in milliseconds;
assertions use the simulated quantities (iterations, downtime, bytes), never the wall clock.

Every test is ``async`` (see test_hypervisor_fake.py for why).
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
from fake_hypervisor_support import SCALE, Ctx, GiB_KIB, MiB, begin, make, req, running_stats, state

from asyncmigfra.errors import (
    Busy,
    ConnectionFailed,
    HypervisorError,
    IncompatibleDestination,
    MigrationFailed,
    TaskCancelled,
    VmNotFound,
    WrongState,
)
from asyncmigfra.hypervisor.base import DomainState, JobStats, MigrationJob
from asyncmigfra.hypervisor.fake import FakeHypervisor
from asyncmigfra.model import StartSpec

# --------------------------------------------------------------------------------------------
# Migration: checks before anything moves


async def test_migration_refusals(a: FakeHypervisor, b: FakeHypervisor) -> None:
    with pytest.raises(VmNotFound, match="no domain with matching name 'ghost'"):
        await begin(a, "ghost")
    with pytest.raises(WrongState, match=r"^Wrong domain state: 5$"):
        await begin(a, "off")
    with pytest.raises(ConnectionFailed, match="'nowhere'"):
        await begin(a, "idle", destination="nowhere")
    with pytest.raises(HypervisorError) as same:
        await begin(a, "idle", destination="a")
    assert str(same.value) == "Attempt to migrate guest to the same host"
    with pytest.raises(IncompatibleDestination, match="not enough free memory on small"):
        await begin(a, "idle", destination="small")
    b.host.domains["idle"] = a.host.domains["idle"].copy_definition()
    await b.start(StartSpec(vm_name="idle"), Ctx())
    with pytest.raises(IncompatibleDestination, match="domain 'idle' is already active on b"):
        await begin(a, "idle")
    assert not a.cluster.jobs


async def test_incoming_migrations_reserve_memory(shared: dict[str, object]) -> None:
    hv = make(
        shared,
        domains=[{"name": "v1", "memory": GiB_KIB}, {"name": "v2", "memory": GiB_KIB}],
        peers={"c": {"memory": int(1.5 * GiB_KIB)}},
    )
    job = await begin(hv, "v1", destination="c", bandwidth=1)
    assert hv.cluster.hosts["c"].free_memory() == GiB_KIB // 2
    with pytest.raises(IncompatibleDestination, match="not enough free memory on c"):
        await begin(hv, "v2", destination="c")
    with pytest.raises(Busy, match="migration job running"):
        await begin(hv, "v1", destination="c")
    with pytest.raises(Busy):
        await hv.stop("v1", Ctx(), force=True)
    # c's own agent cannot boot a same-named definition while the guest is coming in.
    c = make(shared, "c", domains=[{"name": "v1", "state": "shutoff", "memory": 1024}])
    with pytest.raises(Busy, match="being migrated to c"):
        await c.start(StartSpec(vm_name="v1"), Ctx())
    await job.abort()
    assert hv.cluster.hosts["c"].free_memory() == int(1.5 * GiB_KIB)
    await c.start(StartSpec(vm_name="v1"), Ctx())
    assert state(c, "v1") is DomainState.RUNNING


async def test_injected_migrate_failure_at_begin(a: FakeHypervisor, b: FakeHypervisor) -> None:
    a.inject("migrate")
    with pytest.raises(HypervisorError, match=r"^injected failure$"):
        await begin(a, "idle")
    assert not a.cluster.jobs
    job = await begin(a, "idle")
    assert (await job.wait()).iterations == 1


# --------------------------------------------------------------------------------------------
# Migration: the simulation


async def test_idle_guest_converges_in_one_pass(a: FakeHypervisor, b: FakeHypervisor) -> None:
    a.time_scale = 10.0  # 1 GiB at 1000 MiB/s: ~100 ms real, enough to watch it
    job = await begin(a, "idle")
    assert isinstance(job, MigrationJob)
    assert await job.stats() is None  # setup: the destination QEMU is starting
    samples: list[JobStats] = []
    while not job.done:
        stats = await job.stats()
        if stats is not None:
            samples.append(stats)
        await asyncio.sleep(0.001)
    result = await job.wait()
    processed = [s.memory_processed for s in samples]
    assert processed == sorted(processed)
    assert any(0 < p < GiB_KIB * 1024 for p in processed)  # seen mid-copy
    assert all(s.memory_remaining >= 0 and s.memory_total == GiB_KIB * 1024 for s in samples)
    assert {s.phase for s in samples} <= {"migrating", "switchover"}
    assert all(s.transfer_rate in (1000 * MiB,) for s in samples)
    assert result.iterations == 1
    assert result.post_copy is False
    assert result.downtime == pytest.approx(10.0)  # nothing dirty: only the switchover cost
    assert result.transferred == GiB_KIB * 1024
    final = await job.stats()
    assert final is not None
    assert (final.memory_remaining, final.memory_processed) == (0, GiB_KIB * 1024)
    assert "idle" not in a.host.domains
    assert state(b, "idle") is DomainState.RUNNING
    assert b.host.domains["idle"].persistent is True


async def test_dirtying_guest_needs_a_second_pass(a: FakeHypervisor, b: FakeHypervisor) -> None:
    # 50 MiB/s over a 1.024 s first pass leaves 51.2 MiB (51.2 ms > 10 ms); the second pass
    # (100 ms minimum) leaves 5 MiB: 5 ms, so it switches over: 5 ms + 10 ms overhead.
    job = await begin(a, "slow", initial_downtime=10)
    assert await job.wait_iteration(0) >= 1
    result = await job.wait()
    assert result.iterations == 2
    assert result.downtime == pytest.approx(15.0)
    assert result.transferred == pytest.approx((1024 + 51.2 + 5.0) * MiB, abs=2)
    assert state(b, "slow") is DomainState.RUNNING


async def test_non_convergence_until_max_downtime_is_raised(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    # 256 MiB dirtied at 200 MiB/s over a 100 MiB/s link: every pass leaves all of it.
    job = await begin(a, "busy", bandwidth=100)
    seen: list[JobStats] = []
    iteration = 0
    while iteration < 6:
        iteration = await job.wait_iteration(iteration)
        seen.append(await running_stats(job))
    assert not job.done
    last = seen[-1]
    assert last.expected_downtime == pytest.approx(2560.0)
    assert (last.dirty_rate, last.transfer_rate) == (200 * MiB, 100 * MiB)
    assert last.memory_processed >= 5 * 256 * MiB
    assert job.max_downtime == 300.0  # QEMU's default
    await job.set_max_downtime(2000)  # not enough
    iteration = await job.wait_iteration(iteration + 1)
    assert not job.done
    await job.set_max_downtime(3000)  # enough: switches at the end of this pass
    result = await job.wait()
    assert result.iterations >= 7
    # The switchover copies the 256 MiB at the full link speed (QEMU ignores the cap there).
    assert result.downtime == pytest.approx(256.0 + 10.0)
    assert state(b, "busy") is DomainState.RUNNING


async def test_stats_stay_consistent(a: FakeHypervisor, b: FakeHypervisor) -> None:
    # Sample at checkpoints the job cannot run past (it does not converge until told),
    # then let it finish and add the final sample.
    job = await begin(a, "busy", bandwidth=100)
    samples: list[JobStats] = []
    iteration = 0
    for _ in range(4):
        iteration = await job.wait_iteration(iteration)
        samples.append(await running_stats(job))
        await asyncio.sleep(0.0005)
        samples.append(await running_stats(job))
    await job.set_max_downtime(3000)
    await job.wait()
    samples.append(await running_stats(job))
    assert samples[-1].memory_remaining == 0
    assert samples[-1].phase == "switchover"
    for earlier, later in itertools.pairwise(samples):
        assert later.memory_processed >= earlier.memory_processed
        assert later.elapsed >= earlier.elapsed
        assert later.iteration >= earlier.iteration
    for s in samples:
        assert 0 <= s.memory_remaining <= s.memory_total
        assert s.data_remaining == s.memory_remaining
        assert s.phase in {"migrating", "switchover"}
        assert s.elapsed >= 0.3  # no memory moves during setup


async def test_post_copy_completes_a_non_converging_guest(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    job = await begin(a, "busy", bandwidth=100, mode="post-copy")
    iteration = await job.wait_iteration(1)
    await job.start_post_copy()
    stats = await running_stats(job)
    assert stats.phase == "post-copy"
    with pytest.raises(HypervisorError, match="cannot abort migration in post-copy mode"):
        await job.abort()
    await job.start_post_copy()  # already switched: harmless
    result = await job.wait()
    assert result.post_copy is True
    assert result.downtime == pytest.approx(5.0)
    assert result.iterations == iteration - 1  # the passes finished before the switch
    assert result.transferred > 256 * MiB
    assert state(b, "busy") is DomainState.RUNNING


async def test_post_copy_needs_post_copy_mode(a: FakeHypervisor, b: FakeHypervisor) -> None:
    job = await begin(a, "busy", bandwidth=100)
    with pytest.raises(HypervisorError, match="post-copy mode"):
        await job.start_post_copy()
    await job.abort()
    with pytest.raises(TaskCancelled):
        await job.wait()


async def test_suspend_source_makes_it_converge(a: FakeHypervisor, b: FakeHypervisor) -> None:
    job = await begin(a, "busy", bandwidth=100)
    iteration = await job.wait_iteration(2)
    await job.suspend_source()
    assert state(a, "busy") is DomainState.PAUSED
    assert (await running_stats(job)).dirty_rate == 0
    result = await job.wait()
    # It ends this pass with what was dirtied before the suspend, then one clean pass.
    assert iteration <= result.iterations <= iteration + 1
    assert result.downtime is not None
    assert result.downtime > 10.0  # paused since the suspend, not just the switchover
    assert state(b, "busy") is DomainState.RUNNING  # resumed on the destination


async def test_guest_paused_by_its_user_during_migration(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    job = await begin(a, "busy", bandwidth=100)
    iteration = await job.wait_iteration(1)
    await a.suspend("busy", Ctx())  # a plain suspend task while the job runs
    assert (await running_stats(job)).dirty_rate == 0
    result = await job.wait()
    assert result.iterations <= iteration + 1  # no more dirt: it converges
    assert state(b, "busy") is DomainState.PAUSED  # the user's pause is kept


async def test_auto_converge_throttles_until_it_converges(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    # 150 MiB/s over 100 MiB/s never converges unthrottled (see the test above).
    a.host.domains["busy"].dirty_rate = 150 * MiB
    job = await begin(a, "busy", bandwidth=100, auto_converge=True)
    rates: list[int] = []
    iteration = 0
    while not job.done:
        iteration = await job.wait_iteration(iteration)
        stats = await job.stats()
        if stats is not None and stats.phase == "migrating":
            rates.append(stats.dirty_rate)
    result = await job.wait()
    # Sampling may miss passes on a loaded machine; what it sees must only go down.
    assert rates == sorted(rates, reverse=True)
    assert all(r <= 150 * MiB for r in rates)
    assert result.iterations == 7  # 20 % more throttle per pass from pass 3 on: 99 % in 7
    assert job.throttle == pytest.approx(0.99)
    assert result.downtime is not None
    assert result.downtime < 300.0 + 10.0


async def test_warm_migration_pauses_the_guest_for_the_copy(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    counter = a.host.domains["busy"].counter
    job = await begin(a, "busy", bandwidth=100, mode="warm")
    result = await job.wait()
    assert result.iterations == 1
    assert result.downtime == pytest.approx(2560.0 + 10.0)  # the whole copy
    assert state(b, "busy") is DomainState.RUNNING
    assert b.host.domains["busy"].counter >= counter


async def test_offline_migration_moves_the_definition(a: FakeHypervisor, b: FakeHypervisor) -> None:
    with pytest.raises(WrongState, match=r"^Wrong domain state: 1$"):
        await begin(a, "idle", mode="offline")
    with pytest.raises(HypervisorError, match="persist"):
        await begin(a, "off", mode="offline", persist=False)
    job = await begin(a, "off", mode="offline")
    assert job.done
    result = await job.wait()
    assert (result.iterations, result.transferred, result.downtime) == (0, 0, None)
    assert await job.stats() is None
    assert "off" not in a.host.domains
    moved = b.host.domains["off"]
    assert (moved.state, moved.persistent, moved.vcpus) == (DomainState.SHUTOFF, True, 4)


async def test_abort_leaves_the_guest_running_on_the_source(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    job = await begin(a, "busy", bandwidth=100)
    assert a.cluster.hosts["b"].incoming == {"busy": 256 * 1024}
    await job.wait_iteration(1)
    await job.abort()
    with pytest.raises(TaskCancelled) as err:
        await job.wait()
    assert str(err.value) == "migration job aborted"
    with pytest.raises(TaskCancelled):  # and again: the outcome is kept
        await job.wait()
    assert state(a, "busy") is DomainState.RUNNING
    assert "busy" not in b.host.domains
    assert b.host.incoming == {}
    assert await job.wait_iteration(99) == job.iteration  # over: returns at once
    final = await job.stats()
    assert final is not None
    assert final.phase == "migrating"
    await job.abort()  # over already: nothing happens
    # The guest can be migrated again afterwards.
    again = await begin(a, "idle")
    assert (await again.wait()).iterations == 1


async def test_abort_during_setup_and_warm_copy_resumes_the_guest(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    a.time_scale = 1.0  # setup lasts 0.3 s: the abort surely comes first
    job = await begin(a, "idle")
    await job.abort()
    assert await job.stats() is None
    assert state(a, "idle") is DomainState.RUNNING
    a.time_scale = SCALE
    # 1 MiB/s: the warm copy would take 256 ms real; it is looked at and aborted at once.
    warm = await begin(a, "busy", bandwidth=1, mode="warm")
    assert await warm.wait_iteration(0) == 1
    assert state(a, "busy") is DomainState.PAUSED  # warm: paused for the copy
    assert (await running_stats(warm)).dirty_rate == 0
    await warm.abort()
    assert state(a, "busy") is DomainState.RUNNING


async def test_injected_midway_failure(a: FakeHypervisor, b: FakeHypervisor) -> None:
    a.inject("migrate-midway")
    job = await begin(a, "busy", bandwidth=100)
    with pytest.raises(MigrationFailed, match=r"^injected failure$"):
        await job.wait()
    assert state(a, "busy") is DomainState.RUNNING
    assert "busy" not in b.host.domains
    final = await job.stats()
    assert final is not None
    assert final.iteration == 1
    assert final.memory_processed == pytest.approx(128 * MiB, abs=2)  # half the first pass
    assert (await (await begin(a, "idle")).wait()).iterations == 1  # used up


async def test_paused_flag_and_user_paused_guests_stay_paused(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    await (await begin(a, "idle", paused=True)).wait()
    assert state(b, "idle") is DomainState.PAUSED
    await (await begin(a, "frozen")).wait()
    assert state(b, "frozen") is DomainState.PAUSED


async def test_without_persist_like_plain_migrate3(a: FakeHypervisor, b: FakeHypervisor) -> None:
    await (await begin(a, "idle", persist=False)).wait()
    source_copy = a.host.domains["idle"]
    assert (source_copy.state, source_copy.persistent) == (DomainState.SHUTOFF, True)
    assert b.host.domains["idle"].persistent is False  # transient on the destination
    # Back to a, which still has the inactive definition: the guest is persistent again.
    back = await b.begin_migration(req("idle", destination="a", persist=False), Ctx())
    await back.wait()
    assert a.host.domains["idle"].persistent is True
    assert state(a, "idle") is DomainState.RUNNING
    assert "idle" not in b.host.domains  # transient there: nothing left


async def test_two_agents_share_the_cluster_and_the_guest_state(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    before = a.host.domains["idle"].counter
    job = await a.begin_migration(req("idle"), Ctx())
    await job.wait()
    listed = {d.name: d for d in await b.list_domains()}
    assert listed["idle"].state is DomainState.RUNNING
    assert listed["idle"].vcpus == 2
    assert "idle" not in {d.name for d in await a.list_domains()}
    dom = b.host.domains["idle"]
    arrived = dom.counter
    assert arrived >= before  # continued, not rebooted
    await asyncio.sleep(0.005)
    assert dom.counter > arrived
    # Now b's agent owns it; a's does not see it.
    await b.suspend("idle", Ctx())
    with pytest.raises(VmNotFound):
        await a.suspend("idle", Ctx())
    assert a.cluster.locate("idle") == ["b"]


async def test_job_waiters_are_event_driven(a: FakeHypervisor, b: FakeHypervisor) -> None:
    job = await begin(a, "busy", bandwidth=100)
    waiters = [asyncio.create_task(job.wait_iteration(n)) for n in (0, 1, 2)]
    done_waiter = asyncio.create_task(job.wait())
    got = await asyncio.gather(*waiters)
    assert [g > n for g, n in zip(got, (0, 1, 2), strict=True)] == [True] * 3
    assert got == sorted(got)
    assert not done_waiter.done()
    await job.abort()
    with pytest.raises(TaskCancelled):
        await done_waiter


async def test_cancelling_a_waiter_does_not_cancel_the_job(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    job = await begin(a, "busy", bandwidth=100)
    waiter = asyncio.create_task(job.wait())
    await asyncio.sleep(0.001)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not job.done
    await job.set_max_downtime(5000)
    assert (await job.wait()).iterations >= 1


async def test_aclose_ends_the_jobs_of_its_agent(a: FakeHypervisor, b: FakeHypervisor) -> None:
    pre = await begin(a, "busy", bandwidth=100)
    a.host.domains["slow"].dirty_rate = 200 * MiB  # never converges on its own
    post = await begin(a, "slow", bandwidth=100, mode="post-copy")
    await post.wait_iteration(1)
    await post.start_post_copy()
    await a.aclose()
    with pytest.raises(TaskCancelled, match="hypervisor closed"):
        await pre.wait()
    assert state(a, "busy") is DomainState.RUNNING
    assert (await post.wait()).post_copy is True  # the guest already ran on b
    assert state(b, "slow") is DomainState.RUNNING
    assert pre._handle is None
    assert post._handle is None
    assert not a.cluster.jobs


async def test_bad_max_downtime(a: FakeHypervisor, b: FakeHypervisor) -> None:
    job = await begin(a, "idle")
    with pytest.raises(HypervisorError, match="max downtime"):
        await job.set_max_downtime(-1)
    await job.wait()


async def test_set_memory_records_the_balloon_target(a: FakeHypervisor) -> None:
    assert await a.current_memory("idle") == GiB_KIB
    await a.set_memory("idle", 512 * 1024, Ctx())
    assert a.host.domains["idle"].balloon == 512 * 1024
    assert a.host.domains["idle"].memory == GiB_KIB  # the size does not change
    assert await a.current_memory("idle") == 512 * 1024
    with pytest.raises(HypervisorError, match="outside"):
        await a.set_memory("idle", 2 * GiB_KIB, Ctx())
    with pytest.raises(WrongState):
        await a.set_memory("off", 1024, Ctx())
