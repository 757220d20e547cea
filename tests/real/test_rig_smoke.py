"""The rig itself, proven with plain libvirt-python (no agent): identity, boot, migration,
and that teardown leaves nothing behind, also after a crashed (SIGKILLed) session.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rig import (
    VARIANTS,
    Rig,
    build_guests,
    domain_xml,
    migrate_p2p,
    read_state,
    rig_processes,
    wait_counter_above,
)
from rig.hosts import LOCK_PATH, NETNS_DIR, alive

pytestmark = pytest.mark.rig

RIG_NETNS = ("amfrig-a", "amfrig-b")


def _host_uuid(conn: Any) -> str:
    match = re.search(r"<host>\s*<uuid>([^<]+)</uuid>", conn.getCapabilities())
    assert match, "no host UUID in capabilities"
    return match.group(1)


def _names(conn: Any) -> set[str]:
    return {d.name() for d in conn.listAllDomains()}


def test_hosts_have_distinct_identities(rig: Rig, rig_conns: dict[str, Any]) -> None:
    hostnames = {name: conn.getHostname() for name, conn in rig_conns.items()}
    assert hostnames == {"rig-a": "rig-a", "rig-b": "rig-b"}
    uuids = {name: _host_uuid(conn) for name, conn in rig_conns.items()}
    assert uuids == {h.name: h.uuid for h in rig.hosts}
    assert len(set(uuids.values())) == 2


def test_guest_boots_and_runs(rig: Rig, start_guest: Callable[..., Any]) -> None:
    dom = start_guest("idle", persistent=False)
    first = wait_counter_above(dom, 0)
    assert first.booted, f"no boot signature: {first}"
    assert (first.dirty_mib, first.spin) == (0, 0)
    assert wait_counter_above(dom, first.counter).counter > first.counter
    assert rig.a.serial_log(dom.name()).read_text().startswith("R")


@pytest.mark.parametrize("variant", ["dirty16", "dirty64", "dirty16slow"])
def test_dirtying_variants_boot(variant: str, start_guest: Callable[..., Any]) -> None:
    state = wait_counter_above(start_guest(variant, persistent=False), 0)
    assert state.booted
    assert (state.dirty_mib, state.spin) == (VARIANTS[variant].dirty_mib, VARIANTS[variant].spin)


def test_p2p_live_migration_there_and_back(
    rig: Rig, rig_conns: dict[str, Any], start_guest: Callable[..., Any]
) -> None:
    conn_a, conn_b = rig_conns["rig-a"], rig_conns["rig-b"]
    dom = start_guest("dirty16")
    name = dom.name()
    on_a = wait_counter_above(dom, 0)
    assert on_a.booted
    assert on_a.dirty_mib == 16

    t0 = time.monotonic()
    migrate_p2p(dom, rig.b)
    there = time.monotonic() - t0
    assert name not in _names(conn_a), "source still has the domain (UNDEFINE_SOURCE)"
    dom_b = conn_b.lookupByName(name)
    assert dom_b.isActive()
    assert dom_b.isPersistent()
    on_b = read_state(dom_b)
    # the same guest, not a reboot: signature there and the counter continues where it was
    assert on_b.booted
    assert on_b.counter >= on_a.counter
    on_b = wait_counter_above(dom_b, on_b.counter)

    t0 = time.monotonic()
    migrate_p2p(dom_b, rig.a)
    back = time.monotonic() - t0
    assert name not in _names(conn_b)
    dom_a = conn_a.lookupByName(name)
    assert dom_a.isActive()
    assert dom_a.isPersistent()
    again = read_state(dom_a)
    assert again.booted
    assert again.counter >= on_b.counter
    wait_counter_above(dom_a, again.counter)
    print(f"migration A->B {there:.2f} s, B->A {back:.2f} s")


def _query_balloon(dom: Any) -> str:
    import libvirt_qemu  # noqa: PLC0415

    return str(libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-balloon"}', 0))


def _wait_current_kib(dom: Any, kib: int, timeout: float = 10.0) -> float:
    """Poll until libvirt reports ``kib`` as the domain's current memory; return the wait."""
    t0 = time.monotonic()
    while (current := dom.info()[2]) != kib:
        if time.monotonic() - t0 > timeout:
            raise AssertionError(
                f"current memory stuck at {current} KiB (wanted {kib});"
                f" query-balloon: {_query_balloon(dom)}"
            )
        time.sleep(0.02)
    return time.monotonic() - t0


