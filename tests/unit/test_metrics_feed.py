"""The metrics feed: events and results in, series out (read back from the registry), and
the ``metrics.listen`` startup paths."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from typing import Any

import pytest

from asyncmigfra.errors import StartupError
from asyncmigfra.model import ResultEntry, ResultMessage
from asyncmigfra.settings import default_settings, settings_from_text
from asyncmigfra.transport.metrics import feed as feed_module
from asyncmigfra.transport.metrics.feed import LINGER, MetricsFeed, MetricsSink, Vitals
from asyncmigfra.transport.metrics.opening import open_metrics
from asyncmigfra.transport.metrics.series import Series

ROUTE = ("vm1", "host-a", "host-b")


class Clocks:
    def __init__(self) -> None:
        self.wall = 1_000.0
        self.mono = 50.0


def make_feed(routes: dict[tuple[str | None, str], tuple[str, str]] | None = None) -> Any:
    known = {("m1", "vm1"): ("host-a", "host-b")} if routes is None else routes
    clocks = Clocks()
    feed = MetricsFeed(
        Series(),
        route=lambda task_id, vm: known.get((task_id, vm)),
        name="host-a",
        version="1.2.3",
        hypervisor="fake",
        clock=lambda: clocks.wall,
        monotonic=lambda: clocks.mono,
    )
    return feed, clocks


def value(feed: MetricsFeed, metric: str, /, **labels: str) -> float | None:
    return feed.series.registry.get_sample_value(metric, labels)


def mig(name: str, feed: MetricsFeed) -> float | None:
    return value(feed, name, vm="vm1", source="host-a", destination="host-b")


def progress(**fields: object) -> dict[str, object]:
    return {"event": "progress", "id": "m1", "host": "host-a", "vm-name": "vm1", **fields}


def phase(name: str) -> dict[str, object]:
    return {"event": "phase", "id": "m1", "host": "host-a", "vm-name": "vm1", "phase": name}


def done(status: str, duration: float, **more: object) -> dict[str, object]:
    return {
        "event": "done",
        "id": "m1",
        "vm-name": "vm1",
        "status": status,
        "duration": duration,
        **more,
    }


SAMPLE = {
    "phase": "migrating",
    "iteration": 2,
    "memory-total": 1000,
    "memory-processed": 400,
    "memory-remaining": 600,
    "disk-total": 500,
    "disk-processed": 100,
    "disk-remaining": 50,
    "data-remaining": 650,
    "dirty-rate": 7,
    "transfer-rate": 90,
    "expected-downtime": 250,
}


def test_progress_sets_the_migration_series_with_its_route():
    feed, clocks = make_feed()
    feed.observe_event(phase("migrating"))
    feed.observe_event(progress(**SAMPLE))

    assert mig("asyncmigfra_migration_data_total_bytes", feed) == 1500
    assert mig("asyncmigfra_migration_data_processed_bytes", feed) == 500
    assert mig("asyncmigfra_migration_data_remaining_bytes", feed) == 650
    assert mig("asyncmigfra_migration_disk_remaining_bytes", feed) == 50
    assert mig("asyncmigfra_migration_dirty_memory_rate_bytes", feed) == 7
    assert mig("asyncmigfra_migration_transfer_rate_bytes", feed) == 90
    assert mig("asyncmigfra_migration_expected_downtime_seconds", feed) == 0.25
    assert mig("asyncmigfra_migration_iteration", feed) == 2
    assert mig("asyncmigfra_migration_last_progress_timestamp_seconds", feed) == clocks.wall
    assert (
        value(
            feed,
            "asyncmigfra_migration_phase",
            vm="vm1",
            source="host-a",
            destination="host-b",
            phase="migrating",
        )
        == 1
    )


def test_the_progress_stamp_stays_while_no_data_moves():
    feed, clocks = make_feed()
    feed.observe_event(phase("migrating"))
    feed.observe_event(progress(**SAMPLE))
    started = clocks.wall
    clocks.wall += 30
    feed.observe_event(progress(**{**SAMPLE, "transfer-rate": 0}))  # the same bytes: a stall

    assert mig("asyncmigfra_migration_last_progress_timestamp_seconds", feed) == started
    clocks.wall += 1
    feed.observe_event(progress(**{**SAMPLE, "memory-processed": 401}))
    assert mig("asyncmigfra_migration_last_progress_timestamp_seconds", feed) == clocks.wall


def test_a_phase_replaces_the_previous_one():
    feed, _ = make_feed()
    feed.observe_event(phase("pre-checks"))
    feed.observe_event(phase("migrating"))
    text = feed.series.registry.get_sample_value
    labels = {"vm": "vm1", "source": "host-a", "destination": "host-b"}

    assert text("asyncmigfra_migration_phase", {**labels, "phase": "pre-checks"}) is None
    assert text("asyncmigfra_migration_phase", {**labels, "phase": "migrating"}) == 1


def test_events_of_other_tasks_make_no_series():
    feed, _ = make_feed()
    feed.observe_event({"event": "phase", "id": "s1", "vm-name": "vm9", "phase": "starting"})
    feed.observe_event({"event": "accepted", "id": "m1", "task": "migrate vm"})

    names = {m.name for m in feed.series.registry.collect() if m.samples}
    assert not any(n.startswith("asyncmigfra_migration_phase") for n in names)


def test_done_observes_duration_downtime_and_the_prediction_ratio():
    feed, _ = make_feed()
    feed.observe_event(phase("migrating"))
    feed.observe_event(
        {
            "event": "plan",
            "id": "m1",
            "vm-name": "vm1",
            "destination": "host-b",
            "predicted-duration": 10.0,
        }
    )
    feed.observe_event(progress(**{**SAMPLE, "phase": "completed", "downtime": 20}))
    feed.observe_event(done("success", 12.0, **{"predicted-duration": 10.0}))
    route = {"source": "host-a", "destination": "host-b"}

    assert mig("asyncmigfra_migration_predicted_duration_seconds", feed) == 10.0
    assert (
        value(feed, "asyncmigfra_migration_duration_seconds_sum", **route, result="success") == 12
    )
    assert value(feed, "asyncmigfra_migration_downtime_seconds_sum", **route) == 0.02
    ratio = value(feed, "asyncmigfra_migration_duration_prediction_ratio_sum", **route)
    assert ratio == pytest.approx(1.2)
    assert (
        value(
            feed,
            "asyncmigfra_migration_phase",
            vm="vm1",
            source="host-a",
            destination="host-b",
            phase="succeeded",
        )
        == 1
    )


def test_a_migration_refused_in_its_pre_checks_is_no_migration_time():
    feed, _ = make_feed()
    feed.observe_event(phase("pre-checks"))
    feed.observe_event(done("error", 0.2))

    route = {"source": "host-a", "destination": "host-b", "result": "error"}
    assert value(feed, "asyncmigfra_migration_duration_seconds_count", **route) is None


def test_finished_series_disappear_after_the_linger_time():
    feed, clocks = make_feed()
    feed.observe_event(phase("migrating"))
    feed.observe_event(progress(**SAMPLE))
    feed.observe_event(done("success", 3.0))
    vitals = Vitals(broker_connected=True, queued=0, running=0, backlog=0, journal="ok")

    clocks.mono += LINGER - 1
    feed.observe_vitals(vitals, 0.0)
    assert mig("asyncmigfra_migration_data_remaining_bytes", feed) == 650
    clocks.mono += 1
    feed.observe_vitals(vitals, 0.0)
    leftovers = [
        s for m in feed.series.registry.collect() for s in m.samples if s.labels.get("vm") == "vm1"
    ]
    assert leftovers == []


def test_the_same_vm_and_route_again_replaces_the_lingering_series():
    routes = {("m1", "vm1"): ("host-a", "host-b"), ("m2", "vm1"): ("host-a", "host-b")}
    feed, _ = make_feed(routes)
    feed.observe_event(phase("migrating"))
    feed.observe_event(done("error", 3.0))
    feed.observe_event({**phase("migrating"), "id": "m2"})

    labels = {"vm": "vm1", "source": "host-a", "destination": "host-b"}
    get = feed.series.registry.get_sample_value
    assert get("asyncmigfra_migration_phase", {**labels, "phase": "failed"}) is None
    assert get("asyncmigfra_migration_phase", {**labels, "phase": "migrating"}) == 1


def test_tracked_migrations_are_bounded(monkeypatch):
    monkeypatch.setattr(feed_module, "MAX_TRACKED", 3)
    routes = {(f"m{i}", "vm"): ("a", f"b{i}") for i in range(5)}
    feed, _ = make_feed(routes)
    for i in range(3):
        feed.observe_event({"event": "phase", "id": f"m{i}", "vm-name": "vm", "phase": "migrating"})
    feed.observe_event({"event": "phase", "id": "m3", "vm-name": "vm", "phase": "migrating"})
    assert len(feed._migrations) == 3  # all running: the fourth is not shown
    feed.observe_event({"event": "done", "id": "m0", "vm-name": "vm", "status": "success"})
    feed.observe_event({"event": "phase", "id": "m4", "vm-name": "vm", "phase": "migrating"})

    assert sorted(k[0] for k in feed._migrations) == ["m1", "m2", "m4"]


def test_histogram_routes_are_bounded(monkeypatch):
    monkeypatch.setattr(feed_module, "MAX_ROUTES", 1)
    routes = {("m1", "vm1"): ("a", "b"), ("m2", "vm2"): ("a", "c")}
    feed, _ = make_feed(routes)
    for task_id, vm in routes:
        feed.observe_event({"event": "phase", "id": task_id, "vm-name": vm, "phase": "migrating"})
        feed.observe_event(
            {"event": "done", "id": task_id, "vm-name": vm, "status": "success", "duration": 1}
        )

    get = feed.series.registry.get_sample_value
    name = "asyncmigfra_migration_duration_seconds_count"
    assert get(name, {"source": "a", "destination": "b", "result": "success"}) == 1
    assert get(name, {"source": "other", "destination": "other", "result": "success"}) == 1


def test_results_count_entries_by_task_result_and_code():
    feed, _ = make_feed()
    feed.observe_result(
        ResultMessage(
            result="vm started",
            entries=[
                ResultEntry(vm_name="a", status="success"),
                ResultEntry(vm_name="b", status="error", code="not-found", details="x"),
            ],
        )
    )
    feed.observe_result(
        ResultMessage(
            result="status",
            entries=[ResultEntry(vm_name=f"d{i}", status="success") for i in range(5)],
        )
    )
    feed.observe_result(
        ResultMessage(
            result="unknown",
            entries=[ResultEntry(vm_name="", status="error", code="invalid-message")],
        )
    )

    def count(task: str, result: str, code: str) -> float | None:
        return value(feed, "asyncmigfra_tasks_total", task=task, result=result, code=code)

    assert count("start vm", "success", "") == 1
    assert count("start vm", "error", "not-found") == 1
    assert count("status", "success", "") == 1
    assert count("unknown", "error", "invalid-message") == 1


def test_vitals_and_agent_info():
    feed, _ = make_feed()
    feed.observe_vitals(
        Vitals(broker_connected=False, queued=4, running=2, backlog=9, journal="failing"), 0.125
    )

    assert value(feed, "asyncmigfra_agent_info", version="1.2.3", hypervisor="fake", name="host-a")
    assert value(feed, "asyncmigfra_broker_connected") == 0
    assert value(feed, "asyncmigfra_tasks_queued") == 4
    assert value(feed, "asyncmigfra_tasks_running") == 2
    assert value(feed, "asyncmigfra_publish_backlog") == 9
    assert value(feed, "asyncmigfra_event_loop_lag_seconds") == 0.125
    assert value(feed, "asyncmigfra_journal_state", state="failing") == 1
    assert value(feed, "asyncmigfra_journal_state", state="ok") == 0


def test_a_bug_in_the_feed_never_reaches_the_publisher(capsys):
    def broken(task_id: str | None, vm: str) -> tuple[str, str] | None:
        raise RuntimeError("boom")

    feed = MetricsFeed(Series(), route=broken, name="h", version="v", hypervisor="fake")
    seen: list[object] = []

    class Inner:
        def emit(self, event: object, *, terminal: bool = False, qos: int = 1) -> None:
            seen.append(event)

    sink = MetricsSink(Inner(), feed)
    sink.emit(phase("migrating"))
    sink.emit(phase("post-copy"))

    assert len(seen) == 2  # published all the same
    assert capsys.readouterr().out.count("metrics.failed") == 1  # logged once


async def test_the_sampler_measures_a_blocked_loop():
    feed, _ = make_feed()
    vitals = Vitals(broker_connected=True, queued=0, running=0, backlog=0, journal="off")
    sampler = asyncio.create_task(feed.run(lambda: vitals))
    await asyncio.sleep(0.1)
    time.sleep(0.3)  # the loop is blocked: the next tick comes late
    await asyncio.sleep(1.2)
    sampler.cancel()
    await asyncio.gather(sampler, return_exceptions=True)

    lag = value(feed, "asyncmigfra_event_loop_lag_seconds")
    assert lag is not None
    assert lag >= 0.1  # blocked for 0.3 s within a 0.25 s tick


# ---- metrics.listen at startup -------------------------------------------------------------


def test_metrics_are_off_by_default():
    assert open_metrics(default_settings(hostname="h"), route=lambda *_: None, version="v") is None


def test_missing_prometheus_client_names_the_extra(monkeypatch):
    for name in list(sys.modules):
        if name.startswith(("prometheus_client", "asyncmigfra.transport.metrics.endpoint")):
            monkeypatch.delitem(sys.modules, name)
        if name == "asyncmigfra.transport.metrics.series":
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    settings = settings_from_text("metrics:\n  listen: 127.0.0.1:9820\n", hostname="h")

    with pytest.raises(StartupError, match=r"pip install 'asyncmigfra\[metrics\]'"):
        open_metrics(settings, route=lambda *_: None, version="v")


async def test_a_taken_port_is_a_startup_error_naming_the_key():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = settings_from_text(f"metrics:\n  listen: 127.0.0.1:{port}\n", hostname="h")
        metrics = open_metrics(settings, route=lambda *_: None, version="v")
        assert metrics is not None

        with pytest.raises(StartupError, match=rf"metrics.listen 127.0.0.1:{port}: cannot listen"):
            await metrics.start()
