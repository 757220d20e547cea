"""The fixed cost per migration, learned per destination (``migration.fixedcosts``): the
sample against closed-form cases of the model, the median and its bounds, the store across
restarts, and a migration on the ``fake`` back-end teaching it to the predictions."""

from __future__ import annotations

import math
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_dispatcher import dispatcher

from asyncmigfra.hypervisor.fake import create as create_fake
from asyncmigfra.migration.fixedcosts import (
    MAX_FIXED,
    MIN_FIXED,
    FixedCostLearning,
    fixed_cost_sample,
)
from asyncmigfra.migration.forecast import Forecaster
from asyncmigfra.migration.plan import plan_migration
from asyncmigfra.migration.prediction_inputs import MigrationCosts, PredictionInputs
from asyncmigfra.model import MigrateSpec, MigrationParams
from asyncmigfra.settings import Settings, default_settings
from asyncmigfra.tasks.linkrates import FIXED_COST_FILE_NAME, SAMPLES, FixedCosts
from harness import submit

MIB = 1 << 20
#: No cost but the setup, so the model's times are closed-form.
BARE = MigrationCosts(setup=0.35, pass_overhead=0.0, switchover=0.0, min_pass=0.0)


def idle(memory_mib: int = 100, link_mib: float = 50.0, **more: Any) -> PredictionInputs:
    return PredictionInputs(
        memory=memory_mib * MIB,
        link_rate=link_mib * MIB,
        completion_timeout=600.0,
        costs=BARE,
        **more,
    )


# ---- one sample ----------------------------------------------------------------------


def test_an_idle_guest_costs_what_it_took_beyond_memory_over_the_link() -> None:
    # 100 MiB at 50 MiB/s: 2 s of transfer, whatever setup the inputs assumed.
    assert fixed_cost_sample(idle(), 3.0) == pytest.approx(1.0)
    assert fixed_cost_sample(replace(idle(), costs=replace(BARE, setup=5.0)), 3.0) == (
        pytest.approx(1.0)
    )


def test_the_rate_the_run_showed_replaces_the_predicted_link() -> None:
    # At the 100 MiB/s it showed, 100 MiB took 1 s: the other 2 s were fixed.
    assert fixed_cost_sample(idle(), 3.0, transfer_rate=100.0 * MIB) == pytest.approx(2.0)
    # A rate that is no rate is ignored.
    assert fixed_cost_sample(idle(), 3.0, transfer_rate=0.0) == pytest.approx(1.0)
    assert fixed_cost_sample(idle(), 3.0, transfer_rate=math.nan) == pytest.approx(1.0)


def test_a_disk_copy_counts_as_transfer_and_its_own_setup_stays_apart() -> None:
    # 100 MiB of disk and 100 MiB of memory at 50 MiB/s: 4 s, plus the storage setup.
    inputs = idle(disk_bytes=100 * MIB)
    storage = inputs.costs.storage_setup
    assert fixed_cost_sample(inputs, 5.0) == pytest.approx(1.0 - storage)


def test_a_dirty_guest_costs_what_it_took_beyond_the_models_passes() -> None:
    # Dirtying at half the link: the passes form a geometric series (100, 50, 25, ... MiB);
    # whatever the model makes of them, the sample is the time beyond them.
    hot = idle(dirty_rate=25.0 * MIB, max_downtime=300)
    cold = fixed_cost_sample(idle(), 10.0)
    sample = fixed_cost_sample(hot, 10.0)
    assert cold is not None
    assert sample is not None
    # The passes after the first took 1 + 0.5 + 0.25 + ... s at most: under 2 s more.
    assert cold - 2.0 < sample < cold


def test_samples_are_bounded_and_nonsense_teaches_nothing() -> None:
    assert fixed_cost_sample(idle(), 1.0) == MIN_FIXED  # faster than the model's transfer
    assert fixed_cost_sample(idle(), 1e9) == MAX_FIXED
    assert fixed_cost_sample(idle(), math.nan) is None
    assert fixed_cost_sample(idle(), -1.0) is None
    # Dirtying faster than the link: pre-copy never converges, nothing to subtract.
    assert fixed_cost_sample(idle(dirty_rate=80.0 * MIB), 10.0) is None


# ---- learning ----------------------------------------------------------------------


