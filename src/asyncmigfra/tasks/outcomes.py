"""Where the end of a subtask becomes its result entry (kopf's ``Outcome``).

:func:`entry_for` is the one boundary: success, a :class:`~asyncmigfra.errors.TaskError`
(``status: error`` with its ``code``), a cancellation (absorbed by :func:`absorb_cancel` into
:class:`~asyncmigfra.errors.TaskCancelled`) and any other exception (a bug: logged with its
traceback, reported as ``hypervisor-error`` by :func:`as_task_error`) all end here, so a task
never takes the agent down. What an operation wants in its entry besides status and code it
records on an :class:`Outcome` while it runs (``ctx.outcome``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, fields

import structlog
from structlog.stdlib import BoundLogger

from asyncmigfra.errors import HypervisorError, TaskCancelled, TaskError
from asyncmigfra.model import ResultEntry
from asyncmigfra.timing import TimeMeasurement

__all__ = ["Outcome", "absorb_cancel", "as_task_error", "entry_for"]

log: BoundLogger = structlog.stdlib.get_logger(__name__)


@dataclass(slots=True)
class Outcome:
    """What an operation records for its result entry, beyond status and code."""

    #: Notes for ``details`` (hook warnings, a cancel ignored in post-copy); a successful
    #: entry shows them, a failed one its error instead.
    details: str | None = None
    #: Retries the migration needed (set only when it needed any).
    retries: int | None = None
    #: Where the VM runs now: set once it arrived on the destination.
    destination: str | None = None
    #: The VM's state on the destination when repin or resume failed there.
    state: str | None = None
    #: VM 2's own outcome in a swap (a wire map: ``vm-name``, ``status``, ...).
    swap_with: dict[str, object] | None = None
    #: A broken post-copy was recovered (``True``) or could not be (``False``); ``None``: no
    #: recovery was needed.
    recovered: bool | None = None
    #: s the recovery took, from the failure found to the migration completed.
    recovery_time: float | None = None
    #: s the prediction gave the migration (``migration.forecast``), when one was made.
    predicted_duration: float | None = None
    #: ms the guest was paused at the switchover, as the hypervisor measured it. Not a
    #: result key (``time-measurement`` has it when asked for): the journal's history.
    downtime: float | None = None

    def note(self, *texts: str) -> None:
        """Add ``texts`` to ``details`` (``; `` between them)."""
        if texts:
            self.details = "; ".join([self.details, *texts] if self.details else texts)

    def merge(self, other: Outcome) -> None:
        """Take every key ``other`` recorded (a swap's VM 1 into the task's outcome)."""
        for f in fields(other):
            value = getattr(other, f.name)
            if value is not None:
                setattr(self, f.name, value)

    def keys(self) -> dict[str, object]:
        """The extra result keys, in wire order (``details`` is the entry's own field)."""
        keys: dict[str, object] = {}
        if self.retries is not None:
            keys["retries"] = self.retries
        if self.destination is not None:
            keys["destination"] = self.destination
        if self.state is not None:
            keys["state"] = self.state
        if self.swap_with is not None:
            keys["swap-with"] = self.swap_with
        if self.recovered is not None:
            keys["recovered"] = self.recovered
        if self.recovery_time is not None:
            keys["recovery-time"] = self.recovery_time
        if self.predicted_duration is not None:
            keys["predicted-duration"] = round(self.predicted_duration, 3)
        return keys


def as_task_error(
    exc: Exception, logger: BoundLogger, event: str = "task.crashed", /, **log_fields: object
) -> TaskError:
    """``exc`` as a task's failure: a :class:`TaskError` as it is; anything else is a bug,
    logged to the caller's ``logger`` as ``event`` with its traceback and reported as
    ``hypervisor-error``."""
    if isinstance(exc, TaskError):
        return exc
    logger.error(event, exc_info=exc, **log_fields)  # as logger.exception() in the handler
    return HypervisorError(f"internal error: {exc.__class__.__name__}: {exc}")


def absorb_cancel(exc: asyncio.CancelledError, reason: str | None) -> TaskCancelled:
    """In ``except CancelledError``: a cancel the dispatcher asked for (``reason`` given) is
    taken back (``Task.uncancel``) and becomes a ``cancelled`` failure; any other (the
    agent's shutdown) is raised again."""
    task = asyncio.current_task()
    if reason is None or task is None:
        raise exc
    task.uncancel()
    return TaskCancelled(reason)


def entry_for(
    vm_name: str,
    ended: Exception | None = None,
    outcome: Outcome | None = None,
    timer: TimeMeasurement | None = None,
    *,
    details: str | None = None,
    logger: BoundLogger = log,
    **log_fields: object,
) -> ResultEntry:
    """The result entry of a subtask that ended: ``ended`` is ``None`` on success (``details``,
    else the outcome's notes), else its failure (see :func:`as_task_error`; a bug is logged to
    ``logger`` with ``log_fields``). The outcome's keys follow, except after a bug."""
    snapshot = timer.snapshot() if timer is not None else None
    downtime = outcome.downtime if outcome is not None else None
    if ended is None:
        note = details if details is not None else outcome.details if outcome is not None else None
        return ResultEntry(
            vm_name=vm_name,
            status="success",
            details=note or None,
            time_measurement=snapshot,
            extra=outcome.keys() if outcome is not None else {},
            downtime=downtime,
        )
    error = as_task_error(ended, logger, **log_fields)
    return ResultEntry(
        vm_name=vm_name,
        status="error",
        details=str(error) or error.__class__.__name__,
        code=error.code,
        time_measurement=snapshot,
        extra=outcome.keys() if outcome is not None and error is ended else {},
        downtime=downtime,
    )
