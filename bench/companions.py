"""Migration companions benchmarks: configured hooks, ``reduce-memory`` and ``swap-with``.

``python -m bench.companions [--quick] [--no-rig]`` (or ``python -m bench --companions``).
Figures are printed, not asserted. It starts its own mosquitto and runs the agents in this
process, as ``bench/rig_bench.py`` does; every agent figure is end to end as a scheduler sees
it: publish the task (QoS 2), wait for the result.

1. Hook overhead (``fake`` back-end): live migrations of a small idle guest back and forth
   between two fake agents, with no hooks, with a ``before-migrate`` and an ``after-migrate``
   command hook (``/bin/true``, argv form) and with one MQTT hook at both points answered by
   a responder client in this process. The link is fast and the time scale large, so the
   simulated migration takes well under a millisecond and the difference is the hooks.
2. ``reduce-memory`` (``fake``): an 8 GiB guest dirtying 200 MiB/s over a 1000 MiB/s link,
   with and without the built-in hook (``memory: 25%``): simulated migration time and the
   size of the copy.
2b. ``swap-with`` lane hold (``fake``): swaps back and forth with ``migration.swap-lock`` off
   and ``best-effort``: what holding VM 2's lane on the destination's agent costs a swap.
3. On the rig (real libvirtd + QEMU/TCG, ``tests/rig``; needs root; ``--no-rig`` skips it):
   a. ``swap-with`` of guest X on rig-a with guest Y on rig-b as one task (parallel) against
      the same exchange as two sequential ``migrate vm`` tasks, rounds interleaved; each
      exchange is undone by a swap before the next one;
   b. ``reduce-memory`` on the ``balloon`` guest: migration time with and without the hook
      and the balloon round trip, with the legs back to back and with a pause before each
      (libvirt's cached current memory follows QEMU's BALLOON_CHANGE event, sent at most once
      a second; the agent reads the live value, so both series should match). The rig guest's
      balloon driver is cooperative only (it reports the target, frees nothing), so the copy
      does not shrink there.

``--wait-for FILE`` waits (polling every 10 s, up to ``--wait-timeout`` s) until FILE exists
before taking the rig, for a session that uses the rig and announces its end with a file; the
rig section is skipped when it does not appear. The rig itself is taken under its lock, as
rig_bench does, and torn down on every exit path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import pct
from bench.rig_bench import (
    ROOT,
    Reply,
    RigConns,
    Sched,
    agent_pair,
    cache_dir,
    check,
    failed,
    fmt,
    med,
    migrate_body,
    note,
    prefix_of,
    ratio,
    rig_conns,
    rig_session,
    sched,
    standalone,
    table,
    timed_section,
)

# bench.rig_bench put tests/ and tests/real on the path; the MQTT hook responder is a broker test's.
if str(ROOT / "tests" / "broker") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests" / "broker"))

from test_userhooks_mqtt import reply, responder

import libvirt
from asyncmigfra.hypervisor.base import DomainState
from asyncmigfra.hypervisor.fake import FakeDomain
from asyncmigfra.settings import HookSettings, settings_from_text
from harness import agent_settings, running_agent
from rig import (
    Rig,
    RigUnavailable,
    build_guests,
    domain_xml,
    ensure_system,
    wait_counter_above,
)

MIB = 1024 * 1024
KIB_PER_GIB = 1024 * 1024
LIVE = {"migration-type": "live"}


def hooks(text: str) -> tuple[HookSettings, ...]:
    """``hooks:`` parsed exactly as from an agent's configuration file."""
    return settings_from_text("hooks:\n" + textwrap.indent(text, "  "), hostname="h").hooks


def tags(r: Reply) -> dict[str, float]:
    return {str(k): float(v) for k, v in (r.doc.get("time-measurement") or {}).items()}


def hook_seconds(r: Reply) -> float:
    """Every configured hook's time in this result (the ``hook-<name>`` tags together)."""
    return sum(v for k, v in tags(r).items() if k.startswith("hook-"))


def load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- fake agents


