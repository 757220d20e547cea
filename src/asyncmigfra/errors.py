"""The exception tree of asyncmigfra, and the wire codes each error carries.

Every error that can end a task carries a ``code``: one word from the table in
``docs/protocol.md`` (and ``spec/extensions.md``). The runner turns any
:class:`TaskError` into a result entry ``status: error`` with that ``code`` and the
exception text as ``details``. Anything that is *not* an ``AsyncmigfraError`` is a bug:
it is logged with its traceback and reported as ``hypervisor-error``.

::

    AsyncmigfraError                 base; never raised directly
    ├── ConfigError                  bad or unknown configuration key (startup only; exit code 2)
    ├── StartupError                 the agent cannot run: journal locked or unusable, client id
    │                                in use (exit code 2)
    ├── TaskRejected                 a message that cannot become a task (result: unknown)
    └── TaskError                    one subtask failed; ``code`` is the wire code
        ├── InvalidTask              invalid-message (a per-VM input problem, e.g. no name in XML)
        ├── VmNotFound               vm-not-found
        ├── WrongState               wrong-state
        ├── Busy                     busy
        ├── HypervisorError          hypervisor-error
        ├── ConnectionFailed         connection-failed   (retryable)
        ├── IncompatibleDestination  incompatible-destination
        ├── NoDestination            no-destination
        ├── MigrationFailed          migration-failed    (retryable: the VM stays on the source)
        ├── TaskTimeout              timeout
        ├── TaskCancelled            cancelled
        ├── HookFailed               hook-failed
        ├── NotSupported             not-supported
        ├── Unavailable              unavailable         (retryable: nothing was done)
        └── WillNotConverge          will-not-converge   (migration-type auto: nothing started)
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "CODES",
    "AsyncmigfraError",
    "Busy",
    "ConfigError",
    "ConnectionFailed",
    "HookFailed",
    "HypervisorError",
    "IncompatibleDestination",
    "InvalidTask",
    "MigrationFailed",
    "NoDestination",
    "NotSupported",
    "StartupError",
    "TaskCancelled",
    "TaskError",
    "TaskRejected",
    "TaskTimeout",
    "Unavailable",
    "VmNotFound",
    "WillNotConverge",
    "WrongState",
]

#: Every code that may appear on the wire, with its meaning (see docs/protocol.md).
CODES: dict[str, str] = {
    "invalid-message": "not YAML, not a map, over the size limit, or a field of the wrong type",
    "unknown-task": "task: names no known task",
    "vm-not-found": "no such domain",
    "wrong-state": "the domain is not in a state that allows the operation",
    "busy": "another task holds this VM, or the agent is at its limit and the queue is full",
    "hypervisor-error": "the hypervisor refused; details has its own text",
    "connection-failed": "the hypervisor or a destination could not be reached",
    "incompatible-destination": "a pre-migration check failed",
    "no-destination": "evacuate found no host with room",
    "migration-failed": "the migration job failed; the VM still runs on the source",
    "timeout": "a wait or a migration ran past its limit and the configured action was taken",
    "cancelled": "a cancel task stopped it",
    "hook-failed": "a pre/post step failed",
    "not-supported": "the configured hypervisor cannot do this",
    "unavailable": "the agent cannot keep its promise now (its journal cannot write); retry later",
    "will-not-converge": (
        "the prediction says this migration cannot finish within its limits with the allowed"
        " means (pre-copy, post-copy) and nothing was started"
    ),
}


class AsyncmigfraError(Exception):
    """Base of every error asyncmigfra raises on purpose."""


class ConfigError(AsyncmigfraError):
    """The configuration file is missing, unreadable, or has a bad or unknown key.

    ``path`` is the dotted key path (``communicator.port``), empty for file-level problems.
    """

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class StartupError(AsyncmigfraError):
    """The agent cannot run: its journal is locked by another agent or unusable, or another
    client uses its client id. The CLI prints the one-line message and exits 2."""


class TaskRejected(AsyncmigfraError):
    """A message that cannot become a task. The reply is ``result: unknown``.

    ``details`` keeps the original migfra wording as its prefix, so schedulers that match on
    it keep working; ``task_id`` is set when the id could still be read.
    """

    def __init__(self, code: str, details: str, *, task_id: str | None = None) -> None:
        if code not in CODES:  # pragma: no cover - a programming error
            raise ValueError(f"unknown wire code {code!r}")
        self.code = code
        self.details = details
        self.task_id = task_id
        super().__init__(details)


class TaskError(AsyncmigfraError):
    """One subtask failed. ``code`` is the wire code; ``str(exc)`` is the details text."""

    code: ClassVar[str] = "hypervisor-error"
    #: Whether trying again can help (the VM is untouched or still runs where it was).
    retryable: ClassVar[bool] = False


class InvalidTask(TaskError):
    code = "invalid-message"


class VmNotFound(TaskError):
    code = "vm-not-found"


class WrongState(TaskError):
    code = "wrong-state"


class Busy(TaskError):
    code = "busy"


class HypervisorError(TaskError):
    code = "hypervisor-error"


class ConnectionFailed(TaskError):
    code = "connection-failed"
    retryable = True


class IncompatibleDestination(TaskError):
    code = "incompatible-destination"


class NoDestination(TaskError):
    code = "no-destination"


class MigrationFailed(TaskError):
    code = "migration-failed"
    retryable = True


class TaskTimeout(TaskError):
    code = "timeout"


class TaskCancelled(TaskError):
    code = "cancelled"


class HookFailed(TaskError):
    code = "hook-failed"


class NotSupported(TaskError):
    code = "not-supported"


class Unavailable(TaskError):
    """The agent cannot keep its promise now: its journal cannot write (disk full, I/O
    error, read-only). Nothing was done; the task can be sent again later or elsewhere."""

    code = "unavailable"
    retryable = True


class WillNotConverge(TaskError):
    """``migration-type: auto`` (or a plan): the prediction says neither pre-copy nor an
    allowed post-copy finishes within the migration's limits. Nothing was started."""

    code = "will-not-converge"
