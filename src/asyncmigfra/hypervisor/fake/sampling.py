"""What a simulated migration shows at one moment: its :class:`JobStats` (the samples a
libvirt job's ``jobStats()`` would give), computed from the job's state. The state and how it
changes are :class:`~asyncmigfra.hypervisor.fake.migration.FakeMigrationJob`'s; what a phase
has moved so far is :mod:`.transfer`'s."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from asyncmigfra.hypervisor.base import DomainState, JobStats
from asyncmigfra.hypervisor.fake.transfer import _Transfer

if TYPE_CHECKING:
    from asyncmigfra.hypervisor.fake.cluster import FakeDomain

#: ms a post-copy switchover takes (the rig measured 5 ms).
_POSTCOPY_DOWNTIME_MS = 5.0


class _Phase(enum.Enum):
    SETUP = "setup"
    DISKS = "disks"
    PRECOPY = "migrating"
    SWITCHOVER = "switchover"
    POSTCOPY = "post-copy"
    #: The stream stopped moving (``migrate-stall``): nothing more happens until an abort.
    STALLED = "stalled"
    DONE = "done"


class _JobSampling(_Transfer):
    """The sampling half of a fake migration job: the state it reads (set by the job)."""

    domain: FakeDomain
    iteration: int
    _phase: _Phase
    _mem: int
    _disk: int
    _bw: float
    _post_bw: float | None
    _throttle: float
    _iter_amount: float
    _dirty_acc: float
    _dirty_mark: float
    _processed_base: float
    _expected: float | None
    _switch_amount: float
    _switch_duration: float
    _post_amount: float
    _stalled_remaining: float

    def _dirty_rate(self) -> float:
        """Effective dirty rate (bytes/s) right now."""
        if self._phase is not _Phase.PRECOPY or self.domain.state is not DomainState.RUNNING:
            return 0.0
        return self.domain.dirty_rate * (1.0 - self._throttle)

    def _post_rate(self) -> float:
        return self._post_bw if self._post_bw is not None else self._bw

    def _remaining_at(self, now: float) -> tuple[float, float]:
        """(bytes sent in the current pass, bytes remaining) during pre-copy."""
        sent = min(self._iter_amount, self._moved(now))
        dirtied = self._dirty_acc + self._dirty_rate() * max(0.0, now - self._dirty_mark)
        return sent, min(float(self._mem), self._iter_amount - sent + dirtied)

    def _snapshot(self, now: float) -> JobStats | None:
        phase = self._phase
        if phase is _Phase.DISKS:
            return self._disk_stats(now, min(float(self._disk), self._moved(now)))
        if phase is _Phase.PRECOPY:
            sent, remaining = self._remaining_at(now)
            return self._stats(
                "migrating",
                now,
                processed=self._processed_base + sent,
                remaining=remaining,
                dirty_rate=self._dirty_rate(),
                transfer_rate=self._rate,
            )
        if phase is _Phase.SWITCHOVER:
            sent = min(self._switch_amount, self._moved(now))
            return self._stats(
                "switchover",
                now,
                processed=self._processed_base + sent,
                remaining=self._switch_amount - sent,
                dirty_rate=0.0,
                transfer_rate=self._rate,
            )
        if phase is _Phase.POSTCOPY:
            sent = min(self._post_amount, self._moved(now))
            return self._stats(
                "post-copy",
                now,
                processed=self._processed_base + sent,
                remaining=self._post_amount - sent,
                dirty_rate=0.0,
                transfer_rate=self._rate,
            )
        if phase is _Phase.STALLED:
            running = self.domain.state is DomainState.RUNNING
            return self._stats(
                "migrating",
                now,
                processed=self._processed_base,
                remaining=self._stalled_remaining,
                dirty_rate=self.domain.dirty_rate * (1.0 - self._throttle) if running else 0.0,
                transfer_rate=0.0,
            )
        return None

    def _stats(
        self,
        phase: str,
        now: float,
        *,
        processed: float,
        remaining: float,
        dirty_rate: float,
        transfer_rate: float,
    ) -> JobStats:
        left = max(0, round(remaining))
        expected = self._expected
        if phase == "switchover":
            expected = self._switch_duration * 1000.0
        elif phase == "post-copy":
            expected = _POSTCOPY_DOWNTIME_MS
        return JobStats(
            phase=phase,
            iteration=self.iteration,
            elapsed=round(now, 6),
            memory_total=self._mem,
            memory_processed=int(processed),
            memory_remaining=left,
            data_remaining=left,
            dirty_rate=int(dirty_rate),
            transfer_rate=int(transfer_rate),
            expected_downtime=None if expected is None else round(expected, 3),
            disk_total=self._disk,
            disk_processed=self._disk,
            disk_remaining=0,
        )

    def _disk_stats(self, now: float, copied: float) -> JobStats:
        """A sample of the disk phase, shaped like libvirt's (see the class)."""
        left = max(0, self._disk - int(copied))
        return JobStats(
            phase="migrating",
            iteration=0,
            elapsed=round(now, 6),
            memory_total=0,
            memory_processed=0,
            memory_remaining=0,
            data_remaining=left,
            dirty_rate=0,
            transfer_rate=0,
            disk_total=self._disk,
            disk_processed=self._disk - left,
            disk_remaining=left,
        )