@dataclass
class FakePair:
    to_a: Sched
    to_b: Sched
    a: str
    b: str
    shared: dict[str, object]

    def leg(self, i: int) -> tuple[Sched, str]:
        """Even legs go A->B (sent to A), odd legs back B->A (sent to B)."""
        return (self.to_a, self.b) if i % 2 == 0 else (self.to_b, self.a)


@contextlib.asynccontextmanager
async def fake_pair(
    port: int,
    domains: list[dict[str, Any]],
    *,
    bandwidth: float,
    time_scale: float,
    configured: tuple[HookSettings, ...] = (),
    progress_interval: float = 0.5,
    migration: dict[str, Any] | None = None,
) -> AsyncIterator[FakePair]:
    """Two ``fake`` agents sharing one simulated cluster (as ``two_hosts`` in
    tests/broker/test_migrate_fake.py, but with a YAML-free scheduler client per agent: that
    one parses every message on the loop the agents run in), both with ``configured`` hooks."""
    run = uuid.uuid4().hex[:6]
    a, b = f"cb-a-{run}", f"cb-b-{run}"
    host = {"cpus": 64, "memory": 256 * KIB_PER_GIB}
    shared: dict[str, object] = {}

    def settings(me: str, other: str, doms: list[dict[str, Any]]) -> Any:
        options = {
            "host": me,
            "peers": {other: host},
            "domains": doms,
            "bandwidth": bandwidth,
            "time-scale": time_scale,
            **host,
        }
        return agent_settings(
            port,
            hostname=me,
            hv_type="fake",
            hv_options=options,
            hooks=configured,
            agent={"progress_interval": progress_interval},
            migration=migration or {},
        )

    sa, sb = settings(a, b, domains), settings(b, a, [])
    async with (
        sched(port, prefix_of(sa)) as to_a,
        sched(port, prefix_of(sb)) as to_b,
        running_agent(sa, shared=shared),
        running_agent(sb, shared=shared),
    ):
        yield FakePair(to_a, to_b, a, b, shared)


def fake_guest(name: str, mib: int, dirty: float = 0) -> dict[str, Any]:
    return {"name": name, "vcpus": 1, "memory": mib * 1024, "state": "running", "dirty-rate": dirty}


# --------------------------------------------------------------------------- 2b. swap lane hold


async def bench_swap_lock(port: int, n: int, warmup: int = 4) -> None:
    """What holding VM 2's lane on the destination's agent costs a swap: swaps back and forth
    between two fake agents (1 GiB guests; fast link and time scale as in section 1, so the
    simulated migrations take well under a millisecond), with ``migration.swap-lock`` off
    and on."""
    rows = []
    for mode in ("off", "best-effort"):
        run = uuid.uuid4().hex[:6]
        x, y = f"lx-{run}", f"ly-{run}"
        async with fake_pair(
            port,
            [fake_guest(x, 1024)],
            bandwidth=100_000,
            time_scale=1000.0,
            migration={"swap_lock": mode},
        ) as pair:
            cluster: Any = pair.shared["fake-cluster"]
            cluster.hosts[pair.b].domains[y] = FakeDomain(
                name=y, state=DomainState.RUNNING, vcpus=1, memory=KIB_PER_GIB
            )
            wall: list[float] = []
            held: list[float] = []
            for i in range(warmup + n):
                to, dest = pair.leg(i)  # X goes there and Y comes back, every time
                r = await to.call(swap_body(x, dest, y), 60)
                swapped(r, f"swap ({mode})")
                if i >= warmup:
                    wall.append(r.ms)
                    held.append(tags(r).get("peer-lane", 0.0) * 1000)
        rows.append([mode, n, fmt(med(wall), 2), fmt(med(held), 2), fmt(max(held), 2)])
    table(
        f"2b. swap-with lane hold on the fake: {n} swaps back and forth per mode",
        ["migration.swap-lock", "swaps", "swap task p50 ms", "peer-lane tag p50 ms", "max ms"],
        rows,
    )
    note(
        "swap task = publish -> result of one swap task between two in-process fake agents on\n"
        "one mosquitto. peer-lane = the hold's round trip to the destination's agent (its\n"
        "time-measurement tag); the release at the end is not waited for."
    )


