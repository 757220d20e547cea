"""What every bench module shares: a loopback mosquitto, percentiles, an agent process.

``python -m bench`` (``bench/__main__.py``), ``bench.fleet``, ``bench.rig_bench``,
``bench.companions`` and ``bench.metrics`` import these from here, so no bench module imports
another's ``__main__``; also the agent as a process and a client that times its tasks.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from asyncmigfra.transport.mqtt import ToolClient

PROTOCOL = os.environ.get("BENCH_MQTT_PROTOCOL", "5")


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


CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    rss = int(fields[21]) * PAGE
    return cpu, rss


@contextmanager
def agent_process(
    port: int,
    host: str,
    *,
    src: Path | None = None,
    journal: bool | None = None,
    extra_conf: str = "",
) -> Iterator[subprocess.Popen[bytes]]:
    """The agent as a process; ``src``: run the package from that checkout's ``src``
    instead (``--baseline``); ``journal``: on or off (default: ``BENCH_STATE_DIR``);
    ``extra_conf``: more top-level configuration (``metrics:`` ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "migfra.conf"
        # BENCH_STATE_DIR=none measures without the journal.
        state_dir = os.environ.get("BENCH_STATE_DIR", f"{tmp}/state")
        if journal is not None:
            state_dir = f"{tmp}/state" if journal else "none"
        conf.write_text(
            "communicator:\n  type: mqtt\n  id: bench-<hostname>\n"
            "  subscribe-topic: fast/migfra/<hostname>/task\n"
            "  publish-topic: fast/migfra/<hostname>/result\n"
            f"  host: 127.0.0.1\n  port: {port}\n  keepalive: 60\n"
            f"  protocol: {PROTOCOL}\n"
            "hypervisor:\n  type: dummy\n  never-throw: true\n"
            "logging:\n  level: warning\n  format: json\n"
            "limits:\n  max-queued-tasks: 100000\n"
            f"agent:\n  state-dir: {state_dir}\n" + extra_conf
        )
        env = dict(os.environ)
        if src is not None:
            env["PYTHONPATH"] = str(src / "src")
        proc = subprocess.Popen(
            [sys.executable, "-m", "asyncmigfra", "agent", "-c", str(conf), "--hostname", host],
            stdout=subprocess.DEVNULL,
            env=env,
        )
        try:
            yield proc
        finally:
            proc.terminate()
            proc.wait(timeout=30)


class Client:
    """Publishes tasks and matches results by id."""

    def __init__(self, port: int, host: str) -> None:
        self.tool = ToolClient("127.0.0.1", port, client_id=f"bench-{uuid.uuid4().hex[:6]}")
        self.host = host
        self.waiters: dict[str, asyncio.Future[float]] = {}

    async def pump(self) -> None:
        async for msg in self.tool.messages():
            if msg.topic.endswith("/result"):
                # The id is the last key of every result: cheap to find without a YAML parse.
                text = msg.payload.decode()
                idx = text.rfind("\nid: ")
                if idx < 0:
                    continue
                tid = text[idx + 5 :].split("\n", 1)[0].strip().strip('"')
                fut = self.waiters.pop(tid, None)
                if fut is not None and not fut.done():
                    fut.set_result(time.perf_counter())
            elif msg.topic.endswith("/status") and b"online" in msg.payload:
                fut = self.waiters.pop("__online__", None)
                if fut is not None and not fut.done():
                    fut.set_result(time.perf_counter())

    async def send(self, body: str) -> float:
        tid = uuid.uuid4().hex[:12]
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiters[tid] = fut
        t0 = time.perf_counter()
        await self.tool.publish(
            f"fast/migfra/{self.host}/task", f"id: {tid}\n{body}".encode(), qos=2
        )
        t1 = await fut
        return (t1 - t0) * 1000.0


@asynccontextmanager
async def connected(port: int, host: str) -> AsyncIterator[Client]:
    c = Client(port, host)
    async with c.tool:
        await c.tool.subscribe(f"fast/migfra/{host}/result", qos=1)
        online: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        c.waiters["__online__"] = online
        await c.tool.subscribe(f"fast/migfra/{host}/status", qos=1)
        async with asyncio.TaskGroup() as tg:
            pump = tg.create_task(c.pump())
            await asyncio.wait_for(online, 30)
            try:
                yield c
            finally:
                pump.cancel()


START_ONE = "task: start vm\nvm-configurations:\n  - vm-name: vm-{i}\n    probe-with-ssh: false\n"
