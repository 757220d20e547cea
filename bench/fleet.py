"""Fleet simulation: many agents on one mosquitto, evacuating hosts at once (issue 7).

``python -m bench.fleet [--agents 200] [--vms 20] [--evacuate 20] [--mode scatter]``

All agents run in this process with the ``fake`` hypervisor on one simulated cluster (each
agent owns one host of it), each with its own MQTT connection, dispatcher and publisher, as
200 separate agents would. A scheduler client then sends ``evacuate node`` to the first
``--evacuate`` hosts at the same moment, naming every host that is not being evacuated as a
destination, and waits for every result. A monitor subscribed to ``fast/migfra/#`` counts what
the broker carried. Printed: total time, per-VM migration latency percentiles (``accepted``
of the evacuation to the VM's ``done`` event), ``status`` round trips during the run, broker
messages per second, the process's memory per agent, and lost results (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
import uuid
from contextlib import AsyncExitStack, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

from asyncmigfra.app import Agent
from asyncmigfra.logs import configure_logging
from asyncmigfra.settings import HypervisorSettings, LoggingSettings, default_settings
from asyncmigfra.transport.mqtt import ToolClient
from asyncmigfra.wire.parsing import load_yaml
from bench.common import mosquitto, pct

GIB = 1024 * 1024
DONE = b"---\nevent: done"


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def host_name(i: int) -> str:
    return f"node{i:03d}"


def agent_for(i: int, n: int, vms: int, port: int, shared: dict[str, object]) -> Agent:
    name = host_name(i)
    base = default_settings(hostname=name)
    peers = {host_name(j): {"cpus": 64, "memory": 256 * GIB} for j in range(n) if j != i}
    options = {
        "host": name,
        "cpus": 64,
        "memory": 256 * GIB,
        "bandwidth": 10000,
        "peers": peers if i == 0 else {},
        "domains": [
            {
                "name": f"{name}-vm{k:02d}",
                "vcpus": 1,
                "memory": GIB,
                "state": "running",
                "dirty-rate": 5,
            }
            for k in range(vms)
        ],
    }
    settings = replace(
        base,
        mqtt=replace(
            base.mqtt,
            host="127.0.0.1",
            port=port,
            client_id=f"fleet-{name}-{uuid.uuid4().hex[:4]}",
            reconnect_min_delay=0.1,
        ),
        hypervisor=HypervisorSettings(type="fake", options=options),
        agent=replace(base.agent, state_dir="none", progress_interval=0.5),
        logging=LoggingSettings(level="warning"),
    )
    return Agent(settings, shared=shared)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    configure_logging(LoggingSettings(level="warning", format="json"))
    rss0 = rss_bytes()
    shared: dict[str, object] = {}
    with mosquitto() as port:
        agents = [agent_for(i, args.agents, args.vms, port, shared) for i in range(args.agents)]
        evacuated = [host_name(i) for i in range(args.evacuate)]
        destinations = [host_name(i) for i in range(args.evacuate, args.agents)]
        results: dict[str, dict[str, Any]] = {}
        done_at: dict[str, float] = {}
        accepted_at: dict[str, float] = {}
        broker_msgs = 0
        async with AsyncExitStack() as stack, asyncio.TaskGroup() as tg:
            t_start = time.perf_counter()
            runs = [tg.create_task(a.run(), name=f"fleet.{a.settings.hostname}") for a in agents]
            await asyncio.wait_for(asyncio.gather(*(a.ready.wait() for a in agents)), 120)
            t_online = time.perf_counter() - t_start
            rss1 = rss_bytes()
            client = ToolClient("127.0.0.1", port, client_id=f"fleet-sched-{uuid.uuid4().hex[:4]}")
            await stack.enter_async_context(client)
            await client.subscribe("fast/migfra/#", qos=1)
            all_results = asyncio.Event()
            status_rtts: list[float] = []
            status_waiters: dict[str, tuple[float, asyncio.Future[None]]] = {}

            async def pump() -> None:
                nonlocal broker_msgs
                async for msg in client.messages():
                    broker_msgs += 1
                    if msg.topic.endswith("/result"):
                        doc = load_yaml(msg.payload)
                        if not isinstance(doc, dict):
                            continue
                        tid = str(doc.get("id", ""))
                        if tid in status_waiters:
                            t0, fut = status_waiters.pop(tid)
                            status_rtts.append((time.perf_counter() - t0) * 1000)
                            fut.set_result(None)
                        elif tid.startswith("evac-"):
                            results[tid] = doc
                            if len(results) == len(evacuated):
                                all_results.set()
                    elif msg.topic.endswith("/event") and msg.payload.startswith(
                        b"---\nevent: done"
                    ):
                        doc = load_yaml(msg.payload)
                        if isinstance(doc, dict) and str(doc.get("id", "")).startswith("evac-"):
                            done_at[str(doc["vm-name"])] = time.perf_counter()
                    elif msg.topic.endswith("/event") and b"event: accepted" in msg.payload:
                        doc = load_yaml(msg.payload)
                        if isinstance(doc, dict):
                            accepted_at[str(doc.get("id"))] = time.perf_counter()

            async def probe_status() -> None:
                rng = random.Random(7)
                while not all_results.is_set():
                    host = host_name(rng.randrange(args.agents))
                    tid = f"st-{uuid.uuid4().hex[:8]}"
                    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    status_waiters[tid] = (time.perf_counter(), fut)
                    await client.publish(
                        f"fast/migfra/{host}/task", f"id: {tid}\ntask: status\n".encode(), qos=1
                    )
                    try:
                        await asyncio.wait_for(fut, 10)
                    except TimeoutError:
                        status_waiters.pop(tid, None)
                    await asyncio.sleep(0.05)

            pumper = tg.create_task(pump())
            await asyncio.sleep(0.3)
            dest_list = ", ".join(destinations)
            t0 = time.perf_counter()
            for host in evacuated:
                body = (
                    f"id: evac-{host}\ntask: evacuate node\ndestinations: [{dest_list}]\n"
                    f"parameter:\n  mode: {args.mode}\n  overbooking: false\n"
                    "  migration-type: live\n"
                )
                await client.publish(f"fast/migfra/{host}/task", body.encode(), qos=1)
            prober = tg.create_task(probe_status())
            with suppress(TimeoutError):
                await asyncio.wait_for(all_results.wait(), args.timeout)
            total = time.perf_counter() - t0
            msgs_window = broker_msgs
            await prober
            rss2 = rss_bytes()
            pumper.cancel()
            for a in agents:
                a.request_stop()
            codes = await asyncio.gather(*runs)
        entries = [e for r in results.values() for e in r.get("list", [])]
        ok = [e for e in entries if e.get("status") == "success"]
        latencies = [
            (done_at[e["vm-name"]] - accepted_at.get(f"evac-{e['vm-name'].split('-vm')[0]}", t0))
            * 1000
            for e in ok
            if e["vm-name"] in done_at
        ]
        return {
            "agents": args.agents,
            "vms_per_agent": args.vms,
            "evacuated_hosts": args.evacuate,
            "agents_online_s": round(t_online, 2),
            "evacuation_total_s": round(total, 2),
            "results_expected": len(evacuated),
            "results_received": len(results),
            "lost_results": len(evacuated) - len(results),
            "vm_entries": len(entries),
            "vm_migrated": len(ok),
            "vm_errors": len(entries) - len(ok),
            "migration_latency_p50_ms": round(pct(latencies, 0.5), 1) if latencies else None,
            "migration_latency_p90_ms": round(pct(latencies, 0.9), 1) if latencies else None,
            "migration_latency_p99_ms": round(pct(latencies, 0.99), 1) if latencies else None,
            "status_rtt_p50_ms": round(pct(status_rtts, 0.5), 2) if status_rtts else None,
            "status_rtt_p99_ms": round(pct(status_rtts, 0.99), 2) if status_rtts else None,
            "broker_msgs_seen": msgs_window,
            "broker_msgs_per_s": round(msgs_window / total, 1) if total else None,
            "rss_mb_total": round(rss2 / 1e6, 1),
            "rss_mb_per_agent": round((rss1 - rss0) / 1e6 / args.agents, 2),
            "agent_exit_codes_nonzero": sum(1 for c in codes if c),
            "pid": os.getpid(),
        }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fleet")
    p.add_argument("--agents", type=int, default=200)
    p.add_argument("--vms", type=int, default=20)
    p.add_argument("--evacuate", type=int, default=20)
    p.add_argument("--mode", default="scatter", choices=["auto", "compact", "scatter"])
    p.add_argument("--timeout", type=float, default=300)
    out = asyncio.run(run(p.parse_args()))
    print("\n== fleet simulation (fake hypervisor, one mosquitto, agents in one process)")
    for k, v in out.items():
        print(f"  {k:28s} {v}")


if __name__ == "__main__":
    main()
