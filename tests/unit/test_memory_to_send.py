"""What a migration sends in full (issue 18): the guest's memory bounded by what its
hypervisor process keeps resident, less the overhead learned from earlier migrations' zero
pages; and the dirty rate's sample period reaching the model. Closed-form cases on a stub
back-end that answers only what the forecast asks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from asyncmigfra.errors import VmNotFound
from asyncmigfra.hypervisor.base import DiskCopy, KnowsResidentMemory, MigrationResult
from asyncmigfra.hypervisor.fake import create as create_fake
from asyncmigfra.migration.dirtyrates import PROBE_SECONDS
from asyncmigfra.migration.forecast import RESIDENT_FOR, Forecaster, costs_of
from asyncmigfra.migration.plan import plan_migration
from asyncmigfra.migration.prediction import MigrationCosts, PredictionInputs, predict_run
from asyncmigfra.model import MigrateSpec, MigrationParams
from asyncmigfra.settings import Settings, default_settings
from asyncmigfra.tasks.linkrates import HOST_KEY, ResidentOverheads

MIB = 1 << 20
KIB = 1024


class Host:
    """Resident memory (KiB) per VM, and a dirty rate (bytes/s) for the probe."""

    def __init__(self, resident: dict[str, int | None], dirty: float = 0.0) -> None:
        self.resident, self.dirty = resident, dirty

    async def resident_memory(self, vm_name: str) -> int | None:
        if vm_name not in self.resident:
            raise VmNotFound(f"no domain {vm_name}")
        return self.resident[vm_name]

    async def measure_dirty_rate(self, vm_name: str, *, seconds: int = 1) -> float:
        return self.dirty


def settings() -> Settings:
    base = default_settings(hostname="here")
    return replace(base, migration=replace(base.migration, link_rate=8.0))


def migrated(memory: int, zero: int | None) -> MigrationResult:
    return MigrationResult(memory_total=memory, zero_bytes=zero)


def plan_of(vm: str, memory_mib: int = 128):  # type: ignore[no-untyped-def]
    s = settings()
    spec = MigrateSpec(
        vm_name=vm, destination="there", parameter=MigrationParams(migration_type="live")
    )
    return plan_migration(
        spec,
        defaults=s.migration,
        driver=s.hypervisor.driver,
        transport=s.hypervisor.transport,
        memory_kib=memory_mib * 1024,
    )


async def test_without_a_learned_overhead_the_resident_memory_bounds_what_is_sent() -> None:
    host = Host({"idle": 41 * 1024, "big": 200 * 1024})
    assert isinstance(host, KnowsResidentMemory)
    forecaster = Forecaster(settings=settings())
    assert await forecaster.memory_to_send(host, "idle", 128 * MIB) == 41 * MIB  # type: ignore[arg-type]
    # Never more than the guest's memory (QEMU's own memory is resident too).
    assert await forecaster.memory_to_send(host, "big", 128 * MIB) == 128 * MIB  # type: ignore[arg-type]


async def test_a_migrations_zero_pages_teach_the_overhead_and_the_next_guest_sends_less() -> None:
    """The rig's idle guest: 41 MiB resident, 128 MiB of memory of which the job sent 127 MiB
    as zero pages: 40 MiB of the resident memory was QEMU's own. A dirty16 guest then
    resident at 58 MiB sends 18 MiB in full."""
    host = Host({"idle": 41 * 1024, "dirty16": 58 * 1024})
    forecaster = Forecaster(settings=settings())
    await forecaster.memory_to_send(host, "idle", 128 * MIB)  # type: ignore[arg-type]
    await forecaster.learn(plan_of("idle"), _no_samples(), migrated(128 * MIB, 127 * MIB))
    assert forecaster.overheads.estimate(HOST_KEY) == 40 * MIB
    assert await forecaster.memory_to_send(host, "dirty16", 128 * MIB) == 18 * MIB  # type: ignore[arg-type]
    # Resident memory below the overhead sends nothing in full, never a negative amount.
    host.resident["tiny"] = 10 * 1024
    assert await forecaster.memory_to_send(host, "tiny", 128 * MIB) == 0  # type: ignore[arg-type]


async def test_the_overhead_survives_a_restart(tmp_path: Path) -> None:
    store = ResidentOverheads.in_state_dir(tmp_path)
    await store.open()
    forecaster = Forecaster(settings=settings(), overheads=store)
    host = Host({"idle": 41 * 1024})
    await forecaster.memory_to_send(host, "idle", 128 * MIB)  # type: ignore[arg-type]
    await forecaster.learn(plan_of("idle"), _no_samples(), migrated(128 * MIB, 127 * MIB))
    again = ResidentOverheads.in_state_dir(tmp_path)
    await again.open()
    assert again.estimate(HOST_KEY) == 40 * MIB
    assert (tmp_path / "residentoverhead.sqlite").exists()
    assert not (tmp_path / "linkrates.sqlite").exists()  # its own file


@pytest.mark.parametrize(
    "result",
    [
        pytest.param(migrated(128 * MIB, None), id="zero-pages-unknown"),
        pytest.param(migrated(0, 0), id="memory-unknown"),
        pytest.param(None, id="no-result"),
    ],
)
async def test_nothing_is_learned_without_the_figures(result: MigrationResult | None) -> None:
    forecaster = Forecaster(settings=settings())
    await forecaster.memory_to_send(Host({"idle": 41 * 1024}), "idle", 128 * MIB)  # type: ignore[arg-type]
    await forecaster.learn(plan_of("idle"), _no_samples(), result)
    assert forecaster.overheads.samples(HOST_KEY) == 0


async def test_a_resident_figure_too_old_or_never_read_teaches_nothing() -> None:
    forecaster = Forecaster(settings=settings())
    await forecaster.learn(plan_of("idle"), _no_samples(), migrated(128 * MIB, 127 * MIB))
    await forecaster.memory_to_send(Host({"idle": 41 * 1024}), "idle", 128 * MIB)  # type: ignore[arg-type]
    resident, at = forecaster._resident["idle"]
    forecaster._resident["idle"] = (resident, at - RESIDENT_FOR - 1)
    await forecaster.learn(plan_of("idle"), _no_samples(), migrated(128 * MIB, 127 * MIB))
    assert forecaster.overheads.samples(HOST_KEY) == 0


@pytest.mark.parametrize("answer", [None, 0], ids=["unknown", "zero"])
async def test_a_back_end_that_cannot_tell_keeps_the_guests_memory(answer: int | None) -> None:
    forecaster = Forecaster(settings=settings())
    assert await forecaster.memory_to_send(Host({"x": answer}), "x", 128 * MIB) == 128 * MIB  # type: ignore[arg-type]
    assert await forecaster.memory_to_send(Host({}), "gone", 128 * MIB) == 128 * MIB  # type: ignore[arg-type]
    assert await forecaster.memory_to_send(object(), "x", 128 * MIB) == 128 * MIB  # type: ignore[arg-type]


async def test_the_prediction_sends_the_bound_and_knows_the_probes_period() -> None:
    """An idle guest resident at 1 MiB beyond a learned 40 MiB overhead, over 8 MiB/s: one
    pass of 1 MiB (0.125 s), so setup + 0.125 s + the pass overhead + the switchover,
    instead of the 16 s that all 128 MiB would take."""
    forecaster = Forecaster(settings=settings())
    await forecaster.overheads.record(HOST_KEY, 40.0 * MIB)
    host = Host({"idle": 41 * 1024}, dirty=0.0)
    forecast = await forecaster.predict_plan(plan_of("idle"), host)  # type: ignore[arg-type]
    assert forecast.inputs is not None
    assert forecast.memory == 1 * MIB
    assert forecast.inputs.dirty_period == PROBE_SECONDS
    costs = MigrationCosts()
    expected = costs.setup + 0.125 + costs.pass_overhead + costs.switchover / 1000
    assert forecast.duration == pytest.approx(expected)


def _no_samples():  # type: ignore[no-untyped-def]
    from asyncmigfra.migration.forecast import ObservedRates  # noqa: PLC0415

    return ObservedRates()


# ------------------------------------------------------------------ disks and fixed costs


@pytest.mark.parametrize(
    ("size", "data", "sent"),
    [(64 * MIB, None, 64 * MIB), (64 * MIB, 33 * MIB, 33 * MIB), (64 * MIB, 70 * MIB, 64 * MIB)],
    ids=["unknown-data", "sparse", "allocation-above-size"],
)
def test_a_storage_copy_sends_its_data_at_most_its_size(
    size: int, data: int | None, sent: int
) -> None:
    assert DiskCopy(target="vda", path="/x", size=size, data=data).sent == sent


def test_a_storage_copy_adds_its_fixed_cost_before_anything_moves() -> None:
    """The rig's disk guest: 33 MiB of data at 8 MiB/s after setup and storage setup, then
    a 3 MiB pass (0.375 s) and the switchover."""
    costs = MigrationCosts()
    run = predict_run(
        PredictionInputs(
            memory=3 * MIB, link_rate=8 * MIB, completion_timeout=60.0, disk_bytes=33 * MIB
        ),
        "live",
    )
    assert run.disk_time == pytest.approx(33 / 8)
    start = costs.setup + costs.storage_setup + 33 / 8
    assert run.passes[0].start == pytest.approx(start)
    end = start + 3 / 8 + costs.pass_overhead + costs.switchover / 1000
    assert run.duration == pytest.approx(end)


def test_the_fakes_costs_are_its_own_and_nonsense_is_ignored() -> None:
    hv = create_fake({"domains": []}, hostname="here", shared={})
    costs = costs_of(hv)
    assert (costs.setup, costs.storage_setup, costs.pass_overhead) == (0.3, 0.0, 0.0)
    assert costs_of(object()) == MigrationCosts()

    class Odd:
        def migration_costs(self) -> dict[str, object]:
            return {"setup": -1.0, "min_pass": float("nan"), "colour": 3.0, "switchover": 2.0}

    assert costs_of(Odd()) == MigrationCosts(switchover=2.0)