# --------------------------------------------------------------------------- 1. hook overhead


@dataclass
class HookVariant:
    label: str
    runs: int  # hook runs per migration
    configured: tuple[HookSettings, ...]
    ms: list[float] = field(default_factory=list)
    hook_ms: list[float] = field(default_factory=list)
    overall_ms: list[float] = field(default_factory=list)


async def bench_hook_overhead(port: int, n: int, warmup: int = 4) -> None:
    run = uuid.uuid4().hex[:6]
    topic = f"cbhook-{run}"
    variants = [
        HookVariant("none", 0, ()),
        HookVariant(
            "2 command hooks (/bin/true)",
            2,
            hooks(
                "- name: pre\n  when: [before-migrate]\n  command: [/bin/true]\n"
                "- name: post\n  when: [after-migrate]\n  command: [/bin/true]\n"
            ),
        ),
        HookVariant(
            "1 MQTT hook at both points",
            2,
            hooks(
                "- name: notify\n  when: [before-migrate, after-migrate]\n  timeout: 10\n"
                f"  mqtt:\n    request-topic: {topic}/<host>/request\n"
                f"    response-topic: {topic}/response\n"
            ),
        ),
    ]
    bandwidth, scale = 100_000, 1000.0
    async with contextlib.AsyncExitStack() as stack:
        dcim = await stack.enter_async_context(
            responder(port, f"{topic}/+/request", f"{topic}/response", reply("success"))
        )
        pairs = [
            await stack.enter_async_context(
                fake_pair(
                    port,
                    [fake_guest("g", 512)],
                    bandwidth=bandwidth,
                    time_scale=scale,
                    configured=v.configured,
                )
            )
            for v in variants
        ]
        for i in range(warmup + n):
            # Rotate which variant goes first; every pair moves its guest once per round.
            for k in range(len(variants)):
                j = (i + k) % len(variants)
                v, pair = variants[j], pairs[j]
                to, dest = pair.leg(i)
                r = await to.call(migrate_body("g", dest, **LIVE), 30)
                check(r, f"hook overhead, {v.label}")
                if i >= warmup:
                    v.ms.append(r.ms)
                    v.hook_ms.append(hook_seconds(r) * 1000)
                    if "overall" in tags(r):
                        v.overall_ms.append(tags(r)["overall"] * 1000)
        answered = len(dcim.requests)
    base = med(variants[0].ms) or 0.0
    rows = []
    for v in variants:
        p50 = med(v.ms) or 0.0
        rows.append(
            [
                v.label,
                v.runs,
                len(v.ms),
                fmt(p50, 2),
                fmt(pct(v.ms, 0.9), 2),
                fmt(med(v.overall_ms), 2),
                fmt(p50 - base, 2) if v.runs else "-",
                fmt((p50 - base) / v.runs, 2) if v.runs else "-",
                fmt((med(v.hook_ms) or 0) / v.runs, 2) if v.runs else "-",
            ]
        )
    table(
        f"1. hook overhead: live migrations of a 512 MiB idle guest between two fake agents, "
        f"back and forth ({n} per variant, rounds interleaved; link {bandwidth} MiB/s, "
        f"time-scale {scale:g})",
        [
            "hooks",
            "runs/migration",
            "n",
            "p50 ms",
            "p90 ms",
            "in-agent overall p50 ms",
            "+p50 ms",
            "+ms per hook run",
            "hook tag p50 ms/run",
        ],
        rows,
    )
    note(
        "p50/p90 = per migration, publish task -> result. +p50 = p50 minus the no-hook p50;\n"
        "per hook run = that / runs per migration. hook tag = the result's hook-<name> tags\n"
        "(the hook's own time inside the agent: fork+exec+wait of /bin/true, or the MQTT\n"
        "subscribe, request and answer) per run. The MQTT hook's responder answered "
        f"{answered} requests.\n"
        f"load average now {load()} (1/5/15 min) on {os.cpu_count()} cores."
    )


# --------------------------------------------------------------------------- 2. reduce-memory


