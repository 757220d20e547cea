"""Issue 16, the pure parts: a storage copy's parameters from the task and the config, the
completion timeout that counts the disks, and the convergence policy leaving the disk phase
alone."""

from __future__ import annotations

import pytest

from asyncmigfra.errors import InvalidTask
from asyncmigfra.hypervisor.base import JobStats
from asyncmigfra.migration.plan import MigrationPlan, plan_migration
from asyncmigfra.migration.policy import ConvergencePolicy
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
