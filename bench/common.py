"""What every bench module shares: a loopback mosquitto and percentiles.

``python -m bench`` (``bench/__main__.py``), ``bench.fleet``, ``bench.rig_bench`` and
``bench.companions`` import these from here, so no bench module imports another's
``__main__``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.01)
    raise TimeoutError(port)


@contextmanager
def mosquitto() -> Iterator[int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "m.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
            "persistence false\nmax_inflight_messages 1000\nmax_queued_messages 1000000\n"
            "log_type error\n"
        )
        proc = subprocess.Popen([binary, "-c", str(conf)])
        try:
            wait_port(port)
            yield port
        finally:
            proc.terminate()
            proc.wait()


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
