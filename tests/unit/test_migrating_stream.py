"""Issue 17, the pure parts: the stream options and ``progress-timeout`` from the task then the
agent's defaults (plan), the merged check, and the convergence policy respecting what the
operator set with ``tune migration``."""

from __future__ import annotations

from typing import Any

import pytest

from asyncmigfra.errors import InvalidTask
from asyncmigfra.hypervisor.base import JobStats
from asyncmigfra.migration import swap as swap_module
from asyncmigfra.migration.plan import MigrationPlan, _downtime_schedule, plan_migration
from asyncmigfra.migration.policy import ConvergencePolicy
from asyncmigfra.migration.progress import _Progress
from asyncmigfra.model import MigrateSpec, MigrationParams, SwapWith
from asyncmigfra.settings import MigrationDefaults, default_settings

GIB_KIB = 1024 * 1024
MIB = 1 << 20


def plan(params: MigrationParams, **defaults: Any) -> MigrationPlan:
    return plan_migration(
        MigrateSpec(vm_name="v", destination="b", parameter=params),
        defaults=MigrationDefaults(**defaults),
        driver="qemu",
        transport="ssh",
        memory_kib=GIB_KIB,
    )


# ------------------------------------------------------------------------------ the plan


def test_stream_defaults() -> None:
    p = plan(MigrationParams())
    r = p.request
    assert p.progress_timeout == 150.0
    assert (r.compression, r.compression_level, r.xbzrle_cache, r.zerocopy) == (
        (),
        None,
        None,
        False,
    )
    assert (r.postcopy_bandwidth, r.auto_converge_initial, r.auto_converge_increment) == (
        None,
        None,
        None,
    )
    assert r.tls_destination is None


@pytest.mark.parametrize(
    ("task", "config", "expected"),
    [
        (None, 150.0, 150.0),
        (None, 0.0, 0.0),
        (5.0, 150.0, 5.0),
        (0.0, 30.0, 0.0),
    ],
)
def test_progress_timeout_from_the_task_then_the_config(
    task: float | None, config: float, expected: float
) -> None:
    p = plan(MigrationParams(progress_timeout=task), progress_timeout=config)
    assert p.progress_timeout == expected


def test_every_stream_option_from_the_task() -> None:
    r = plan(
        MigrationParams(
            parallel_connections=4,
            compression=("zstd",),
            compression_level=3,
            postcopy_bandwidth=100,
            auto_converge=True,
            auto_converge_initial=30,
            auto_converge_increment=5,
            tls=True,
            tls_destination="b.example.org",
        )
    ).request
    assert (r.compression, r.compression_level, r.postcopy_bandwidth) == (("zstd",), 3, 100)
    assert (r.auto_converge_initial, r.auto_converge_increment) == (30, 5)
    assert r.tls_destination == "b.example.org"


def test_every_stream_option_from_the_config() -> None:
    r = plan(
        MigrationParams(),
        parallel_connections=2,
        compression=("zlib",),
        compression_level=7,
        postcopy_bandwidth=50,
        auto_converge=True,
        auto_converge_initial=40,
    ).request
    assert (r.compression, r.compression_level, r.postcopy_bandwidth) == (("zlib",), 7, 50)
    assert r.auto_converge_initial == 40
    r = plan(MigrationParams(), compression=("xbzrle",), xbzrle_cache=256).request
    assert (r.compression, r.xbzrle_cache) == (("xbzrle",), 256)
    r = plan(MigrationParams(), zerocopy=True, parallel_connections=4).request
    assert r.zerocopy


def test_the_configured_level_and_cache_tune_the_configured_methods_only() -> None:
    # The task names its own methods: the configured level (for zlib) does not follow.
    r = plan(
        MigrationParams(compression=("zstd",)),
        parallel_connections=2,
        compression=("zlib",),
        compression_level=9,
    ).request
    assert (r.compression, r.compression_level) == (("zstd",), None)
    r = plan(MigrationParams(compression=()), compression=("xbzrle",), xbzrle_cache=128).request
    assert (r.compression, r.xbzrle_cache) == ((), None), "compression: [] turns it off"
    # A task that gives only the level takes the configured methods with it.
    r = plan(
        MigrationParams(compression_level=2), parallel_connections=2, compression=("zstd",)
    ).request
    assert (r.compression, r.compression_level) == (("zstd",), 2)


