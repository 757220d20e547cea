"""What ``metrics.listen`` costs: ``python -m bench.metrics [--quick] [--rounds N]`` (also
``python -m bench --metrics``).

Two measurements, each in three variants run side by side, rounds interleaved (off, on, on
with a scraper, off, on, ...), medians and ratios to *off* printed:

* **task path**: the agent as a process (``dummy`` hypervisor, through mosquitto): p50 of
  sequential ``start vm`` round trips and tasks/s with 20 in flight;
* **event-loop lag**: an in-process agent (``fake`` back-end) running 32 concurrent live
  migrations with progress every 0.1 s; the lag of a 5 ms sleep probe on its loop, p50/p99.

*on*: ``metrics.listen`` set, nobody scrapes; *scraped*: a separate process GETs
``/metrics`` every second (as a Prometheus with ``scrape_interval: 1s`` would). Figures are
printed, not asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from asyncmigfra.app import Agent
from asyncmigfra.logs import configure_logging
from asyncmigfra.settings import HypervisorSettings, LoggingSettings, default_settings
from asyncmigfra.settings.model import MetricsSettings
from asyncmigfra.transport.mqtt import ToolClient
from bench.common import free_port, mosquitto, pct
from bench.load import agent_process, connected, measure

VARIANTS = ("off", "on", "scraped")

#: A scraper in a process of its own: GET /metrics every second, count the bytes.
_SCRAPER = """
import sys, time, urllib.request
url = sys.argv[1]
while True:
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            answer.read()
    except OSError:
        pass
    time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
