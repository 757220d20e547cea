"""The bytes a ``fake`` migration job's current phase moves, at a rate that may change.

A job moves data in phases (the disk copy, each memory pass, the switchover, post-copy). Alone,
a phase moves at one rate from its start. When its hosts' NICs are shared (:mod:`.links`),
the rate changes whenever another migration starts or stops moving data; what the phase had
moved by then is kept (``_seg_moved`` at ``_seg_at``) and it goes on at the new rate; the
same holds when the job's own bandwidth is set while it runs (``tune migration``).
:class:`_Transfer` is that bookkeeping, mixed into
:class:`~asyncmigfra.hypervisor.fake.migration.FakeMigrationJob`; times are the job's
simulated seconds unless named ``*_loop`` (the event loop's clock).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from asyncmigfra.hypervisor.fake.links import FakeLinks


class _Transfer:
    """The current phase's rate and progress, and the job's side of :mod:`.links`."""

    _t0: float
    _scale: float
    #: The cluster's links when the job shares a NIC, else ``None``.
    _links: FakeLinks | None
    #: Bytes/s the current phase moves at now.
    _rate: float
    #: Since when (s) ``_rate`` applies, and what the phase had moved by then.
    _seg_at: float
    _seg_moved: float

    def _next_event(self) -> float | None:
        raise NotImplementedError

    def _fire(self, at: float) -> None:
        raise NotImplementedError

    def _rerated(self) -> None:
        """The rate changed during the phase (the job adjusts what depends on it)."""

    def _loop_time(self, at: float) -> float:
        return self._t0 + at / self._scale

    def _moving(self, at: float, wants: float | None) -> None:
        """A phase begins at ``at`` that moves data at up to ``wants`` bytes/s (``None``:
        it moves nothing, so it takes no share of a NIC)."""
        self._seg_at = at
        self._seg_moved = 0.0
        if self._links is not None:  # its share (kept when it wants what it wanted)
            self._links.want(self, wants, self._loop_time(at))  # type: ignore[arg-type]
        elif wants is not None:
            self._rate = wants

    def _retarget(self, at: float, wants: float) -> None:
        """From ``at`` on the current phase wants ``wants`` bytes/s (a bandwidth set while it
        runs); what it moved so far stays. Shared NICs are divided again."""
        if self._links is not None:
            self._links.want(self, wants, self._loop_time(at))  # type: ignore[arg-type]
        else:
            self._rerate(wants, self._loop_time(at))

    def _next_segment(self, at: float) -> None:
        """The next phase of the same flow (a new pass) begins at ``at``: its bytes count
        from zero, at the same rate."""
        self._seg_at, self._seg_moved = at, 0.0

    def _moved(self, now: float) -> float:
        """Bytes the current phase has moved by ``now`` (not capped at its amount)."""
        return self._seg_moved + self._rate * max(0.0, now - self._seg_at)

    def _moved_by(self, amount: float) -> float:
        """When the current phase will have moved ``amount`` bytes."""
        if self._rate <= 0:
            return math.inf
        return self._seg_at + max(0.0, amount - self._seg_moved) / self._rate

    def _rerate(self, rate: float, at_loop: float) -> None:
        """The NICs' division (:mod:`.links`) or the job's bandwidth changed: from
        ``at_loop`` the phase moves at ``rate``."""
        if rate == self._rate:
            return
        at = max(self._seg_at, (at_loop - self._t0) * self._scale)
        self._seg_moved = self._moved(at)
        self._seg_at = at
        self._rate = rate
        self._rerated()

    def _next_event_time(self) -> float | None:
        """Loop time of the next event (:meth:`.links.FakeLinks.advance`)."""
        at = self._next_event()
        return None if at is None else self._loop_time(at)

    def _fire_next(self) -> None:
        """Fire the next event (:meth:`.links.FakeLinks.advance`: it is due)."""
        at = self._next_event()
        assert at is not None
        self._fire(at)