def test_a_postcopy_bandwidth_of_0_is_unlimited() -> None:
    assert (
        plan(
            MigrationParams(postcopy_bandwidth=0), postcopy_bandwidth=10
        ).request.postcopy_bandwidth
        is None
    )


@pytest.mark.parametrize(
    ("params", "defaults", "message"),
    [
        (
            MigrationParams(compression=("zstd",)),
            {},
            "compression zstd needs parallel-connections >= 2",
        ),
        (
            MigrationParams(parallel_connections=1),
            {"parallel_connections": 2, "compression": ("zstd",)},
            "compression zstd needs parallel-connections >= 2",
        ),
        (
            MigrationParams(compression=("xbzrle",)),
            {"parallel_connections": 4},
            "compression xbzrle does not work with parallel-connections >= 2",
        ),
        (
            MigrationParams(zerocopy=True, parallel_connections=2),
            {"tls": True},
            "zerocopy does not work with tls",
        ),
        (
            MigrationParams(zerocopy=True, parallel_connections=2),
            {"compressed": True},
            "zerocopy does not work with compression",
        ),
        (
            MigrationParams(zerocopy=True),
            {},
            "zerocopy needs parallel-connections >= 2",
        ),
        (
            MigrationParams(auto_converge_initial=30),
            {},
            "auto-converge-initial needs auto-converge: true",
        ),
        (
            MigrationParams(tls_destination="b"),
            {},
            "tls-destination needs tls: true",
        ),
        (
            MigrationParams(compression_level=12),
            {"parallel_connections": 2, "compression": ("zlib",)},
            "compression-level zlib takes levels 0 to 9",
        ),
        (
            MigrationParams(xbzrle_cache=64),
            {},
            "xbzrle-cache needs xbzrle in compression",
        ),
    ],
)
def test_what_only_the_merge_shows_is_refused_before_anything_moves(
    params: MigrationParams, defaults: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidTask) as info:
        plan(params, **defaults)
    assert message in str(info.value)
    assert "(the task's parameter completed with this agent's migration: defaults)" in str(
        info.value
    )
    assert info.value.code == "invalid-message"


# ---------------------------------------------------------------------------- the policy


def sample(iteration: int, remaining: int, *, expected: float | None = None) -> JobStats:
    return JobStats(
        phase="migrating",
        iteration=iteration,
        elapsed=float(iteration),
        memory_total=1 << 30,
        memory_processed=iteration << 28,
        memory_remaining=remaining,
        data_remaining=remaining,
        dirty_rate=10 * MIB,
        transfer_rate=100 * MIB,
        expected_downtime=expected,
    )


def stall(policy: ConvergencePolicy, passes: int, start: int = 1) -> list[str | None]:
    """``passes`` passes that each leave the same 512 MiB (a stall from the second on)."""
    return [policy.on_iteration(sample(i, 512 * MIB)) for i in range(start, start + passes)]


def test_an_operator_downtime_above_the_schedule_is_never_lowered() -> None:
    policy = ConvergencePolicy(max_downtime=300, post_copy_allowed=False)
    assert policy.downtime == _downtime_schedule(300)[0] == 30
    policy.set_by_operator(1000)
    assert policy.downtime == 1000
    actions = stall(policy, 6)
    assert "raise-downtime" not in actions, "no step of the schedule lies above 1000 ms"
    assert policy.downtime == 1000


def test_a_step_is_the_larger_of_the_schedule_and_the_operator() -> None:
    schedule = _downtime_schedule(300)  # 30, 53, 95, 169, 300
    policy = ConvergencePolicy(max_downtime=300, post_copy_allowed=False)
    policy.set_by_operator(100)
    assert policy.downtime == 100
    assert stall(policy, 2) == [None, "raise-downtime"]
    # 53 and 95 lie under the operator's 100: the next step that raises is 169.
    assert policy.downtime == schedule[3] == 169
    assert stall(policy, 1, start=3) == ["raise-downtime"]
    assert policy.downtime == 300
    assert stall(policy, 3, start=4) == [None, None, None]


def test_an_operator_downtime_without_a_schedule_is_the_target() -> None:
    policy = ConvergencePolicy(max_downtime=None, post_copy_allowed=True)
    assert policy.downtime is None
    policy.set_by_operator(250)
    assert policy.downtime == 250
    # No schedule: two stalls at "the maximum", then post-copy as before.
    assert stall(policy, 4) == [None, None, "post-copy", None]


