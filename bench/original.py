"""The original C++ migfra daemon as a bench row (issue 20: "against the original too").

The daemon (RWTH-OS/migration-framework with fast-project/fast-lib) is built outside the
repository by ``bench/original.sh``, never by the tests. :func:`find_binary` finds it:
``MIGFRA_ORIGINAL=/path/to/migfra``, else the script's cache
(``~/.cache/asyncmigfra-bench/original/bin/migfra``). :func:`original_process` runs it with
the ``dummy`` hypervisor (``never-throw: true``) on the bench's broker, its task and result
topics those of the load generator's host, and ``TCP_NODELAY`` forced on its sockets by an
``LD_PRELOAD`` shim (``bench/nodelay.c``, compiled here with ``cc`` into the cache): as
shipped, libmosquitto 1.4 never sets it and every task waits for a delayed ACK.

The original says nothing on a status topic, so the load generator sends it tasks until one
is answered (:func:`bench.load.connected` with ``probe``). It holds ``/tmp/migfra.pid``
locked: one instance per machine, so two benchmarks of it cannot run at the same time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIM_SOURCE = HERE / "nodelay.c"
NOT_BUILT = "original: not built (see bench/original.sh)"


def cache_dir() -> Path:
    """Where ``bench/original.sh`` builds and the shim is compiled (the same rule)."""
    if root := os.environ.get("ASYNCMIGFRA_BENCH_CACHE"):
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "asyncmigfra-bench"


def find_binary() -> Path | None:
    """``MIGFRA_ORIGINAL`` if set (None if it is not an executable), else the cache's."""
    given = os.environ.get("MIGFRA_ORIGINAL")
    path = Path(given) if given else cache_dir() / "original" / "bin" / "migfra"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def nodelay_shim() -> Path:
    """``bench/nodelay.c`` compiled into the cache (once per version of the source)."""
    source = SHIM_SOURCE.read_bytes()
    out = cache_dir() / f"nodelay-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        cc = shutil.which("cc") or "cc"
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(
            [cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(SHIM_SOURCE), "-ldl"],
            check=True,
        )
        tmp.replace(out)
    return out


def config_text(port: int, host: str) -> str:
    """The original's configuration (its ``migfra.conf``) for the bench's broker and host."""
    return (
        "---\ncommunicator:\n  type: mqtt\n"
        f"  id: bench-original-{host}\n"
        f"  subscribe-topic: fast/migfra/{host}/task\n"
        f"  publish-topic: fast/migfra/{host}/result\n"
        f"  host: 127.0.0.1\n  port: {port}\n  keepalive: 60\n"
        "hypervisor:\n  type: dummy\n  never-throw: true\n...\n"
    )


@contextmanager
def original_process(
    binary: Path, port: int, host: str, *, nodelay: bool = True
) -> Iterator[subprocess.Popen[bytes]]:
    """The original daemon as a process; its trace log (stdout) goes to /dev/null, as the
    agent rows' logs do."""
    env = dict(os.environ)
    if nodelay:
        env["LD_PRELOAD"] = str(nodelay_shim())
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "migfra.conf"
        conf.write_text(config_text(port, host))
        proc = subprocess.Popen(
            [str(binary), "-c", str(conf)],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        try:
            yield proc
        finally:
            proc.terminate()
            proc.wait(timeout=30)
