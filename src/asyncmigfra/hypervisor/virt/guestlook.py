"""Reading a guest once for the steps of a migration (``ReadsGuestOnce``): one round trip to
libvirtd's worker threads instead of one (or three) per check.

A migration reads the same guest many times before its job starts: its memory, whether a
post-copy of it broke, its definition (machine type, CPU, disks, devices), the record of an
earlier storage copy, its resident memory, its state and persistence. Each was a lookup
and a few calls in a hop of its own; on a loaded host every hop and call costs (issue 20).
Within :func:`reading_once` the first of those reads takes a :class:`GuestLook` of all of it
in one hop (a lookup, ``state()``, ``isPersistent()``, ``XMLDesc(0)``, ``info()`` and, for a
running guest, ``memoryStats()``), and the later ones answer from it. What guards the job's
start (the guest's state and a job of someone else's on it) is read right before it, not
from the look: others may have changed the guest since.

The first change the back-end makes to the guest within the scope (a device unplugged, the
job started, an earlier copy's images removed, its memory ballooned) ends the look: every
read after it is its own, as without a scope. A look that fails (no such domain) is not kept
either: each step then reads for itself and reports its own error, in its own words; when
libvirtd is out of reach, the look fails as the step's own read would (one wait for it, not
two). The scope is a context variable: it covers the task that opened it (and what that
task starts), nothing else on the host; a scope opened within another starts afresh.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import libvirt
from asyncmigfra.hypervisor.virt.domains import _SHUTOFF

if TYPE_CHECKING:
    from asyncmigfra.hypervisor.virt.backend import LibvirtHypervisor

__all__ = ["GuestLook", "guest_look", "reading_once", "spend"]


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
    #: ``info()``
    info: tuple[int, ...]
    #: ``memoryStats()['rss']`` KiB when positive (``None``: no figure); ``rss_read`` false
    #: when the guest is not running or ``memoryStats()`` failed.
    rss: int | None
    rss_read: bool
    #: ``xml`` parsed, in the worker thread that read it (the loop never parses it); read
    #: only, by every reader.
    tree: ET.Element = field(repr=False, compare=False)

    @property
    def active(self) -> bool:
        return bool(self.state != _SHUTOFF)

    def root(self) -> ET.Element:
        return self.tree


@dataclass(slots=True)
class _Scope:
    vm_name: str
    #: The scope this one was opened within (a change ends its looks too).
    outer: _Scope | None = None
    #: URI -> the look (``None``: spent, or failed: readers read for themselves).
    looks: dict[str, GuestLook | None] = field(default_factory=dict)


_SCOPE: ContextVar[_Scope | None] = ContextVar("asyncmigfra_guest_look", default=None)


@contextlib.contextmanager
def reading_once(vm_name: str) -> Iterator[None]:
    """Within the block, ``vm_name`` is read once (see the module docstring)."""
    token = _SCOPE.set(_Scope(vm_name, _SCOPE.get()))
    try:
        yield
    finally:
        _SCOPE.reset(token)


async def guest_look(hv: LibvirtHypervisor, uri: str, vm_name: str) -> GuestLook | None:
    """The scope's look of ``vm_name`` on ``uri`` (taken now when it is the first read);
    ``None`` outside a scope of ``vm_name``, after the look ended or when it failed: read
    for yourself. Raises what your own read would when libvirtd is out of reach
    (``ConnectionFailed``)."""
    scope = _SCOPE.get()
    if scope is None or scope.vm_name != vm_name:
        return None
    if uri in scope.looks:
        return scope.looks[uri]
    look: GuestLook | None
    try:
        look = await hv._call(uri, lambda conn: _read(conn, vm_name))
    except libvirt.libvirtError:
        look = None  # each check reads (and fails) for itself
    # A TaskError (libvirtd out of reach after RECONNECT_GRACE s) propagates: the reader's
    # own read would fail the same way, after as long again. Nothing is kept: a later read
    # tries again.
    scope.looks.setdefault(uri, look)
    return scope.looks[uri]


def spend(uri: str, vm_name: str) -> None:
    """End the looks of ``vm_name`` on ``uri``, in this scope and those it was opened within:
    the back-end changes the guest now."""
    scope = _SCOPE.get()
    while scope is not None:
        if scope.vm_name == vm_name:
            scope.looks[uri] = None
        scope = scope.outer


def _read(conn: Any, name: str) -> GuestLook:
    """Worker thread: the look, one lookup and the calls after it."""
    dom = conn.lookupByName(name)
    state, reason = (int(v) for v in dom.state())
    persistent = bool(dom.isPersistent())
    xml = str(dom.XMLDesc(0))
    info = tuple(int(v) for v in dom.info())
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
    tree = ET.fromstring(xml)  # noqa: S314 - libvirt's own XML
    return GuestLook(name, state, reason, persistent, xml, info, rss, rss_read, tree)
