"""The dispatcher: who runs what, when, and in which order.

One accepted message is a *job*; each of its subtasks runs as its own named asyncio task,
owned by the job, which is owned by the dispatcher's TaskGroup. The rules:

* **Concurrency.** Subtasks of a message run concurrently; ``concurrent-execution: false`` (on
  the message or on an item) runs that subtask after every earlier one finished, in list
  order (protocol §7.1). One result is published per message when all its subtasks are done.
* **Per-VM order.** Work on the same VM never overlaps: each VM has a FIFO *lane*; a subtask
  reserves its place at submission (synchronously, so the order is the arrival order) and
  starts when it reaches the front. This is what the original lacked (protocol §7.2).
* **Limits.** At most ``limits.max-concurrent-tasks`` subtasks run at once; at most
  ``limits.max-queued-tasks`` wait. A message that does not fit is answered at once with
  ``code: busy`` for every entry — never dropped.
* **Duplicates.** The same payload with the same ``id`` received again within
  ``limits.dedupe-window`` is not run twice: while the first runs the copy gets a
  ``rejected`` event (its result follows once), after it finished its result is published
  again.
* **Cancel.** ``task: cancel`` marks the target's subtasks and cancels their asyncio tasks:
  a queued one never starts, a running migration aborts its job (see ``migrating``). Each
  cancelled entry reports ``code: cancelled``.
* **Tune.** ``task: tune migration`` changes the target's running migration jobs through the
  steering the engine registers on each run while a job runs (bandwidth, downtime target,
  post-copy now, force-complete); answered at once, like cancel.
* **Shutdown.** :meth:`Dispatcher.drain` answers new work with ``busy``, lets running work
  finish within a grace period, then cancels what remains, so every accepted task still gets
  its result.

Modules: :mod:`.lanes` (per-VM FIFO lanes), :mod:`.jobs` (``Reply``, jobs and runs, the audit
line), :mod:`.base` (the dispatcher's state and shared steps), :mod:`.remembered` (duplicates
and remembered results, bounded in bytes), :mod:`.expansion` (stop-by-regex, evacuate),
:mod:`.predicted` (an evacuation in waves planned from predictions), :mod:`.answers` (status,
cancel, quit), :mod:`.tuning` (tune migration), :mod:`.dispatcher` (:class:`Dispatcher`:
lifecycle, intake, running).
"""

from asyncmigfra.tasks.dispatching.dispatcher import Dispatcher
from asyncmigfra.tasks.dispatching.jobs import Reply

__all__ = ["Dispatcher", "Reply"]
