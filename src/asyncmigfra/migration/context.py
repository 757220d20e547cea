"""What the migration engine needs from the task running it (:class:`EngineContext`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from asyncmigfra.peers.userhooks import HookRunner
from asyncmigfra.tasks.outcomes import Outcome
from asyncmigfra.timing import TimeMeasurement

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from asyncmigfra.migration.steering import MigrationSteering

__all__ = [
    "EngineContext",
]


class EngineContext(Protocol):
    task_id: str | None
    vm_name: str
    timer: TimeMeasurement
    outcome: Outcome

    def phase(self, name: str) -> None: ...

    def measure(self, tag: str) -> AbstractContextManager[None]: ...

    def record(self, tag: str, seconds: float) -> None: ...

    def progress(self, fields: dict[str, object]) -> None: ...

    def plan(self, fields: dict[str, object]) -> None:
        """Publish a ``plan`` event: the migration's prediction, before it starts."""
        ...

    @property
    def hooks(self) -> HookRunner | None:
        """The configured hooks (``None``: none)."""
        ...

    def steerable(self, steering: MigrationSteering) -> AbstractContextManager[None]:
        """Make ``steering`` reachable for ``tune migration`` (under this context's VM name)
        while the block runs: the engine holds it for as long as the job runs."""
        ...

    def companion(self, vm_name: str) -> EngineContext:
        """A context for another VM of the same task (a swap partner): its events carry that
        VM's name and its time-measurement tags the suffix ``-<vm>``."""
        ...
