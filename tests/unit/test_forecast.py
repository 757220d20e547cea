"""The forecast (issue 18): its inputs, its blockers, the link-rate store, the dirty-rate
memory, and ``migration-type: auto`` and the plan tasks through the dispatcher, all on the
``fake`` back-end (no broker: see tests/broker/test_prediction_fake.py for that)."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_dispatcher import dispatcher, statuses

from asyncmigfra.errors import NotSupported, TaskRejected, WillNotConverge
from asyncmigfra.hypervisor.base import MeasuresDirtyRate
from asyncmigfra.hypervisor.fake import create as create_fake
from asyncmigfra.migration.dirtyrates import DirtyRates
from asyncmigfra.migration.forecast import Forecaster, choose
from asyncmigfra.migration.forecastresult import plan_fields
from asyncmigfra.migration.plan import plan_migration
from asyncmigfra.model import MigrateSpec, MigrationParams, PlanEvacuationSpec, PlanMigrationSpec
from asyncmigfra.settings import Settings, default_settings
from asyncmigfra.tasks.linkrates import SAMPLES, LinkRates
from asyncmigfra.wire.parsing import parse_task
from harness import submit

MIB = 1 << 20
GIB_KIB = 1024 * 1024


def settings(**migration: Any) -> Settings:
    base = default_settings(hostname="here")
    # The fake's link is 100 MiB/s: predict with the same figure.
    values: dict[str, Any] = {"link_rate": 100.0, **migration}
    return replace(base, migration=replace(base.migration, **values))


def fake(shared: dict[str, object], *, scale: float = 50.0, **peer: Any) -> Any:
    doms = [
        {"name": "idle", "memory": 256 * 1024, "vcpus": 1, "dirty-rate": 0},
        {"name": "hot", "memory": 256 * 1024, "vcpus": 1, "dirty-rate": 200},
        {"name": "warmish", "memory": 256 * 1024, "vcpus": 1, "dirty-rate": 20},
    ]
    return create_fake(
        {
            "host": "here",
            "domains": doms,
            "peers": {"there": peer or {}},
            "bandwidth": 100,
            "time-scale": scale,
        },
        hostname="here",
        shared=shared,
    )


def spec(vm: str, dest: str = "there", **params: Any) -> MigrateSpec:
    return MigrateSpec(vm_name=vm, destination=dest, parameter=MigrationParams(**params))


# ------------------------------------------------------------------------ the forecast


async def test_an_idle_guest_converges_live_with_the_fakes_figures() -> None:
    hv = fake({})
    assert isinstance(hv, MeasuresDirtyRate)
    forecaster = Forecaster(settings=settings())
    forecast = await forecaster.forecast(spec("idle", migration_type="live"), hv)
    assert (forecast.mode, forecast.converges, forecast.blockers) == ("live", True, ())
    assert forecast.memory == 256 * MIB
    assert forecast.dirty.rate == 0.0
    assert forecast.dirty.source == "measured"
    assert forecast.link_rate == 100 * MIB
    assert forecast.link_source == "configured"
    # One pass of 256 MiB at 100 MiB/s after the setup: about 2.9 s.
    assert forecast.duration == pytest.approx(0.3 + 2.56 + 0.005 + 0.01, abs=0.05)
    fields = plan_fields(forecast)
    assert list(fields) == [
        "destination",
        "mode",
        "converges",
        "predicted-duration",
        "predicted-downtime",
        "passes",
        "memory",
        "disk",
        "dirty-rate",
        "transfer-rate",
        "blockers",
    ]
    assert fields["passes"] == 1
    assert fields["transfer-rate"] == 100 * MIB


async def test_a_guest_dirtying_faster_than_the_link_does_not_converge_live() -> None:
    hv = fake({})
    forecaster = Forecaster(settings=settings())
    forecast = await forecaster.forecast(spec("hot", migration_type="live"), hv)
    assert not forecast.converges
    assert forecast.code == "will-not-converge"
    assert forecast.dirty.rate == 200 * MIB
    assert "pre-copy" in forecast.reason
    auto = await forecaster.forecast(spec("hot", migration_type="auto"), hv)
    assert (auto.mode, auto.converges, auto.blockers) == ("post-copy", True, ())


async def test_a_bandwidth_cap_is_the_link_rate() -> None:
    hv = fake({})
    forecast = await Forecaster(settings=settings()).forecast(
        spec("warmish", migration_type="live", bandwidth=10), hv
    )
    assert (forecast.link_rate, forecast.link_source) == (10 * MIB, "bandwidth")
    assert not forecast.converges  # 20 MiB/s dirtied against 10 MiB/s sent


@pytest.mark.parametrize(
    ("vm", "dest", "code", "predicted"),
    [
        ("idle", "nowhere", "connection-failed", True),
        ("idle", "here", "incompatible-destination", True),
        ("ghost", "there", "vm-not-found", False),
    ],
)
async def test_pre_check_refusals_become_blockers(
    vm: str, dest: str, code: str, predicted: bool
) -> None:
    hv = fake({})
    forecast = await Forecaster(settings=settings()).forecast(
        spec(vm, dest, migration_type="live"), hv
    )
    assert forecast.code == code
    assert forecast.blockers[0].text
    assert (forecast.verdict is not None) == predicted


async def test_too_little_memory_on_the_destination_is_a_blocker() -> None:
    hv = fake({}, memory=128 * 1024)  # 128 MiB host: the 256 MiB guest does not fit
    forecast = await Forecaster(settings=settings()).forecast(spec("idle"), hv)
    assert forecast.code == "incompatible-destination"
    assert "not enough free memory" in forecast.reason
    assert not plan_fields(forecast)["converges"]


async def test_a_plan_changes_nothing() -> None:
    shared: dict[str, object] = {}
    hv = fake(shared)
    before = {name: (d.state, d.memory) for name, d in hv.host.domains.items()}
    await Forecaster(settings=settings()).forecast(spec("hot", migration_type="auto"), hv)
    assert {name: (d.state, d.memory) for name, d in hv.host.domains.items()} == before
    assert not hv.cluster.jobs


def test_choose_refuses_with_the_numbers_when_post_copy_is_not_allowed() -> None:
    async def run() -> None:
        hv = fake({})
        forecaster = Forecaster(settings=settings(allow_post_copy=False))
        s = spec("hot", migration_type="auto")
        forecast = await forecaster.forecast(s, hv)
        assert forecast.code == "will-not-converge"
        plan = plan_migration(
            s,
            defaults=forecaster.settings.migration,
            driver="qemu",
            transport="ssh",
            memory_kib=256 * 1024,
        )
        with pytest.raises(WillNotConverge) as caught:
            choose(plan, forecast)
        text = str(caught.value)
        assert "post-copy is not allowed" in text
        assert "dirty rate 200.0 MiB/s" in text
        assert "link 100.0 MiB/s" in text

    asyncio.run(run())


def test_auto_post_copy_gets_a_timeout_from_the_prediction_and_switches_at_it() -> None:
    async def run() -> None:
        hv = fake({})
        forecaster = Forecaster(settings=settings())
        s = spec("hot", migration_type="auto")
        forecast = await forecaster.forecast(s, hv)
        plan = plan_migration(
            s,
            defaults=forecaster.settings.migration,
            driver="qemu",
            transport="ssh",
            memory_kib=256 * 1024,
        )
        chosen = choose(plan, forecast)
        assert chosen.request.mode == "post-copy"
        assert chosen.timeout_action == "post-copy"
        assert forecast.duration is not None
        assert chosen.completion_timeout == max(30.0, 3 * forecast.duration)
        given = replace(plan, completion_timeout=500.0, timeout_given=True)
        assert choose(given, forecast).completion_timeout == 500.0

    asyncio.run(run())


# ------------------------------------------------------------------------ the link rates


async def test_link_rates_survive_a_reopen_and_keep_the_last_samples(tmp_path: Path) -> None:
    store = LinkRates.in_state_dir(tmp_path)
    await store.open()
    assert store.estimate("b") is None
    for rate in [10.0, 1000.0, 20.0] + [30.0] * SAMPLES:
        await store.record("b", rate * MIB)
    await store.record("c", 5 * MIB)
    await store.record("c", float("nan"))  # ignored
    again = LinkRates.in_state_dir(tmp_path)
    await again.open()
    assert again.samples("b") == SAMPLES
    assert again.estimate("b") == 30 * MIB  # the old outliers are gone
    assert again.estimate("c") == 5 * MIB
    assert again.problem is None


async def test_the_median_ignores_one_slow_run(tmp_path: Path) -> None:
    store = LinkRates(None)
    for rate in (100.0, 100.0, 5.0, 100.0):
        await store.record("b", rate)
    assert store.estimate("b") == 100.0


async def test_an_unreadable_store_is_logged_and_the_agent_learns_in_memory(
    tmp_path: Path,
) -> None:
    path = tmp_path / "linkrates.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    store = LinkRates(path)
    await store.open()
    assert store.problem is not None
    await store.record("b", 7 * MIB)
    assert store.estimate("b") == 7 * MIB
    assert path.read_bytes().startswith(b"this is not")  # left as it was


async def test_a_store_that_cannot_be_written_keeps_working_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "linkrates.sqlite"
    store = LinkRates(path)
    await store.open()
    await store.record("b", 1.0)
    db = sqlite3.connect(path)
    db.execute("DROP TABLE link_rates")
    db.execute("CREATE TABLE link_rates (x)")  # a write now fails
    db.commit()
    db.close()
    await store.record("b", 3.0)
    assert store.problem is not None
    assert store.estimate("b") == 2.0


# ------------------------------------------------------------------------ the dirty rates


class CountingProbe:
    def __init__(self, rate: float, delay: float = 0.05) -> None:
        self.rate, self.delay, self.calls = rate, delay, 0

    async def measure_dirty_rate(self, vm_name: str, *, seconds: int = 1) -> float:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return self.rate


async def test_one_probe_per_vm_serves_concurrent_askers_and_is_remembered() -> None:
    probe = CountingProbe(5.0)
    rates = DirtyRates()
    first = await asyncio.gather(*(rates.rate(probe, "g", measure=True) for _ in range(5)))  # type: ignore[arg-type]
    assert probe.calls == 1
    assert [r.rate for r in first] == [5.0] * 5
    again = await rates.rate(probe, "g", measure=True)  # type: ignore[arg-type]
    assert (again.rate, again.source, probe.calls) == (5.0, "recent", 1)


async def test_a_stale_figure_is_measured_again_and_a_failed_probe_falls_back() -> None:
    probe = CountingProbe(5.0)
    rates = DirtyRates(fresh_for=0.0)
    rates.observed("g", 9.0)
    await asyncio.sleep(0.01)
    assert (await rates.rate(probe, "g", measure=True)).source == "measured"  # type: ignore[arg-type]

    class Failing:
        async def measure_dirty_rate(self, vm_name: str, *, seconds: int = 1) -> float:
            raise NotSupported("this function is not supported by the connection driver")

    rates.observed("h", 9.0)
    await asyncio.sleep(0.01)
    answer = await rates.rate(Failing(), "h", measure=True)  # type: ignore[arg-type]
    assert (answer.rate, answer.source) == (9.0, "last-migration")
    assert answer.note is not None
    assert "not supported" in answer.note
    unknown = await rates.rate(Failing(), "x", measure=True)  # type: ignore[arg-type]
    assert (unknown.rate, unknown.source) == (None, "unknown")


async def test_probes_are_bounded() -> None:
    running = 0
    most = 0

    class Slow:
        async def measure_dirty_rate(self, vm_name: str, *, seconds: int = 1) -> float:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.02)
            running -= 1
            return 1.0

    rates = DirtyRates(max_probes=2)
    await asyncio.gather(*(rates.rate(Slow(), f"vm{i}", measure=True) for i in range(6)))  # type: ignore[arg-type]
    assert most == 2


# ------------------------------------------------------------------------ parsing


def test_plan_tasks_parse_with_the_keys_of_migrate_and_evacuate() -> None:
    msg = parse_task(
        b"task: plan migration\nid: p1\nvm-name: a\ndestination: b\n"
        b"parameter: {migration-type: auto, bandwidth: 10}\n"
    )
    (sub,) = msg.subtasks
    assert isinstance(sub, PlanMigrationSpec)
    assert sub.migration.parameter.migration_type == "auto"
    assert sub.migration.parameter.bandwidth == 10
    assert msg.kind.result_name == "plan"
    assert msg.vm_names == ("a",)
    msg = parse_task(
        b"task: plan evacuation\nid: p2\ndestinations: [b, c]\nparameter: {mode: scatter}\n"
    )
    (sub,) = msg.subtasks
    assert isinstance(sub, PlanEvacuationSpec)
    assert sub.evacuation.destinations == ("b", "c")
    assert sub.evacuation.mode == "scatter"


@pytest.mark.parametrize(
    "text",
    [
        b"task: plan migration\nvm-name: a\n",  # no destination
        b"task: plan migration\nvm-name: a\ndestination: b\nparameter: {migration-type: fast}\n",
        b"task: plan evacuation\nparameter: {}\n",  # no destinations
        b"task: plan migration\nvm-name: [a]\ndestination: b\n",
    ],
)
def test_plan_tasks_are_as_strict_as_the_tasks_they_plan(text: bytes) -> None:
    with pytest.raises(TaskRejected) as caught:
        parse_task(text)
    assert caught.value.code == "invalid-message"


# ------------------------------------------------------------------------ through the dispatcher


def _events(rec: Any, task_id: str) -> list[str]:
    out = []
    for e in rec.events:
        if e.get("id") != task_id:
            continue
        out.append(f"phase:{e['phase']}" if e["event"] == "phase" else str(e["event"]))
    return out


async def test_plan_migration_answers_a_plan_result_and_changes_nothing() -> None:
    shared: dict[str, object] = {}
    hv = fake(shared)
    async with dispatcher(hv, settings()) as (d, rec):
        submit(
            d,
            "id: p\ntask: plan migration\nvm-name: hot\ndestination: there\n"
            "parameter: {migration-type: auto}\n",
        )
        result = await rec.result("p")
    assert result.result == "plan"
    assert not result.flat
    (entry,) = result.entries
    assert (entry.vm_name, entry.status, entry.code) == ("hot", "success", None)
    assert entry.extra["mode"] == "post-copy"
    assert entry.extra["converges"] is True
    assert entry.extra["dirty-rate"] == 200 * MIB
    assert "wave" not in entry.extra
    assert not hv.cluster.jobs
    assert hv.cluster.locate("hot") == ["here"]
    assert _events(rec, "p") == ["accepted", "done"]


async def test_plan_evacuation_places_predicts_and_puts_every_vm_in_wave_1() -> None:
    shared: dict[str, object] = {}
    hv = fake(shared)
    async with dispatcher(hv, settings()) as (d, rec):
        submit(
            d,
            "id: pe\ntask: plan evacuation\ndestinations: [there, nowhere]\n"
            "parameter: {migration-type: live}\n",
        )
        result = await rec.result("pe")
    assert result.result == "plan"
    by_vm = {e.vm_name: e for e in result.entries}
    assert set(by_vm) == {"hot", "idle", "warmish"}
    assert {e.extra["wave"] for e in result.entries} == {1}
    assert {e.extra["destination"] for e in result.entries} == {"there"}
    assert statuses(result) == [
        ("hot", "error", "will-not-converge"),
        ("idle", "success", None),
        ("warmish", "success", None),
    ]
    assert by_vm["hot"].extra["blockers"]
    assert not hv.cluster.jobs


async def test_a_plan_does_not_wait_behind_a_migration_of_the_same_vm() -> None:
    shared: dict[str, object] = {}
    hv = fake(shared, scale=1.0)  # a real-time migration of 2.9 s
    async with dispatcher(hv, settings()) as (d, rec):
        submit(
            d,
            "id: m\ntask: migrate vm\nvm-name: idle\ndestination: there\n"
            "parameter: {migration-type: live}\n",
        )
        await rec.until(
            lambda: any(e["phase"] == "migrating" for e in rec.events_for("m", "phase"))
        )
        submit(d, "id: p\ntask: plan migration\nvm-name: idle\ndestination: there\n")
        plan = await rec.result("p")
        assert not rec.results_for("m")  # answered while the migration still runs
        assert "runs or waits on idle" in (plan.entries[0].details or "")
        d.cancel_all("done")


async def test_auto_chooses_live_for_an_idle_guest_and_reports_the_prediction() -> None:
    shared: dict[str, object] = {}
    hv = fake(shared)
    async with dispatcher(hv, settings()) as (d, rec):
        submit(
            d,
            "id: a\ntask: migrate vm\nvm-name: idle\ndestination: there\n"
            "parameter: {migration-type: auto}\n",
        )
        result = await rec.result("a")
    (entry,) = result.entries
    assert (entry.status, entry.extra["destination"]) == ("success", "there")
    predicted = entry.extra["predicted-duration"]
    assert isinstance(predicted, float)
    assert predicted == pytest.approx(2.875, abs=0.05)
    order = _events(rec, "a")
    assert order.index("plan") < order.index("phase:migrating")
    (plan_event,) = rec.events_for("a", "plan")
    assert plan_event["mode"] == "live"
    assert plan_event["converges"] is True
    (done,) = rec.events_for("a", "done")
    assert done["predicted-duration"] == predicted
    assert all(p.get("phase") != "post-copy" for p in rec.events_for("a", "progress"))
    assert hv.cluster.locate("idle") == ["there"]


async def test_auto_chooses_post_copy_for_a_guest_that_dirties_faster_than_the_link() -> None:
    shared: dict[str, object] = {}
    hv = fake(shared)
    async with dispatcher(hv, settings()) as (d, rec):
        submit(
            d,
            "id: a\ntask: migrate vm\nvm-name: hot\ndestination: there\n"
            "parameter: {migration-type: auto}\n",
        )
        result = await rec.result("a")
    (entry,) = result.entries
    assert entry.status == "success", entry.details
    (plan_event,) = rec.events_for("a", "plan")
    assert plan_event["mode"] == "post-copy"
    assert "phase:post-copy" in _events(rec, "a")
    assert hv.cluster.locate("hot") == ["there"]


async def test_auto_refuses_when_post_copy_is_not_allowed_and_starts_nothing() -> None:
    shared: dict[str, object] = {}
    hv = fake(shared)
    async with dispatcher(hv, settings(allow_post_copy=False)) as (d, rec):
        submit(
            d,
            "id: a\ntask: migrate vm\nvm-name: hot\ndestination: there\n"
            "parameter: {migration-type: auto}\n",
        )
        result = await rec.result("a")
    (entry,) = result.entries
    assert (entry.status, entry.code) == ("error", "will-not-converge")
    assert "nothing was started" in (entry.details or "")
    assert "phase:migrating" not in _events(rec, "a")
    assert "plan" in _events(rec, "a")
    assert hv.cluster.locate("hot") == ["here"]
    assert not hv.cluster.jobs


async def test_a_migration_teaches_the_link_rate_and_the_dirty_rate() -> None:
    shared: dict[str, object] = {}
    hv = fake(shared)
    forecaster = Forecaster(settings=settings())
    async with dispatcher(hv, settings()) as (d, rec):
        d._forecaster = forecaster
        submit(
            d,
            "id: m\ntask: migrate vm\nvm-name: warmish\ndestination: there\n"
            "parameter: {migration-type: live}\n",
        )
        result = await rec.result("m")
    assert result.entries[0].status == "success"
    assert forecaster.link_rates.samples("there") == 1
    assert forecaster.link_rates.estimate("there") == pytest.approx(100 * MIB)
    # Seen in the migration: 20 MiB/s (the fake reports it exactly).
    seen = await forecaster.dirty_rates.rate(hv, "warmish", measure=False)
    assert seen.rate == pytest.approx(20 * MIB)
    assert seen.source == "recent"


async def test_a_capped_migration_does_not_teach_the_link_rate() -> None:
    shared: dict[str, object] = {}
    hv = fake(shared)
    forecaster = Forecaster(settings=settings())
    async with dispatcher(hv, settings()) as (d, rec):
        d._forecaster = forecaster
        submit(
            d,
            "id: m\ntask: migrate vm\nvm-name: idle\ndestination: there\n"
            "parameter: {migration-type: live, bandwidth: 50}\n",
        )
        await rec.result("m")
    assert forecaster.link_rates.samples("there") == 0


async def test_swap_with_auto_is_not_supported() -> None:
    shared: dict[str, object] = {}
    hv = fake(shared)
    async with dispatcher(hv, settings()) as (d, rec):
        submit(
            d,
            "id: s\ntask: migrate vm\nvm-name: idle\ndestination: there\n"
            "parameter: {migration-type: auto, swap-with: {vm-name: other}}\n",
        )
        result = await rec.result("s")
    assert statuses(result) == [("idle", "error", "not-supported")]


async def test_a_live_migration_is_predicted_only_when_its_dirty_rate_is_known() -> None:
    shared: dict[str, object] = {}
    hv = fake(shared)
    forecaster = Forecaster(settings=settings())
    async with dispatcher(hv, settings()) as (d, rec):
        d._forecaster = forecaster
        submit(
            d,
            "id: m1\ntask: migrate vm\nvm-name: idle\ndestination: there\ntime-measurement: true\n"
            "parameter: {migration-type: live}\n",
        )
        first = await rec.result("m1")
        forecaster.dirty_rates.observed("warmish", 20.0 * MIB)
        submit(
            d,
            "id: m2\ntask: migrate vm\nvm-name: warmish\ndestination: there\n"
            "parameter: {migration-type: live}\n",
        )
        second = await rec.result("m2")
    assert rec.events_for("m1", "plan") == []  # unknown: no probe for a type that does not choose
    assert "predicted-duration" not in first.entries[0].extra
    assert "prediction" not in (first.entries[0].time_measurement or {})
    assert forecaster.dirty_rates.probes == 0
    (plan,) = rec.events_for("m2", "plan")
    assert (plan["mode"], plan["converges"]) == ("live", True)
    assert second.entries[0].extra["predicted-duration"] == plan["predicted-duration"]
    order = _events(rec, "m2")
    assert "phase:predicting" not in order
    assert order.index("plan") < order.index("phase:migrating")
