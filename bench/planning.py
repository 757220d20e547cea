"""How long planning a large predicted evacuation takes, and how long it holds the event loop
(issue 18): ``python -m bench.planning [--vms N,N,...] [--seed S]``.

For each size, one agent's dispatcher (no broker: results and events go to memory) on the
``fake`` back-end with ``N`` guests (idle, cold and hot ones, 0.5-4 GiB, drawn from
``--seed``), four destinations, NICs of 1250 MiB/s, answers a ``plan evacuation`` with
``schedule: predicted`` (placement, every guest's prediction and the wave planner: all an
``evacuate node`` does before its first migration), twice: with the plan computed in a
worker thread (how it was, ``thread``) and as the agent computes it now (a process of its
own beyond 32 VMs, ``tasks/dispatching/planner.py``). Printed side by side: the time to
the result, the event loop's longest stall meanwhile (a 1 ms ticker's worst lateness) and
its p99, and the planner alone (:func:`~asyncmigfra.tasks.waves.plan_waves` on the same
inputs, in this thread). Figures, not assertions; the machine's other load shows in them.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import replace
from typing import Any

from asyncmigfra.hypervisor.fake import create as create_fake
from asyncmigfra.logs import configure_logging
from asyncmigfra.migration.prediction import PredictionInputs
from asyncmigfra.model import ResultMessage
from asyncmigfra.settings import LoggingSettings, default_settings
from asyncmigfra.tasks.dispatching import Dispatcher, Reply
from asyncmigfra.tasks.dispatching.planner import Planner
from asyncmigfra.tasks.waves import WaveVm, plan_waves
from asyncmigfra.wire.events import Events
from asyncmigfra.wire.parsing import parse_task

MIB = 1024 * 1024
NIC = 1250
DESTINATIONS = ("b", "c", "d", "e")


def guests(n: int, seed: int) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        kind = rnd.random()
        dirty = (
            0.0 if kind < 0.4 else rnd.uniform(10, 100) if kind < 0.75 else rnd.uniform(350, 750)
        )
        out.append(
            {
                "name": f"vm{i:04d}",
                "memory": rnd.choice((512, 1024, 2048, 4096)) * 1024,
                "dirty-rate": round(dirty, 1),
                "state": "running",
            }
        )
    return out


class _Sink:
    def __init__(self) -> None:
        self.results: list[ResultMessage] = []
        self.done = asyncio.Event()

    def deliver(self, result: ResultMessage, reply: Reply | None, key: str | None) -> None:
        self.results.append(result)
        self.done.set()

    def emit(self, event: object, *, terminal: bool = False, qos: int = 1) -> None:
        pass


async def _ticker(lateness: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(0.001)
        lateness.append(time.perf_counter() - start - 0.001)


async def one(n: int, seed: int, *, thread: bool) -> tuple[float, float, float, int]:
    """(s to the result, the loop's worst stall, its p99 stall, VMs planned); ``thread``:
    the plan in a worker thread whatever its size."""
    peers = {d: {"cpus": 4096, "memory": 64 * 1024 * MIB, "nic-rate": NIC} for d in DESTINATIONS}
    options = {"domains": guests(n, seed), "peers": peers, "nic-rate": NIC, "bandwidth": 1000}
    hv = create_fake({"cpus": 4096, "memory": 64 * 1024 * MIB, **options}, hostname="a", shared={})
    base = default_settings(hostname="a")
    settings = replace(base, migration=replace(base.migration, max_outgoing=4, max_incoming=4))
    sink = _Sink()
    d = Dispatcher(
        hypervisor=hv,
        settings=settings,
        events=Events(sink, host="a"),
        deliver=sink.deliver,
        on_quit=lambda: None,
    )
    if thread:
        d._planner = Planner(in_thread_up_to=10**9)
    await hv.open()
    runner = asyncio.create_task(d.run())
    await asyncio.sleep(0)
    text = (
        f"id: p\ntask: plan evacuation\ndestinations: [{', '.join(DESTINATIONS)}]\n"
        "parameter:\n  schedule: predicted\n  migration-type: live\n  max-downtime: 500\n"
    ).encode()
    lateness: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_ticker(lateness, stop))
    started = time.perf_counter()
    d.submit(parse_task(text), payload=text, reply=None)
    await sink.done.wait()
    took = time.perf_counter() - started
    stop.set()
    await ticker
    d.close()
    await runner
    await hv.aclose()
    (result,) = sink.results
    waves = {e.extra.get("wave") for e in result.entries}
    assert len(waves) > 1, "no waves planned"
    lateness.sort()
    return took, lateness[-1], lateness[int(len(lateness) * 0.99)], len(result.entries)


def planner_alone(n: int, seed: int) -> float:
    """s the planner takes on its own for guests like those of :func:`one`."""
    vms = [
        WaveVm(
            name=g["name"],
            destination=DESTINATIONS[i % len(DESTINATIONS)],
            inputs=PredictionInputs(
                memory=g["memory"] * 1024,
                link_rate=1000 * MIB,
                dirty_rate=g["dirty-rate"] * MIB,
                completion_timeout=150.0 * g["memory"] / MIB,
            ),
        )
        for i, g in enumerate(guests(n, seed))
    ]
    started = time.perf_counter()
    plan_waves(
        vms,
        link_rate=NIC * MIB,
        max_parallel=4,
        max_incoming=4,
        destination_rates=dict.fromkeys(DESTINATIONS, NIC * MIB),
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", default="200,1000")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    configure_logging(LoggingSettings(level="warning"))
    print(
        f"{'VMs':>6} {'plan':>8} {'s to result':>12} {'loop max ms':>12} {'p99 ms':>7}"
        f" {'planner alone s':>16}"
    )
    for n in (int(v) for v in args.vms.split(",")):
        alone = planner_alone(n, args.seed)
        worst = {}
        for way in ("thread", "agent"):
            took, worst[way], p99, planned = asyncio.run(one(n, args.seed, thread=way == "thread"))
            print(
                f"{planned:>6} {way:>8} {took:>12.2f} {worst[way] * 1e3:>12.1f}"
                f" {p99 * 1e3:>7.1f} {alone:>16.2f}"
            )
        print(f"{'':>6} loop max stall, agent / thread: {worst['agent'] / worst['thread']:.3f}")


if __name__ == "__main__":
    main()
