"""Progress event fields from job samples: ``percent`` that never goes backwards, ``eta``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from asyncmigfra.hypervisor.base import JobStats

__all__ = [
    "estimate_eta",
]


def estimate_eta(stats: JobStats) -> float | None:
    """The remaining time (s, 1 decimal) of a running job, as progress events carry it in
    ``eta`` (protocol §5.5): the data still to send divided by the rate at which it shrinks,
    the transfer rate minus the dirty rate (in post-copy the whole transfer rate: dirtied
    pages no longer need sending again). ``None`` when that rate is not positive (the copy
    does not converge at this rate: no honest estimate) or the job reported no rate."""
    if stats.transfer_rate <= 0:
        return None
    shrinking = stats.transfer_rate
    if stats.phase != "post-copy":
        shrinking -= stats.dirty_rate
    if shrinking <= 0:
        return None
    return round(max(0, stats.data_remaining) / shrinking, 1)


@dataclass(slots=True)
class _Progress:
    """Turns job samples into progress event fields; ``percent`` never decreases."""

    max_downtime: int | None
    percent: float = 0.0
    started: float = field(default_factory=time.monotonic)
    last: JobStats | None = None
    #: ``time.monotonic()`` when ``last`` was taken.
    last_at: float = 0.0

    def elapsed(self) -> float:
        """s since the job started, on the back-end's clock (its samples' ``elapsed``) carried
        forward by the wall clock since the last sample, so it never goes backwards."""
        now = time.monotonic()
        if self.last is None:
            return now - self.started
        return self.last.elapsed + (now - self.last_at)

    def fields(
        self, stats: JobStats | None, *, phase: str, action: str | None, downtime: int | None
    ) -> dict[str, object]:
        out: dict[str, object] = {"phase": phase}
        if stats is not None:
            self.last = stats
            self.last_at = time.monotonic()
            total = stats.memory_processed + stats.memory_remaining
            if total > 0:
                pct = 100.0 * stats.memory_processed / total
                self.percent = max(self.percent, min(99.0, pct))
            out.update(
                {
                    "iteration": stats.iteration,
                    "elapsed": round(stats.elapsed, 3),
                    "percent": round(self.percent, 1),
                    "memory-total": stats.memory_total,
                    "memory-processed": stats.memory_processed,
                    "memory-remaining": stats.memory_remaining,
                    "data-remaining": stats.data_remaining,
                    "dirty-rate": stats.dirty_rate,
                    "transfer-rate": stats.transfer_rate,
                }
            )
            if stats.expected_downtime is not None:
                out["expected-downtime"] = round(stats.expected_downtime, 1)
            eta = estimate_eta(stats)
            if eta is not None:
                out["eta"] = eta
        else:
            out.update(
                {
                    "iteration": 0,
                    "elapsed": round(self.elapsed(), 3),
                    "percent": round(self.percent, 1),
                }
            )
        if downtime is not None:
            out["max-downtime"] = downtime
        if action is not None:
            out["action"] = action
        return out

    def final(self, *, downtime: int | None) -> dict[str, object]:
        """The last event of a completed job: 100 %, nothing left to copy."""
        last = self.last
        out: dict[str, object] = {"phase": "completed"}
        out["iteration"] = last.iteration if last else 0
        out["elapsed"] = round(self.elapsed(), 3)
        out["percent"] = 100.0
        if last is not None:
            out["memory-total"] = last.memory_total
            out["memory-processed"] = last.memory_processed + last.memory_remaining
            out["memory-remaining"] = 0
            out["data-remaining"] = 0
            out["transfer-rate"] = last.transfer_rate
        out["eta"] = 0.0
        if downtime is not None:
            out["max-downtime"] = downtime
        return out
