"""Evacuations scheduled by prediction against fixed policies, on shared NICs (issue 18).

``python -m bench.evacuation [--quick] [--seed N | --seeds N,N,...] [--sources N] [--vms N]``

The same simulated cluster is evacuated once per policy, each time from scratch: ``--sources``
hosts with ``--vms`` guests each (idle, cold and hot ones: sizes and dirty rates drawn from
``--seed``) are evacuated at the same moment onto ``--destinations`` hosts, by agents on one
mosquitto with the ``fake`` back-end (every host runs one, the destinations too: they
answer the sources' reservations of their inbound NICs). Every host's NIC carries 1250
MiB/s each way (``nic-rate``, about 10 GbE) and one migration's stream at most 1000 MiB/s
(``bandwidth``), so a host's migrations share its NIC and a destination's share that one's,
max-min fairly.
Every policy uses the same placement (``mode: auto``), ``migration-type: live``,
``max-downtime: 500`` and ``completion-timeout: 30`` (a guest that does not converge fails
after 30 s rather than the default 150 s per GiB, to keep the run short), and agents with
``max-outgoing`` and ``max-incoming`` 4. The policies:

* ``nova``: one migration at a time per host, in placement order (Nova's host evacuation
  migrates one instance after another);
* ``kubevirt``: two at a time per host, largest first (KubeVirt's
  ``parallelOutboundMigrationsPerNode`` 2; its cluster-wide 5 does not bind with two
  sources);
* ``parallel``: four at a time, largest first (this agent's behaviour without ``schedule``);
* ``predicted``: ``schedule: predicted``, waves of at most four (protocol §3.7).

Printed per policy: the makespan (from sending the evacuations to the last result), the
guests moved, those that failed because they did not converge in time (``code: timeout``),
other failures, and for ``predicted`` the plans' predicted makespans and re-plans. Then the
ratio of the planner's makespan to the better fixed policy's (fewest failures, then
shortest makespan: ``nova`` or ``kubevirt``) and to the fastest of all fixed policies, and
the *lower bound* no schedule can beat as the model counts it
(:func:`~asyncmigfra.tasks.waves.lower_bound`: every guest's bytes at its whole stream,
through the NICs at their full rates; placement as the agents place): a target below it
cannot be met by any schedule. With ``--seeds`` the runs follow one another and a summary
of the ratios ends the output. Figures, not assertions; the simulation runs at
``time-scale`` 1 (real seconds), so concurrent load on the machine moves them: compare
policies within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
import uuid
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any

from asyncmigfra.app import Agent
from asyncmigfra.hypervisor.fake import create as create_fake
from asyncmigfra.logs import configure_logging
from asyncmigfra.migration.forecast import costs_of
from asyncmigfra.migration.prediction import PredictionInputs
from asyncmigfra.settings import HypervisorSettings, LoggingSettings, default_settings
from asyncmigfra.tasks.placement import Capacity, VmSize, place
from asyncmigfra.tasks.waves import WaveVm, lower_bound
from asyncmigfra.transport.mqtt import ToolClient
from asyncmigfra.wire.parsing import load_yaml
from bench.common import mosquitto

MIB_KIB = 1024  # KiB per MiB
MIB = 1024 * 1024
NIC = 1250  # MiB/s
STREAM = 1000  # MiB/s
PARAMETERS = "  migration-type: live\n  max-downtime: 500\n  completion-timeout: 30\n"
DESTINATION_CPUS = 256
DESTINATION_MEMORY = 1024 * 1024 * MIB_KIB

POLICIES: dict[str, str] = {
    "nova": "  max-parallel: 1\n",
    "kubevirt": "  max-parallel: 2\n",
    "parallel": "  max-parallel: 4\n",
    "predicted": "  max-parallel: 4\n  schedule: predicted\n",
}
FIXED = ("nova", "kubevirt")


@dataclass(frozen=True)
class Guest:
    name: str
    mib: int
    dirty: float  # MiB/s
    kind: str


def guests(host: str, count: int, rng: random.Random) -> list[Guest]:
    """A host's guests: about 40 % idle, 35 % cold, 25 % hot."""
    out = []
    for i in range(count):
        draw = rng.random()
        if draw < 0.40:
            kind, mib, dirty = "idle", rng.choice([512, 1024, 2048]), rng.uniform(0, 2)
        elif draw < 0.75:
            kind, mib, dirty = "cold", rng.choice([1024, 2048]), rng.uniform(10, 100)
        else:
            kind, mib, dirty = "hot", rng.choice([1024, 2048]), rng.uniform(350, 750)
        out.append(Guest(f"{host}-{kind}{i:02d}", mib, round(dirty, 1), kind))
    return out


