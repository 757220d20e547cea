"""Post-copy recovery time on the rig (issue 17): how long after the link returns a broken
post-copy migration is complete again.

``python -m bench.postcopy_recovery [--rounds N] [--memory MIB]``. Each round starts a
``dirty16`` guest on rig-a, migrates it peer-to-peer with LIVE|PEER2PEER|POSTCOPY|
PERSIST_DEST|UNDEFINE_SOURCE (pre-copy capped at 20 MiB/s, post-copy at 4 MiB/s so that it
lasts), switches to post-copy, waits until the guest runs on rig-b, then breaks the stream as
``tests/real/test_agent_postcopy_recovery.py`` does (veth down, the stream's TCP connection
killed in both namespaces), brings the link back after 5 s and resumes the migration with
``VIR_MIGRATE_POSTCOPY_RESUME`` as the agent does: an attempt at once, again every
``--probe`` s while refused. Printed per round and as the median:

* ``fail``: link up -> the original migrate call raised (libvirtd's Finish3 answer was
  waiting for the link);
* ``recovery``: link up -> the resumed migration completed (what a guest waits for once the
  network is back; the agent's own figure, ``recovery-time``, starts when it sees the failure);
* ``attempts``: resume calls made.

It takes the rig lock (waiting up to 15 minutes for another session's rig) and always brings
the rig down. Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from rig import Rig, build_guests, domain_xml, read_state, remove_domain
from rig.hosts import VETH

LINK_DOWN = 5.0
FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_POSTCOPY
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
)


def _ss_kill(netns: str, peer: str) -> None:
    cmd = ["ip", "netns", "exec", netns, "ss", "-tnK", "dst", peer]
    for port in ("16509", "16510"):
        cmd += ["not", "dport", "=", port, "not", "sport", "=", port]
    subprocess.run(cmd, capture_output=True, check=True)


def _link(rig: Rig, state: str) -> None:
    assert rig.a.netns is not None
    subprocess.run(["ip", "-n", rig.a.netns, "link", "set", VETH, state], check=True)


def _wait_state(conn: Any, name: str, want: tuple[int, int], limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            if tuple(conn.lookupByName(name).state()) == want:
                return
        except libvirt.libvirtError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} never reached {want}")
        time.sleep(0.02)


def one_round(rig: Rig, kernel: Path, memory: int, probe: float, n: int) -> dict[str, float]:
    name = f"bench-pcr-{n}"
    ca, cb = libvirt.open(rig.a.local_uri), libvirt.open(rig.b.local_uri)
    try:
        for conn in (ca, cb):
            remove_domain(conn, name)
        dom = ca.defineXML(domain_xml(name, kernel, memory))
        dom.create()
        params = {
            libvirt.VIR_MIGRATE_PARAM_URI: rig.b.migrate_uri,
            libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 20,
            libvirt.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY: 4,
        }
        failed_at: list[float] = []

        def migrate() -> None:
            conn = libvirt.open(rig.a.local_uri)
            try:
                conn.lookupByName(name).migrateToURI3(rig.b.p2p_uri, params, FLAGS)
            except libvirt.libvirtError:
                failed_at.append(time.monotonic())
            finally:
                conn.close()

        worker = threading.Thread(target=migrate)
        worker.start()
        while ca.lookupByName(name).jobStats().get("memory_iteration", 0) < 1:
            time.sleep(0.05)
        ca.lookupByName(name).migrateStartPostCopy(0)
        _wait_state(cb, name, (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY))
        time.sleep(0.5)
        assert rig.a.netns is not None
        assert rig.b.netns is not None
        _link(rig, "down")
        _ss_kill(rig.a.netns, rig.b.ip)
        _ss_kill(rig.b.netns, rig.a.ip)
        time.sleep(LINK_DOWN)
        _link(rig, "up")
        up = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                ca.lookupByName(name).migrateToURI3(
                    rig.b.p2p_uri, params, FLAGS | libvirt.VIR_MIGRATE_POSTCOPY_RESUME
                )
                break
            except libvirt.libvirtError as exc:
                if attempts > 200:
                    raise RuntimeError(f"not resumed: {exc}") from exc
                time.sleep(probe)
        done = time.monotonic()
        worker.join(30)
        arrived = cb.lookupByName(name)
        first = read_state(arrived).counter
        time.sleep(0.2)
        assert read_state(arrived).counter > first, "the guest does not run on rig-b"
        return {
            "fail": (failed_at[0] - up) if failed_at else float("nan"),
            "recovery": done - up,
            "attempts": attempts,
        }
    finally:
        for conn in (ca, cb):
            remove_domain(conn, name)
            conn.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--memory", type=int, default=256, help="guest memory, MiB")
    p.add_argument("--probe", type=float, default=0.25, help="s between resume attempts")
    args = p.parse_args()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # refusals are expected
    cache = Path("/tmp/asyncmigfra-rig")
    kernel = build_guests(cache / "guests", ("dirty16",))["dirty16"]
    rig = Rig(Path("/tmp/asyncmigfra-bench-pcr"), cachedir=cache, lock_timeout=900)
    rig.up()
    try:
        if rig.mode != "netns":
            raise SystemExit("needs the rig's network namespaces")
        rows = []
        for n in range(args.rounds):
            row = one_round(rig, kernel, args.memory, args.probe, n)
            rows.append(row)
            print(
                f"round {n + 1}: migrate call failed {row['fail']:.2f} s after link up; "
                f"recovered {row['recovery']:.2f} s after link up ({row['attempts']:.0f} attempts)",
                flush=True,
            )
        print(
            f"median over {len(rows)} rounds ({args.memory} MiB dirty16, link down"
            f" {LINK_DOWN:g} s):"
            f" fail {statistics.median(r['fail'] for r in rows):.2f} s,"
            f" recovery {statistics.median(r['recovery'] for r in rows):.2f} s after link up"
        )
    finally:
        if rig.is_up and rig.mode == "netns":
            _link(rig, "up")
        rig.down()


if __name__ == "__main__":
    main()