def test_a_refused_step_reverts_to_the_operator_value() -> None:
    policy = ConvergencePolicy(max_downtime=300, post_copy_allowed=False)
    policy.set_by_operator(60)
    assert stall(policy, 2) == [None, "raise-downtime"]
    assert policy.downtime == 95
    policy.revert("raise-downtime")
    assert policy.downtime == 60


def test_post_copy_the_operator_started_is_not_undone_or_repeated() -> None:
    policy = ConvergencePolicy(max_downtime=300, post_copy_allowed=True)
    policy.post_copy_started = True  # what tune migration does
    assert stall(policy, 6) == [None] * 6
    assert policy.post_copy_started


def test_after_force_complete_the_policy_does_nothing_more() -> None:
    policy = ConvergencePolicy(max_downtime=300, post_copy_allowed=True)
    policy.force_completed = True
    policy.source_suspended = True
    assert stall(policy, 8) == [None] * 8
    assert policy.downtime == 30
    assert not policy.post_copy_started


def test_hopeless_is_judged_against_the_operator_limit_too() -> None:
    """An operator who allows a long downtime makes a copy that fits it not hopeless."""
    hopeless = JobStats(
        phase="migrating",
        iteration=2,
        elapsed=2.0,
        memory_total=1 << 30,
        memory_processed=1 << 30,
        memory_remaining=512 * MIB,
        data_remaining=512 * MIB,
        dirty_rate=100 * MIB,
        transfer_rate=100 * MIB,
        expected_downtime=5000.0,
    )
    policy = ConvergencePolicy(max_downtime=300, post_copy_allowed=True)
    policy.on_iteration(sample(1, 512 * MIB))
    assert policy.on_iteration(hopeless) == "post-copy"
    patient = ConvergencePolicy(max_downtime=300, post_copy_allowed=True)
    patient.set_by_operator(8000)
    patient.on_iteration(sample(1, 512 * MIB))
    assert patient.on_iteration(hopeless) is None, "5 s fits the operator's 8 s"


# -------------------------------------------------------------------------- the events


def test_a_limit_event_carries_action_and_reason() -> None:
    progress = _Progress(max_downtime=300)
    fields = progress.fields(
        sample(2, MIB), phase="migrating", action="abort", downtime=30, reason="progress-timeout"
    )
    assert (fields["action"], fields["reason"]) == ("abort", "progress-timeout")
    assert list(fields)[-2:] == ["action", "reason"]


def test_a_tuned_event_carries_the_values() -> None:
    progress = _Progress(max_downtime=300)
    tuned = {"action": "tuned", "bandwidth": 0, "max-downtime": 500}
    fields = progress.fields(
        sample(2, MIB), phase="migrating", action=None, downtime=500, tuned=tuned
    )
    assert (fields["action"], fields["bandwidth"], fields["max-downtime"]) == ("tuned", 0, 500)
    assert "reason" not in fields
    # The engine's own action takes the slot; the announcement waits for the next event.
    other = progress.fields(
        sample(3, MIB), phase="migrating", action="raise-downtime", downtime=53, tuned=tuned
    )
    assert other["action"] == "raise-downtime"
    assert "bandwidth" not in other


async def test_a_swap_partner_does_not_take_the_tls_destination(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """VM 2 comes to this host: the name in ``tls-destination`` is the destination's."""
    seen: list[MigrateSpec] = []

    async def held(ours: MigrateSpec, theirs: MigrateSpec, *args: object, **kw: object) -> None:
        seen.extend([ours, theirs])

    monkeypatch.setattr(swap_module, "_swap_held", held)
    params = MigrationParams(
        tls=True, tls_destination="b.example.org", swap_with=SwapWith(vm_name="two")
    )
    spec = MigrateSpec(vm_name="one", destination="b", parameter=params)
    settings = default_settings(hostname="a", migration={"swap_lock": "off"})
    await swap_module.swap(spec, None, hypervisor=None, settings=settings)  # type: ignore[arg-type]
    ours, theirs = seen
    assert (ours.vm_name, ours.parameter.tls_destination) == ("one", "b.example.org")
    assert (theirs.vm_name, theirs.parameter.tls_destination) == ("two", None)
    assert theirs.parameter.tls is True
