"""The load generator and the processes it drives, shared by ``bench`` and ``bench.speed``.

:func:`agent_process` runs the agent as its own process (``dummy`` hypervisor) against a
loopback broker; :func:`connected` gives a :class:`Client` that publishes tasks at QoS 2 and
matches their results by id once the answering process said ``online``; :func:`measure`
takes one round of figures (sequential latencies, then throughput with 20 in flight).

``BENCH_PROFILE=DIR`` runs every agent process under cProfile and leaves its statistics in
``DIR/agent-<host>.prof`` when it stops (``python -m pstats FILE``); for looking, never
for figures (the profiler slows the agent several times).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from asyncmigfra.transport.mqtt import ToolClient
from bench.common import pct, proc_usage

PROTOCOL = os.environ.get("BENCH_MQTT_PROTOCOL", "5")

START_ONE = "task: start vm\nvm-configurations:\n  - vm-name: vm-{i}\n    probe-with-ssh: false\n"


@contextmanager
def agent_process(
    port: int,
    host: str,
    *,
    src: Path | None = None,
    journal: bool | None = None,
    event_qos: int | None = None,
    extra_conf: str = "",
) -> Iterator[subprocess.Popen[bytes]]:
    """The agent as a process; ``src``: run the package from that checkout's ``src``
    instead (``--baseline``); ``journal``: on or off (default: ``BENCH_STATE_DIR``);
    ``event_qos``: ``communicator.event-qos`` (default: the agent's default);
    ``extra_conf``: more top-level configuration (``metrics:`` ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "migfra.conf"
        # BENCH_STATE_DIR=none measures without the journal.
        state_dir = os.environ.get("BENCH_STATE_DIR", f"{tmp}/state")
        if journal is not None:
            state_dir = f"{tmp}/state" if journal else "none"
        qos_line = f"  event-qos: {event_qos}\n" if event_qos is not None else ""
        conf.write_text(
            "communicator:\n  type: mqtt\n  id: bench-<hostname>\n"
            "  subscribe-topic: fast/migfra/<hostname>/task\n"
            "  publish-topic: fast/migfra/<hostname>/result\n"
            f"  host: 127.0.0.1\n  port: {port}\n  keepalive: 60\n"
            f"  protocol: {PROTOCOL}\n{qos_line}"
            "hypervisor:\n  type: dummy\n  never-throw: true\n"
            "logging:\n  level: warning\n  format: json\n"
            "limits:\n  max-queued-tasks: 100000\n"
            f"agent:\n  state-dir: {state_dir}\n" + extra_conf
        )
        env = dict(os.environ)
        if src is not None:
            env["PYTHONPATH"] = str(src / "src")
        cmd = [sys.executable, "-m", "asyncmigfra", "agent", "-c", str(conf), "--hostname", host]
        if profile_dir := os.environ.get("BENCH_PROFILE"):
            cmd[1:1] = ["-m", "cProfile", "-o", f"{profile_dir}/agent-{host}.prof"]
        proc = subprocess.Popen(
            cmd,
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
        try:
            await self.tool.publish(
                f"fast/migfra/{self.host}/task", f"id: {tid}\n{body}".encode(), qos=2
            )
            t1 = await fut
        finally:
            self.waiters.pop(tid, None)
        return (t1 - t0) * 1000.0


async def first_answer(c: Client, proc: subprocess.Popen[bytes], within: float = 30.0) -> None:
    """Send ``proc`` a task every 0.2 s until one is answered: for a process that says nothing
    on the status topic (the original), whose subscription may not be there yet."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before answering")
        try:
            await asyncio.wait_for(c.send(START_ONE.format(i=0)), 0.2)
        except TimeoutError:
            continue
        return
    raise TimeoutError(f"{proc.args!r} answered no task in {within} s")


@asynccontextmanager
async def connected(
    port: int, host: str, *, probe: subprocess.Popen[bytes] | None = None
) -> AsyncIterator[Client]:
    """A client once the answering process is ready: it said ``online`` on the status topic,
    or (``probe``, a process that does not) it answered a task."""
    c = Client(port, host)
    async with c.tool:
        await c.tool.subscribe(f"fast/migfra/{host}/result", qos=1)
        online: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if probe is None:
            c.waiters["__online__"] = online
        await c.tool.subscribe(f"fast/migfra/{host}/status", qos=1)
        async with asyncio.TaskGroup() as tg:
            pump = tg.create_task(c.pump())
            if probe is None:
                await asyncio.wait_for(online, 30)
            else:
                await first_answer(c, probe)
            try:
                yield c
            finally:
                pump.cancel()


@dataclass(frozen=True, slots=True)
class Round:
    """One round's figures of one answering process."""

    p50_ms: float
    p99_ms: float
    tasks_per_s: float
    #: The answering process's CPU time (user + system) per task after the warm-up, when
    #: its pid was given.
    cpu_ms_per_task: float = float("nan")


async def measure(
    c: Client, *, n_seq: int, n_tput: int, warmup: int = 30, pid: int | None = None
) -> Round:
    """Sequential tasks (one at a time), then ``n_tput`` tasks with 20 in flight; with
    ``pid``, that process's CPU time per task over both."""
    for i in range(warmup):
        await c.send(START_ONE.format(i=i))
    cpu0 = proc_usage(pid)[0] if pid is not None else 0.0
    lat = [await c.send(START_ONE.format(i=i)) for i in range(n_seq)]
    sem = asyncio.Semaphore(20)

    async def one(i: int) -> None:
        async with sem:
            await c.send(START_ONE.format(i=i))

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for i in range(n_tput):
            tg.create_task(one(i))
    tput = n_tput / (time.perf_counter() - t0)
    cpu_ms = float("nan")
    if pid is not None:
        # Results are in, but the last acknowledgements may still be on their way.
        await asyncio.sleep(0.05)
        cpu_ms = (proc_usage(pid)[0] - cpu0) * 1000.0 / (n_seq + n_tput)
    return Round(pct(lat, 0.5), pct(lat, 0.99), tput, cpu_ms)
