"""The ``fake`` back-end's broken post-copy (fault ``postcopy-break``) and its recovery.

A job made with ``postcopy-break`` breaks half-way through its post-copy phase, as a post-copy
does on libvirt when its connection breaks after the switch: the job fails, the guest stays
paused on the source (``broken`` on the domain) and its destination is taken. A resume
(:class:`FakePostCopyRecovery`) fails with "No route to host" until ``postcopy-break-for``
simulated seconds have passed since the break, then pulls the rest at the link's bandwidth
and moves the guest like a finished post-copy.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from asyncmigfra.errors import ConnectionFailed, HypervisorError
from asyncmigfra.hypervisor.base import (
    DomainState,
    JobStats,
    MigrationRequest,
    MigrationResult,
    PostCopySourceState,
)

if TYPE_CHECKING:
    from asyncmigfra.hypervisor.fake.backend import FakeHypervisor
    from asyncmigfra.hypervisor.fake.cluster import FakeDomain, FakeHost
    from asyncmigfra.hypervisor.fake.migration import FakeMigrationJob

__all__ = ["BrokenPostCopy", "FakePostCopyRecovery", "break_post_copy", "find_broken"]

#: The migrate call's error when the post-copy broke (libvirt's words on the rig).
BROKEN_MESSAGE = "Migration failed: operation failed: job 'migration in' failed in post-copy phase"


@dataclass(slots=True)
class BrokenPostCopy:
    """What a broken post-copy leaves on its domain."""

    destination: FakeHost
    request: MigrationRequest
    #: Bytes still to pull from the source.
    remaining: float
    #: Loop time from which a resume can reach the destination again.
    reachable_at: float


def break_post_copy(job: FakeMigrationJob, at: float, *, remaining: float) -> None:
    """End ``job`` at simulated time ``at`` as a broken post-copy (see the module)."""
    owner = job._owner
    loop = asyncio.get_running_loop()
    dom = job.domain
    final = job._snapshot(at)
    dom.broken = BrokenPostCopy(
        destination=job.destination,
        request=job.request,
        remaining=remaining,
        reachable_at=loop.time() + owner.postcopy_break_for / owner.time_scale,
    )
    dom._apply_state(DomainState.PAUSED)
    job._end(
        at,
        HypervisorError(f"{BROKEN_MESSAGE} (post-copy failed: the guest is paused on the source)"),
        final,
    )
    job.destination.incoming[dom.name] = dom.memory  # its vCPUs wait there


def find_broken(owner: FakeHypervisor, request: MigrationRequest) -> FakePostCopyRecovery | None:
    """The recovery of ``request``'s broken post-copy on ``owner``'s host, if it has one."""
    dom = owner.host.domains.get(request.vm_name)
    if dom is None or dom.broken is None:
        return None
    if dom.broken.destination.name != request.destination:
        return None
    return FakePostCopyRecovery(owner, dom)


class FakePostCopyRecovery:
    """Implements :class:`~asyncmigfra.hypervisor.base.PostCopyRecovery` for the fake."""

    def __init__(self, owner: FakeHypervisor, domain: FakeDomain) -> None:
        assert domain.broken is not None
        self._owner = owner
        self._source = owner.host
        self._domain = domain
        self._broken = domain.broken
        self._job: FakeMigrationJob | None = None

    def __repr__(self) -> str:
        return f"FakePostCopyRecovery({self._domain.name!r} -> {self._broken.destination.name})"

    async def resume_post_copy(self) -> MigrationResult:
        broken = self._broken
        destination = broken.destination.name
        if self._domain.broken is not broken:
            raise HypervisorError("Requested operation is not valid: post-copy is not broken")
        if asyncio.get_running_loop().time() < broken.reachable_at:
            raise ConnectionFailed(
                f"unable to connect to server at '{destination}': No route to host"
            )
        job = self._owner._resumed_job(self._domain, broken.destination, broken.request)
        self._domain.broken = None
        self._job = job
        job._begin_resumed(broken.remaining)
        return await job.wait()

    async def stats(self) -> JobStats | None:
        return await self._job.stats() if self._job is not None else None

    async def source_state(self) -> PostCopySourceState:
        dom = self._source.domains.get(self._domain.name)
        if dom is not self._domain:
            return "left"
        return "broken" if dom.broken is not None or dom.job is not None else "other"

    async def describe(self) -> str:
        source, destination = self._source.name, self._broken.destination.name
        return (
            f"the guest is paused (post-copy failed) on {source} and running (post-copy "
            f"failed) on {destination}, where its vCPUs wait for the memory still on {source}; "
            "send the migrate task again to resume it"
        )
