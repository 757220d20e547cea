"""The Prometheus series the agent exposes (docs/protocol.md §11), in one registry of its own.

Names follow KubeVirt's migration metrics (``kubevirt_vmi_migration_data_remaining_bytes``
becomes ``asyncmigfra_migration_data_remaining_bytes``), in base units (bytes, seconds). Only
this module (and :mod:`.endpoint`) imports ``prometheus_client``: the ``metrics`` extra.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

__all__ = ["MIGRATION_LABELS", "Gauge", "Series"]  # Gauge: for the feed's types

#: The labels of one migration's series.
MIGRATION_LABELS = ("vm", "source", "destination")
#: The labels of the migration histograms (no ``vm``: a fleet's VMs would make one per VM).
ROUTE_LABELS = ("source", "destination")

_DURATION_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600, 7200)
_DOWNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
#: actual / predicted duration: 1 is a perfect prediction.
_RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 4)


class Series:
    """Every series, registered in :attr:`registry` (not the library's global one, so several
    agents in one process, as in tests and the demo, do not clash)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = MIGRATION_LABELS) -> Gauge:
            return Gauge(f"asyncmigfra_{name}", doc, labels, registry=registry)

        # ---- one running (or just finished) migration
        self.data_total = gauge(
            "migration_data_total_bytes", "Memory and copied disks of the migrating guest."
        )
        self.data_processed = gauge(
            "migration_data_processed_bytes",
            "Memory and disk data sent so far, cumulative over all passes.",
        )
        self.data_remaining = gauge(
            "migration_data_remaining_bytes", "Memory and disk data still to send."
        )
        self.disk_remaining = gauge(
            "migration_disk_remaining_bytes", "Disk data still to copy (storage copies only)."
        )
        self.dirty_rate = gauge(
            "migration_dirty_memory_rate_bytes", "Bytes per second the guest dirties memory."
        )
        self.transfer_rate = gauge(
            "migration_transfer_rate_bytes", "Bytes per second the migration sends."
        )
        self.expected_downtime = gauge(
            "migration_expected_downtime_seconds", "The hypervisor's estimate of the downtime."
        )
        self.iteration = gauge("migration_iteration", "The memory pass (0 before the first).")
        self.predicted_duration = gauge(
            "migration_predicted_duration_seconds", "The agent's prediction of the duration."
        )
        self.last_progress = gauge(
            "migration_last_progress_timestamp_seconds",
            "Unix time the migration last moved data (or its job started).",
        )
        self.phase = gauge(
            "migration_phase",
            "1 for the migration's current phase; succeeded or failed once it ended.",
            (*MIGRATION_LABELS, "phase"),
        )
        # ---- finished migrations and tasks
        self.tasks = Counter(
            "asyncmigfra_tasks",
            "Result entries published, by task, result (success, error) and error code.",
            ("task", "result", "code"),
            registry=registry,
        )
        self.duration = Histogram(
            "asyncmigfra_migration_duration_seconds",
            "Duration of migrations whose job started, by route and result.",
            (*ROUTE_LABELS, "result"),
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.downtime = Histogram(
            "asyncmigfra_migration_downtime_seconds",
            "Measured downtime of completed migrations.",
            ROUTE_LABELS,
            buckets=_DOWNTIME_BUCKETS,
            registry=registry,
        )
        self.prediction_ratio = Histogram(
            "asyncmigfra_migration_duration_prediction_ratio",
            "Actual over predicted duration of completed migrations that had a prediction.",
            ROUTE_LABELS,
            buckets=_RATIO_BUCKETS,
            registry=registry,
        )
        # ---- the agent
        self.info = gauge("agent_info", "Always 1: the agent.", ("version", "hypervisor", "name"))
        self.broker_connected = gauge(
            "broker_connected", "1 while the agent is connected to its MQTT broker.", ()
        )
        self.queued = gauge("tasks_queued", "Subtasks accepted and waiting to run.", ())
        self.running = gauge("tasks_running", "Subtasks running.", ())
        self.publish_backlog = gauge(
            "publish_backlog", "Results and events not yet acknowledged by the broker.", ()
        )
        self.loop_lag = gauge(
            "event_loop_lag_seconds", "The largest event-loop delay of the last second.", ()
        )
        self.journal = gauge(
            "journal_state", "1 for the journal's state (ok, failing, off).", ("state",)
        )

    def migration_gauges(self) -> tuple[Gauge, ...]:
        """The per-migration gauges labelled exactly by :data:`MIGRATION_LABELS`."""
        return (
            self.data_total,
            self.data_processed,
            self.data_remaining,
            self.disk_remaining,
            self.dirty_rate,
            self.transfer_rate,
            self.expected_downtime,
            self.iteration,
            self.predicted_duration,
            self.last_progress,
        )
