"""How fast a running guest dirties its memory, measured by QEMU without migrating it.

``virDomainStartDirtyRateCalc`` in **page-sampling** mode only: QEMU hashes a sample of the
guest's pages, waits the period and counts the sampled pages that changed. The other modes
are never used: dirty-bitmap mode crashed the guest on QEMU 7.2 (reproduced twice on the
rig), and dirty-ring mode needs KVM's dirty ring. The result is read with
``virConnectGetAllDomainStats(VIR_DOMAIN_STATS_DIRTYRATE)``: ``dirtyrate.calc_status``
(0 unstarted, 1 measuring, 2 measured) and ``dirtyrate.megabytes_per_second`` (QEMU counts
MiB: used memory of each RAM block shifted by 20).

How sure the figure is: QEMU picks its pages at random, 512 per GiB of each RAM block
(``DIRTYRATE_DEFAULT_SAMPLE_PAGES``; ``virDomainStartDirtyRateCalc`` cannot ask for more and
``domstats --dirtyrate`` does not report it), and reports ``dirty * MiB of RAM * 1000 /
(sampled * ms)``, rounded down. :func:`sample` turns the figure back into the pages behind it
(:func:`pages_of`), so ``migration.dirtysample`` can bound the rate and pool probes. The
guest's memory is taken as one RAM block of its ``<memory>`` (hot-plugged DIMMs are blocks
of their own and not counted: the bound is then a little wider than it need be).

Every libvirt call runs in the back-end's worker threads (the ``call`` given); the wait
for the sample runs on the event loop, bounded. A guest that dirties less than 1 MiB/s
reads as 0 (QEMU's figure is a whole number).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import libvirt
from asyncmigfra.errors import TaskTimeout
from asyncmigfra.hypervisor.base import DirtyPageSample
from asyncmigfra.hypervisor.virt.domains import _RUNNING
from asyncmigfra.hypervisor.virt.errors import _wrong_state, map_libvirt_errors

__all__ = [
    "MAX_SECONDS",
    "SAMPLE_PAGES_PER_GIB",
    "DirtyRateReading",
    "measure",
    "pages_of",
    "read",
    "sample",
    "start_sampling",
]

T = TypeVar("T")
#: Runs ``fn(conn)`` in a worker thread on the connection to the guest's host.
Call = Callable[[Callable[[Any], T]], Awaitable[T]]

#: The only mode this module asks for (see the module docstring).
PROBE_MODE: Final = libvirt.VIR_DOMAIN_DIRTYRATE_MODE_PAGE_SAMPLING
#: Longest sample (QEMU allows 1-60 s).
MAX_SECONDS: Final = 60
#: s between reads once the sample should be over.
POLL_INTERVAL: Final = 0.05
#: Pages QEMU samples per GiB of a RAM block (its default; libvirt cannot change it).
SAMPLE_PAGES_PER_GIB: Final = 512
#: s past the sample's end to wait for QEMU's figure before giving up.
RESULT_GRACE: Final = 5.0
_MIB: Final = 1 << 20
_PREFIX: Final = "Error measuring the dirty rate: "


@dataclass(frozen=True, slots=True)
class DirtyRateReading:
    """One read of a domain's dirty-rate statistics."""

    #: ``VIR_DOMAIN_DIRTYRATE_*``: unstarted, measuring, measured; ``None``: not reported.
    status: int | None
    #: MiB/s, present once measured.
    mib_per_second: int | None


def start_sampling(conn: Any, vm_name: str, seconds: int) -> int:
    """Start a page-sampling calculation of ``seconds`` on the running ``vm_name``; its
    memory (KiB, ``<memory>``: the size of its RAM block)."""
    dom = conn.lookupByName(vm_name)
    state = int(dom.state()[0])
    if state != _RUNNING:
        raise _wrong_state(state)
    memory_kib = int(dom.maxMemory())
    dom.startDirtyRateCalc(seconds, PROBE_MODE)
    return memory_kib


def pages_of(mib_per_second: int, memory: int, seconds: int) -> DirtyPageSample:
    """The sample behind QEMU's figure for a guest of ``memory`` bytes: ``sampled`` =
    memory x 512 / GiB, ``dirty`` the smallest count that QEMU's rounded-down figure allows
    (QEMU divides by the period it really waited, a few ms past ``seconds``, which can only
    lower the figure: the smallest count above it is the one)."""
    sampled = memory * SAMPLE_PAGES_PER_GIB >> 30
    block_mib = memory >> 20
    if sampled == 0 or block_mib == 0:
        return DirtyPageSample(sampled=0, dirty=0, memory=memory, period=float(seconds))
    exact = max(0, mib_per_second) * sampled * seconds / block_mib
    dirty = min(sampled, math.ceil(exact - 1e-9))
    return DirtyPageSample(sampled=sampled, dirty=dirty, memory=memory, period=float(seconds))


def read(conn: Any, vm_name: str) -> DirtyRateReading:
    """The domain's dirty-rate statistics now."""
    dom = conn.lookupByName(vm_name)
    records = conn.domainListGetStats([dom], libvirt.VIR_DOMAIN_STATS_DIRTYRATE)
    stats: dict[str, object] = dict(records[0][1]) if records else {}
    return DirtyRateReading(
        status=_int(stats.get("dirtyrate.calc_status")),
        mib_per_second=_int(stats.get("dirtyrate.megabytes_per_second")),
    )


async def measure(call: Call[Any], vm_name: str, seconds: int = 1) -> float:
    """Bytes/s the running ``vm_name`` dirties, sampled for ``seconds`` (1-60): QEMU's
    figure. Raises as :func:`sample` does."""
    mib_per_second, _ = await _probe(call, vm_name, seconds)
    return float(mib_per_second * _MIB)


async def sample(call: Call[Any], vm_name: str, seconds: int = 1) -> DirtyPageSample:
    """One probe of ``seconds`` (1-60) on the running ``vm_name`` as the pages behind it
    (:func:`pages_of`).

    Raises ``WrongState`` (not running), ``NotSupported`` (libvirt or QEMU cannot), another
    mapped libvirt error, or ``TaskTimeout`` when no figure came within the sample and
    :data:`RESULT_GRACE` s."""
    mib_per_second, memory_kib = await _probe(call, vm_name, seconds)
    return pages_of(mib_per_second, memory_kib * 1024, seconds)


async def _probe(call: Call[Any], vm_name: str, seconds: int) -> tuple[int, int]:
    """QEMU's figure (MiB/s) and the guest's memory (KiB)."""
    if not 1 <= seconds <= MAX_SECONDS:
        raise ValueError(f"seconds must be 1-{MAX_SECONDS}, got {seconds!r}")
    with map_libvirt_errors(_PREFIX):
        memory_kib: int = await call(lambda conn: start_sampling(conn, vm_name, seconds))
    await asyncio.sleep(seconds)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RESULT_GRACE
    while True:
        with map_libvirt_errors(_PREFIX):
            reading: DirtyRateReading = await call(lambda conn: read(conn, vm_name))
        measured = reading.status == libvirt.VIR_DOMAIN_DIRTYRATE_MEASURED
        if measured and reading.mib_per_second is not None:
            return max(0, reading.mib_per_second), memory_kib
        if loop.time() >= deadline:
            raise TaskTimeout(
                f"{_PREFIX}no figure for {vm_name} within {seconds + RESULT_GRACE:g} s"
                f" (calc_status {reading.status})"
            )
        await asyncio.sleep(POLL_INTERVAL)


def _int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)
