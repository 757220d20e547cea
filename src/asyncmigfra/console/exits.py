"""Exit codes of the client commands, and the exception that carries one to ``main``.

Scripts branch on these, so they are part of the interface (listed in ``--help``):
the task's own outcome (0/1) is kept apart from "could not even ask" (2, 3, 4), so a script
can tell "the migration failed" from "the broker is down" without parsing text.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BROKER",
    "CLOSED_PIPE",
    "EPILOG",
    "FAILED",
    "INTERRUPTED",
    "OFFLINE",
    "OK",
    "TIMEOUT",
    "USAGE",
    "CliError",
]

#: Every entry of the result succeeded (or the command needed no task).
OK: Final = 0
#: The agent answered, and at least one entry failed (including ``result: unknown``, ``busy``
#: and a cancelled migration).
FAILED: Final = 1
#: Bad usage, an unreadable task file, a task without a readable id, or (``follow``) an id no
#: agent knows.
USAGE: Final = 2
#: The broker could not be reached, refused the connection or dropped it.
BROKER: Final = 2
#: The addressed agent is offline (retained status ``offline`` or none) and ``--force`` was
#: not given, or it went offline before answering.
OFFLINE: Final = 3
#: No result within ``--timeout``.
TIMEOUT: Final = 4
#: Ctrl-C before the result arrived (the task keeps running on the agent).
INTERRUPTED: Final = 130
#: stdout was closed by its reader (``| head``), any command: it ends at once, printing
#: nothing more and no traceback (a task it sent keeps running on the agent). 141 = 128 +
#: SIGPIPE, what the shell reports for a program that the closed pipe ended.
CLOSED_PIPE: Final = 141

EPILOG: Final = """\
exit codes:
  agent      0 clean shutdown, 2 bad configuration, journal locked by another agent or
             unusable, client id in use; 3 the shutdown hung (last-resort timer)
  clients    0 every entry of the result succeeded (status, watch: no error)
             1 the agent answered and at least one entry failed (also result: unknown,
               busy, a cancelled migration)
             2 bad usage or task file, a task id no agent knows (follow); cannot
               reach the MQTT broker, or it dropped us
             3 the addressed agent is offline (retained status offline or absent; --force
               sends anyway), or went offline before answering
             4 no result within --timeout
           130 interrupted with Ctrl-C (the task keeps running on the agent)
  demo       0 every task succeeded, 1 one failed; 2 bad usage, cannot reach the MQTT broker
             or listen on --port (the embedded broker speaks MQTT 3.1.1 only)
  all      141 stdout was closed by its reader (e.g. `| head`): the command ends quietly
             (a task it sent keeps running on the agent)

environment:
  ASYNCMIGFRA_MQTT_PASSWORD   the MQTT password when --password-file is not given
"""


class CliError(Exception):
    """Ends a command with ``message`` on stderr and exit code ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