def test_balloon_guest_follows_set_memory_across_migration(
    rig: Rig, rig_conns: dict[str, Any], start_guest: Callable[..., Any]
) -> None:
    import libvirt  # noqa: PLC0415

    live = libvirt.VIR_DOMAIN_AFFECT_LIVE
    dom = start_guest("balloon", memory_mib=128)
    name = dom.name()
    first = wait_counter_above(dom, 0)
    assert first.booted
    assert first.balloon_io, f"the guest found no virtio balloon on PCI bus 0: {first}"
    assert rig.a.serial_log(name).read_text().startswith("RB")
    assert "<memballoon model='virtio'>" in dom.XMLDesc(0)
    assert dom.info()[1:3] == [131072, 131072]

    dom.setMemoryFlags(64 * 1024, live)
    down = _wait_current_kib(dom, 65536)
    assert "<currentMemory unit='KiB'>65536</currentMemory>" in dom.XMLDesc(0)
    assert json.loads(_query_balloon(dom))["return"] == {"actual": 64 << 20}
    before = wait_counter_above(dom, first.counter)

    migrate_p2p(dom, rig.b)
    assert name not in _names(rig_conns["rig-a"])
    dom_b = rig_conns["rig-b"].lookupByName(name)
    # the balloon state moved with the guest: still 64 MiB on B, and the guest still answers
    assert dom_b.info()[2] == 65536
    assert json.loads(_query_balloon(dom_b))["return"] == {"actual": 64 << 20}
    on_b = read_state(dom_b)
    assert on_b.booted
    assert on_b.counter >= before.counter
    assert on_b.balloon_io == first.balloon_io

    dom_b.setMemoryFlags(128 * 1024, live)
    up = _wait_current_kib(dom_b, 131072)
    assert "<currentMemory unit='KiB'>131072</currentMemory>" in dom_b.XMLDesc(0)
    assert json.loads(_query_balloon(dom_b))["return"] == {"actual": 128 << 20}
    wait_counter_above(dom_b, on_b.counter)
    print(f"balloon 128->64 MiB on A in {down:.2f} s, 64->128 MiB on B in {up:.2f} s")


