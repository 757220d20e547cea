"""asyncmigfra benchmarks: ``python -m bench [--quick]`` (or ``./dev bench`` / ``nox -s bench``).

Everything goes through a real mosquitto on loopback (``set_tcp_nodelay true``), the way a
scheduler talks to the agent. The agent runs as its own process for the throughput and
latency figures (so its CPU time and RSS can be read from /proc), with the ``dummy``
hypervisor, as the original's figures were taken. Figures are printed, not asserted.

``--rig`` adds the rig benchmarks (real libvirtd + QEMU, needs root): the agent against direct
libvirt calls for lifecycle operations and migrations; see ``bench/rig_bench.py``, which also
runs on its own as ``python -m bench.rig_bench [--quick]``.

``--companions`` adds the migration companions' figures (configured hooks, ``reduce-memory``,
``swap-with``) on two in-process ``fake`` agents, and with ``--rig`` also on the rig; see
``bench/companions.py``, which also runs on its own as ``python -m bench.companions
[--quick] [--no-rig]``.

``--storage`` adds the storage migration figures (``copy-storage all`` through the agent against
direct ``migrateToURI3``, and how sparse a copied image stays), on the rig; see
``bench/storage.py``, which also runs on its own as ``python -m bench.storage [--quick]
[--rounds N]``.

``--metrics`` adds what ``metrics.listen`` costs on the task path and on the event-loop lag
of 32 migrations, with and without a scraper; see ``bench/metrics.py``, which also runs on
its own as ``python -m bench.metrics [--quick] [--rounds N]``.

``--evacuation`` adds evacuations scheduled by prediction against fixed policies on the
``fake`` back-end with shared NICs; see ``bench/evacuation.py``, which also runs on its own
as ``python -m bench.evacuation [--quick] [--sources N] [--seed S]``. How long planning a
large predicted evacuation (200 and 1000 guests) takes and holds the event loop, the plan
in a thread against the agent's way: ``python -m bench.planning [--vms N,N]`` (on its own).

Reference (the original C++ daemon on this machine class, from the issue): p50 43.7 ms as
shipped (1.06 ms with TCP_NODELAY forced), about 1550 tasks/s, 0.27 ms CPU per task, 17 MB RSS.
Targets: p50 <= 2 ms, >= 1500 tasks/s, event-loop lag p99 < 5 ms. Once built
(``bench/original.sh``), the original itself is a row of ``bench/speed.py``, side by side.

The agent against a bare aiomqtt echo of the same packet pattern, rounds interleaved, ratios
printed (issue 20): ``bench/speed.py``, also on its own as ``python -m bench.speed [--quick]``.
What one durable write costs on this disk (the floor of ``accepted``, after an idle moment and
back to back, the journal's against a raw ``fdatasync``): ``python -m bench.flush`` (on its own).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from asyncmigfra.app import Agent
from asyncmigfra.logs import configure_logging
from asyncmigfra.settings import HypervisorSettings, LoggingSettings, default_settings
from asyncmigfra.transport.mqtt import ToolClient
from bench.common import mosquitto, pct, proc_usage
from bench.load import START_ONE, agent_process, connected, measure
from bench.speed import Plan as SpeedPlan
from bench.speed import run_speed
from bench.speed import table as speed_table

ROOT = Path(__file__).resolve().parent.parent


async def bench_dummy(port: int, quick: bool) -> dict[str, Any]:
    host = f"bench-{uuid.uuid4().hex[:6]}"
    out: dict[str, Any] = {}
    n_seq, n_tput, n_big = (300, 1000, 100) if quick else (2000, 5000, 500)
    with agent_process(port, host) as proc:
        async with connected(port, host) as c:
            for i in range(50):  # warm-up
                await c.send(START_ONE.format(i=i))
            cpu0, _ = proc_usage(proc.pid)
            lat = [await c.send(START_ONE.format(i=i)) for i in range(n_seq)]
            cpu1, rss = proc_usage(proc.pid)
            out["sequential"] = {
                "tasks": n_seq,
                "p50_ms": round(pct(lat, 0.50), 3),
                "p99_ms": round(pct(lat, 0.99), 3),
                "mean_ms": round(statistics.fmean(lat), 3),
                "agent_cpu_ms_per_task": round((cpu1 - cpu0) * 1000 / n_seq, 3),
            }
            sem = asyncio.Semaphore(20)

            async def one(i: int, body: str) -> None:
                async with sem:
                    await c.send(body.format(i=i))

            cpu0, _ = proc_usage(proc.pid)
            t0 = time.perf_counter()
            async with asyncio.TaskGroup() as tg:
                for i in range(n_tput):
                    tg.create_task(one(i, START_ONE))
            dt = time.perf_counter() - t0
            cpu1, rss = proc_usage(proc.pid)
            out["throughput_20_in_flight"] = {
                "tasks": n_tput,
                "tasks_per_s": round(n_tput / dt, 1),
                "agent_cpu_ms_per_task": round((cpu1 - cpu0) * 1000 / n_tput, 3),
            }
            big = "task: start vm\nvm-configurations:\n" + "".join(
                f"  - vm-name: big-{{i}}-{k}\n    probe-with-ssh: false\n" for k in range(50)
            )
            cpu0, _ = proc_usage(proc.pid)
            t0 = time.perf_counter()
            async with asyncio.TaskGroup() as tg:
                for i in range(n_big):
                    tg.create_task(one(i, big))
            dt = time.perf_counter() - t0
            cpu1, rss = proc_usage(proc.pid)
            out["fifty_vm_tasks"] = {
                "tasks": n_big,
                "tasks_per_s": round(n_big / dt, 1),
                "vms_per_s": round(50 * n_big / dt, 1),
                "agent_cpu_ms_per_task": round((cpu1 - cpu0) * 1000 / n_big, 3),
            }
            out["agent_rss_mb"] = round(rss / 1e6, 1)
    return out


async def bench_loop_lag(port: int, quick: bool) -> dict[str, Any]:
    """Event-loop lag of an in-process agent while 32 fake migrations stream progress."""
    n = 32
    gib = 1024 * 1024
    opts = {
        "host": "lag-a",
        "peers": {"lag-b": {"cpus": 256, "memory": 512 * gib}},
        "cpus": 256,
        "memory": 512 * gib,
        "bandwidth": 400,
        "domains": [
            {"name": f"m{i}", "vcpus": 1, "memory": 2 * gib, "state": "running", "dirty-rate": 50}
            for i in range(n)
        ],
    }
    base = default_settings(hostname="lag-a")
    settings = replace(
        base,
        mqtt=replace(
            base.mqtt, host="127.0.0.1", port=port, client_id=f"lag-{uuid.uuid4().hex[:6]}"
        ),
        hypervisor=HypervisorSettings(type="fake", options=opts),
        logging=LoggingSettings(level="warning"),
        migration=replace(base.migration, max_outgoing=n, max_incoming=n),
        agent=replace(base.agent, progress_interval=0.1),
    )
    agent = Agent(settings, shared={})
    lags: list[float] = []
    progress = 0
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(agent.run())
        await asyncio.wait_for(agent.ready.wait(), 10)
        tool = ToolClient("127.0.0.1", port, client_id=f"lagc-{uuid.uuid4().hex[:6]}")
        async with tool:
            await tool.subscribe("fast/migfra/lag-a/result", qos=1)
            await tool.subscribe("fast/migfra/lag-a/event", qos=0)
            results = 0
            done = asyncio.Event()

            async def pump() -> None:
                nonlocal results, progress
                async for msg in tool.messages():
                    if msg.topic.endswith("/result"):
                        results += 1
                        if results == n:
                            done.set()
                    elif b"event: progress" in msg.payload:
                        progress += 1

            async def probe() -> None:
                while not done.is_set():
                    t0 = time.perf_counter()
                    await asyncio.sleep(0.005)
                    lags.append((time.perf_counter() - t0 - 0.005) * 1000)

            p = tg.create_task(pump())
            pr = tg.create_task(probe())
            t0 = time.perf_counter()
            for i in range(n):
                body = (
                    f"id: lag-{i}\ntask: migrate vm\nvm-name: m{i}\ndestination: lag-b\n"
                    "parameter:\n  migration-type: live\n"
                )
                await tool.publish("fast/migfra/lag-a/task", body.encode(), qos=2)
            await asyncio.wait_for(done.wait(), 120)
            dt = time.perf_counter() - t0
            await pr
            p.cancel()
        agent.request_stop()
        await run
    return {
        "migrations": n,
        "wall_s": round(dt, 2),
        "progress_events": progress,
        "loop_lag_p50_ms": round(pct(lags, 0.5), 3),
        "loop_lag_p99_ms": round(pct(lags, 0.99), 3),
        "loop_lag_max_ms": round(max(lags), 3),
    }


async def measure_agent(
    port: int, *, src: Path | None, journal: bool, n_seq: int, n_tput: int
) -> tuple[float, float]:
    """(p50 ms of sequential tasks, tasks/s with 20 in flight) of one agent process."""
    host = f"cmp-{uuid.uuid4().hex[:6]}"
    with agent_process(port, host, src=src, journal=journal):
        async with connected(port, host) as c:
            got = await measure(c, n_seq=n_seq, n_tput=n_tput)
            return got.p50_ms, got.tasks_per_s


async def bench_baseline(port: int, baseline: Path, quick: bool) -> dict[str, Any]:
    """This checkout against another one (``--baseline DIR``, e.g. a ``git worktree`` of the
    commit before a change), journal on and off, rounds interleaved; medians and ratios."""
    rounds, n_seq, n_tput = (2, 200, 600) if quick else (5, 500, 2000)
    figures: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for journal in (True, False):
            for name, src in (("baseline", baseline), ("this", None)):
                got = await measure_agent(
                    port, src=src, journal=journal, n_seq=n_seq, n_tput=n_tput
                )
                figures.setdefault((name, journal), []).append(got)
    out: dict[str, Any] = {"rounds": rounds, "sequential": n_seq, "throughput_tasks": n_tput}
    for journal in (True, False):
        label = "journal_on" if journal else "journal_off"
        row: dict[str, Any] = {}
        for name in ("baseline", "this"):
            runs = figures[(name, journal)]
            row[f"{name}_p50_ms"] = round(statistics.median(r[0] for r in runs), 3)
            row[f"{name}_tasks_per_s"] = round(statistics.median(r[1] for r in runs), 1)
        row["p50_ratio"] = round(row["this_p50_ms"] / row["baseline_p50_ms"], 3)
        row["throughput_ratio"] = round(row["this_tasks_per_s"] / row["baseline_tasks_per_s"], 3)
        out[label] = row
    return out


def show(title: str, data: dict[str, Any]) -> None:
    print(f"\n== {title}")
    for k, v in data.items():
        if isinstance(v, dict):
            print(f"  {k}:")
            for k2, v2 in v.items():
                print(f"    {k2:28s} {v2}")
        else:
            print(f"  {k:30s} {v}")


async def amain(args: argparse.Namespace) -> None:
    configure_logging(LoggingSettings(level="warning"))
    with mosquitto() as port:
        if args.baseline is not None:
            show(
                f"this checkout against {args.baseline} (dummy, agent as a process)",
                await bench_baseline(port, args.baseline, args.quick),
            )
            return
        show(
            "dummy hypervisor through mosquitto (agent as a process)",
            await bench_dummy(port, args.quick),
        )
        speed_plan = SpeedPlan.from_args(args)
        print("\n== the agent against a bare aiomqtt echo (bench/speed.py)")
        for line in speed_table(await run_speed(port, speed_plan), speed_plan):
            print(f"  {line}")
        show(
            "event-loop lag, 32 fake migrations streaming progress",
            await bench_loop_lag(port, args.quick),
        )
        if args.rig:
            # Imported only here: it needs libvirt-python and the rig (tests/rig).
            from bench.rig_bench import Plan, run_rig_benchmarks  # noqa: PLC0415

            print("\n== rig: the agent against direct libvirt calls (bench/rig_bench.py)")
            await run_rig_benchmarks(port, Plan.from_args(args))
        if args.companions:
            # Imported only here, as the rig benchmarks (it imports them).
            from bench.companions import Plan as CompanionsPlan  # noqa: PLC0415
            from bench.companions import run_companions  # noqa: PLC0415

            print("\n== migration companions (bench/companions.py)")
            args.no_rig = not args.rig
            await run_companions(port, CompanionsPlan.from_args(args))
        if args.storage:
            # Imported only here, as the rig benchmarks (it imports them).
            from bench.storage import Plan as StoragePlan  # noqa: PLC0415
            from bench.storage import run_storage  # noqa: PLC0415

            print("\n== storage migration (bench/storage.py)")
            await run_storage(port, StoragePlan.from_args(args))
        if args.steering:
            from bench.steering import Plan as SteeringPlan  # noqa: PLC0415
            from bench.steering import run_steering  # noqa: PLC0415

            print("\n== steering a running migration (bench/steering.py)")
            await run_steering(port, SteeringPlan.from_args(args))
    if args.fleet:
        # Its own broker: 200 agents' connections and traffic, apart from the figures above.
        import argparse as _argparse  # noqa: PLC0415

        from bench.fleet import run as run_fleet  # noqa: PLC0415

        small = {"agents": 40, "vms": 10, "evacuate": 4} if args.quick else {}
        fleet_args = _argparse.Namespace(
            agents=small.get("agents", 200),
            vms=small.get("vms", 20),
            evacuate=small.get("evacuate", 20),
            mode="scatter",
            timeout=300.0,
        )
        show("fleet simulation (bench/fleet.py)", await run_fleet(fleet_args))
    if args.metrics:
        # Its own broker; off, on and scraped side by side.
        import argparse as _argparse  # noqa: PLC0415

        from bench.metrics import run as run_metrics  # noqa: PLC0415

        await run_metrics(_argparse.Namespace(quick=args.quick, rounds=0))
    if args.evacuation:
        # Its own broker, one evacuation per policy after another.
        import argparse as _argparse  # noqa: PLC0415

        from bench import evacuation  # noqa: PLC0415

        plan = _argparse.Namespace(
            seed=18, sources=1, vms=6 if args.quick else 12, destinations=4, timeout=900.0
        )
        outcomes = await evacuation.run(plan)
        print("\n== evacuation schedules (bench/evacuation.py)")
        for line in [*evacuation.table(outcomes), "", *evacuation.verdict(outcomes)]:
            print(f"  {line}")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--quick", action="store_true", help="fewer tasks (a smoke run)")
    p.add_argument(
        "--rig",
        action="store_true",
        help="also run the rig benchmarks (real libvirtd + QEMU; root): bench/rig_bench.py",
    )
    p.add_argument(
        "--companions",
        action="store_true",
        help="also run the migration companions benchmarks (hooks, reduce-memory, swap-with;"
        " on the rig too with --rig): bench/companions.py",
    )
    p.add_argument(
        "--storage",
        action="store_true",
        help="also run the storage migration benchmarks (copy-storage, sparse copies; real"
        " libvirtd + QEMU; root): bench/storage.py",
    )
    p.add_argument(
        "--steering",
        action="store_true",
        help="also run the steering benchmarks (progress-timeout, tune migration, xbzrle; real"
        " libvirtd + QEMU; root): bench/steering.py",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="only compare this checkout's agent with the one in DIR (e.g. `git worktree add"
        " /tmp/base HEAD~1`), journal on and off, interleaved",
    )
    p.add_argument(
        "--fleet",
        action="store_true",
        help="also run the 200-agent fleet simulation (bench/fleet.py)",
    )
    p.add_argument(
        "--metrics",
        action="store_true",
        help="also measure what metrics.listen costs (task path, loop lag; with and without a"
        " scraper): bench/metrics.py",
    )
    p.add_argument(
        "--evacuation",
        action="store_true",
        help="also compare evacuations scheduled by prediction with fixed policies"
        " (bench/evacuation.py)",
    )
    asyncio.run(amain(p.parse_args()))


if __name__ == "__main__":
    main()
