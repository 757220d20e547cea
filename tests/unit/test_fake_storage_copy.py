"""Issue 16 on the ``fake`` back-end: a migration that copies storage moves the disks first
(at the bandwidth, shaped like libvirt's NBD phase), then memory; and through the engine its
progress events carry ``disk-*`` with a ``percent`` that rises to 100.

Every test is ``async`` (see tests/unit/test_hypervisor_fake.py for why).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, replace
from typing import Any

import pytest
from engine_stub import RecordingContext

from asyncmigfra.errors import ConfigError, HypervisorError, InvalidTask, TaskCancelled
from asyncmigfra.hypervisor.base import DomainState, JobStats, MigrationRequest
from asyncmigfra.hypervisor.fake import FakeHypervisor, create
from asyncmigfra.hypervisor.fake.migration import FakeMigrationJob
from asyncmigfra.migration.engine import migrate
from asyncmigfra.model import MigrateSpec, MigrationParams
from asyncmigfra.settings import Settings
from harness import RecordingOpContext as Ctx

MIB = 1024 * 1024
GIB = 1024 * MIB
SCALE = 1000.0

DOMAINS: list[dict[str, Any]] = [
    # 256 MiB of memory, the default disk (vda, 1 GiB)
    {"name": "plain", "memory": 256 * 1024},
    # two disks of 512 and 256 MiB
    {"name": "two", "memory": 256 * 1024, "disks": {"vda": 512, "vdb": 256}},
    {"name": "diskless", "memory": 256 * 1024, "disks": {}},
    {"name": "off", "state": "shutoff"},
]


@pytest.fixture
def a(shared: dict[str, object]) -> FakeHypervisor:
    return create(
        {"time-scale": SCALE, "domains": DOMAINS, "peers": {"b": None}},
        hostname="a",
        shared=shared,
    )


async def begin(hv: FakeHypervisor, vm: str, **kwargs: Any) -> FakeMigrationJob:
    kwargs.setdefault("mode", "live")
    job = await hv.begin_migration(MigrationRequest(vm_name=vm, destination="b", **kwargs), Ctx())
    assert isinstance(job, FakeMigrationJob)
    return job


async def samples_until_done(job: FakeMigrationJob) -> list[JobStats]:
    samples: list[JobStats] = []
    while not job.done:
        stats = await job.stats()
        if stats is not None:
            samples.append(stats)
        await asyncio.sleep(0.0005)
    return samples


# --------------------------------------------------------------------------------------------
# the fake's disks


async def test_domains_have_one_1_gib_disk_unless_configured(a: FakeHypervisor) -> None:
    assert a.host.domains["plain"].disks == {"vda": GIB}
    assert a.host.domains["two"].disks == {"vda": 512 * MIB, "vdb": 256 * MIB}
    assert a.host.domains["diskless"].disks == {}
    assert a.host.domains["two"].copy_definition().disks == a.host.domains["two"].disks


@pytest.mark.parametrize(
    ("disks", "path", "message"),
    [
        ({"VDA": 1}, "hypervisor.domains[0].disks.VDA", "expected a disk target such as vda"),
        ({"vda": -1}, "hypervisor.domains[0].disks.vda", "must be >= 0"),
        ({"vda": "big"}, "hypervisor.domains[0].disks.vda", "expected a number"),
        ([1], "hypervisor.domains[0].disks", "expected a map"),
    ],
)
async def test_bad_disks_option(disks: object, path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        create({"domains": [{"name": "x", "disks": disks}]}, hostname="h", shared={})
    assert err.value.path == path


async def test_disks_to_copy(a: FakeHypervisor) -> None:
    two = a.host.domains["two"]
    base = MigrationRequest(vm_name="two", destination="b")
    assert two.disks_to_copy(base) == {}
    assert two.disks_to_copy(replace(base, copy_storage="all")) == two.disks
    only = replace(base, copy_storage="inc", migrate_disks=("vdb",))
    assert two.disks_to_copy(only) == {"vdb": 256 * MIB}
    with pytest.raises(HypervisorError, match="invalid argument: disk target vdz not found"):
        two.disks_to_copy(replace(base, copy_storage="all", migrate_disks=("vda", "vdz")))


# --------------------------------------------------------------------------------------------
# the disk phase of a migration


async def test_disks_are_copied_before_memory_like_libvirts_nbd_phase(a: FakeHypervisor) -> None:
    a.time_scale = 20.0  # 1 GiB + 256 MiB at 1000 MiB/s: ~65 ms real
    job = await begin(a, "plain", copy_storage="all")
    assert await job.stats() is None  # setup
    samples = await samples_until_done(job)
    result = await job.wait()
    disk_phase = [s for s in samples if s.memory_total == 0]
    memory_phase = [s for s in samples if s.memory_total > 0]
    assert disk_phase, "seen while the disks are copied"
    assert memory_phase
    assert samples.index(memory_phase[0]) == len(disk_phase), "disks first, then memory"
    assert any(0 < s.disk_processed < GIB for s in disk_phase)
    for s in disk_phase:
        assert (s.iteration, s.memory_processed, s.memory_remaining) == (0, 0, 0)
        assert (s.transfer_rate, s.dirty_rate, s.expected_downtime) == (0, 0, None)
        assert s.disk_total == GIB
        assert s.disk_processed + s.disk_remaining == GIB
        assert s.data_remaining == s.disk_remaining
    for s in memory_phase:
        assert (s.disk_total, s.disk_processed, s.disk_remaining) == (GIB, GIB, 0)
        assert s.iteration >= 1
    for earlier, later in itertools.pairwise(samples):
        assert later.disk_processed >= earlier.disk_processed
        assert later.elapsed >= earlier.elapsed
    # Memory starts after setup (0.3 s) and the disks (1.024 s at 1000 MiB/s).
    assert min(s.elapsed for s in memory_phase) >= 0.3 + 1.024
    assert result.iterations == 1
    assert result.transferred == 256 * MIB, "memory transferred, as without disks"
    assert a.cluster.locate("plain") == ["b"]
    assert a.cluster.domain("b", "plain").disks == {"vda": GIB}


async def test_migrate_disks_picks_the_disks_and_the_bandwidth_caps_their_copy(
    a: FakeHypervisor,
) -> None:
    job = await begin(a, "two", copy_storage="inc", migrate_disks=("vdb",), bandwidth=256)
    await job.wait_iteration(0)  # memory started: the disk phase took 256 MiB / 256 MiB/s
    stats = await job.stats()
    assert stats is not None
    assert (stats.disk_total, stats.disk_remaining) == (256 * MIB, 0)
    assert stats.elapsed >= 0.3 + 1.0
    await job.wait()


@pytest.mark.parametrize(
    ("vm", "kwargs"),
    [
        pytest.param("plain", {}, id="no-copy"),
        pytest.param("diskless", {"copy_storage": "all"}, id="nothing-to-copy"),
    ],
)
async def test_without_disks_to_copy_memory_moves_right_after_setup(
    a: FakeHypervisor, vm: str, kwargs: dict[str, Any]
) -> None:
    job = await begin(a, vm, **kwargs)
    await job.wait_iteration(0)
    stats = await job.stats()
    assert stats is not None
    assert stats.disk_total == 0
    assert stats.elapsed < 0.3 + 0.3
    await job.wait()


async def test_an_unknown_disk_target_refuses_before_anything_moves(a: FakeHypervisor) -> None:
    with pytest.raises(HypervisorError, match="disk target vdc not found"):
        await begin(a, "two", copy_storage="all", migrate_disks=("vdc",))
    assert not a.cluster.jobs
    assert a.cluster.locate("two") == ["a"]


async def test_offline_migration_cannot_copy_storage(a: FakeHypervisor) -> None:
    with pytest.raises(HypervisorError, match="offline migration cannot handle non-shared"):
        await begin(a, "off", mode="offline", copy_storage="all")
    assert a.cluster.locate("off", active_only=False) == ["a"]


async def test_warm_pauses_the_guest_only_when_memory_moves(a: FakeHypervisor) -> None:
    a.time_scale = 10.0
    job = await begin(a, "plain", mode="warm", copy_storage="all")
    while (await job.stats()) is None or (await job.stats()).memory_total == 0:  # type: ignore[union-attr]
        assert a.host.domains["plain"].state is DomainState.RUNNING, "running while disks copy"
        await asyncio.sleep(0.001)
    if not job.done:
        assert a.host.domains["plain"].state is DomainState.PAUSED
    result = await job.wait()
    assert result.downtime is not None
    assert result.downtime < 1024.0, "the downtime is the memory copy, not the disks"
    assert result.downtime == pytest.approx(256.0 + 10.0, abs=1.0)


async def test_post_copy_cannot_start_while_the_disks_are_copied(a: FakeHypervisor) -> None:
    a.time_scale = 1.0
    job = await begin(a, "plain", mode="post-copy", copy_storage="all")
    while (await job.stats()) is None:
        await asyncio.sleep(0.01)
    with pytest.raises(HypervisorError, match="post-copy can start only once memory moves"):
        await job.start_post_copy()
    await job.abort()
    with pytest.raises(TaskCancelled):
        await job.wait()
    assert a.cluster.locate("plain") == ["a"]
    assert a.host.domains["plain"].state is DomainState.RUNNING
    final = await job.stats()
    assert final is not None
    assert 0 < final.disk_processed < GIB, "the last sample is of the disk phase"


# --------------------------------------------------------------------------------------------
# through the engine


@dataclass
class EngineCtx(RecordingContext):
    vm_name: str = "plain"


def settings(**migration: Any) -> Settings:
    base = Settings()
    return replace(
        base,
        hostname="a",
        agent=replace(base.agent, progress_interval=0.005),
        migration=replace(base.migration, **migration),
    )


async def test_a_fake_migration_with_copy_storage_all_reports_disks_then_memory(
    a: FakeHypervisor,
) -> None:
    a.time_scale = 10.0  # ~130 ms real: dozens of samples
    spec = MigrateSpec(
        vm_name="plain",
        destination="b",
        parameter=MigrationParams(migration_type="live", copy_storage="all"),
    )
    ctx = EngineCtx()
    async with asyncio.timeout(10):
        await migrate(spec, ctx, hypervisor=a, settings=settings())  # type: ignore[arg-type]
    assert ctx.outcome.destination == "b"
    assert a.cluster.locate("plain") == ["b"]
    events = ctx.events
    with_disks = [e for e in events if "disk-total" in e]
    assert len(with_disks) >= 3
    assert all(e["disk-total"] == GIB for e in with_disks)
    disk_phase = [e for e in with_disks if e["memory-total"] == 0]
    assert any(0 < e["disk-processed"] < GIB for e in disk_phase)  # type: ignore[operator]
    assert any(e["memory-total"] == 256 * MIB for e in with_disks), "memory after the disks"
    assert any("eta" in e for e in disk_phase), "an estimate while the disks are copied"
    rates = [e["transfer-rate"] for e in disk_phase]
    assert rates[0] == 0, "libvirt reports no rate before memory moves, nor does the fake"
    # then measured between two samples (on the job's clock, rounded to the microsecond)
    assert rates[1:] == pytest.approx([1000 * MIB] * (len(rates) - 1), rel=1e-3)
    percents = [float(e["percent"]) for e in events]  # type: ignore[arg-type]
    assert percents == sorted(percents), "percent never decreases"
    assert percents[-1] == 100.0
    assert max(percents[:-1]) < 100.0
    # The disks are 4/5 of what moves: the memory phase starts near 80 %, not near 99 %.
    first_memory = next(e for e in with_disks if e["memory-total"] == 256 * MIB)
    assert 70.0 <= float(first_memory["percent"]) <= 99.0  # type: ignore[arg-type]
    last_disk = disk_phase[-1]
    assert float(last_disk["percent"]) <= 80.0  # type: ignore[arg-type]
    final = events[-1]
    assert final["phase"] == "completed"
    assert (final["disk-total"], final["disk-processed"], final["disk-remaining"]) == (
        GIB,
        GIB,
        0,
    )


async def test_the_engine_refuses_disks_when_nothing_copies_storage(a: FakeHypervisor) -> None:
    spec = MigrateSpec(
        vm_name="two", destination="b", parameter=MigrationParams(migrate_disks=("vda",))
    )
    with pytest.raises(InvalidTask, match="migrate-disks needs copy-storage all or inc"):
        await migrate(spec, EngineCtx(vm_name="two"), hypervisor=a, settings=settings())  # type: ignore[arg-type]
    assert a.cluster.locate("two") == ["a"]
    # With the agent's default copy-storage: inc, the same task copies vda only.
    a.time_scale = 100.0
    ctx = EngineCtx(vm_name="two")
    await migrate(spec, ctx, hypervisor=a, settings=settings(copy_storage="inc"))  # type: ignore[arg-type]
    assert {e.get("disk-total") for e in ctx.events if "disk-total" in e} == {512 * MIB}
