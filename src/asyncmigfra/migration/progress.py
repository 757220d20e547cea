"""Progress event fields from job samples: ``percent`` that never goes backwards, ``eta``.

A migration that copies storage (``copy-storage: all``/``inc``) moves the disks first (libvirt
mirrors them over NBD) and memory after: during that **disk phase** a sample has
``disk_total > 0`` while ``memory_total`` is still 0 and ``iteration`` 0. ``percent`` and
``eta`` then cover disks and memory together:

* ``percent`` = processed / (processed + remaining) of disks and memory summed; while the
  hypervisor reports no memory figures yet, the guest's memory (the plan's) counts as still
  to copy, so the percent does not run to 99 on the disks and stall there while memory moves;
* ``eta`` during the disk phase = the disk remaining over the rate at which it shrinks, plus
  one pass of the guest's memory at the rate the disks are copied: a lower bound (a guest
  that dirties memory needs more passes); after it, the memory estimate of
  :func:`estimate_eta`, whose ``data_remaining`` counts what the disks still have to sync.

libvirt reports no transfer rate while the disks are copied (``memory_bps`` is QEMU's, which
has not started): the rate is then measured between two samples (``disk_processed`` over
``elapsed``) and the event's ``transfer-rate`` carries that measurement.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from asyncmigfra.hypervisor.base import JobStats

__all__ = [
    "disk_phase",
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


def disk_phase(stats: JobStats) -> bool:
    """The sample is from a storage copy before memory moves (see the module)."""
    return stats.disk_total > 0 and stats.memory_total <= 0


@dataclass(slots=True)
class _DiskRate:
    """Rates of the disk phase, measured between two samples (on the job's clock)."""

    #: (elapsed, disk_processed, disk_remaining) of the last sample with a later one to
    #: compare to.
    mark: tuple[float, int, int] | None = None
    #: bytes/s copied, and by which the disk remaining shrank; 0: not measured yet.
    copy: float = 0.0
    shrink: float = 0.0

    def feed(self, stats: JobStats) -> None:
        now = (stats.elapsed, stats.disk_processed, stats.disk_remaining)
        mark = self.mark
        if mark is not None and now[0] > mark[0]:
            span = now[0] - mark[0]
            self.copy = max(0.0, (now[1] - mark[1]) / span)
            self.shrink = (mark[2] - now[2]) / span
        if mark is None or now[0] > mark[0]:
            self.mark = now


@dataclass(slots=True)
class _Progress:
    """Turns job samples into progress event fields; ``percent`` never decreases."""

    max_downtime: int | None
    #: Bytes of guest memory (the plan's; 0: unknown): what is still to copy after the disks
    #: while the hypervisor reports no memory figures (see the module).
    memory: int = 0
    percent: float = 0.0
    started: float = field(default_factory=time.monotonic)
    last: JobStats | None = None
    #: ``time.monotonic()`` when ``last`` was taken.
    last_at: float = 0.0
    disk_rate: _DiskRate = field(default_factory=_DiskRate)

    def elapsed(self) -> float:
        """s since the job started, on the back-end's clock (its samples' ``elapsed``) carried
        forward by the wall clock since the last sample, so it never goes backwards."""
        now = time.monotonic()
        if self.last is None:
            return now - self.started
        return self.last.elapsed + (now - self.last_at)

    def _done_fraction(self, stats: JobStats) -> float | None:
        processed = stats.memory_processed + stats.disk_processed
        remaining = stats.memory_remaining + stats.disk_remaining
        if disk_phase(stats):
            remaining += max(0, self.memory)
        total = processed + remaining
        return processed / total if total > 0 else None

    def _rate_and_eta(self, stats: JobStats) -> tuple[int, float | None]:
        """The transfer rate to report and the ``eta`` (see the module)."""
        if not disk_phase(stats):
            return stats.transfer_rate, estimate_eta(stats)
        rates = self.disk_rate
        rates.feed(stats)
        copy = stats.transfer_rate if stats.transfer_rate > 0 else rates.copy
        # Measured: the disks remaining shrink by less than is copied while the guest writes.
        shrink = rates.shrink if rates.copy > 0 else copy
        if copy <= 0 or shrink <= 0:
            return round(copy), None
        eta = max(0, stats.disk_remaining) / shrink + max(0, self.memory) / copy
        return round(copy), round(eta, 1)

    def fields(
        self,
        stats: JobStats | None,
        *,
        phase: str,
        action: str | None,
        downtime: int | None,
        reason: str | None = None,
        tuned: Mapping[str, object] | None = None,
    ) -> dict[str, object]:
        """One progress event's fields. ``action`` is what the agent changed with this sample
        and ``reason`` why, when a limit made it act (``progress-timeout``,
        ``completion-timeout``); ``tuned`` is what ``tune migration`` changed (``action:
        tuned`` and the values applied, which then take the place of ``action``)."""
        out: dict[str, object] = {"phase": phase}
        if stats is not None:
            self.last = stats
            self.last_at = time.monotonic()
            done = self._done_fraction(stats)
            if done is not None:
                self.percent = max(self.percent, min(99.0, 100.0 * done))
            rate, eta = self._rate_and_eta(stats)
            out.update(
                {
                    "iteration": stats.iteration,
                    "elapsed": round(stats.elapsed, 3),
                    "percent": round(self.percent, 1),
                    "memory-total": stats.memory_total,
                    "memory-processed": stats.memory_processed,
                    "memory-remaining": stats.memory_remaining,
                }
            )
            if stats.disk_total > 0:
                out["disk-total"] = stats.disk_total
                out["disk-processed"] = stats.disk_processed
                out["disk-remaining"] = stats.disk_remaining
            out.update(
                {
                    "data-remaining": stats.data_remaining,
                    "dirty-rate": stats.dirty_rate,
                    "transfer-rate": rate,
                }
            )
            if stats.expected_downtime is not None:
                out["expected-downtime"] = round(stats.expected_downtime, 1)
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
            if reason is not None:
                out["reason"] = reason
        elif tuned:
            out.update(tuned)
        return out

    def final(self, *, downtime: int | None) -> dict[str, object]:
        """The last event of a completed job: 100 %, nothing left to copy (disks included)."""
        last = self.last
        out: dict[str, object] = {"phase": "completed"}
        out["iteration"] = last.iteration if last else 0
        out["elapsed"] = round(self.elapsed(), 3)
        out["percent"] = 100.0
        if last is not None:
            out["memory-total"] = last.memory_total
            out["memory-processed"] = last.memory_processed + last.memory_remaining
            out["memory-remaining"] = 0
            if last.disk_total > 0:
                out["disk-total"] = last.disk_total
                out["disk-processed"] = last.disk_processed + last.disk_remaining
                out["disk-remaining"] = 0
            out["data-remaining"] = 0
            out["transfer-rate"] = last.transfer_rate
        out["eta"] = 0.0
        if downtime is not None:
            out["max-downtime"] = downtime
        return out
