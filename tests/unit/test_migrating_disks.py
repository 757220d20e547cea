"""Issue 16, the pure parts: a storage copy's parameters from the task and the config, the
completion timeout that counts the disks, the convergence policy leaving the disk phase
alone, and ``percent``/``eta`` over disks and memory."""

from __future__ import annotations

from dataclasses import replace

import pytest

from asyncmigfra.errors import InvalidTask
from asyncmigfra.hypervisor.base import JobStats
from asyncmigfra.migration.plan import MigrationPlan, plan_migration
from asyncmigfra.migration.policy import ConvergencePolicy
from asyncmigfra.migration.progress import _Progress, disk_phase
from asyncmigfra.model import MigrateSpec, MigrationParams
from asyncmigfra.settings import MigrationDefaults

GIB_KIB = 1024 * 1024
GIB = 1024**3


def plan(
    params: MigrationParams, *, memory_kib: int = GIB_KIB, disk_bytes: int = 0, **defaults: object
) -> MigrationPlan:
    spec = MigrateSpec(vm_name="v", destination="b", parameter=params)
    return plan_migration(
        spec,
        defaults=MigrationDefaults(**defaults),  # type: ignore[arg-type]
        driver="qemu",
        transport="ssh",
        memory_kib=memory_kib,
        disk_bytes=disk_bytes,
    )


# --------------------------------------------------------------------------------------------
# plan


def test_no_storage_copy_by_default() -> None:
    request = plan(MigrationParams()).request
    assert (request.copy_storage, request.migrate_disks, request.synchronous_writes) == (
        "none",
        (),
        False,
    )


@pytest.mark.parametrize(
    ("params", "defaults", "expected"),
    [
        pytest.param(MigrationParams(copy_storage="all"), {}, ("all", (), False), id="task-copy"),
        pytest.param(
            MigrationParams(), {"copy_storage": "inc"}, ("inc", (), False), id="config-copy"
        ),
        pytest.param(
            MigrationParams(copy_storage="none"),
            {"copy_storage": "all", "copy_storage_synchronous_writes": True},
            ("none", (), False),
            id="task-none-wins-and-config-sync-means-nothing-then",
        ),
        pytest.param(
            MigrationParams(copy_storage="all", migrate_disks=("vdb", "vda")),
            {},
            ("all", ("vdb", "vda"), False),
            id="disks-in-order",
        ),
        pytest.param(
            MigrationParams(migrate_disks=("vda",), synchronous_writes=True),
            {"copy_storage": "inc"},
            ("inc", ("vda",), True),
            id="config-copy-task-disks-and-sync",
        ),
        pytest.param(
            MigrationParams(copy_storage="all"),
            {"copy_storage_synchronous_writes": True},
            ("all", (), True),
            id="config-sync",
        ),
        pytest.param(
            MigrationParams(copy_storage="all", synchronous_writes=False),
            {"copy_storage_synchronous_writes": True},
            ("all", (), False),
            id="task-sync-off-wins",
        ),
        pytest.param(
            MigrationParams(copy_storage="all", migrate_disks=()),
            {},
            ("all", (), False),
            id="empty-list-is-libvirts-default",
        ),
    ],
)
def test_storage_parameters_come_from_the_task_then_the_config(
    params: MigrationParams, defaults: dict[str, object], expected: tuple[object, ...]
) -> None:
    request = plan(params, **defaults).request
    assert (request.copy_storage, request.migrate_disks, request.synchronous_writes) == expected


@pytest.mark.parametrize(
    ("params", "key"),
    [
        pytest.param(MigrationParams(migrate_disks=("vda",)), "migrate-disks", id="disks"),
        pytest.param(
            MigrationParams(synchronous_writes=True), "copy-storage-synchronous-writes", id="sync"
        ),
    ],
)
def test_disks_or_sync_without_any_copy_are_refused(params: MigrationParams, key: str) -> None:
    """The parser refuses them next to ``copy-storage: none``; without a copy-storage key
    only the agent knows its default."""
    with pytest.raises(InvalidTask) as info:
        plan(params)
    assert str(info.value) == (
        f"{key} needs copy-storage all or inc: the task gives no copy-storage and the agent's"
        " default (migration.copy-storage) is none"
    )
    assert info.value.code == "invalid-message"
    plan(MigrationParams(migrate_disks=(), synchronous_writes=False))  # nothing asked: fine


