"""The ``fake`` back-end's NICs: the migrations that use a host's NIC share it.

Each :class:`~asyncmigfra.hypervisor.fake.cluster.FakeHost` may have a ``nic_rate`` (bytes
per simulated second, ``None``: unlimited). A NIC is full duplex: what a host sends and what
it receives are limited separately, each to ``nic_rate``. A migration job that moves data
(the disk copy, the memory passes, the switchover, post-copy; not its setup) is a flow out of
its source's NIC and into its destination's, limited by itself to what it *wants*: its
bandwidth (``min(bandwidth option, the request's bandwidth cap)``), or the link's full
bandwidth during the switchover (QEMU lifts the cap there). The flows divide the NICs max-min
fairly (:func:`~asyncmigfra.fairshare.max_min_rates`): a migration capped below its fair share
leaves the rest to the others. The division is recomputed whenever a flow starts, ends or
changes what it wants, and every job's progress is carried over at its old rate up to that
moment.

Jobs between two hosts without a ``nic_rate`` never join: they run at their bandwidth, exactly
as before the NIC model existed. Jobs that do join are advanced in the order of their events
across the cluster (:meth:`FakeLinks.advance`), not each on its own clock, since one job's
event changes the others' rates. The division assumes one ``time-scale`` for the agents of
a process (rates are per simulated second of each job).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from asyncmigfra.fairshare import Flow, max_min_rates

if TYPE_CHECKING:
    from asyncmigfra.hypervisor.fake.cluster import FakeHost
    from asyncmigfra.hypervisor.fake.migration import FakeMigrationJob

__all__ = ["FakeLinks"]


def _out(host: FakeHost) -> str:
    return f"{host.name}>"


def _in(host: FakeHost) -> str:
    return f">{host.name}"


class FakeLinks:
    """The NIC shares of one cluster's migration jobs."""

    def __init__(self) -> None:
        #: Jobs between hosts of which at least one has a NIC limit, not yet ended.
        self.jobs: set[FakeMigrationJob] = set()
        #: job -> bytes/s it wants while it moves data.
        self._wants: dict[FakeMigrationJob, float] = {}

    def __repr__(self) -> str:
        return f"FakeLinks(jobs={len(self.jobs)}, moving={len(self._wants)})"

    @staticmethod
    def limited(source: FakeHost, destination: FakeHost) -> bool:
        """A job between these hosts shares a NIC with others (and so joins)."""
        return source.nic_rate is not None or destination.nic_rate is not None

    def join(self, job: FakeMigrationJob) -> None:
        self.jobs.add(job)

    def want(self, job: FakeMigrationJob, rate: float | None, at: float) -> None:
        """From loop time ``at`` on, ``job`` moves data at up to ``rate`` bytes/s (``None``:
        it moves nothing, ended or not); every job's share is recomputed. The caller has
        advanced every job to ``at``."""
        if rate is None:
            if self._wants.pop(job, None) is None:
                return
        else:
            if self._wants.get(job) == rate:
                return
            self._wants[job] = rate
        self._divide(at)

    def leave(self, job: FakeMigrationJob, at: float) -> None:
        """``job`` ended at loop time ``at``."""
        self.jobs.discard(job)
        self.want(job, None, at)

    def _divide(self, at: float) -> None:
        capacities: dict[str, float] = {}
        flows: dict[FakeMigrationJob, Flow] = {}
        for job, wanted in self._wants.items():
            links = (_out(job.source), _in(job.destination))
            for host, link in zip((job.source, job.destination), links, strict=True):
                if host.nic_rate is not None:
                    capacities[link] = host.nic_rate
            flows[job] = Flow(limit=wanted, links=links)
        for job, rate in max_min_rates(flows, capacities).items():
            if rate != job._rate:
                job._rerate(rate, at)
                job._reschedule()  # its timer: the phase ends sooner or later now

    def advance(self, until: float) -> None:
        """Fire every event of the joined jobs due by loop time ``until``, earliest first
        across all of them, then set each one's timer for its next event."""
        while True:
            earliest: tuple[float, FakeMigrationJob] | None = None
            for job in self.jobs:
                at = job._next_event_time()
                if at is not None and at <= until and (earliest is None or at < earliest[0]):
                    earliest = (at, job)
            if earliest is None:
                break
            earliest[1]._fire_next()
        for job in list(self.jobs):
            job._reschedule()
