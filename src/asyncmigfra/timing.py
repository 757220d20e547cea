"""Named timers for a result's ``time-measurement`` map (spec section 2).

The original's fast-lib ``Time_measurement`` threw on a duplicate tag, which made every timed
swap migration fail (protocol §9.4). Here a repeated tag accumulates (a retried step reports its
total), and a timer still running when the result is built reports the time so far, as the
original did.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["TimeMeasurement"]


class TimeMeasurement:
    """Monotonic named timers; a disabled instance records nothing and costs nothing."""

    __slots__ = ("_done", "_running", "enabled")

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._done: dict[str, float] = {}
        self._running: dict[str, float] = {}

    def tick(self, tag: str) -> None:
        if self.enabled:
            self._running[tag] = time.perf_counter()

    def tock(self, tag: str) -> None:
        if self.enabled and tag in self._running:
            elapsed = time.perf_counter() - self._running.pop(tag)
            self._done[tag] = self._done.get(tag, 0.0) + elapsed

    def record(self, tag: str, seconds: float) -> None:
        """Record a duration measured elsewhere (e.g. the downtime libvirt reports)."""
        if self.enabled:
            self._done[tag] = seconds

    @contextmanager
    def measure(self, tag: str) -> Iterator[None]:
        self.tick(tag)
        try:
            yield
        finally:
            self.tock(tag)

    def snapshot(self) -> dict[str, float] | None:
        """tag -> seconds, running timers included; ``None`` when disabled or empty."""
        if not self.enabled:
            return None
        now = time.perf_counter()
        out = dict(self._done)
        for tag, started in self._running.items():
            out[tag] = out.get(tag, 0.0) + (now - started)
        return out or None
