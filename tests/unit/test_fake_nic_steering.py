"""The ``fake`` back-end's shared NICs (``nic-rate``) together with what steers or breaks a
migration: ``set_bandwidth`` (``tune migration``), the post-copy bandwidth, the
``migrate-stall`` fault and a broken post-copy that is resumed. Each changes what a job
wants, or whether it moves anything, and so the other jobs' shares.

Times are the jobs' simulated ``elapsed`` (``time-scale`` 20), computed by hand as in
``test_fake_nic``: setup 0.3 s, then each phase at its share.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from asyncmigfra.hypervisor.base import MigrationRequest
from asyncmigfra.hypervisor.fake import SHARED_KEY, FakeCluster, FakeHypervisor, create
from asyncmigfra.hypervisor.fake.migration import FakeMigrationJob
from harness import RecordingOpContext as Ctx

MIB = 1024 * 1024
SCALE = 20.0


@pytest.fixture
def shared() -> Iterator[dict[str, object]]:
    data: dict[str, object] = {}
    yield data
    cluster = data.get(SHARED_KEY)
    if isinstance(cluster, FakeCluster):
        assert not cluster.jobs, f"jobs left running: {cluster.jobs}"
        assert not cluster.links.jobs, f"jobs left on the NICs: {cluster.links.jobs}"


def vm(name: str, mib: int) -> dict[str, Any]:
    return {"name": name, "memory": mib * 1024}


def agent(shared: dict[str, object], mibs: dict[str, int]) -> FakeHypervisor:
    return create(
        {
            "time-scale": SCALE,
            "nic-rate": 100,
            "domains": [vm(n, m) for n, m in mibs.items()],
            "peers": {"b": None},
        },
        hostname="a",
        shared=shared,
    )


async def begin(hv: FakeHypervisor, name: str, **extra: Any) -> FakeMigrationJob:
    request = MigrationRequest(vm_name=name, destination="b", **{"mode": "live", **extra})
    job = await hv.begin_migration(request, Ctx())  # type: ignore[arg-type]
    assert isinstance(job, FakeMigrationJob)
    return job


async def rates(*jobs: FakeMigrationJob) -> list[int | None]:
    out = []
    for job in jobs:
        stats = await job.stats()
        out.append(None if stats is None else stats.transfer_rate)
    return out


async def elapsed(job: FakeMigrationJob) -> float:
    async with asyncio.timeout(10):
        await job.wait()
    final = await job.stats()
    assert final is not None
    return final.elapsed


async def test_a_bandwidth_set_while_sharing_gives_the_rest_to_the_other(
    shared: dict[str, object],
) -> None:
    a = agent(shared, {"v1": 1000, "v2": 1000})
    j1, j2 = await begin(a, "v1"), await begin(a, "v2")
    await asyncio.sleep(1.0 / SCALE)  # about 1 s simulated: both past the setup
    assert await rates(j1, j2) == [50 * MIB, 50 * MIB]
    before = await j1.stats()
    assert before is not None
    await j1.set_bandwidth(10)
    assert await rates(j1, j2) == [10 * MIB, 90 * MIB]
    after = await j1.stats()
    assert after is not None
    # What was sent at the old share stays sent.
    assert after.memory_processed >= before.memory_processed > 0
    await j1.set_bandwidth(0)  # the link's speed again: fair shares
    assert await rates(j1, j2) == [50 * MIB, 50 * MIB]
    for job in (j1, j2):
        await job.abort()
        with pytest.raises(Exception, match="aborted"):
            await job.wait()


async def test_a_bandwidth_set_during_the_setup_applies_once_memory_moves(
    shared: dict[str, object],
) -> None:
    # v1 at 20 MiB/s (100 MiB: 5 s), v2 gets the other 80 (300 MiB: 3.75 s).
    a = agent(shared, {"v1": 100, "v2": 300})
    j1, j2 = await begin(a, "v1"), await begin(a, "v2")
    await j1.set_bandwidth(20)
    t1, t2 = await elapsed(j1), await elapsed(j2)
    assert t1 == pytest.approx(0.3 + 5.0 + 0.01, abs=0.03)
    assert t2 == pytest.approx(0.3 + 3.75 + 0.01, abs=0.03)


async def test_a_stalled_stream_leaves_the_nic_to_the_others(shared: dict[str, object]) -> None:
    # Both at 50 MiB/s until v1 stalls half-way through its 100 MiB (1.3 s); v2 has 50 MiB
    # left then and gets all 100 MiB/s: 1.3 + 0.5 + 0.01 s.
    a = agent(shared, {"v1": 100, "v2": 100})
    a.inject("migrate-stall")
    j1, j2 = await begin(a, "v1"), await begin(a, "v2")
    assert await elapsed(j2) == pytest.approx(1.81, abs=0.02)
    assert j1.stalled
    assert await rates(j1) == [0]
    await j1.abort()
    with pytest.raises(Exception, match="aborted"):
        await j1.wait()


async def test_the_post_copy_bandwidth_is_what_a_post_copy_wants_of_the_nic(
    shared: dict[str, object],
) -> None:
    # v1 switches to post-copy during its setup and pulls its 100 MiB at 20 MiB/s (5 s);
    # v2 gets the other 80 MiB/s (300 MiB: 3.75 s).
    a = agent(shared, {"v1": 100, "v2": 300})
    j1 = await begin(a, "v1", mode="post-copy", postcopy_bandwidth=20)
    j2 = await begin(a, "v2")
    await j1.start_post_copy()
    t1, t2 = await elapsed(j1), await elapsed(j2)
    assert t1 == pytest.approx(5.0, abs=0.1)  # post-copy started at once: no setup time
    assert t2 == pytest.approx(0.3 + 3.75 + 0.01, abs=0.03)
    assert shared[SHARED_KEY].domain("b", "v1").name == "v1"  # type: ignore[attr-defined]


async def test_a_broken_post_copy_resumes_on_a_shared_nic(shared: dict[str, object]) -> None:
    a = agent(shared, {"v1": 100})
    a.inject("postcopy-break")
    request = MigrationRequest(vm_name="v1", destination="b", mode="post-copy")
    job = await a.begin_migration(request, Ctx())  # type: ignore[arg-type]
    await job.start_post_copy()
    with pytest.raises(Exception, match="post-copy"):
        async with asyncio.timeout(10):
            await job.wait()
    recovery = await a.broken_post_copy(request)
    assert recovery is not None
    async with asyncio.timeout(10):
        while True:
            try:
                result = await recovery.resume_post_copy()
            except Exception:  # the link is down for postcopy-break-for (2 s simulated)
                await asyncio.sleep(0.5 / SCALE)
            else:
                break
    assert result.post_copy
    assert await recovery.source_state() == "left"
    resumed = await recovery.stats()
    assert resumed is not None
    assert resumed.transfer_rate == 100 * MIB  # alone on the NIC