@dataclass
class ReduceLeg:
    e2e_s: float
    sim_s: float
    downtime_ms: float | None
    total_mib: float | None
    iterations: int
    hook_ms: float | None


def reduce_leg(to: Sched, r: Reply, scale: float) -> ReduceLeg:
    tm = tags(r)
    progress = to.events_for(r.id, "progress")
    totals = [float(e["memory-total"]) for e in progress if "memory-total" in e]
    return ReduceLeg(
        e2e_s=r.ms / 1000,
        sim_s=tm.get("migrate", 0.0) * scale,
        downtime_ms=tm["downtime"] * 1000 if "downtime" in tm else None,
        total_mib=max(totals) / MIB if totals else None,
        iterations=max((int(e.get("iteration") or 0) for e in progress), default=0),
        hook_ms=tm["hook-shrink"] * 1000 if "hook-shrink" in tm else None,
    )


async def bench_reduce_fake(port: int, rounds: int) -> None:
    bandwidth, dirty, scale = 1000, 200, 10.0
    configs = {
        "without": (),
        "with reduce-memory 25%": hooks(
            "- name: shrink\n  builtin: reduce-memory\n  memory: 25%\n"
        ),
    }
    legs: dict[str, list[ReduceLeg]] = {label: [] for label in configs}
    async with contextlib.AsyncExitStack() as stack:
        pairs = {
            label: await stack.enter_async_context(
                fake_pair(
                    port,
                    [fake_guest("big", 8192, dirty)],
                    bandwidth=bandwidth,
                    time_scale=scale,
                    configured=configured,
                    progress_interval=0.05,
                )
            )
            for label, configured in configs.items()
        }
        labels = list(configs)
        for i in range(rounds):
            for label in labels if i % 2 == 0 else labels[::-1]:
                pair = pairs[label]
                for leg in (0, 1):  # A->B, then back
                    to, dest = pair.leg(leg)
                    r = await to.call(migrate_body("big", dest, **LIVE), 120)
                    check(r, f"reduce-memory on the fake, {label}")
                    legs[label].append(reduce_leg(to, r, scale))
    rows = []
    for label, series in legs.items():

        def col(
            get: Callable[[ReduceLeg], float | None], series: list[ReduceLeg] = series
        ) -> list[float]:
            return [x for x in map(get, series) if x is not None]

        rows.append(
            [
                label,
                len(series),
                fmt(med(col(lambda x: x.sim_s)), 2),
                fmt(med(col(lambda x: x.e2e_s)), 3),
                fmt(med(col(lambda x: x.total_mib)), 0),
                fmt(med(col(lambda x: float(x.iterations))), 0),
                fmt(med(col(lambda x: x.downtime_ms)), 0),
                fmt(med(col(lambda x: x.hook_ms)), 2),
            ]
        )
    table(
        f"2. reduce-memory on the fake: 8 GiB guest dirtying {dirty} MiB/s, link {bandwidth} "
        f"MiB/s, time-scale {scale:g}, {rounds} rounds of A->B->A (per leg)",
        [
            "hook",
            "legs",
            "simulated migration p50 s",
            "real end-to-end p50 s",
            "memory-total MiB",
            "passes",
            "downtime p50 ms",
            "hook-shrink p50 ms",
        ],
        rows,
    )
    note(
        "simulated migration = the result's 'migrate' tag x time-scale (the job, setup included;\n"
        "the agent's real overhead is scaled up with it). memory-total = what the copy moves\n"
        "(progress events). downtime = the simulated switchover downtime. hook-shrink = the\n"
        "hook's two runs (balloon down and wait; memory back on the destination), real ms.\n"
        "The fake skips ballooned pages by construction: its copy is the balloon's size. QEMU\n"
        "does skip the pages a real balloon driver freed; the rig guest's balloon driver is\n"
        "cooperative only (it reports the target, frees nothing), so the rig cannot show the\n"
        "copy shrinking (section 3b)."
    )


# --------------------------------------------------------------------------- 3. the rig


