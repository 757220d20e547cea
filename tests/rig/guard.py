"""The rig's guard process, and a manual sweep: run as a script, never imported.

* ``python -I tests/rig/guard.py guard <state dir>``: started by :meth:`rig.Rig.up` (see
  ``Rig._start_guard``). It holds the rig lock together with the owner and sweeps when the owner
  dies without calling :meth:`rig.Rig.down` (SIGKILL, ``os._exit``): it waits for EOF on its
  stdin, a pipe that the owner closes or that closes when the owner dies, however it dies.
* ``python tests/rig/guard.py sweep``: manual clean-up after a crash (refuses if a rig is up).
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import time
from pathlib import Path

# Run as a script with -I (no PYTHONPATH, no script dir on sys.path): make `rig` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rig.hosts import LOCK_PATH
from rig.network import _PLANS
from rig.processes import sweep


def _guard_main(statedir: str) -> int:
    """Body of the guard process (see :meth:`Rig._start_guard`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the owner
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if sys.stdin.buffer.read() == b"done":
        return 0
    t0 = time.monotonic()
    killed = sweep([statedir], [p.netns for p in _PLANS])
    print(
        f"guard: owner died without teardown; killed {killed} in {time.monotonic() - t0:.2f} s",
        flush=True,
    )
    return 0


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "guard":
        return _guard_main(argv[1])
    if argv == ["sweep"]:
        # manual clean-up after a crash: python tests/rig/guard.py sweep (refuses if a rig is up)
        fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"a rig is up ({LOCK_PATH}): not sweeping", file=sys.stderr)
            return 1
        print(f"killed {sweep(None, [p.netns for p in _PLANS])}")
        return 0
    print("usage: guard.py sweep", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
