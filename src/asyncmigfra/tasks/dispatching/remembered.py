"""Duplicates: a task seen again within ``limits.dedupe-window`` is not run twice; finished
results are remembered, bounded in count and in (estimated) bytes."""

from __future__ import annotations

import time

import structlog

from asyncmigfra.model import (
    ResultMessage,
    TaskMessage,
)
from asyncmigfra.tasks.dispatching.base import _DispatcherBase
from asyncmigfra.tasks.dispatching.jobs import Reply

log = structlog.stdlib.get_logger("asyncmigfra.dispatching")


def _estimated_bytes(key: tuple[str, str], result: ResultMessage) -> int:
    """About what a remembered result costs in memory (its strings and a per-object toll)."""
    cost = 400 + len(key[0]) + len(key[1])
    for entry in result.entries:
        cost += 300 + len(entry.vm_name) + len(entry.details or "") + 100 * len(entry.extra)
    return cost


#: Finished tasks remembered for duplicate detection, at most.
_MAX_REMEMBERED = 100_000
#: Bytes (estimated) of remembered results, at most: ids are bounded (256 characters), but a
#: result with many entries and long details is not.
_MAX_REMEMBERED_BYTES = 64 * 1024 * 1024


class _Remembering(_DispatcherBase):
    """Duplicate detection and the remembered results of finished tasks."""

    def _duplicate(self, key: tuple[str, str], msg: TaskMessage, reply: Reply | None) -> bool:
        now = time.monotonic()
        running = self._running_keys.get(key)
        if running is not None:
            log.info("task.duplicate_running", task_id=msg.id)
            details = f"task '{msg.id}' is already running; its result follows once"
            if running.accepted:
                self._events.rejected(msg.id, code="busy", details=details)
            else:  # not before the first copy's ``accepted`` (or its refusal)
                running.after_accepted.append(
                    lambda: self._events.rejected(msg.id, code="busy", details=details)
                )
            return True
        seen = self._finished.get(key)
        if seen is not None and now - seen[0] <= self._settings.limits.dedupe_window:
            log.info("task.duplicate_finished", task_id=msg.id)
            self._deliver(seen[1], reply, None)
            return True
        return False

    def _remember(self, key: tuple[str, str], result: ResultMessage) -> None:
        """Keep ``result`` for duplicates of its task, within the window, the count and the
        byte budget (oldest forgotten first)."""
        cost = _estimated_bytes(key, result)
        old = self._finished.pop(key, None)
        if old is not None:
            self._remembered_bytes -= old[2]
        self._finished[key] = (time.monotonic(), result, cost)
        self._remembered_bytes += cost
        window = self._settings.limits.dedupe_window
        now = time.monotonic()
        while self._finished:
            oldest, (when, _, size) = next(iter(self._finished.items()))
            if (
                now - when <= window
                and len(self._finished) <= _MAX_REMEMBERED
                and self._remembered_bytes <= _MAX_REMEMBERED_BYTES
            ):
                break
            del self._finished[oldest]
            self._remembered_bytes -= size