def swap_body(vm: str, dest: str, partner: str) -> str:
    return migrate_body(vm, dest, **LIVE) + f"  swap-with:\n    vm-name: {partner}\n"


def swapped(r: Reply, what: str) -> dict[str, Any]:
    e = check(r, what)
    half = e.get("swap-with") or {}
    if half.get("status") != "success":
        raise RuntimeError(f"{what}: partner {half.get('code')}: {half.get('details')}")
    return e


@dataclass
class SwapFigures:
    swap_s: list[float] = field(default_factory=list)
    seq_s: list[float] = field(default_factory=list)
    orders: list[str] = field(default_factory=list)
    halves: dict[str, list[float]] = field(default_factory=dict)
    seq_legs: dict[str, list[float]] = field(default_factory=dict)
    reset_s: list[float] = field(default_factory=list)


async def swap_rounds(
    rig: Rig, to_a: Sched, to_b: Sched, x: str, y: str, rounds: int
) -> SwapFigures:
    """X runs on A and Y on B. Each round: the exchange as one swap task and as two
    sequential migrate tasks (order flipping every round), each undone by a swap from B."""
    figs = SwapFigures()

    async def reset() -> None:
        r = await to_b.call(swap_body(x, rig.a.name, y), 300)
        swapped(r, "swap back")
        figs.reset_s.append(r.ms / 1000)

    async def as_swap(record: bool) -> None:
        r = await to_a.call(swap_body(x, rig.b.name, y), 300)
        e = swapped(r, "swap-with")
        if record:
            figs.swap_s.append(r.ms / 1000)
            figs.orders.append(str(e["swap-with"].get("order")))
            tm = tags(r)
            for vm in (x, y):
                if f"migrate-{vm}" in tm:
                    figs.halves.setdefault(vm, []).append(tm[f"migrate-{vm}"])
        await reset()

    async def as_two_tasks(record: bool) -> None:
        t0 = time.perf_counter()
        rx = await to_a.call(migrate_body(x, rig.b.name, **LIVE), 300)
        check(rx, f"migrate {x} A->B")
        ry = await to_b.call(migrate_body(y, rig.a.name, **LIVE), 300)
        check(ry, f"migrate {y} B->A")
        if record:
            figs.seq_s.append(time.perf_counter() - t0)
            figs.seq_legs.setdefault(x, []).append(rx.ms / 1000)
            figs.seq_legs.setdefault(y, []).append(ry.ms / 1000)
        await reset()

    await as_swap(False)  # warm-up: each QEMU's first migration, connections
    await as_two_tasks(False)
    figs.reset_s.clear()
    for i in range(rounds):
        for step in (as_swap, as_two_tasks) if i % 2 == 0 else (as_two_tasks, as_swap):
            await step(True)
    return figs


async def bench_swap(
    rig: Rig,
    conns: RigConns,
    to_a: Sched,
    to_b: Sched,
    guests: dict[str, Path],
    variants: Sequence[str],
    rounds: int,
) -> None:
    rows = []
    for variant in variants:
        run = uuid.uuid4().hex[:6]
        x, y = f"bench-swx-{variant}-{run}", f"bench-swy-{variant}-{run}"
        figs = SwapFigures()
        try:
            await asyncio.gather(
                asyncio.to_thread(conns.start_guest, rig.a, x, guests[variant]),
                asyncio.to_thread(conns.start_guest, rig.b, y, guests[variant]),
            )
            figs = await swap_rounds(rig, to_a, to_b, x, y, rounds)
        except Exception as exc:
            failed(f"3a. swap-with ({variant})", exc)
        finally:
            await asyncio.gather(
                asyncio.to_thread(conns.remove_everywhere, x),
                asyncio.to_thread(conns.remove_everywhere, y),
            )
        orders = sorted(set(figs.orders))
        rows.append(
            [
                f"{variant} + {variant}",
                len(figs.swap_s),
                fmt(med(figs.swap_s), 3),
                fmt(med(figs.seq_s), 3),
                ratio(med(figs.swap_s), med(figs.seq_s)),
                "/".join(fmt(med(figs.halves.get(vm, [])), 3) for vm in (x, y)),
                "/".join(fmt(med(figs.seq_legs.get(vm, [])), 3) for vm in (x, y)),
                fmt(med(figs.reset_s), 3),
                ",".join(orders) or "-",
            ]
        )
    table(
        f"3a. swap-with on the rig: guest X on rig-a <-> guest Y on rig-b (128 MiB, live), "
        f"{rounds} interleaved rounds",
        [
            "guests X + Y",
            "rounds",
            "one swap task p50 s",
            "two sequential tasks p50 s",
            "ratio",
            "swap halves X/Y p50 s",
            "sequential legs X/Y p50 s",
            "swap back p50 s",
            "order",
        ],
        rows,
    )
    note(
        "one swap task = 'migrate vm' X to rig-b with swap-with Y, sent to rig-a's agent,\n"
        "publish -> result. two sequential tasks = 'migrate vm' X A->B, then on its result\n"
        "'migrate vm' Y B->A (sent to rig-b's agent): wall time from the first publish to the\n"
        "second result. swap halves = the swap's migrate-<vm> tags (each half's job);\n"
        "sequential legs = each task's publish -> result. swap back = the untimed reset after\n"
        "every exchange (a swap sent to rig-b). One warm-up round of each is not counted.\n"
        f"TCG guests: the parallel halves share {os.cpu_count()} cores with 4 QEMUs."
    )


