"""An ``EngineContext`` for tests that drive the migration engine directly: it records the
phases, the progress events (and when each came) and the steering handles the engine
registers. Imported by name (pytest puts this directory on ``sys.path``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from asyncmigfra.migration.steering import MigrationSteering
from asyncmigfra.tasks.outcomes import Outcome
from asyncmigfra.timing import TimeMeasurement


@dataclass
class RecordingContext:
    """Records what the engine tells its task; ``companion`` is not supported."""

    vm_name: str = "v"
    task_id: str | None = "t"
    timer: TimeMeasurement = field(default_factory=lambda: TimeMeasurement(enabled=False))
    outcome: Outcome = field(default_factory=Outcome)
    phases: list[str] = field(default_factory=list)
    events: list[dict[str, object]] = field(default_factory=list)
    #: ``time.monotonic()`` of each progress event.
    times: list[float] = field(default_factory=list)
    hooks: None = None
    #: VM name -> the steering handle of its running job (while it runs).
    steering: dict[str, MigrationSteering] = field(default_factory=dict)

    def phase(self, name: str) -> None:
        self.phases.append(name)

    @contextmanager
    def measure(self, tag: str) -> Iterator[None]:
        yield

    def record(self, tag: str, seconds: float) -> None:
        pass

    def progress(self, fields: dict[str, object]) -> None:
        self.events.append(fields)
        self.times.append(time.monotonic())

    @contextmanager
    def steerable(self, steering: MigrationSteering) -> Iterator[None]:
        self.steering[self.vm_name] = steering
        try:
            yield
        finally:
            del self.steering[self.vm_name]

    def companion(self, vm_name: str) -> RecordingContext:
        raise NotImplementedError

    def actions(self) -> list[object]:
        """The ``action`` of every progress event that has one."""
        return [e["action"] for e in self.events if "action" in e]

    def with_action(self, action: str) -> list[dict[str, object]]:
        """The progress events with that ``action``."""
        return [e for e in self.events if e.get("action") == action]
