"""Pure parts of the migration engine: parameter resolution, downtime schedule, policy, percent."""

from __future__ import annotations

from dataclasses import replace

import pytest

from asyncmigfra.hypervisor.base import JobStats
from asyncmigfra.migration.plan import _downtime_schedule, plan_migration
from asyncmigfra.migration.policy import ConvergencePolicy
from asyncmigfra.migration.progress import _Progress, estimate_eta
from asyncmigfra.model import MigrateSpec, MigrationParams
from asyncmigfra.settings import MigrationDefaults
from asyncmigfra.timing import TimeMeasurement

GIB = 1024 * 1024


def stats(iteration: int, remaining: int, processed: int = 0) -> JobStats:
    return JobStats(
        phase="migrating",
        iteration=iteration,
        elapsed=float(iteration),
        memory_total=1 << 30,
        memory_processed=processed,
        memory_remaining=remaining,
        data_remaining=remaining,
        dirty_rate=0,
        transfer_rate=0,
        expected_downtime=None,
    )


def plan(params: MigrationParams, memory_kib: int = GIB, **defaults: object):
    spec = MigrateSpec(vm_name="v", destination="b", parameter=params)
    return plan_migration(
        spec,
        defaults=MigrationDefaults(**defaults),  # type: ignore[arg-type]
        driver="qemu",
        transport="ssh",
        memory_kib=memory_kib,
    )