@dataclass
class BalloonLeg:
    e2e_s: float
    migrate_s: float | None
    downtime_ms: float | None
    hook_ms: float | None
    shrink_ms: float | None
    total_mib: float | None
    details: str | None


def phase_gap_ms(to: Sched, tid: str, phase: str) -> float | None:
    """ms from the first ``phase`` event of task ``tid`` to the phase event after it."""
    events = to.events_for(tid, "phase")
    for k, e in enumerate(events[:-1]):
        if e.get("phase") == phase:
            t0 = datetime.fromisoformat(str(e["time"]).replace("Z", "+00:00"))
            t1 = datetime.fromisoformat(str(events[k + 1]["time"]).replace("Z", "+00:00"))
            return (t1 - t0).total_seconds() * 1000
    return None


#: s before each leg of the settled reduce-memory series on the rig: QEMU sends at most one
#: BALLOON_CHANGE event a second per guest (libvirt's cached current memory follows it; the
#: agent reads the live balloon value instead, which this series checks).
SETTLE = 1.2


def minmax(values: Sequence[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}" if values else "-"


async def bench_reduce_rig(
    port: int, rig: Rig, conns: RigConns, plain: tuple[Sched, Sched], kernel: Path, rounds: int
) -> None:
    config = hooks("- name: shrink\n  builtin: reduce-memory\n  memory: 25%\n")
    name = f"bench-balloon-{uuid.uuid4().hex[:6]}"
    back_to_back = "with reduce-memory 25%, legs back to back"
    settled = f"with reduce-memory 25%, {SETTLE:g} s pause before each leg"
    legs: dict[str, list[BalloonLeg]] = {"without": [], back_to_back: [], settled: []}

    def start() -> None:
        dom = conns.ctl[rig.a.name].defineXML(domain_xml(name, kernel, 128, balloon=True))
        dom.create()
        wait_counter_above(dom, 0)

    try:
        await asyncio.to_thread(start)
        async with agent_pair(port, rig, hooks=config) as (h_a, h_b):
            sets = {"without": plain, back_to_back: (h_a, h_b), settled: (h_a, h_b)}

            async def trip(label: str, record: bool) -> None:
                to_a, to_b = sets[label]
                for to, dest in ((to_a, rig.b), (to_b, rig.a)):
                    if label == settled:
                        await asyncio.sleep(SETTLE)  # past QEMU's BALLOON_CHANGE throttle
                    r = await to.call(migrate_body(name, dest.name, **LIVE), 120)
                    e = check(r, f"reduce-memory on the rig, {label}")
                    if not record:
                        continue
                    tm = tags(r)
                    completed = [
                        ev for ev in to.events_for(r.id, "progress") if "memory-total" in ev
                    ]
                    legs[label].append(
                        BalloonLeg(
                            e2e_s=r.ms / 1000,
                            migrate_s=tm.get("migrate"),
                            downtime_ms=tm["downtime"] * 1000 if "downtime" in tm else None,
                            hook_ms=tm["hook-shrink"] * 1000 if "hook-shrink" in tm else None,
                            shrink_ms=phase_gap_ms(to, r.id, "hook:shrink"),
                            total_mib=float(completed[-1]["memory-total"]) / MIB
                            if completed
                            else None,
                            details=e.get("details"),
                        )
                    )

            labels = list(sets)
            for label in labels:  # warm-up
                await trip(label, False)
            for i in range(rounds):
                for k in range(len(labels)):  # rotate which series goes first
                    await trip(labels[(i + k) % len(labels)], True)
    finally:
        await asyncio.to_thread(conns.remove_everywhere, name)
    rows = []
    warnings = []
    for label, series in legs.items():

        def col(
            get: Callable[[BalloonLeg], float | None], series: list[BalloonLeg] = series
        ) -> list[float]:
            return [x for x in map(get, series) if x is not None]

        warnings += [x.details for x in series if x.details]
        rows.append(
            [
                label,
                len(series),
                fmt(med(col(lambda x: x.e2e_s)), 3),
                fmt(med(col(lambda x: x.migrate_s)), 3),
                fmt(med(col(lambda x: x.downtime_ms)), 0),
                fmt(med(col(lambda x: x.total_mib)), 0),
                fmt(med(col(lambda x: x.shrink_ms)), 0),
                minmax(col(lambda x: x.shrink_ms)),
                fmt(med(col(lambda x: x.hook_ms)), 0),
            ]
        )
    table(
        f"3b. reduce-memory on the rig: 'balloon' guest (128 MiB, virtio balloon), live, "
        f"{rounds} interleaved rounds of A->B->A (per leg)",
        [
            "hook",
            "legs",
            "end-to-end p50 s",
            "migrate p50 s",
            "downtime p50 ms",
            "memory-total MiB",
            "balloon down p50 ms",
            "balloon down min-max ms",
            "hook-shrink p50 ms",
        ],
        rows,
    )
    note(
        "migrate = the result's 'migrate' tag (the job). balloon down = from the 'hook:shrink'\n"
        "phase event to the next phase event (set the balloon, wait until the guest reports\n"
        "it; the agent looks every 0.1 s). hook-shrink = the tag: both runs together (down and\n"
        "wait; memory back on the destination, not waited for). memory-total = the copy's\n"
        "size as QEMU reports it: the rig guest's balloon frees nothing, so it stays 128 MiB.\n"
        "The guest answers within a pass (ms). The agent reads QEMU's live balloon value\n"
        "(memoryStats 'actual'), not libvirt's current memory, which follows QEMU's\n"
        "BALLOON_CHANGE event (at most one a second per guest): back to back, a shrink comes\n"
        "within 1 s of the memory given back at the end of the previous leg and would\n"
        "otherwise be seen only when that second is over. The paused series waits "
        f"{SETTLE:g} s before each leg (not timed).\n"
        + (f"warnings in results: {sorted(set(warnings))}" if warnings else "no warnings.")
    )


async def wait_for_file(path: Path, limit: float, poll: float = 10.0) -> bool:
    """Whether ``path`` exists, looking every ``poll`` s for up to ``limit`` s."""
    deadline = time.monotonic() + limit
    if await asyncio.to_thread(path.exists):
        return True
    print(
        f"\n(waiting for {path} before taking the rig: polling every {poll:.0f} s, "
        f"up to {limit:.0f} s)",
        flush=True,
    )
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(poll)
        if await asyncio.to_thread(path.exists):
            print(f"({path} appeared after {time.monotonic() - t0:.0f} s)", flush=True)
            return True
        print(f"(still waiting for {path}: {time.monotonic() - t0:.0f} s)", flush=True)
    return False


async def run_rig(port: int, plan: Plan) -> None:
    if plan.wait_for is not None and not await wait_for_file(plan.wait_for, plan.wait_timeout):
        print(
            f"\n!! {plan.wait_for} did not appear within {plan.wait_timeout:.0f} s: "
            "rig section skipped"
        )
        return
    try:
        ensure_system()
        guests = await asyncio.to_thread(
            build_guests, cache_dir() / "guests", ("idle", "dirty16", "balloon")
        )
    except (RigUnavailable, OSError, RuntimeError) as exc:
        print(f"\n!! rig unavailable, rig section skipped: {exc}")
        return
    async with rig_session("companions", [["load average", load()]]) as rig:
        await rig_sections(port, rig, guests, plan)


async def rig_sections(port: int, rig: Rig, guests: dict[str, Path], plan: Plan) -> None:
    async with rig_conns(rig) as conns, agent_pair(port, rig) as (to_a, to_b):
        await timed_section(
            "3a. swap-with",
            lambda: bench_swap(
                rig, conns, to_a, to_b, guests, plan.swap_variants, plan.swap_rounds
            ),
        )
        await timed_section(
            "3b. reduce-memory on the rig",
            lambda: bench_reduce_rig(
                port, rig, conns, (to_a, to_b), guests["balloon"], plan.balloon_rounds
            ),
        )


# --------------------------------------------------------------------------- running it


@dataclass
class Plan:
    quick: bool
    rig: bool
    hook_migrations: int
    reduce_rounds: int
    swap_rounds: int
    swap_variants: tuple[str, ...]
    balloon_rounds: int
    wait_for: Path | None = None
    wait_timeout: float = 1200.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = bool(args.quick)
        wait_for = getattr(args, "wait_for", None)
        return cls(
            quick=quick,
            rig=not getattr(args, "no_rig", False),
            hook_migrations=10 if quick else 40,
            reduce_rounds=3 if quick else 5,
            swap_rounds=2 if quick else 5,
            swap_variants=("idle",) if quick else ("idle", "dirty16"),
            balloon_rounds=2 if quick else 5,
            wait_for=Path(wait_for) if wait_for else None,
            wait_timeout=float(getattr(args, "wait_timeout", 1200.0)),
        )


async def run_companions(port: int, plan: Plan) -> None:
    """Everything, on mosquitto at 127.0.0.1:``port``; the rig is up only inside section 3."""
    t_start = time.perf_counter()
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    main_thread = task is not None and threading.current_thread() is threading.main_thread()
    if main_thread:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)  # unwinds like Ctrl-C: tears down
    lv = libvirt.getVersion()
    try:
        table(
            "machine",
            ["fact", "value"],
            [
                ["command", " ".join(sys.orig_argv)],
                ["nproc", os.cpu_count()],
                ["load average at start", load()],
                ["python", sys.version.split()[0]],
                ["libvirt (library)", f"{lv // 1_000_000}.{lv // 1000 % 1000}.{lv % 1000}"],
            ],
        )
        for label, step in (
            ("1. hook overhead", lambda: bench_hook_overhead(port, plan.hook_migrations)),
            ("2. reduce-memory on the fake", lambda: bench_reduce_fake(port, plan.reduce_rounds)),
            ("2b. swap lane hold", lambda: bench_swap_lock(port, plan.hook_migrations)),
        ):
            await timed_section(label, step)
        if plan.rig:
            await run_rig(port, plan)
    finally:
        if main_thread:
            loop.remove_signal_handler(signal.SIGTERM)
        print(f"total {time.perf_counter() - t_start:.1f} s; load average (1/5/15 min) {load()}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-rig", action="store_true", help="skip section 3 (the rig)")
    p.add_argument(
        "--wait-for",
        metavar="FILE",
        help="before taking the rig, wait until FILE exists (polled every 10 s)",
    )
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=1200.0,
        help="s to wait for --wait-for's file; the rig section is skipped after (default 1200)",
    )


def main() -> None:
    standalone(
        "companions",
        __doc__,
        "fewer migrations and rounds",
        add_arguments,
        lambda port, args: run_companions(port, Plan.from_args(args)),
    )


if __name__ == "__main__":
    main()
