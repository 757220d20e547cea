"""Shape the rig's link: a token bucket (``tc qdisc ... tbf``) on a host's veth.

A migration's RAM stream (and a storage copy's NBD stream) leaves the source host through
its end of the veth (``rig0`` in the source's network namespace): a ``tbf`` qdisc there
limits what the source sends, whatever QEMU asks for, as a slower NIC would. Only the
namespace's own interface is touched (netns mode); in loopback mode the hosts share the
root namespace's ``lo`` with everything else, and shaping it would slow every process on the
machine, so :func:`shape` refuses.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator

from rig.hosts import Host
from rig.network import VETH

__all__ = ["BURST_MIN", "ShapingUnavailable", "shape", "shaped", "shaping", "unshape"]

#: Bytes: the smallest bucket (a GSO packet of the veth is up to 64 KiB; tbf splits larger
#: packets, but a bucket of several packets keeps the rate steady).
BURST_MIN = 256 * 1024
#: ms a packet may wait in the queue before tbf drops it.
LATENCY_MS = 100
_MIB = 1 << 20


class ShapingUnavailable(RuntimeError):
    """The rig runs in loopback mode, or ``tc`` refused."""


def _tc(host: Host, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    if host.netns is None:
        raise ShapingUnavailable("loopback mode: no veth of the host's own to shape")
    proc = subprocess.run(
        ["tc", "-n", host.netns, *args], capture_output=True, text=True, timeout=10, check=False
    )
    if check and proc.returncode != 0:
        raise ShapingUnavailable(f"tc {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def shape(host: Host, mib_per_s: float) -> None:
    """Limit what ``host`` sends on the rig's veth to ``mib_per_s`` MiB/s (replacing any
    earlier limit). The bucket holds 10 ms of the rate, at least :data:`BURST_MIN`."""
    if not mib_per_s > 0:
        raise ValueError(f"rate must be > 0 MiB/s, got {mib_per_s!r}")
    rate = int(mib_per_s * _MIB)
    burst = max(BURST_MIN, rate // 100)
    _tc(
        host, "qdisc", "replace", "dev", VETH, "root", "tbf",
        "rate", f"{rate}bps", "burst", str(burst), "latency", f"{LATENCY_MS}ms",
    )  # fmt: skip


def unshape(host: Host) -> None:
    """Remove the limit (no error when there is none)."""
    _tc(host, "qdisc", "del", "dev", VETH, "root", check=False)


def shaping(host: Host) -> str:
    """The veth's root qdisc as ``tc`` shows it (for the record)."""
    return _tc(host, "qdisc", "show", "dev", VETH, "root").stdout.strip()


@contextlib.contextmanager
def shaped(host: Host, mib_per_s: float) -> Iterator[None]:
    """``host`` sends at most ``mib_per_s`` MiB/s inside the block; unshaped after it."""
    shape(host, mib_per_s)
    try:
        yield
    finally:
        unshape(host)
