"""The rig's link shaping (``rig.shaping``): a token bucket on rig-a's veth holds a real
QEMU migration's transfer rate near the limit, and removing it lifts the limit (the same
guest then converges).

Behaviour, not timing: QEMU's own ``memory_bps`` of a migration of a ``dirty64`` guest
(which always has pages to send) is compared with the bucket's rate, and the run is aborted
once a few samples are in."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import libvirt
from rig import Rig, migrate_p2p
from rig.shaping import ShapingUnavailable, shape, shaped, shaping, unshape

pytestmark = [pytest.mark.rig]

MIB = 1 << 20
LIMIT = 8  # MiB/s


def transfer_rates(rig: Rig, conn: Any, dom: Any, samples: int = 6) -> list[int]:
    """QEMU's transfer rates (bytes/s) of a migration of ``dom`` to rig-b, sampled every
    0.5 s once memory moves, on a connection of their own; the job is then aborted."""
    ctl = conn.lookupByName(dom.name())
    failure: list[BaseException] = []

    def migrate() -> None:
        try:
            migrate_p2p(dom, rig.b, timeout=60)
        except libvirt.libvirtError as exc:  # aborted below, as intended
            failure.append(exc)

    mover = threading.Thread(target=migrate, daemon=True)
    mover.start()
    rates: list[int] = []
    deadline = time.monotonic() + 40
    try:
        while len(rates) < samples and time.monotonic() < deadline and mover.is_alive():
            time.sleep(0.5)
            with contextlib.suppress(libvirt.libvirtError):
                stats = ctl.jobStats()
                if stats.get("memory_iteration", 0) >= 1 and stats.get("memory_bps", 0) > 0:
                    rates.append(int(stats["memory_bps"]))
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            ctl.abortJob()
        mover.join(30)
    return rates


async def test_a_token_bucket_holds_a_migration_near_its_rate(
    rig: Rig, rig_conns: dict[str, Any], start_guest: Callable[..., Any]
) -> None:
    if rig.mode != "netns":
        pytest.skip("loopback mode: the rig's link cannot be shaped")
    dom = start_guest("dirty64")
    conn = rig_conns[rig.a.name]
    with shaped(rig.a, LIMIT):
        assert "tbf" in shaping(rig.a)
        rates = await asyncio.to_thread(transfer_rates, rig, conn, dom)
    assert "tbf" not in shaping(rig.a)
    assert len(rates) >= 3, rates
    shaped_rate = statistics.median(rates)
    # At most the bucket's rate (QEMU counts its own bytes, a little under the wire's) ...
    assert shaped_rate <= LIMIT * MIB * 1.1, rates
    # ... and the stream fills most of it: the bucket, not QEMU, is what limits it.
    assert shaped_rate >= LIMIT * MIB * 0.5, rates
    assert dom.isActive()  # the run was aborted: the guest still runs on rig-a
    # Unshaped, the same guest converges: 64 MiB rewritten all the time never fit a
    # downtime at 8 MiB/s, and do at the veth's own speed.
    await asyncio.to_thread(migrate_p2p, dom, rig.b, timeout=60)
    assert rig_conns[rig.b.name].lookupByName(dom.name()).isActive()


def test_shaping_refuses_nonsense(rig: Rig) -> None:
    with pytest.raises(ValueError, match="> 0"):
        shape(rig.a, 0)
    unshape(rig.a)  # no limit set: not an error
    if rig.mode != "netns":
        with pytest.raises(ShapingUnavailable):
            shape(rig.a, LIMIT)