def source_name(i: int) -> str:
    return f"src{i}"


def destination_name(i: int) -> str:
    return f"dst{i}"


def agent_for(
    host: str,
    domains: list[Guest],
    peers: Mapping[str, Any],
    port: int,
    shared: dict[str, object],
    *,
    cpus: int = 64,
    memory: int = 256 * 1024 * MIB_KIB,
) -> Agent:
    base = default_settings(hostname=host)
    options = {
        "host": host,
        "cpus": cpus,
        "memory": memory,
        "bandwidth": STREAM,
        "nic-rate": NIC,
        "peers": dict(peers),
        "domains": [
            {
                "name": g.name,
                "vcpus": 2,
                "memory": g.mib * MIB_KIB,
                "state": "running",
                "dirty-rate": g.dirty,
            }
            for g in domains
        ],
    }
    settings = replace(
        base,
        mqtt=replace(
            base.mqtt,
            host="127.0.0.1",
            port=port,
            client_id=f"evac-{host}-{uuid.uuid4().hex[:4]}",
            reconnect_min_delay=0.1,
        ),
        hypervisor=HypervisorSettings(type="fake", options=options),
        migration=replace(base.migration, max_outgoing=4, max_incoming=4),
        agent=replace(base.agent, state_dir="none", progress_interval=1.0),
        logging=LoggingSettings(level="warning"),
    )
    return Agent(settings, shared=shared)


@dataclass
class Outcome:
    makespan: float = 0.0
    moved: int = 0
    not_converged: int = 0
    other_failures: int = 0
    lost: int = 0
    predicted: list[float] = field(default_factory=list)
    replans: int = 0
    waves: list[int] = field(default_factory=list)
    #: vm -> (s from the start when its migration began, when it ended, status)
    timeline: dict[str, list[Any]] = field(default_factory=dict)
    #: vm -> (s from its evacuation's plan when it was planned to start, and to end)
    planned: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def failures(self) -> int:
        return self.not_converged + self.other_failures + self.lost


