"""Event records streamed on ``<prefix>/event`` while tasks run (extensions.md, Events).

Events are an API, not logs: each is an ordered map with ``event``, ``id`` (when the task has
one), ``host``, ``time`` (ISO 8601 UTC) and, when it concerns one VM, ``vm-name``, followed by
the event's own keys. Building them is pure; delivering them is the :class:`EventSink`'s job
(the publisher), which never blocks the caller.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

__all__ = ["EventSink", "Events"]


class EventSink(Protocol):
    def emit(self, event: Mapping[str, object], *, terminal: bool = False, qos: int = 1) -> None:
        """Queue an event for publishing. ``terminal`` events are never dropped."""


#: The current second, and its text up to the milliseconds (every event asks for the time).
_second: tuple[int, str] = (-1, "")


def _now() -> str:
    """The time, ISO 8601 in UTC to the millisecond (``2026-01-01T00:00:00.000Z``)."""
    global _second  # noqa: PLW0603 - a memo of one entry
    second, ns = divmod(time.time_ns(), 1_000_000_000)
    if second != _second[0]:
        text = dt.datetime.fromtimestamp(second, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _second = (second, text)
    return f"{_second[1]}{ns // 1_000_000:03d}Z"


class Events:
    """Builds events for one agent and hands them to a sink."""

    __slots__ = ("event_qos", "host", "progress_qos", "sink")

    def __init__(
        self, sink: EventSink, *, host: str, progress_qos: int = 0, event_qos: int = 1
    ) -> None:
        self.sink = sink
        self.host = host
        #: QoS of ``progress`` events (``communicator.progress-qos``).
        self.progress_qos = progress_qos
        #: QoS of every other event (``communicator.event-qos``).
        self.event_qos = event_qos

    def _base(self, event: str, task_id: str | None, vm_name: str | None) -> dict[str, object]:
        fields: dict[str, object] = {"event": event}
        if task_id:
            fields["id"] = task_id
        fields["host"] = self.host
        fields["time"] = _now()
        if vm_name is not None:
            fields["vm-name"] = vm_name
        return fields

    def accepted(self, task_id: str | None, *, task: str, vm_names: Sequence[str]) -> None:
        ev = self._base("accepted", task_id, None)
        ev["task"] = task
        ev["vm-names"] = list(vm_names)
        self.sink.emit(ev, qos=self.event_qos)

    def rejected(self, task_id: str | None, *, code: str, details: str) -> None:
        ev = self._base("rejected", task_id, None)
        ev["code"] = code
        ev["details"] = details
        self.sink.emit(ev, terminal=True, qos=self.event_qos)

    def phase(self, task_id: str | None, vm_name: str | None, phase: str) -> None:
        ev = self._base("phase", task_id, vm_name)
        ev["phase"] = phase
        self.sink.emit(ev, qos=self.event_qos)

    def progress(self, task_id: str | None, vm_name: str, fields: Mapping[str, object]) -> None:
        ev = self._base("progress", task_id, vm_name)
        ev.update(fields)
        self.sink.emit(ev, qos=self.progress_qos)

    def error(self, task_id: str | None, vm_name: str | None, *, code: str, details: str) -> None:
        ev = self._base("error", task_id, vm_name)
        ev["code"] = code
        ev["details"] = details
        self.sink.emit(ev, terminal=True, qos=self.event_qos)

    def plan(self, task_id: str | None, vm_name: str | None, fields: Mapping[str, object]) -> None:
        """A plan, before what it plans starts (protocol §5.8): a migration's prediction
        (``vm_name`` set; ``migration.forecastresult.plan_fields``), or an evacuation's schedule
        (``vm_name`` ``None``; its waves, or why there are none)."""
        ev = self._base("plan", task_id, vm_name)
        ev.update(fields)
        self.sink.emit(ev, qos=self.event_qos)

    def done(
        self,
        task_id: str | None,
        vm_name: str | None,
        *,
        status: str,
        duration: float,
        extra: Mapping[str, object] | None = None,
        predicted_duration: object = None,
    ) -> None:
        """``extra``: keys after ``duration`` (``recovered``, ``recovery-time``);
        ``predicted_duration``: s, a migration's prediction (compare with ``duration``)."""
        ev = self._base("done", task_id, vm_name)
        ev["status"] = status
        ev["duration"] = round(duration, 6)
        if isinstance(predicted_duration, int | float):
            ev["predicted-duration"] = predicted_duration
        ev.update(extra or {})
        self.sink.emit(ev, terminal=True, qos=self.event_qos)