@pytest.mark.parametrize(
    ("memory_kib", "explicit", "expected"),
    [
        pytest.param(GIB, None, 150.0, id="1-GiB-150-s"),
        pytest.param(GIB // 2, None, 120.0, id="small-guest-at-least-120-s"),
        pytest.param(4 * GIB, None, 600.0, id="4-GiB-600-s"),
        pytest.param(4 * GIB, 30.0, 30.0, id="task-value-wins"),
    ],
)
def test_completion_timeout_default_is_150_s_per_gib_at_least_120(memory_kib, explicit, expected):
    p = plan(MigrationParams(completion_timeout=explicit), memory_kib)
    assert expected == p.completion_timeout


def test_task_parameters_win_over_agent_defaults():
    p = plan(
        MigrationParams(migration_type="live", bandwidth=100, persist=False, retry_counter=3),
        bandwidth=500,
        persist=True,
        retry_counter=1,
    )
    assert (p.request.mode, p.request.bandwidth, p.request.persist, p.retries) == (
        "live",
        100,
        False,
        3,
    )
    p = plan(MigrationParams(), bandwidth=500, auto_converge=True)
    assert (p.request.bandwidth, p.request.auto_converge, p.request.mode) == (500, True, "warm")


def test_vcpu_map_keeps_the_guest_paused_on_the_destination():
    assert plan(MigrationParams(vcpu_map=((1,),))).request.paused is True
    assert plan(MigrationParams()).request.paused is False


def test_downtime_schedule_rises_geometrically_to_the_maximum():
    steps = _downtime_schedule(500)
    assert steps[0] == 50
    assert steps[-1] == 500
    assert steps == sorted(steps)
    assert len(steps) == 5
    assert _downtime_schedule(5)[-1] == 5
    assert _downtime_schedule(1) == [1]


def test_policy_raises_downtime_only_when_an_iteration_stalls():
    policy = ConvergencePolicy(max_downtime=500, post_copy_allowed=False)
    assert policy.on_iteration(stats(1, 1000)) is None
    assert policy.on_iteration(stats(2, 500)) is None  # progress: no change
    assert policy.downtime == 50
    assert policy.on_iteration(stats(3, 500)) == "raise-downtime"  # stalled
    assert policy.downtime > 50


def test_policy_switches_to_post_copy_after_the_maximum_when_allowed():
    policy = ConvergencePolicy(max_downtime=500, post_copy_allowed=True)
    actions = [policy.on_iteration(stats(i, 1000)) for i in range(1, 12)]
    assert actions.count("raise-downtime") == len(policy.schedule) - 1
    assert "post-copy" in actions
    assert policy.downtime == 500
    first = actions.index("post-copy")
    assert all(a is None for a in actions[first + 1 :]), "post-copy is started once"


def test_policy_never_post_copies_when_not_allowed():
    policy = ConvergencePolicy(max_downtime=500, post_copy_allowed=False)
    actions = [policy.on_iteration(stats(i, 1000)) for i in range(1, 30)]
    assert "post-copy" not in actions


def test_percent_never_decreases_and_stays_below_100_until_done():
    progress = _Progress(max_downtime=300)
    seen = []
    for processed, remaining in [(10, 90), (50, 50), (60, 80), (95, 5), (100, 0), (100, 40)]:
        fields = progress.fields(
            stats(1, remaining, processed), phase="migrating", action=None, downtime=300
        )
        seen.append(fields["percent"])
    assert seen == sorted(seen)
    assert max(seen) <= 99.0
    assert progress.final(downtime=300)["percent"] == 100.0


def test_eta_is_what_is_left_over_the_rate_it_shrinks_at_and_absent_when_it_does_not():
    mib = 1 << 20
    running = stats(2, 900 * mib)
    fast = replace(running, transfer_rate=1000 * mib, dirty_rate=100 * mib)
    assert estimate_eta(fast) == 1.0  # 900 MiB at 1000 - 100 MiB/s
    post = replace(fast, phase="post-copy", dirty_rate=2000 * mib)
    assert estimate_eta(post) == 0.9  # post-copy: dirtied pages are not sent again
    stalled = replace(fast, dirty_rate=1000 * mib)
    assert estimate_eta(stalled) is None
    assert estimate_eta(running) is None  # no rate reported yet
    progress = _Progress(max_downtime=300)
    assert progress.fields(fast, phase="migrating", action=None, downtime=300)["eta"] == 1.0
    assert "eta" not in progress.fields(stalled, phase="migrating", action=None, downtime=300)
    assert progress.final(downtime=300)["eta"] == 0.0


def test_elapsed_never_goes_backwards_into_the_final_event():
    """The back-end's clock (a fake with a time scale runs ahead of the wall clock) carries
    on into the last event instead of jumping back to wall-clock time."""
    progress = _Progress(max_downtime=None)
    sampled = progress.fields(stats(5, 1 << 20), phase="migrating", action=None, downtime=None)
    assert sampled["elapsed"] == 5.0
    final = progress.final(downtime=None)
    assert 5.0 <= float(final["elapsed"]) < 6.0  # type: ignore[arg-type]


def test_time_measurement_accumulates_repeated_tags_and_reports_running_ones():
    timer = TimeMeasurement(enabled=True)
    with timer.measure("migrate"):
        pass
    with timer.measure("migrate"):
        pass
    timer.tick("overall")
    snap = timer.snapshot()
    assert snap is not None
    assert set(snap) == {"migrate", "overall"}
    assert TimeMeasurement(enabled=False).snapshot() is None


def test_agent_default_migration_type_applies_when_the_task_names_none():
    assert plan(MigrationParams(), migration_type="live").request.mode == "live"
    assert plan(MigrationParams()).request.mode == "warm"
    assert plan(MigrationParams(migration_type="offline"), migration_type="live").request.mode == (
        "offline"
    )


def test_without_max_downtime_the_hypervisor_default_is_left_alone():
    p = plan(MigrationParams())
    assert p.max_downtime is None
    assert p.request.initial_downtime is None
    policy = ConvergencePolicy(max_downtime=None, post_copy_allowed=True)
    assert policy.downtime is None
    actions = [policy.on_iteration(stats(i, 1000)) for i in range(1, 6)]
    assert "raise-downtime" not in actions
    assert "post-copy" in actions


def hot(iteration: int, remaining: int, *, dirty: int, rate: int, expected: float) -> JobStats:
    return JobStats(
        phase="migrating",
        iteration=iteration,
        elapsed=float(iteration),
        memory_total=1 << 30,
        memory_processed=0,
        memory_remaining=remaining,
        data_remaining=remaining,
        dirty_rate=dirty,
        transfer_rate=rate,
        expected_downtime=expected,
    )


def test_hopeless_copy_goes_to_post_copy_without_downtime_steps():
    policy = ConvergencePolicy(max_downtime=300, post_copy_allowed=True)
    assert policy.on_iteration(hot(1, 1000, dirty=200, rate=100, expected=900)) is None
    assert policy.on_iteration(hot(2, 1000, dirty=200, rate=100, expected=900)) == "post-copy"
    assert policy.step == 0


def test_a_slow_but_possible_copy_steps_the_downtime_instead():
    policy = ConvergencePolicy(max_downtime=300, post_copy_allowed=True)
    policy.on_iteration(hot(1, 1000, dirty=70, rate=100, expected=900))
    assert policy.on_iteration(hot(2, 1000, dirty=70, rate=100, expected=900)) == "raise-downtime"


def test_a_dirty_rate_levelling_off_just_under_the_link_rate_is_hopeless_too():
    """Measured on the rig: a guest rewriting the same 16 MiB each pass shows 7.1-8.0 MiB/s
    dirtied against 8.0 MiB/s sent; a strict comparison flipped on that noise."""
    policy = ConvergencePolicy(max_downtime=300, post_copy_allowed=True)
    policy.on_iteration(hot(1, 1000, dirty=89, rate=100, expected=2000))
    assert policy.on_iteration(hot(2, 1000, dirty=89, rate=100, expected=2000)) == "post-copy"


def test_a_pass_that_leaves_nothing_is_no_stall():
    policy = ConvergencePolicy(max_downtime=500, post_copy_allowed=True)
    actions = [policy.on_iteration(stats(i, 0)) for i in range(1, 8)]
    assert actions == [None] * 7
    assert policy.step == 0


def test_a_pass_whose_rest_fits_the_downtime_target_is_converging_not_stalling():
    """An idle guest leaves the same few pages every pass; the hypervisor switches over at
    the end of such a pass, so stepping the target up would only race the job's end."""
    policy = ConvergencePolicy(max_downtime=500, post_copy_allowed=True)
    assert policy.downtime is not None
    fits = policy.downtime
    actions = [
        policy.on_iteration(hot(i, 200, dirty=1, rate=100, expected=fits)) for i in range(1, 6)
    ]
    assert actions == [None] * 5
    assert policy.on_iteration(hot(6, 200, dirty=1, rate=100, expected=fits + 1)) == (
        "raise-downtime"
    )


def test_revert_forgets_a_refused_action():
    policy = ConvergencePolicy(max_downtime=500, post_copy_allowed=True)
    policy.on_iteration(stats(1, 1000))
    assert policy.on_iteration(stats(2, 1000)) == "raise-downtime"
    policy.revert("raise-downtime")
    assert policy.step == 0
    policy.post_copy_started = True
    policy.revert("post-copy")
    assert policy.post_copy_started is False
