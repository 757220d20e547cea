"""Issue 17 on the ``fake`` back-end: ``set_bandwidth`` (pre-copy and post-copy),
``postcopy-bandwidth``, and the ``migrate-stall`` fault (a stream that stops moving).

As in test_hypervisor_fake_migration.py, migrations run with a large ``time-scale``; assertions
use the simulated quantities (rates, bytes), never the wall clock.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from asyncmigfra.errors import HypervisorError, TaskCancelled
from asyncmigfra.hypervisor.base import DomainState, JobStats, MigrationRequest
from asyncmigfra.hypervisor.fake import FakeHypervisor, FakeMigrationJob
from asyncmigfra.hypervisor.fake import create as create_fake
from harness import RecordingOpContext as Ctx

MiB = 1024 * 1024
SCALE = 1000.0
LINK = 1000  # MiB/s, the fake's default link


def make(shared: dict[str, object], hostname: str, **options: Any) -> FakeHypervisor:
    return create_fake({"time-scale": SCALE, **options}, hostname=hostname, shared=shared)


@pytest.fixture
def a(shared: dict[str, object]) -> FakeHypervisor:
    domains = [
        {"name": "idle", "memory": 1024 * 1024},
        {"name": "busy", "memory": 256 * 1024, "dirty-rate": 200},
    ]
    return make(shared, "a", domains=domains, peers={"b": None})


@pytest.fixture
def b(shared: dict[str, object], a: FakeHypervisor) -> FakeHypervisor:
    return make(shared, "b")


async def begin(hv: FakeHypervisor, vm: str, **kwargs: Any) -> FakeMigrationJob:
    kwargs.setdefault("mode", "live")
    job = await hv.begin_migration(MigrationRequest(vm_name=vm, destination="b", **kwargs), Ctx())
    assert isinstance(job, FakeMigrationJob)
    return job


async def sample(job: FakeMigrationJob) -> JobStats:
    stats = await job.stats()
    assert stats is not None
    return stats


async def in_first_pass(job: FakeMigrationJob) -> None:
    async with asyncio.timeout(5):
        await job.wait_iteration(0)


async def test_set_bandwidth_changes_the_rate_from_now_on(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    job = await begin(a, "idle", bandwidth=1)  # 1 GiB at 1 MiB/s: ~17 simulated minutes
    await in_first_pass(job)
    before = await sample(job)
    assert before.transfer_rate == 1 * MiB
    await job.set_bandwidth(4)
    assert job.bandwidth == 4 * MiB
    after = await sample(job)
    assert after.transfer_rate == 4 * MiB
    assert after.memory_processed >= before.memory_processed, "what was sent stays sent"
    await job.set_bandwidth(0)  # unlimited: the link's speed
    assert job.bandwidth == LINK * MiB
    async with asyncio.timeout(5):
        result = await job.wait()
    assert a.host.domains.get("idle") is None
    assert b.host.domains["idle"].state is DomainState.RUNNING
    # Every byte of the 1 GiB pass counted once across the three rates.
    assert result.transferred >= 1024 * MiB
    assert result.transferred < 1024 * MiB + 64 * MiB


async def test_set_bandwidth_above_the_link_is_the_link(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    job = await begin(a, "idle", bandwidth=1)
    await in_first_pass(job)
    await job.set_bandwidth(10**9)
    assert job.bandwidth == LINK * MiB
    with pytest.raises(HypervisorError, match="bandwidth must be >= 0"):
        await job.set_bandwidth(-1)
    await job.wait()


async def test_post_copy_runs_at_its_own_bandwidth(a: FakeHypervisor, b: FakeHypervisor) -> None:
    job = await begin(a, "busy", mode="post-copy", bandwidth=100, postcopy_bandwidth=2)
    await in_first_pass(job)
    assert (await sample(job)).transfer_rate == 100 * MiB
    await job.start_post_copy()
    stats = await sample(job)
    assert (stats.phase, stats.transfer_rate) == ("post-copy", 2 * MiB)
    await job.set_bandwidth(8, post_copy=True)
    assert (await sample(job)).transfer_rate == 8 * MiB
    assert job.bandwidth == 100 * MiB, "the pre-copy cap is another setting"
    await job.set_bandwidth(0, post_copy=True)
    assert job.post_copy_bandwidth == LINK * MiB
    result = await job.wait()
    assert result.post_copy


async def test_without_postcopy_bandwidth_post_copy_keeps_the_pre_copy_rate(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    job = await begin(a, "busy", mode="post-copy", bandwidth=50)
    await in_first_pass(job)
    await job.start_post_copy()
    assert (await sample(job)).transfer_rate == 50 * MiB
    await job.set_bandwidth(20)  # the pre-copy cap, followed by post-copy here
    assert (await sample(job)).transfer_rate == 20 * MiB
    await job.wait()


async def stalled(job: FakeMigrationJob) -> None:
    async with asyncio.timeout(5):
        while not job.stalled:
            await asyncio.sleep(0.001)


async def test_a_stalled_stream_moves_no_more_data_until_aborted(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    a.inject("migrate-stall")
    job = await begin(a, "busy", mode="post-copy", bandwidth=100)
    await stalled(job)
    first = await sample(job)
    await asyncio.sleep(0.05)  # 50 simulated seconds
    later = await sample(job)
    assert later.memory_processed == first.memory_processed
    assert first.memory_processed == pytest.approx(128 * MiB, abs=2)  # half the first pass
    assert later.transfer_rate == 0
    assert later.elapsed > first.elapsed, "the job's clock goes on"
    assert later.iteration == 1
    assert later.dirty_rate == 200 * MiB, "the guest keeps dirtying"
    with pytest.raises(HypervisorError, match="moves no data"):
        await job.start_post_copy()
    await job.set_bandwidth(500)  # accepted, and nothing moves all the same
    assert (await sample(job)).memory_processed == first.memory_processed
    await job.suspend_source()
    assert a.host.domains["busy"].state is DomainState.PAUSED
    await job.abort()
    with pytest.raises(TaskCancelled):
        await job.wait()
    assert a.host.domains["busy"].state is DomainState.RUNNING, "resumed on the source"
    assert "busy" not in b.host.domains


async def test_the_stall_fault_from_the_options_is_used_once(shared: dict[str, object]) -> None:
    domains = [{"name": "v", "memory": 256 * 1024}, {"name": "w", "memory": 256 * 1024}]
    a = make(shared, "a", domains=domains, peers={"b": None}, fail={"migrate-stall": 1})
    make(shared, "b")
    job = await begin(a, "v", bandwidth=100)
    await stalled(job)
    await job.abort()
    with pytest.raises(TaskCancelled):
        await job.wait()
    other = await begin(a, "w", bandwidth=1000)
    assert (await other.wait()).iterations >= 1