async def evacuate(
    policy: str, cluster: dict[str, list[Guest]], destinations: list[str], port: int, limit: float
) -> Outcome:
    """Evacuate every source of ``cluster`` at once with ``policy``, on a fresh simulation."""
    shared: dict[str, object] = {}
    peers = {
        d: {"cpus": DESTINATION_CPUS, "memory": DESTINATION_MEMORY, "nic-rate": NIC}
        for d in destinations
    }
    agents = [
        agent_for(host, doms, peers if i == 0 else {}, port, shared)
        for i, (host, doms) in enumerate(cluster.items())
    ]
    # Every host runs an agent: the destinations' answer the sources' requests for shares
    # of their inbound NICs (schedule: predicted).
    agents += [
        agent_for(d, [], {}, port, shared, cpus=DESTINATION_CPUS, memory=DESTINATION_MEMORY)
        for d in destinations
    ]
    outcome = Outcome()
    results: dict[str, dict[str, Any]] = {}
    everything = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        runs = [tg.create_task(a.run(), name=f"bench.{a.settings.hostname}") for a in agents]
        await asyncio.wait_for(asyncio.gather(*(a.ready.wait() for a in agents)), 60)
        client = ToolClient("127.0.0.1", port, client_id=f"evac-sched-{uuid.uuid4().hex[:4]}")
        async with client:
            await client.subscribe("fast/migfra/+/result", qos=1)
            await client.subscribe("fast/migfra/+/event", qos=1)

            async def pump() -> None:
                async for msg in client.messages():
                    now = time.perf_counter() - t0
                    if msg.topic.endswith("/event") and (
                        b"event: phase" in msg.payload or b"event: done" in msg.payload
                    ):
                        doc = load_yaml(msg.payload)
                        if isinstance(doc, dict) and "vm-name" in doc:
                            line = outcome.timeline.setdefault(str(doc["vm-name"]), [0.0, 0.0, ""])
                            if doc.get("event") == "done":
                                line[1:] = [now, doc.get("status")]
                            elif doc.get("phase") == "migrating" and not line[0]:
                                line[0] = now
                    elif msg.topic.endswith("/event") and b"event: plan" in msg.payload:
                        doc = load_yaml(msg.payload)
                        if isinstance(doc, dict) and doc.get("schedule") == "predicted":
                            if doc.get("revision") == 1:
                                outcome.predicted.append(float(doc.get("makespan", 0)))
                                outcome.waves.append(len(doc.get("waves", [])))
                                for wave in doc.get("waves", []):
                                    for one in wave.get("vms", []):
                                        start = float(wave.get("start", 0.0))
                                        end = start + float(one.get("predicted-duration", 0.0))
                                        outcome.planned[str(one["vm-name"])] = (start, end)
                            else:
                                outcome.replans += 1
                    elif msg.topic.endswith("/result"):
                        doc = load_yaml(msg.payload)
                        if isinstance(doc, dict) and str(doc.get("id", "")).startswith("evac-"):
                            results[str(doc["id"])] = doc
                            if len(results) == len(cluster):
                                everything.set()

            t0 = time.perf_counter()
            pumper = tg.create_task(pump())
            await asyncio.sleep(0.3)
            targets = ", ".join(destinations)
            t0 = time.perf_counter()
            for host in cluster:
                body = (
                    f"id: evac-{host}\ntask: evacuate node\ndestinations: [{targets}]\n"
                    f"parameter:\n  mode: auto\n{PARAMETERS}{POLICIES[policy]}"
                )
                await client.publish(f"fast/migfra/{host}/task", body.encode(), qos=1)
            with suppress(TimeoutError):
                await asyncio.wait_for(everything.wait(), limit)
            outcome.makespan = time.perf_counter() - t0
            pumper.cancel()
        for a in agents:
            a.request_stop()
        await asyncio.gather(*runs)
    expected = sum(len(doms) for doms in cluster.values())
    entries = [e for r in results.values() for e in r.get("list", [])]
    outcome.moved = sum(1 for e in entries if e.get("status") == "success")
    outcome.not_converged = sum(1 for e in entries if e.get("code") == "timeout")
    outcome.other_failures = sum(
        1 for e in entries if e.get("status") != "success" and e.get("code") != "timeout"
    )
    outcome.lost = expected - len(entries)
    return outcome


def table(outcomes: Mapping[str, Outcome]) -> list[str]:
    lines = [
        f"{'policy':10} {'makespan s':>10} {'moved':>6} {'not conv.':>9} {'other fail':>10}"
        f" {'lost':>5}  notes"
    ]
    for policy, o in outcomes.items():
        notes = ""
        if o.predicted:
            notes = (
                f"predicted makespan per host {', '.join(f'{p:.1f}' for p in o.predicted)} s;"
                f" waves {o.waves}; re-plans {o.replans}"
            )
        lines.append(
            f"{policy:10} {o.makespan:10.1f} {o.moved:6d} {o.not_converged:9d}"
            f" {o.other_failures:10d} {o.lost:5d}  {notes}"
        )
    return lines


def bound(cluster: Mapping[str, list[Guest]], destinations: list[str]) -> float:
    """The makespan no schedule beats, as the model counts (see the module): each source's
    own, and the destinations' shared by all sources."""
    everyone: list[WaveVm] = []
    worst = 0.0
    nics = dict.fromkeys(destinations, NIC * MIB)
    costs = costs_of(create_fake({}, hostname="bound", shared={}))  # the simulation's own
    for doms in cluster.values():
        capacities = [
            Capacity(host=d, cpus=DESTINATION_CPUS, vcpus_used=0, free_memory=DESTINATION_MEMORY)
            for d in destinations
        ]
        placed = place([VmSize(g.name, 2, g.mib * MIB_KIB) for g in doms], capacities)
        vms = [
            WaveVm(
                name=g.name,
                destination=placed.assignments[g.name],
                inputs=PredictionInputs(
                    memory=g.mib * MIB,
                    link_rate=STREAM * MIB,
                    completion_timeout=30,
                    dirty_rate=g.dirty * MIB,
                    max_downtime=500,
                    costs=costs,
                ),
            )
            for g in doms
            if g.name in placed.assignments
        ]
        everyone += vms
        worst = max(worst, lower_bound(vms, link_rate=NIC * MIB, destination_rates=nics))
    return max(worst, lower_bound(everyone, link_rate=math.inf, destination_rates=nics))