async def test_the_estimate_is_the_median_of_the_last_samples_per_destination() -> None:
    learning = FixedCostLearning()
    base = MigrationCosts()
    assert learning.costs(base, "b") is base  # nothing learned: the constant
    for i, elapsed in enumerate([3.5, 3.6, 9.0, 3.4, 3.5]):  # one run slowed by a load
        learning.predicted(f"vm{i}", "b", idle())
        sample = await learning.learn(f"vm{i}", "b", elapsed, transfer_rate=None, post_copy=False)
        assert sample == pytest.approx(elapsed - 2.0)
    assert learning.costs(base, "b").setup == pytest.approx(1.5)
    assert learning.costs(base, "b").storage_setup == base.storage_setup
    assert learning.costs(base, "c") is base
    for _ in range(SAMPLES):  # a lasting change takes over
        learning.predicted("vm", "b", idle())
        await learning.learn("vm", "b", 2.5, transfer_rate=None, post_copy=False)
    assert learning.costs(base, "b").setup == pytest.approx(0.5)


async def test_only_a_predicted_pre_copy_run_to_the_predicted_destination_teaches() -> None:
    learning = FixedCostLearning()
    assert await learning.learn("a", "b", 3.0, transfer_rate=None, post_copy=False) is None
    learning.predicted("a", "b", idle())
    assert await learning.learn("a", "b", 3.0, transfer_rate=None, post_copy=True) is None
    learning.predicted("a", "b", idle())
    assert await learning.learn("a", "c", 3.0, transfer_rate=None, post_copy=False) is None
    # A prediction serves one migration.
    learning.predicted("a", "b", idle())
    assert await learning.learn("a", "b", 3.0, transfer_rate=None, post_copy=False) == 1.0
    assert await learning.learn("a", "b", 3.0, transfer_rate=None, post_copy=False) is None
    assert learning.store.samples("b") == 1


async def test_fixed_costs_survive_a_restart_and_an_edited_file_is_bounded(
    tmp_path: Path,
) -> None:
    store = FixedCosts.in_state_dir(tmp_path)
    await store.open()
    await store.record("b", 1.2)
    await store.record("b", 1e6)  # no setup: refused
    assert (tmp_path / FIXED_COST_FILE_NAME).exists()
    again = FixedCosts.in_state_dir(tmp_path)
    await again.open()
    assert again.estimate("b") == pytest.approx(1.2)
    assert again.samples("b") == 1
    # A figure out of bounds written by hand is not loaded.
    db = sqlite3.connect(tmp_path / FIXED_COST_FILE_NAME)
    with db:
        db.execute("INSERT INTO link_rates VALUES ('c', 1.0, 1e9)")
    db.close()
    third = FixedCosts.in_state_dir(tmp_path)
    await third.open()
    assert third.estimate("c") is None
    assert third.estimate("b") == pytest.approx(1.2)


# ---- a migration on the fake teaches the predictions -------------------------------


def _settings() -> Settings:
    base = default_settings(hostname="here")
    return replace(base, migration=replace(base.migration, link_rate=100.0))


async def test_a_slow_setup_on_the_fake_is_learned_and_predicted_next_time() -> None:
    # The fake's destination QEMU takes 1.5 s to start here (its probe still says 0.3 s);
    # at time-scale 1 the fake's seconds are the agent's.
    shared: dict[str, object] = {}
    hv = create_fake(
        {
            "host": "here",
            "domains": [{"name": "idle", "memory": 64 * 1024, "setup-time": 1.5}],
            "peers": {"there": {}},
            "bandwidth": 100,
        },
        hostname="here",
        shared=shared,
    )
    forecaster = Forecaster(settings=_settings())
    spec = MigrateSpec(
        vm_name="idle", destination="there", parameter=MigrationParams(migration_type="live")
    )
    plan = plan_migration(
        spec,
        defaults=_settings().migration,
        driver="fake",
        transport="tcp",
        memory_kib=64 * 1024,
    )
    async with dispatcher(hv, _settings()) as (d, rec):
        before = await forecaster.predict_plan(plan, hv)
        assert before.inputs is not None
        assert before.inputs.costs.setup == pytest.approx(0.3)  # the fake's constant
        d._forecaster = forecaster
        submit(
            d,
            "id: m\ntask: migrate vm\nvm-name: idle\ndestination: there\n"
            "parameter: {migration-type: auto}\n",
        )
        result = await rec.result("m")
        assert result.entries[0].status == "success"
    learned = forecaster.fixed_costs.store.estimate("there")
    assert learned is not None
    assert learned >= 1.5  # at least the setup the fake spent
    assert forecaster.fixed_costs.store.samples("there") == 1
    # The next prediction of the same plan counts the learned setup instead.
    after = await forecaster.predict_plan(replace(plan), hv)
    assert after.inputs is not None
    assert after.inputs.costs.setup == pytest.approx(learned)
    assert before.duration is not None
    assert after.duration == pytest.approx(before.duration - 0.3 + learned)