"""


@contextmanager
def scraper(port: int | None) -> Iterator[None]:
    """Scrape ``127.0.0.1:port/metrics`` every second while the block runs (``None``: no)."""
    if port is None:
        yield
        return
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRAPER, f"http://127.0.0.1:{port}/metrics"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def task_path(port: int, variant: str, n_seq: int, n_tput: int) -> tuple[float, float]:
    """(p50 ms of sequential tasks, tasks/s with 20 in flight) of one agent process."""
    host = f"met-{uuid.uuid4().hex[:6]}"
    metrics_port = free_port()
    extra = f"metrics:\n  listen: 127.0.0.1:{metrics_port}\n" if variant != "off" else ""
    with agent_process(port, host, journal=False, extra_conf=extra):
        async with connected(port, host) as c:
            with scraper(metrics_port if variant == "scraped" else None):
                figures = await measure(c, n_seq=n_seq, n_tput=n_tput)
                return figures.p50_ms, figures.tasks_per_s


async def loop_lag(port: int, variant: str, n: int = 32) -> tuple[float, float, int]:
    """(lag p50 ms, lag p99 ms, progress events) of an agent running ``n`` migrations."""
    gib = 1024 * 1024
    tag = uuid.uuid4().hex[:6]
    name, peer = f"lag-{tag}", f"peer-{tag}"
    opts = {
        "host": name,
        "peers": {peer: {"cpus": 256, "memory": 512 * gib}},
        "cpus": 256,
        "memory": 512 * gib,
        "bandwidth": 400,
        "domains": [
            {"name": f"m{i}", "vcpus": 1, "memory": 2 * gib, "state": "running", "dirty-rate": 50}
            for i in range(n)
        ],
    }
    metrics_port = free_port()
    base = default_settings(hostname=name)
    settings = replace(
        base,
        mqtt=replace(base.mqtt, host="127.0.0.1", port=port, client_id=f"lag-{tag}"),
        hypervisor=HypervisorSettings(type="fake", options=opts),
        logging=LoggingSettings(level="warning"),
        migration=replace(base.migration, max_outgoing=n, max_incoming=n),
        agent=replace(base.agent, progress_interval=0.1, state_dir="none"),
        metrics=MetricsSettings(listen=f"127.0.0.1:{metrics_port}" if variant != "off" else None),
    )
    agent = Agent(settings, shared={})
    lags: list[float] = []
    events = 0
    prefix = f"fast/migfra/{name}"
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(agent.run())
        await asyncio.wait_for(agent.ready.wait(), 10)
        tool = ToolClient("127.0.0.1", port, client_id=f"lagc-{tag}")
        async with tool:
            await tool.subscribe(f"{prefix}/result", qos=1)
            await tool.subscribe(f"{prefix}/event", qos=0)
            done = asyncio.Event()
            results = 0

            async def pump() -> None:
                nonlocal results, events
                async for msg in tool.messages():
                    if msg.topic.endswith("/result"):
                        results += 1
                        if results == n:
                            done.set()
                    else:
                        events += 1

            async def probe() -> None:
                while not done.is_set():
                    t0 = time.perf_counter()
                    await asyncio.sleep(0.005)
                    lags.append((time.perf_counter() - t0 - 0.005) * 1000)

            with scraper(metrics_port if variant == "scraped" else None):
                pumping = tg.create_task(pump())
                probing = tg.create_task(probe())
                for i in range(n):
                    body = (
                        f"id: lag-{i}\ntask: migrate vm\nvm-name: m{i}\ndestination: {peer}\n"
                        "parameter:\n  migration-type: live\n"
                    )
                    await tool.publish(f"{prefix}/task", body.encode(), qos=2)
                await asyncio.wait_for(done.wait(), 300)
                await probing
                pumping.cancel()
        agent.request_stop()
        await run
    return pct(lags, 0.5), pct(lags, 0.99), events


async def run(args: argparse.Namespace) -> None:
    configure_logging(LoggingSettings(level="warning"))
    rounds = args.rounds or (2 if args.quick else 4)
    n_seq, n_tput = (200, 600) if args.quick else (500, 2000)
    paths: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    lags: dict[str, list[tuple[float, float, int]]] = {v: [] for v in VARIANTS}
    with mosquitto() as port:
        for _ in range(rounds):
            for variant in VARIANTS:
                paths[variant].append(await task_path(port, variant, n_seq, n_tput))
        for _ in range(rounds):
            for variant in VARIANTS:
                lags[variant].append(await loop_lag(port, variant))
    print(f"\n== metrics on the task path (dummy, agent as a process, {rounds} rounds interleaved)")
    print(f"  {n_seq} sequential start vm round trips; {n_tput} with 20 in flight; medians")
    print(f"  {'variant':10s} {'p50 ms':>8s} {'ratio':>6s} {'tasks/s':>9s} {'ratio':>6s}")
    off_p50 = statistics.median(r[0] for r in paths["off"])
    off_tput = statistics.median(r[1] for r in paths["off"])
    for variant in VARIANTS:
        p50 = statistics.median(r[0] for r in paths[variant])
        tput = statistics.median(r[1] for r in paths[variant])
        print(f"  {variant:10s} {p50:8.3f} {p50 / off_p50:6.3f} {tput:9.1f} {tput / off_tput:6.3f}")
    print(f"\n== event-loop lag, 32 fake migrations, progress every 0.1 s ({rounds} rounds)")
    print(f"  {'variant':10s} {'p50 ms':>8s} {'ratio':>6s} {'p99 ms':>8s} {'ratio':>6s} events")
    off_lag50 = statistics.median(r[0] for r in lags["off"])
    off_lag99 = statistics.median(r[1] for r in lags["off"])
    for variant in VARIANTS:
        lag50 = statistics.median(r[0] for r in lags[variant])
        lag99 = statistics.median(r[1] for r in lags[variant])
        events = statistics.median(r[2] for r in lags[variant])
        print(
            f"  {variant:10s} {lag50:8.3f} {lag50 / off_lag50:6.3f} {lag99:8.3f}"
            f" {lag99 / off_lag99:6.3f} {events:.0f}"
        )
    print("  (on: metrics.listen set, not scraped; scraped: GET /metrics every 1 s)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="fewer tasks and rounds")
    p.add_argument("--rounds", type=int, default=0, help="rounds of each variant")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.metrics")
    add_arguments(p)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