async def run(args: argparse.Namespace, seed: int) -> tuple[dict[str, Outcome], float]:
    configure_logging(LoggingSettings(level="warning", format="json"))
    rng = random.Random(seed)
    cluster = {source_name(i): guests(source_name(i), args.vms, rng) for i in range(args.sources)}
    destinations = [destination_name(i) for i in range(args.destinations)]
    kinds = [g.kind for doms in cluster.values() for g in doms]
    print(
        f"== evacuation schedules: {args.sources} hosts x {args.vms} guests"
        f" ({kinds.count('idle')} idle, {kinds.count('cold')} cold, {kinds.count('hot')} hot;"
        f" {sum(g.mib for d in cluster.values() for g in d) / 1024:.1f} GiB) onto"
        f" {args.destinations} hosts; NIC {NIC} MiB/s, stream {STREAM} MiB/s, seed {seed}"
    )
    outcomes: dict[str, Outcome] = {}
    policies = args.policies.split(",") if args.policies else list(POLICIES)
    with mosquitto() as port:
        for policy in policies:
            outcomes[policy] = await evacuate(policy, cluster, destinations, port, args.timeout)
            print(f"  {policy}: {outcomes[policy].makespan:.1f} s", flush=True)
            if args.trace:
                for vm, (began, ended, status) in sorted(
                    outcomes[policy].timeline.items(), key=lambda item: item[1][0]
                ):
                    plan = outcomes[policy].planned.get(vm)
                    told = f"  (planned {plan[0]:5.1f} -> {plan[1]:5.1f})" if plan else ""
                    print(f"    {vm:16} {began:6.1f} -> {ended:6.1f}  {status}{told}")
    return outcomes, bound(cluster, destinations)


def better_fixed(outcomes: Mapping[str, Outcome]) -> str:
    return min(FIXED, key=lambda p: (outcomes[p].failures, outcomes[p].makespan))


def verdict(outcomes: Mapping[str, Outcome], least: float) -> list[str]:
    planner = outcomes["predicted"]
    better = better_fixed(outcomes)
    fastest = min((p for p in outcomes if p != "predicted"), key=lambda p: outcomes[p].makespan)
    lines = []
    for label, other in (
        ("the better fixed policy", better),
        ("the fastest fixed policy", fastest),
    ):
        o = outcomes[other]
        lines.append(
            f"planner / {label} ({other}): makespan {planner.makespan / o.makespan:.2f}x,"
            f" failures {planner.failures} vs {o.failures}"
        )
    o = outcomes[better]
    lines.append(
        f"lower bound (model) {least:.1f} s: planner / bound {planner.makespan / least:.2f}x;"
        f" the best any schedule could do against {better}: {least / o.makespan:.2f}x"
    )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.evacuation")
    p.add_argument("--quick", action="store_true", help="2 hosts x 6 guests (a smoke run)")
    p.add_argument("--seed", type=int, default=18)
    p.add_argument("--seeds", help="several seeds, comma-separated (one run each, a summary)")
    p.add_argument("--sources", type=int, default=2)
    p.add_argument("--vms", type=int, default=12)
    p.add_argument("--destinations", type=int, default=4)
    p.add_argument("--timeout", type=float, default=900.0, help="s per policy at most")
    p.add_argument("--policies", help=f"only these, comma-separated (of {', '.join(POLICIES)})")
    p.add_argument("--trace", action="store_true", help="each guest's start and end")
    args = p.parse_args()
    if args.quick:
        args.vms = 6
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    summary = []
    for seed in seeds:
        outcomes, least = asyncio.run(run(args, seed))
        print()
        for line in table(outcomes):
            print(line)
        if not {"predicted", *FIXED} <= set(outcomes):
            continue  # --policies without the planner or a fixed policy: no ratios
        print()
        for line in verdict(outcomes, least):
            print(line)
        print(flush=True)
        better = better_fixed(outcomes)
        planner, fixed = outcomes["predicted"], outcomes[better]
        summary.append(
            f"seed {seed:4d}: planner / {better:8} {planner.makespan / fixed.makespan:.2f}x"
            f" (failures {planner.failures} vs {fixed.failures}); bound / {better:8}"
            f" {least / fixed.makespan:.2f}x; planner / bound {planner.makespan / least:.2f}x"
        )
    if len(summary) > 1:
        print(f"== summary, {args.sources} source(s) x {args.vms} guests")
        for line in summary:
            print(line)


if __name__ == "__main__":
    main()