@pytest.mark.parametrize(
    ("params", "memory_kib", "disk_bytes", "expected"),
    [
        pytest.param(MigrationParams(copy_storage="all"), GIB_KIB, 3 * GIB, 600.0, id="1+3-GiB"),
        pytest.param(MigrationParams(copy_storage="inc"), GIB_KIB, GIB // 2, 225.0, id="inc"),
        pytest.param(MigrationParams(), GIB_KIB, 3 * GIB, 150.0, id="no-copy-no-disk-time"),
        pytest.param(
            MigrationParams(copy_storage="all"), GIB_KIB // 4, GIB // 4, 120.0, id="at-least-min"
        ),
        pytest.param(MigrationParams(copy_storage="all"), GIB_KIB, 0, 150.0, id="unknown-disks"),
        pytest.param(
            MigrationParams(copy_storage="all", completion_timeout=30.0),
            GIB_KIB,
            9 * GIB,
            30.0,
            id="task-value-wins",
        ),
    ],
)
def test_completion_timeout_counts_the_disks_a_copy_moves(
    params: MigrationParams, memory_kib: int, disk_bytes: int, expected: float
) -> None:
    assert plan(params, memory_kib=memory_kib, disk_bytes=disk_bytes).completion_timeout == expected


def test_the_plan_knows_the_memory_it_was_made_for() -> None:
    assert plan(MigrationParams(), memory_kib=2 * GIB_KIB).memory == 2 * GIB


# --------------------------------------------------------------------------------------------
# policy


def sample(iteration: int, *, memory_total: int, remaining: int, disk: int = 0) -> JobStats:
    return JobStats(
        phase="migrating",
        iteration=iteration,
        elapsed=1.0,
        memory_total=memory_total,
        memory_processed=0,
        memory_remaining=remaining,
        data_remaining=remaining + disk,
        dirty_rate=900,
        transfer_rate=1000,
        expected_downtime=5000.0,
        disk_total=4 * GIB,
        disk_processed=4 * GIB - disk,
        disk_remaining=disk,
    )


def test_policy_ignores_disk_phase_samples() -> None:
    policy = ConvergencePolicy(max_downtime=300, post_copy_allowed=True)
    for _ in range(5):
        assert policy.on_iteration(sample(0, memory_total=0, remaining=0, disk=GIB)) is None
    assert policy.last_remaining is None, "a disk-phase sample is no memory pass"
    assert (policy.step, policy.stalls_at_max, policy.post_copy_started) == (0, 0, False)
    # The memory passes are judged as without a storage copy: the third stalls.
    assert policy.on_iteration(sample(1, memory_total=GIB, remaining=GIB)) is None
    assert policy.on_iteration(sample(2, memory_total=GIB, remaining=GIB)) == "post-copy"


# --------------------------------------------------------------------------------------------
# progress: percent and eta over disks + memory

MIB = 1024**2


def disk_sample(elapsed: float, copied: int, *, disk: int = 4 * GIB) -> JobStats:
    """A disk-phase sample as libvirt reports it: no memory figures, no rate yet."""
    return JobStats(
        phase="migrating",
        iteration=0,
        elapsed=elapsed,
        memory_total=0,
        memory_processed=0,
        memory_remaining=0,
        data_remaining=disk - copied,
        dirty_rate=0,
        transfer_rate=0,
        disk_total=disk,
        disk_processed=copied,
        disk_remaining=disk - copied,
    )


def memory_sample(
    elapsed: float, iteration: int, processed: int, remaining: int, *, disk: int = 4 * GIB
) -> JobStats:
    return JobStats(
        phase="migrating",
        iteration=iteration,
        elapsed=elapsed,
        memory_total=GIB,
        memory_processed=processed,
        memory_remaining=remaining,
        data_remaining=remaining,
        dirty_rate=10 * MIB,
        transfer_rate=100 * MIB,
        expected_downtime=50.0,
        disk_total=disk,
        disk_processed=disk,
        disk_remaining=0,
    )


def run(progress: _Progress, samples: list[JobStats]) -> list[dict[str, object]]:
    return [progress.fields(s, phase="migrating", action=None, downtime=None) for s in samples]


def test_percent_covers_disks_and_memory_and_never_falls_at_the_switch_to_memory() -> None:
    """4 GiB of disks at 100 MiB/s, then 1 GiB of memory in two passes."""
    samples = [disk_sample(t * 4.096, copied=t * 400 * MIB) for t in range(11)]
    samples.append(disk_sample(41.0, copied=4 * GIB))
    samples += [
        memory_sample(42.0, 1, 0, GIB),
        memory_sample(46.0, 1, 400 * MIB, 624 * MIB),
        memory_sample(51.0, 2, GIB, 50 * MIB),
        memory_sample(52.0, 3, GIB + 50 * MIB, 2 * MIB),
    ]
    progress = _Progress(max_downtime=None, memory=GIB)
    events = run(progress, samples)
    percents = [float(e["percent"]) for e in events]  # type: ignore[arg-type]
    assert percents == sorted(percents), "percent never decreases"
    assert max(percents) <= 99.0
    # The disks are 4/5 of the whole: all of them copied is 80 %, not 99 %, and memory takes
    # it on from there without a jump.
    assert percents[11] == 80.0
    assert percents[12] == 80.0
    assert 80.0 < percents[13] < 99.0
    assert percents[5] == pytest.approx(100 * 2000 / 5120, abs=0.1)
    final = progress.final(downtime=None)
    assert final["percent"] == 100.0


def test_without_the_guest_memory_the_percent_still_never_falls() -> None:
    progress = _Progress(max_downtime=None)  # the back-end listed no memory for the VM
    events = run(progress, [disk_sample(1.0, GIB), disk_sample(2.0, 4 * GIB)])
    events += run(progress, [memory_sample(3.0, 1, 0, GIB), memory_sample(4.0, 1, GIB // 2, 0)])
    percents = [float(e["percent"]) for e in events]  # type: ignore[arg-type]
    assert percents == sorted(percents)
    assert percents[0] == 25.0


def test_eta_during_the_disk_phase_is_the_disks_then_one_pass_of_memory() -> None:
    progress = _Progress(max_downtime=None, memory=GIB)
    first, second, repeat = run(
        progress, [disk_sample(10.0, GIB), disk_sample(20.0, 2 * GIB), disk_sample(20.0, 2 * GIB)]
    )
    assert "eta" not in first, "one sample gives no rate: no estimate"
    assert first["transfer-rate"] == 0
    rate = GIB / 10  # measured between the two samples
    assert second["transfer-rate"] == round(rate)
    assert second["eta"] == round(2 * GIB / rate + GIB / rate, 1) == 30.0
    assert repeat["eta"] == second["eta"], "a repeated sample keeps the measured rate"


def test_eta_during_the_disk_phase_uses_a_reported_rate_and_knows_when_disks_grow() -> None:
    progress = _Progress(max_downtime=None, memory=GIB)
    reported = replace(disk_sample(10.0, GIB), transfer_rate=int(GIB / 8))
    (event,) = run(progress, [reported])
    assert event["eta"] == 32.0  # (3 GiB + 1 GiB) / (1/8 GiB/s)
    # The guest writes faster than the mirror copies: what remains does not shrink.
    progress = _Progress(max_downtime=None, memory=GIB)
    growing = [disk_sample(10.0, GIB), replace(disk_sample(20.0, 2 * GIB), disk_remaining=4 * GIB)]
    assert "eta" not in run(progress, growing)[-1]


def test_eta_after_the_disks_is_the_memory_estimate() -> None:
    progress = _Progress(max_downtime=None, memory=GIB)
    (event,) = run(progress, [memory_sample(42.0, 1, 0, GIB)])
    assert event["eta"] == round(GIB / (90 * MIB), 1)
    assert event["transfer-rate"] == 100 * MIB


def test_events_carry_disk_fields_only_with_a_storage_copy() -> None:
    progress = _Progress(max_downtime=None, memory=GIB)
    (plain,) = run(progress, [replace(memory_sample(1.0, 1, 0, GIB), disk_total=0)])
    assert not {"disk-total", "disk-processed", "disk-remaining"} & set(plain)
    progress = _Progress(max_downtime=None, memory=GIB)
    (event,) = run(progress, [disk_sample(1.0, GIB)])
    assert (event["disk-total"], event["disk-processed"], event["disk-remaining"]) == (
        4 * GIB,
        GIB,
        3 * GIB,
    )
    assert list(event).index("memory-remaining") < list(event).index("disk-total")
    assert list(event).index("disk-remaining") < list(event).index("data-remaining")


def test_the_final_event_reports_the_disks_all_processed() -> None:
    progress = _Progress(max_downtime=None, memory=GIB)
    last = replace(memory_sample(52.0, 3, GIB, 2 * MIB), disk_processed=4 * GIB + 3 * MIB)
    last = replace(last, disk_remaining=MIB)
    run(progress, [disk_sample(1.0, GIB), last])
    final = progress.final(downtime=None)
    assert (final["disk-total"], final["disk-processed"], final["disk-remaining"]) == (
        4 * GIB,
        4 * GIB + 4 * MIB,
        0,
    )
    assert (final["memory-remaining"], final["data-remaining"], final["percent"]) == (0, 0, 100.0)
    without = _Progress(max_downtime=None)
    run(without, [replace(memory_sample(1.0, 1, 0, GIB), disk_total=0)])
    assert "disk-total" not in without.final(downtime=None)


def test_disk_phase() -> None:
    assert disk_phase(disk_sample(1.0, 0))
    assert not disk_phase(memory_sample(1.0, 1, 0, GIB))
    assert not disk_phase(replace(memory_sample(1.0, 1, 0, GIB), disk_total=0))
