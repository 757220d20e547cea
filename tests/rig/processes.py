"""A rig's processes and network namespaces: finding them and killing them (the sweep).

Pitfalls handled here (each one was hit while building the reference rig):

* Teardown does not depend on bookkeeping that a crash can lose. Every rig daemon carries the
  ``ASYNCMIGFRA_RIG=<state dir>`` environment variable; teardown kills the marked processes,
  every process in their mount namespaces (QEMU, whose environment libvirt scrubs) and every
  process in the rig's network namespaces, then deletes the namespaces. The same sweep runs
  (for any state dir) when a rig comes up, so a SIGKILLed earlier run is cleaned.
* A graceful libvirtd shutdown takes about 2 s and buys nothing, since the state is throwaway:
  teardown uses SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rig.system import RigError, _run

#: Environment variable that marks every daemon of a rig; its value is the rig's state dir.
MARKER = "ASYNCMIGFRA_RIG"
NETNS_DIR = Path("/run/netns")


@dataclass(frozen=True)
class _ProcInfo:
    pid: int
    ppid: int
    mnt: str
    net: int
    marker: str | None


def _ns_inode(link: str) -> int:
    # "net:[4026531840]" -> 4026531840
    return int(link.rsplit("[", 1)[1].rstrip("]"))


def _processes() -> Iterator[_ProcInfo]:
    """All live processes with their namespaces and rig marker (zombies have none: skipped)."""
    prefix = f"{MARKER}=".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            mnt = os.readlink(f"/proc/{entry.name}/ns/mnt")
            net = _ns_inode(os.readlink(f"/proc/{entry.name}/ns/net"))
            env = Path(f"/proc/{entry.name}/environ").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # gone, a zombie, or a kernel thread
        marker = next(
            (
                v[len(prefix) :].decode(errors="replace")
                for v in env.split(b"\0")
                if v.startswith(prefix)
            ),
            None,
        )
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        yield _ProcInfo(int(entry.name), ppid, mnt, net, marker)


def alive(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie (a zombie holds no namespace or resource)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _netns_inodes(names: Iterable[str]) -> set[int]:
    inodes = set()
    for name in names:
        with contextlib.suppress(OSError):
            inodes.add(os.stat(NETNS_DIR / name).st_ino)
    return inodes


@dataclass(frozen=True)
class RigProcess:
    """A process of a rig: its parent and whether it carries the marker (tini, libvirtd)."""

    ppid: int
    marked: bool


def rig_processes(markers: Collection[str] | None, netns: Iterable[str]) -> dict[int, RigProcess]:
    """The rig's processes by PID.

    A process belongs to the rig if it carries the marker (for ``markers=None``: any value),
    shares a mount namespace with such a process (QEMU: libvirt scrubs its environment), or
    lives in one of the ``netns`` network namespaces. Our own (root) mount and network
    namespaces are never used as a criterion: a just-forked child is briefly marked while still
    in them, and selecting by them would kill the whole machine.
    """
    own_mnt = os.readlink("/proc/self/ns/mnt")
    own_net = _ns_inode(os.readlink("/proc/self/ns/net"))
    procs = list(_processes())
    marked = {
        p.pid for p in procs if p.marker is not None and (markers is None or p.marker in markers)
    }
    mnts = {p.mnt for p in procs if p.pid in marked} - {own_mnt}
    nets = _netns_inodes(netns) - {own_net}
    spared = {1, os.getpid(), os.getppid()}
    return {
        p.pid: RigProcess(p.ppid, p.pid in marked)
        for p in procs
        if (p.pid in marked or p.mnt in mnts or p.net in nets) and p.pid not in spared
    }


def sweep(
    markers: Collection[str] | None, netns: Iterable[str], timeout: float = 15.0
) -> list[int]:
    """SIGKILL every rig process (see :func:`rig_processes`) and delete the ``netns``.

    Order matters because of zombies. QEMU and libvirtd are both children of tini, the
    subreaper, and tini exits as soon as libvirtd does: so QEMU (unmarked) goes first, while
    tini is there to reap it at once, then libvirtd, then whatever is left. A zombie passed to
    PID 1 instead lingers for about a second here. Repeats until nothing is left, since a dying
    libvirtd may have forked meanwhile. Returns the PIDs killed. Deleting a network namespace
    also deletes the veth end inside it, and so the pair.
    """
    netns = list(netns)
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while found := rig_processes(markers, netns):
        children = {pid for pid, p in found.items() if p.ppid in found}
        victims = {pid for pid in children if not found[pid].marked} or children or set(found)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed.extend(sorted(victims))
        while any(alive(p) for p in victims):
            if time.monotonic() > deadline:
                raise RigError(f"rig processes survive SIGKILL: {sorted(victims)}")
            time.sleep(0.005)
        # let the parent (tini: milliseconds) reap them before it is killed in turn; bounded,
        # since the parent may be PID 1 or a busy libvirtd
        reaped_by = time.monotonic() + 0.25
        while time.monotonic() < reaped_by and any(
            Path(f"/proc/{p}").exists() and alive(found[p].ppid) for p in victims
        ):
            time.sleep(0.005)
    for name in netns:
        if (NETNS_DIR / name).exists():
            _run(["ip", "netns", "delete", name])
    return killed


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold SIGINT (a second Ctrl-C) until the block is done; it is delivered afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
