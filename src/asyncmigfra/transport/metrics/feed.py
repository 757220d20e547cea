"""The one boundary where the agent's outgoing stream becomes metrics.

Everything the metrics show is something the agent already publishes: the events (a
:class:`MetricsSink` sits in front of the event publisher and sees each event as it is
queued) and the results (:meth:`MetricsFeed.observe_result`, where ``app`` delivers them).
No other code calls a metric. What no message carries is sampled once a second on the loop
(:meth:`MetricsFeed.run`): broker connection, queue depth, running subtasks, the publisher's
backlog, the journal's state, and the event loop's lag.

A migration's series carry the labels ``vm``, ``source`` and ``destination``; the route comes
from the dispatcher (``route``), asked once, when the migration's first event passes. Its
series stay :data:`LINGER` s after its ``done`` event (so a scrape sees how it ended), then
disappear. Updates are a few dict look-ups and ``Gauge.set`` calls (a short lock each): the
exposition thread reads the same objects (:mod:`.endpoint`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from asyncmigfra.model import ResultMessage, TaskKind
from asyncmigfra.wire.events import EventSink

if TYPE_CHECKING:  # the feed itself imports no prometheus_client (app imports Vitals)
    from asyncmigfra.transport.metrics.series import Gauge, Series

__all__ = ["LINGER", "MetricsFeed", "MetricsSink", "Route", "Vitals"]

log = structlog.stdlib.get_logger("asyncmigfra.metrics")

#: s a finished migration's series remain before they are removed.
LINGER = 60.0
#: Migrations tracked at once; beyond it the oldest finished one goes first, and a new one
#: is not shown while all are running (far above any host's concurrency limit).
MAX_TRACKED = 1024
#: Distinct (source, destination) pairs of the histograms; later ones count as ``other``.
MAX_ROUTES = 256
#: s between two samples of the vitals, and between two lag measurements.
SAMPLE_INTERVAL = 1.0
LAG_TICK = 0.25
#: Phases in which a migration's job moves data (its progress stamp starts with them).
JOB_PHASES = frozenset({"migrating", "post-copy", "suspended-copy", "adopted"})
JOURNAL_STATES = ("ok", "failing", "off")

#: (task id, VM name) -> (source, destination) of a running migration, or ``None``.
Route = Callable[[str | None, str], tuple[str, str] | None]

_TASK_OF_RESULT: dict[str, str] = {kind.result_name: kind.value for kind in TaskKind}
_TASK_OF_RESULT["plan"] = "plan"  # plan migration and plan evacuation answer alike
_TASK_OF_RESULT["unknown"] = "unknown"  # a message that could not become a task


@dataclass(frozen=True, slots=True)
class Vitals:
    """What the agent reports about itself once a second."""

    broker_connected: bool
    queued: int
    running: int
    backlog: int
    journal: str


@dataclass(slots=True)
class _Migration:
    labels: tuple[str, str, str]
    phase: str | None = None
    #: Bytes processed at the last progress event (-1: none yet).
    processed: float = -1.0
    #: Its job started (a ``migrating`` phase): its duration goes into the histogram.
    started: bool = False
    #: ``time.monotonic()`` of its ``done`` event.
    finished_at: float | None = None
    #: Its labelled children by gauge (``labels()`` once, then only ``set``).
    children: dict[int, Any] = field(default_factory=dict)

    def child(self, gauge: Gauge) -> Any:
        found = self.children.get(id(gauge))
        if found is None:
            found = self.children[id(gauge)] = gauge.labels(*self.labels)
        return found


def _number(event: Mapping[str, object], key: str) -> float | None:
    value = event.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class MetricsFeed:
    """Turns events and results into series (see the module)."""

    def __init__(
        self,
        series: Series,
        *,
        route: Route,
        name: str,
        version: str,
        hypervisor: str,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.series = series
        self._route = route
        self._clock = clock
        self._monotonic = monotonic
        self._migrations: dict[tuple[str | None, str], _Migration] = {}
        self._routes: set[tuple[str, str]] = set()
        self._failed = False
        series.info.labels(version, hypervisor, name).set(1)

    # ---------------------------------------------------------------- inputs

    def observe_event(self, event: Mapping[str, object]) -> None:
        """One event as it is published (never raises: metrics never break a task)."""
        try:
            self._event(event)
        except Exception as exc:  # noqa: BLE001 - a bug here must not reach the task's code
            self._bug("event", exc)

    def observe_result(self, result: ResultMessage) -> None:
        """One result as it is published: ``asyncmigfra_tasks_total`` counts its entries
        (a ``status`` answer, whose entries are domains, counts once)."""
        try:
            self._result(result)
        except Exception as exc:  # noqa: BLE001 - as observe_event
            self._bug("result", exc)

    def observe_vitals(self, vitals: Vitals, lag: float) -> None:
        """The sampled figures; also removes the series of migrations past :data:`LINGER`."""
        s = self.series
        s.broker_connected.set(1 if vitals.broker_connected else 0)
        s.queued.set(vitals.queued)
        s.running.set(vitals.running)
        s.publish_backlog.set(vitals.backlog)
        s.loop_lag.set(lag)
        for state in JOURNAL_STATES:
            s.journal.labels(state).set(1 if vitals.journal == state else 0)
        now = self._monotonic()
        for key, mig in list(self._migrations.items()):
            if mig.finished_at is not None and now - mig.finished_at >= LINGER:
                self._drop(key)

    async def run(self, vitals: Callable[[], Vitals]) -> None:
        """Sample :class:`Vitals` every :data:`SAMPLE_INTERVAL` s with the loop's lag: the
        largest delay of a :data:`LAG_TICK` s sleep in that second."""
        loop = asyncio.get_running_loop()
        worst = 0.0
        ticks_per_sample = round(SAMPLE_INTERVAL / LAG_TICK)
        while True:
            for _ in range(ticks_per_sample):
                before = loop.time()
                await asyncio.sleep(LAG_TICK)
                worst = max(worst, loop.time() - before - LAG_TICK)
            self.observe_vitals(vitals(), worst)
            worst = 0.0

    # ---------------------------------------------------------------- events

    def _event(self, event: Mapping[str, object]) -> None:
        kind = event.get("event")
        vm = event.get("vm-name")
        if kind not in ("phase", "progress", "plan", "done") or not isinstance(vm, str):
            return
        task_id = event.get("id")
        key = (task_id if isinstance(task_id, str) else None, vm)
        mig = self._migrations.get(key) or self._track(key)
        if mig is None:
            return  # not a migration (start, stop, ...)
        if kind == "phase":
            phase = event.get("phase")
            if isinstance(phase, str):
                self._phase(mig, phase)
        elif kind == "progress":
            self._progress(mig, event)
        elif kind == "plan":
            predicted = _number(event, "predicted-duration")
            if predicted is not None:
                mig.child(self.series.predicted_duration).set(predicted)
        else:
            self._done(mig, event)

    def _track(self, key: tuple[str | None, str]) -> _Migration | None:
        route = self._route(*key)
        if route is None:
            return None
        labels = (key[1], *route)
        for other, known in list(self._migrations.items()):
            if known.labels == labels:  # the same VM and route again: the old one goes
                self._drop(other)
        if len(self._migrations) >= MAX_TRACKED:
            finished = [k for k, m in self._migrations.items() if m.finished_at is not None]
            if not finished:
                return None
            self._drop(min(finished, key=lambda k: self._migrations[k].finished_at or 0.0))
        mig = self._migrations[key] = _Migration(labels)
        return mig

    def _phase(self, mig: _Migration, phase: str) -> None:
        gauge = self.series.phase
        if mig.phase is not None:
            gauge.remove(*mig.labels, mig.phase)
        mig.phase = phase
        gauge.labels(*mig.labels, phase).set(1)
        if phase in JOB_PHASES:
            mig.started = True
            if phase in ("migrating", "adopted"):  # a job (or a retry's) starts: a fresh stamp
                mig.child(self.series.last_progress).set(self._clock())

    def _progress(self, mig: _Migration, event: Mapping[str, object]) -> None:
        s = self.series
        memory_total = _number(event, "memory-total")
        if memory_total is None:
            return  # no statistics yet (before the first pass, or an offline migration)
        disk_total = _number(event, "disk-total") or 0.0
        processed = (_number(event, "memory-processed") or 0.0) + (
            _number(event, "disk-processed") or 0.0
        )
        mig.child(s.data_total).set(memory_total + disk_total)
        mig.child(s.data_processed).set(processed)
        if processed > mig.processed:
            mig.processed = processed
            mig.child(s.last_progress).set(self._clock())
        for gauge, key, scale in (
            (s.data_remaining, "data-remaining", 1.0),
            (s.disk_remaining, "disk-remaining", 1.0),
            (s.dirty_rate, "dirty-rate", 1.0),
            (s.transfer_rate, "transfer-rate", 1.0),
            (s.expected_downtime, "expected-downtime", 0.001),
            (s.iteration, "iteration", 1.0),
        ):
            value = _number(event, key)
            if value is not None:
                mig.child(gauge).set(value * scale)
        downtime = _number(event, "downtime")
        if event.get("phase") == "completed" and downtime is not None:
            s.downtime.labels(*self._route_labels(mig.labels)).observe(downtime / 1000)

    def _done(self, mig: _Migration, event: Mapping[str, object]) -> None:
        ok = event.get("status") == "success"
        self._phase(mig, "succeeded" if ok else "failed")
        mig.finished_at = self._monotonic()
        duration = _number(event, "duration")
        if not mig.started or duration is None:
            return  # it never moved: a refused or failed pre-check is no migration time
        route = self._route_labels(mig.labels)
        self.series.duration.labels(*route, "success" if ok else "error").observe(duration)
        predicted = _number(event, "predicted-duration")
        if ok and predicted is not None and predicted > 0:
            self.series.prediction_ratio.labels(*route).observe(duration / predicted)

    def _route_labels(self, labels: tuple[str, str, str]) -> tuple[str, str]:
        route = (labels[1], labels[2])
        if route in self._routes:
            return route
        if len(self._routes) < MAX_ROUTES:
            self._routes.add(route)
            return route
        return ("other", "other")

    def _drop(self, key: tuple[str | None, str]) -> None:
        mig = self._migrations.pop(key)
        for gauge in self.series.migration_gauges():
            with contextlib.suppress(KeyError):  # this migration never set it
                gauge.remove(*mig.labels)
        if mig.phase is not None:
            self.series.phase.remove(*mig.labels, mig.phase)

    # ---------------------------------------------------------------- results

    def _result(self, result: ResultMessage) -> None:
        task = _TASK_OF_RESULT.get(result.result, "other")
        counter = self.series.tasks
        if result.result == "status":
            failed = next((e for e in result.entries if e.status == "error"), None)
            if failed is None:
                counter.labels(task, "success", "").inc()
            else:
                counter.labels(task, "error", failed.code or "").inc()
            return
        for entry in result.entries:
            code = (entry.code or "") if entry.status == "error" else ""
            counter.labels(task, entry.status, code).inc()

    def _bug(self, what: str, exc: Exception) -> None:
        if not self._failed:  # once: a broken metric must not flood the log
            self._failed = True
            log.error("metrics.failed", input=what, exc_info=exc)


class MetricsSink:
    """An :class:`~asyncmigfra.wire.events.EventSink` in front of another: every event goes
    to ``inner`` (the publisher) and then to the feed."""

    __slots__ = ("_feed", "_inner")

    def __init__(self, inner: EventSink, feed: MetricsFeed) -> None:
        self._inner = inner
        self._feed = feed

    def emit(self, event: Mapping[str, object], *, terminal: bool = False, qos: int = 1) -> None:
        self._inner.emit(event, terminal=terminal, qos=qos)
        self._feed.observe_event(event)
