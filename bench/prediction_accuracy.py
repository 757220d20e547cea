"""Predictions on the rig: predicted vs actual migrations, and evacuations planner vs fixed.

Issue 18 item 6. ``python -m bench.prediction_accuracy [--quick] [--only accuracy evacuation]``.
Figures are printed, not asserted. It starts its own mosquitto, brings the project's two-host
rig up (``tests/rig``; it takes the rig lock and waits while another session uses it) and
runs one agent per rig host in this process with the ``libvirt`` back-end, as
``bench/rig_bench.py`` does. The link from rig-a to rig-b is a token bucket (``tc qdisc
... tbf``, ``rig.shaping``) on rig-a's end of the veth.

1. **Accuracy.** For each link speed: fresh agents (nothing learned), then *learning*
   migrations (a ``dirty64`` guest, ``migration-type: post-copy``; one with ``--quick``, else
   two) from which the agent learns
   the link rate to rig-b as it learns it in production (the median transfer rate of the
   memory passes; also what the guests' QEMUs keep resident beyond guest memory, see
   docs/protocol.md *Predictions*). Then for each guest (``idle``, ``dirty16``, ``dirty64``
   and an ``idle`` guest with a local qcow2 disk, ``copy-storage: all``): ``plan migration``
   (the agent's own prediction: its page-sampling probe, its learned link rate), then the same
   ``migrate vm`` (``migration-type: live``, ``completion-timeout`` so that a migration that
   does not converge ends, ``timeout-action: abort``). Predicted vs actual duration
   (the result's ``time-measurement: migrate``, the job from its start to its end) and
   downtime, and the verdict (``converges``) vs what happened.
2. **Evacuation.** Four guests (``idle``, ``idle``, ``dirty16``, ``dirty64``) evacuated from
   rig-a to rig-b over the shaped link with ``migration-type: auto``: ``schedule: predicted``
   against a fixed ``max-parallel: 2`` (``schedule: placement``), in the same run, order
   alternating; makespan (publish to result) and failed migrations.

Everything is torn down on every exit path (guests and images after each case, the link's
shaping, the agents, the rig).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import statistics
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.rig_bench import (
    MIB,
    ROOT,
    RigConns,
    Sched,
    agent_pair,
    cache_dir,
    entry,
    fmt,
    machine_facts,
    migrate_body,
    note,
    rig_conns,
    rig_session,
    standalone,
    table,
    timed_section,
)
from bench.storage import clean_up, image_path, start_with_disk

if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from asyncmigfra.migration.prediction import MigrationCosts
from rig import Rig, RigUnavailable, build_guests, ensure_system
from rig.shaping import shape, shaping, unshape

KINDS = ("idle", "dirty16", "dirty64", "disk")
#: s a learning migration may take (completion timeout; it then switches to post-copy).
LEARN_LIMIT = 60.0
#: The disk guest's image: virtual size and bytes written into it before the migration.
DISK_SIZE, DISK_DATA = 64 * MIB, 32 * MIB


@dataclass
class Plan:
    quick: bool
    speeds: tuple[float, ...]
    kinds: tuple[str, ...]
    #: s: the accuracy runs' completion timeout (a run that does not converge ends then).
    timeout: float
    evac_speed: float
    evac_rounds: int
    learning_runs: int
    only: frozenset[str]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = bool(args.quick)
        return cls(
            quick=quick,
            speeds=tuple(args.speeds or ((8.0, 256.0) if quick else (8.0, 32.0, 256.0))),
            kinds=KINDS,
            timeout=args.timeout or (15.0 if quick else 25.0),
            evac_speed=args.evac_speed,
            evac_rounds=args.evac_rounds or (1 if quick else 2),
            learning_runs=1 if quick else 2,
            only=frozenset(args.only or ("accuracy", "evacuation")),
        )


@dataclass
class Case:
    kind: str
    speed: float
    plan: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    learned: float | None = None
    error: str | None = None

    @property
    def predicted_converges(self) -> bool | None:
        value = self.plan.get("converges")
        return value if isinstance(value, bool) else None

    @property
    def converged(self) -> bool | None:
        status = self.result.get("status")
        return None if status is None else status == "success"

    @property
    def actual_s(self) -> float | None:
        tm = self.result.get("time-measurement") or {}
        return float(tm["migrate"]) if self.converged and "migrate" in tm else None

    @property
    def actual_downtime_ms(self) -> float | None:
        tm = self.result.get("time-measurement") or {}
        return float(tm["downtime"]) * 1000 if self.converged and "downtime" in tm else None

    @property
    def fixed_s(self) -> float | None:
        """What the run took beyond the model's transfer time: the fixed cost it showed
        (actual - predicted + the model's fixed costs), to check the model's constants."""
        predicted, actual = self.plan.get("predicted-duration"), self.actual_s
        if predicted is None or actual is None:
            return None
        costs = MigrationCosts()
        fixed = costs.setup + (costs.storage_setup if self.kind == "disk" else 0.0)
        return actual - float(predicted) + fixed

    @property
    def error_share(self) -> float | None:
        """(predicted - actual) / actual duration, both converged."""
        predicted, actual = self.plan.get("predicted-duration"), self.actual_s
        if predicted is None or actual is None or actual <= 0:
            return None
        return (float(predicted) - actual) / actual


def params(kind: str, timeout: float, mode: str = "live") -> dict[str, object]:
    out: dict[str, object] = {
        "migration-type": mode,
        "completion-timeout": timeout,
        "timeout-action": "abort",
    }
    if kind == "disk":
        out["copy-storage"] = "all"
    return out


def plan_body(name: str, dest: str, **parameters: object) -> str:
    return migrate_body(name, dest, **parameters).replace(
        "task: migrate vm", "task: plan migration"
    )


async def start_guest(conns: RigConns, rig: Rig, kind: str, guests: dict[str, Path]) -> str:
    name = f"acc-{kind}-{uuid.uuid4().hex[:6]}"
    if kind == "disk":
        await asyncio.to_thread(
            start_with_disk, conns, rig.a, name, guests["idle"], DISK_SIZE, DISK_DATA
        )
    else:
        await asyncio.to_thread(conns.start_guest, rig.a, name, guests[kind])
    return name


async def remove_guest(conns: RigConns, rig: Rig, kind: str, name: str) -> None:
    if kind == "disk":
        await asyncio.to_thread(clean_up, conns, rig, name, image_path(name))
    else:
        await asyncio.to_thread(conns.remove_everywhere, name)


@contextlib.asynccontextmanager
async def shaped_link(rig: Rig, speed: float) -> AsyncIterator[str]:
    await asyncio.to_thread(shape, rig.a, speed)
    try:
        yield await asyncio.to_thread(shaping, rig.a)
    finally:
        await asyncio.to_thread(unshape, rig.a)


# --------------------------------------------------------------------------- 1. accuracy


async def learning_migration(
    conns: RigConns, rig: Rig, to_a: Sched, guests: dict[str, Path], limit: float
) -> str:
    """A migration the agent learns from (the link rate, the resident overhead): a
    ``dirty64`` guest, which keeps the link busy, in post-copy (it always ends); what
    happened, for the record."""
    name = await start_guest(conns, rig, "dirty64", guests)
    try:
        await asyncio.sleep(1.0)
        p = {**params("dirty64", limit, "post-copy"), "timeout-action": "post-copy"}
        reply = await to_a.call(
            migrate_body(name, rig.b.name, **p, **{"max-downtime": 300}), limit + 60
        )
        e = entry(reply)
        tm = e.get("time-measurement") or {}
        return f"{e.get('status')} {e.get('code') or ''} in {fmt(tm.get('migrate'), 1)} s".strip()
    finally:
        await remove_guest(conns, rig, "dirty64", name)


async def accuracy_case(
    conns: RigConns, rig: Rig, to_a: Sched, guests: dict[str, Path], case: Case, limit: float
) -> None:
    name = await start_guest(conns, rig, case.kind, guests)
    try:
        await asyncio.sleep(1.0)  # the guest at its steady rate
        p = params(case.kind, limit)
        case.plan = entry(await to_a.call(plan_body(name, rig.b.name, **p), 60))
        case.result = entry(await to_a.call(migrate_body(name, rig.b.name, **p), limit + 90))
    finally:
        await remove_guest(conns, rig, case.kind, name)


async def bench_accuracy(port: int, rig: Rig, guests: dict[str, Path], plan: Plan) -> None:
    cases: list[Case] = []
    learning: list[list[object]] = []
    async with rig_conns(rig) as conns:
        for speed in plan.speeds:
            async with (
                shaped_link(rig, speed) as qdisc,
                agent_pair(port, rig) as (to_a, _),
            ):
                learned = [
                    await learning_migration(conns, rig, to_a, guests, LEARN_LIMIT)
                    for _ in range(plan.learning_runs)
                ]
                learning.append([f"{speed:g}", qdisc, "; ".join(learned)])
                for kind in plan.kinds:
                    case = Case(kind, speed)
                    cases.append(case)
                    try:
                        await accuracy_case(conns, rig, to_a, guests, case, plan.timeout)
                    except Exception as exc:  # one case failing does not end the section
                        case.error = f"{type(exc).__name__}: {exc}"
    table(
        "1a. link speeds and the learning migration", ["MiB/s", "qdisc", "learning run"], learning
    )
    accuracy_tables(cases, plan)


def accuracy_tables(cases: Sequence[Case], plan: Plan) -> None:
    rows = []
    for c in cases:
        p, r = c.plan, c.result
        share = c.error_share
        verdict = "-"
        if c.predicted_converges is not None and c.converged is not None:
            verdict = "right" if c.predicted_converges == c.converged else "WRONG"
        rows.append(
            [
                c.kind,
                f"{c.speed:g}",
                fmt(_mib(p.get("transfer-rate")), 1),
                fmt(_mib(p.get("dirty-rate")), 1),
                fmt(_bound(p), 1),
                fmt(_pages(p), 0),
                fmt(_mib(p.get("memory")), 1),
                fmt(_mib(p.get("disk")), 0),
                "yes" if c.predicted_converges else "no",
                "yes" if c.converged else (c.error or r.get("code") or "no"),
                verdict,
                fmt(p.get("predicted-duration"), 2),
                fmt(c.actual_s, 2),
                "-" if share is None else f"{share * 100:+.0f} %",
                fmt(p.get("predicted-downtime"), 0),
                fmt(c.actual_downtime_ms, 0),
                p.get("passes", "-"),
                fmt(c.fixed_s, 2),
            ]
        )
    table(
        "1b. plan migration vs migrate vm (live, completion-timeout"
        f" {plan.timeout:g} s, timeout-action abort)",
        [
            "guest",
            "link MiB/s",
            "learned MiB/s",
            "dirty MiB/s",
            "bound MiB/s",
            "pages",
            "memory MiB",
            "disk MiB",
            "predicted conv.",
            "converged",
            "verdict",
            "pred. s",
            "actual s",
            "error",
            "pred. down ms",
            "actual down ms",
            "passes",
            "fixed s",
        ],
        rows,
    )
    errors = [abs(s) for s in (c.error_share for c in cases) if s is not None]
    judged = [c for c in cases if c.predicted_converges is not None and c.converged is not None]
    right = sum(c.predicted_converges == c.converged for c in judged)
    median = f"{statistics.median(errors) * 100:.0f} %" if errors else "-"
    note(
        f"median |duration error| over the {len(errors)} cases that converged and were"
        f" predicted to: {median} (target <= 20 %)\n"
        f"verdict right in {right} of {len(judged)} cases (target: all)\n"
        "learned = the link rate the agent's plan used (learned from the learning migration);\n"
        "dirty = the agent's page-sampling estimate (1 s probes, pooled while the estimate and\n"
        "its bound lead to different verdicts); bound = its 95 % upper confidence bound, at\n"
        "which the verdict is judged; pages = guest pages sampled (said only when it converges);\n"
        "memory = what the first pass sends (plan); actual s = the result's time-measurement\n"
        "'migrate' (job start to end).\n"
        "error = (predicted - actual) / actual. fixed s = actual - predicted + the model's\n"
        "fixed costs: what the run cost beyond the model's transfer time."
    )
    costs = MigrationCosts()
    for label, disk, model in (
        ("without a storage copy", False, costs.setup),
        ("with a storage copy", True, costs.setup + costs.storage_setup),
    ):
        fixed = [c.fixed_s for c in cases if (c.kind == "disk") == disk and c.fixed_s is not None]
        if fixed:
            print(
                f"  fixed cost {label}: median {statistics.median(fixed):.2f} s over"
                f" {len(fixed)} runs (model: {model:.2f} s)"
            )
    for c in cases:
        blockers = c.plan.get("blockers") or []
        if c.error or (c.predicted_converges is False and blockers):
            print(f"  {c.kind} @ {c.speed:g}: {c.error or blockers[0]}")


def _bound(plan: dict[str, Any]) -> float | None:
    """The dirty rate's upper bound (MiB/s) the plan's text names (no wire key has it)."""
    text = str(plan.get("details") or "")
    found = re.search(r"at most ([0-9.]+) MiB/s|upper confidence bound, ([0-9.]+) MiB/s", text)
    return float(found.group(1) or found.group(2)) if found else None


def _pages(plan: dict[str, Any]) -> float | None:
    found = re.search(r"sampled from ([0-9]+) pages", str(plan.get("details") or ""))
    return float(found.group(1)) if found else None


def _mib(value: object) -> float | None:
    return float(value) / MIB if isinstance(value, int | float) else None


# --------------------------------------------------------------------------- 2. evacuation


EVAC_KINDS = ("idle", "idle", "dirty16", "dirty64")


@dataclass
class EvacRun:
    policy: str
    seconds: float = 0.0
    failures: int = 0
    entries: list[dict[str, Any]] = field(default_factory=list)
    plan_events: int = 0
    first_plan: dict[str, Any] = field(default_factory=dict)
    #: Per VM: (s from the task's publication, what happened), in order.
    trace: dict[str, list[tuple[float, str]]] = field(default_factory=dict)


async def evacuation_run(
    conns: RigConns, rig: Rig, to_a: Sched, guests: dict[str, Path], policy: str
) -> EvacRun:
    names = [await start_guest(conns, rig, kind, guests) for kind in EVAC_KINDS]
    run = EvacRun(policy)
    schedule = (
        "  schedule: predicted\n"
        if policy == "predicted"
        else "  schedule: placement\n  max-parallel: 2\n"
    )
    try:
        await asyncio.sleep(1.0)
        body = (
            f"task: evacuate node\ndestinations: [{rig.b.name}]\ntime-measurement: true\n"
            "parameter:\n  mode: auto\n  overbooking: true\n  migration-type: auto\n" + schedule
        )
        t0 = time.perf_counter()
        reply = await to_a.call(body, 900)
        run.seconds = time.perf_counter() - t0
        run.trace = evac_trace(to_a, reply.id, t0)
        run.entries = list(reply.doc.get("list") or [])
        run.failures = sum(e.get("status") != "success" for e in run.entries)
        plans = to_a.events_for(reply.id, "plan")
        run.plan_events = len(plans)
        if plans:
            run.first_plan = plans[0]
    finally:
        for kind, name in zip(EVAC_KINDS, names, strict=True):
            await remove_guest(conns, rig, kind, name)
    return run


def evac_trace(to_a: Sched, tid: str, t0: float) -> dict[str, list[tuple[float, str]]]:
    """Per VM kind+name: when each phase began and when it was done (event arrival times),
    and the transfer rate its progress events showed in each second (MiB/s, median)."""
    out: dict[str, list[tuple[float, str]]] = {}
    rates: dict[str, dict[int, list[float]]] = {}
    for t, e in to_a.timed_events_for(tid):
        vm = e.get("vm-name")
        what = e.get("event")
        if what == "phase":
            label = str(e.get("phase"))
        elif what == "done":
            label = f"done ({e.get('status')}, predicted {e.get('predicted-duration', '-')} s)"
        elif what == "progress" and e.get("action"):
            label = f"action {e.get('action')}"
        elif what == "progress" and vm is not None and e.get("transfer-rate") is not None:
            second = rates.setdefault(str(vm), {}).setdefault(int(t - t0), [])
            second.append(float(e["transfer-rate"]) / MIB)
            continue
        else:
            continue
        if vm is not None:
            steps = out.setdefault(str(vm), [])
            if not steps or steps[-1][1] != label or label.startswith("action tuned"):
                steps.append((t - t0, label))
    for vm, seconds in rates.items():
        shown = " ".join(f"{s}:{statistics.median(r):.0f}" for s, r in sorted(seconds.items()))
        out.setdefault(vm, []).append((0.0, f"MiB/s by second [{shown}]"))
    return out


def kind_of(e: dict[str, Any]) -> str:
    """The guest kind from a bench VM's name (``acc-<kind>-<hex>``)."""
    parts = str(e.get("vm-name", "?")).split("-")
    return parts[1] if len(parts) > 2 else "?"


def evac_entry(e: dict[str, Any]) -> str:
    kind = kind_of(e)
    how = e.get("mode") or e.get("code") or e.get("status")
    wave = "" if e.get("wave") is None else f"/w{e.get('wave')}"
    return f"{kind}:{how}{wave}"


async def bench_evacuation(port: int, rig: Rig, guests: dict[str, Path], plan: Plan) -> None:
    runs: list[EvacRun] = []
    async with (
        rig_conns(rig) as conns,
        shaped_link(rig, plan.evac_speed) as qdisc,
        agent_pair(port, rig) as (to_a, _),
    ):
        learned = await learning_migration(conns, rig, to_a, guests, LEARN_LIMIT)
        for i in range(plan.evac_rounds):
            order = ("predicted", "fixed") if i % 2 == 0 else ("fixed", "predicted")
            for policy in order:
                runs.append(await evacuation_run(conns, rig, to_a, guests, policy))
    rows = []
    for run in runs:
        modes = ", ".join(evac_entry(e) for e in run.entries)
        rows.append([run.policy, f"{run.seconds:.1f}", run.failures, run.plan_events, modes])
    table(
        f"2. evacuation of {', '.join(EVAC_KINDS)} from rig-a to rig-b at {plan.evac_speed:g}"
        " MiB/s (migration-type auto)",
        ["schedule", "makespan s", "failed", "plan events", "per VM (mode/wave)"],
        rows,
    )
    for run in runs:
        if run.first_plan.get("waves"):
            waves = " | ".join(
                ", ".join(
                    f"{kind_of(v)} {fmt(v.get('predicted-duration'), 1)} s"
                    for v in w.get("vms") or []
                )
                for w in run.first_plan["waves"]
            )
            print(f"  planned waves: {waves}; makespan {run.first_plan.get('makespan')} s")
    for run in runs:
        print(f"  trace of {run.policy} ({run.seconds:.1f} s):")
        for e in run.entries:
            tm = e.get("time-measurement") or {}
            shown = ", ".join(f"{k} {float(v):.2f}" for k, v in tm.items())
            print(f"    {kind_of(e):8} time-measurement: {shown}")
        for vm, steps in sorted(run.trace.items(), key=lambda kv: kv[1][0][0] if kv[1] else 0):
            line = ", ".join(f"{t:.1f} {label}" for t, label in steps)
            print(f"    {kind_of({'vm-name': vm}):8} {line}")
    for policy in ("predicted", "fixed"):
        mine = [r.seconds for r in runs if r.policy == policy]
        failed = sum(r.failures for r in runs if r.policy == policy)
        print(f"  {policy}: failed migrations {failed} over {len(mine)} runs")
        print(f"  {policy}: makespan median {statistics.median(mine):.1f} s over {len(mine)}")
    note(
        f"link: {qdisc}; learning migration: {learned}.\n"
        "predicted = schedule: predicted (waves from the agent's predictions); fixed =\n"
        "schedule: placement with max-parallel: 2 (KubeVirt's per-node default)."
    )


# --------------------------------------------------------------------------- running it


async def rig_sections(port: int, rig: Rig, guests: dict[str, Path], plan: Plan) -> None:
    if "accuracy" in plan.only:
        await timed_section("1. accuracy", lambda: bench_accuracy(port, rig, guests, plan))
    if "evacuation" in plan.only:
        await timed_section("2. evacuation", lambda: bench_evacuation(port, rig, guests, plan))


async def run_prediction_accuracy(port: int, plan: Plan) -> None:
    t_start = time.perf_counter()
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    main_thread = task is not None and threading.current_thread() is threading.main_thread()
    if main_thread:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)  # unwinds like Ctrl-C: tears down
    try:
        table("machine", ["fact", "value"], machine_facts())
        try:
            ensure_system()
            guests = await asyncio.to_thread(
                build_guests, cache_dir() / "guests", ("idle", "dirty16", "dirty64")
            )
        except (RigUnavailable, OSError, RuntimeError) as exc:
            print(f"\n!! rig unavailable, nothing measured: {exc}")
            return
        facts = [
            ["link speeds (MiB/s)", ", ".join(f"{s:g}" for s in plan.speeds)],
            ["completion timeout", f"{plan.timeout:g} s"],
        ]
        async with rig_session("predictionbench", facts) as rig:
            if rig.mode != "netns":
                print("\n!! the rig runs in loopback mode: its link cannot be shaped")
                return
            await rig_sections(port, rig, guests, plan)
    finally:
        if main_thread:
            loop.remove_signal_handler(signal.SIGTERM)
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"total {time.perf_counter() - t_start:.1f} s; load average (1/5/15 min) {load}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speeds", type=float, nargs="+", help="link speeds, MiB/s")
    p.add_argument("--timeout", type=float, default=0.0, help="completion timeout, s")
    p.add_argument("--evac-speed", type=float, default=32.0, help="evacuation link, MiB/s")
    p.add_argument("--only", nargs="+", choices=("accuracy", "evacuation"))
    p.add_argument(
        "--evac-rounds", type=int, default=0, help="evacuation rounds (each policy once a round)"
    )


def main() -> None:
    standalone(
        "prediction_accuracy",
        __doc__,
        "two link speeds, one learning run, one evacuation round each (~2.5 min; full ~5)",
        add_arguments,
        lambda port, args: run_prediction_accuracy(port, Plan.from_args(args)),
    )


if __name__ == "__main__":
    main()
