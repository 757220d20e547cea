"""Reading a guest once for the steps of a migration (``ReadsGuestOnce``): one round trip to
libvirtd's worker threads instead of one (or three) per check.

A migration reads the same guest many times before its job starts: its memory, whether a
post-copy of it broke, its definition (machine type, CPU, disks, devices), the record of an
earlier storage copy, its resident memory, its state, persistence and running job. Each was
a lookup and a few calls in a hop of its own; on a loaded host every hop and call costs
(issue 20). Within :func:`reading_once` the first of those reads takes a :class:`GuestLook`
of everything its purpose needs, in one hop, and the later ones answer from it:

* ``checks`` (the pre-checks): state and reason, persistence, ``info()``, the live
  definition, the resident memory (``memoryStats()['rss']``, running guests only);
* ``start`` (devices out and the job's start): state, persistence, the live definition and
  the operation of a job already running.

The first change the back-end makes to the guest within the scope (a device unplugged, the
job started, an earlier copy's images removed) ends the look: every read after it is its own,
as without a scope. A look that fails (no such domain, libvirtd away) is not kept either:
each check then reads for itself and reports its own error, in its own words. The scope is a
context variable: it covers the task that opened it (and what that task starts), nothing
else on the host.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import libvirt
from asyncmigfra.errors import TaskError
from asyncmigfra.hypervisor.base import GuestReadPurpose
from asyncmigfra.hypervisor.virt.domains import _JOB_NONE, _SHUTOFF
from asyncmigfra.hypervisor.virt.migrationparams import _num

if TYPE_CHECKING:
    from asyncmigfra.hypervisor.virt.backend import LibvirtHypervisor

__all__ = ["GuestLook", "LookPurpose", "guest_look", "reading_once", "spend"]

#: ``checks`` or ``start`` (:data:`asyncmigfra.hypervisor.base.GuestReadPurpose`).
LookPurpose = GuestReadPurpose


@dataclass(frozen=True, slots=True)
class GuestLook:
    """One guest as one round trip read it (see the module docstring)."""

    name: str
    #: ``dom.state()``
    state: int
    reason: int
    persistent: bool
    #: ``XMLDesc(0)``: the live definition of a running guest.
    xml: str
    #: ``info()`` (``checks`` only).
    info: tuple[int, ...] | None = None
    #: ``memoryStats()['rss']`` KiB when positive (``checks``; ``None``: no figure);
    #: ``rss_read`` false when the guest is not running or ``memoryStats()`` failed.
    rss: int | None = None
    rss_read: bool = False
    #: The operation of a job already running on the guest (``start`` only; ``None``: none,
    #: or no job statistics on this driver).
    job_operation: int | None = None

    @property
    def active(self) -> bool:
        return bool(self.state != _SHUTOFF)

    def root(self) -> ET.Element:
        return ET.fromstring(self.xml)  # noqa: S314 - libvirt's own XML


@dataclass(slots=True)
class _Scope:
    vm_name: str
    purpose: LookPurpose
    #: URI -> the look (``None``: spent, or failed: readers read for themselves).
    looks: dict[str, GuestLook | None] = field(default_factory=dict)


_SCOPE: ContextVar[_Scope | None] = ContextVar("asyncmigfra_guest_look", default=None)


@contextlib.contextmanager
def reading_once(vm_name: str, purpose: LookPurpose) -> Iterator[None]:
    """Within the block, ``vm_name`` is read once for ``purpose`` (module docstring)."""
    token = _SCOPE.set(_Scope(vm_name, purpose))
    try:
        yield
    finally:
        _SCOPE.reset(token)


async def guest_look(
    hv: LibvirtHypervisor, uri: str, vm_name: str, purpose: LookPurpose
) -> GuestLook | None:
    """The scope's look of ``vm_name`` on ``uri`` (taken now when it is the first read);
    ``None`` outside a scope for ``purpose`` or after the look ended: read for yourself."""
    scope = _SCOPE.get()
    if scope is None or scope.vm_name != vm_name or scope.purpose != purpose:
        return None
    if uri in scope.looks:
        return scope.looks[uri]
    look: GuestLook | None
    try:
        look = await hv._call(uri, lambda conn: _read(conn, vm_name, purpose))
    except (libvirt.libvirtError, TaskError):
        look = None  # each check reads (and fails) for itself
    scope.looks.setdefault(uri, look)
    return scope.looks[uri]


def spend(uri: str, vm_name: str) -> GuestLook | None:
    """End the look of ``vm_name`` on ``uri`` (the back-end changes the guest now); returns
    it (``None``: none) for the step that changes it."""
    scope = _SCOPE.get()
    if scope is None or scope.vm_name != vm_name:
        return None
    look = scope.looks.get(uri)
    scope.looks[uri] = None
    return look


def _read(conn: Any, name: str, purpose: LookPurpose) -> GuestLook:
    """Worker thread: the look, one lookup and the calls ``purpose`` needs."""
    dom = conn.lookupByName(name)
    state, reason = (int(v) for v in dom.state())
    persistent = bool(dom.isPersistent())
    xml = str(dom.XMLDesc(0))
    if purpose == "checks":
        rss: int | None = None
        rss_read = False  # not running (or no statistics): the reader's own call says why
        if state != _SHUTOFF:
            try:
                raw = dom.memoryStats().get("rss")
            except libvirt.libvirtError:
                pass
            else:
                rss = int(raw) if isinstance(raw, int) and raw > 0 else None
                rss_read = True
        info = tuple(int(v) for v in dom.info())
        return GuestLook(name, state, reason, persistent, xml, info, rss, rss_read)
    operation: int | None = None
    if state != _SHUTOFF:
        try:
            raw_job = dom.jobStats()
        except libvirt.libvirtError:
            pass  # no job statistics here (test driver): nothing to check
        else:
            if _num(raw_job, "type") != _JOB_NONE:
                operation = _num(raw_job, "operation")
    return GuestLook(name, state, reason, persistent, xml, job_operation=operation)