def test_balloon_without_the_guest_driver_changes_nothing(start_guest: Callable[..., Any]) -> None:
    """The control: it is the ``balloon`` guest that answers, not libvirt or QEMU alone."""
    import libvirt  # noqa: PLC0415

    dom = start_guest("idle", balloon=True)
    first = wait_counter_above(dom, 0)
    assert first.booted
    assert first.balloon_io == 0
    assert "<memballoon model='virtio'>" in dom.XMLDesc(0)
    dom.setMemoryFlags(64 * 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    # the balloon guest answers within a pass; give this one a few hundred
    later = read_state(dom).counter + 300
    wait_counter_above(dom, later)
    assert dom.info()[2] == 131072
    assert json.loads(_query_balloon(dom))["return"] == {"actual": 128 << 20}


# --- teardown, the guard and the start-up sweep --------------------------------------------
# These take the session rig down for their duration and bring it up again afterwards.


@pytest.fixture
def rig_down(rig: Rig) -> Iterator[Rig]:
    rig.down()
    yield rig
    rig.up()


def _assert_nothing_left(pids: Iterable[int] = ()) -> None:
    assert rig_processes(None, RIG_NETNS) == {}
    assert not [n for n in RIG_NETNS if (NETNS_DIR / n).exists()]
    # zombies do not count: a killed session's orphans are reaped by PID 1, here slowly
    left = [p for p in pids if alive(p)]
    assert not left, f"still running: {left}"


def _lock_is_free() -> bool:
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_down_leaves_no_processes_or_namespaces(rig: Rig, start_guest: Callable[..., Any]) -> None:
    wait_counter_above(start_guest("idle", persistent=False), 0)
    ours = rig_processes([str(rig.statedir)], RIG_NETNS)
    assert len(ours) >= 5, ours  # 2 x (tini, libvirtd) + QEMU
    rig.down()
    try:
        _assert_nothing_left(ours)
        assert _lock_is_free()
        rig.down()  # idempotent
    finally:
        rig.up()
    assert rig.is_up


# A session that brings its own rig up, starts a guest and then waits to be killed.
_CRASHING_SESSION = """
import json, sys, time
from pathlib import Path
from rig import Rig, domain_xml
import libvirt
rig = Rig(Path(sys.argv[1]), cachedir=Path(sys.argv[2])).up()
libvirt.open(rig.a.local_uri).createXML(domain_xml("crashy", sys.argv[3]), 0)
print(json.dumps({"guard": rig.guard_pid, "state": str(rig.statedir)}), flush=True)
time.sleep(600)
"""


@dataclass
class CrashingSession:
    proc: subprocess.Popen[str]
    guard: int
    pids: set[int]


@pytest.fixture
def crashing_session(rig_down: Rig, tmp_path: Path) -> Iterator[CrashingSession]:
    """Another session's rig, up with a guest, for the test to kill (killed anyway at the end;
    the session rig coming back up then waits for its guard and sweeps what is left)."""
    cache = rig_down.cachedir or tmp_path
    kernel = build_guests(cache / "guests", ("idle",))["idle"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CRASHING_SESSION,
            str(tmp_path / "crashed"),
            str(cache),
            str(kernel),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])),
    )
    try:
        assert proc.stdout is not None
        with proc.stdout:
            line = proc.stdout.readline()
        assert line, "the crashing session failed to start"
        info = json.loads(line)
        pids = set(rig_processes([info["state"]], RIG_NETNS))
        assert len(pids) >= 5, pids
        yield CrashingSession(proc, info["guard"], pids)
    finally:
        proc.kill()
        proc.wait()


def test_guard_cleans_up_after_a_sigkilled_session(crashing_session: CrashingSession) -> None:
    crashing_session.proc.kill()
    crashing_session.proc.wait()
    deadline = time.monotonic() + 20
    while not _lock_is_free():  # the guard holds the lock until it has swept
        assert time.monotonic() < deadline, "the guard did not finish"
        time.sleep(0.05)
    _assert_nothing_left(crashing_session.pids)


def test_up_sweeps_what_a_killed_session_and_guard_left(
    rig_down: Rig, crashing_session: CrashingSession
) -> None:
    os.kill(crashing_session.guard, signal.SIGKILL)  # nobody will clean up now
    crashing_session.proc.kill()
    crashing_session.proc.wait()
    pids = crashing_session.pids - {crashing_session.guard}
    time.sleep(0.1)
    assert set(rig_processes(None, RIG_NETNS)) >= pids, "nothing stale to sweep?"
    rig_down.up()
    # libvirtd and QEMU were killed; the orphaned tinis then exited on their own
    assert rig_down.stale_killed
    assert not [p for p in pids if alive(p)]
    # every rig process now is the new rig's
    everything = rig_processes(None, RIG_NETNS).keys()
    assert everything == rig_processes([str(rig_down.statedir)], RIG_NETNS).keys()
    import libvirt  # noqa: PLC0415

    conn = libvirt.open(rig_down.b.local_uri)
    try:
        assert conn.getHostname() == "rig-b"
    finally:
        conn.close()


def test_domain_xml_refuses_kernels_the_hosts_cannot_see() -> None:
    with pytest.raises(ValueError, match="/var/"):
        domain_xml("x", "/var/tmp/guest.elf")
