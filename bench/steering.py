"""Steering a running migration on the rig (issue 17 item 6): stall detection, tune, compression.

``python -m bench.steering [--quick] [--rounds N] [--only 1 2 3]`` (or ``python -m bench
--steering``). Figures are printed, not asserted. It starts its own mosquitto, brings the
project's two-host rig up (``tests/rig``; it takes the rig lock, waiting up to 15 minutes while
another session uses the rig) and runs one agent per rig host in this process with the
``libvirt`` back-end, configured as ``tests/real/agents.py`` configures them (the agents' default
``progress-interval``, 0.5 s, unless ``--progress-interval``). Everything goes through MQTT as a
scheduler sees it; times are taken on this process's clock when a message is published and when
its answer (a result, or an event) arrives. Guests: ``dirty16``, 128 MiB, TCG.

1. Time to detect a stalled migration: a ``live`` migration capped at 4 MiB/s with
   ``progress-timeout: 5``; once its second memory pass started, the rig's veth is taken down
   in rig-a's namespace (the TCP connection stays, nothing moves: what the progress timeout is
   for). Link down -> the ``action: abort`` progress event (``reason: progress-timeout``) and
   -> the result (which waits for the source libvirtd to finish the aborted job: its peer
   connection over the dead link has to give up). The link comes back after the result and
   the round waits until the VM is settled (active and persistent on rig-a only). The default
   completion timeout that the progress timeout replaces as a stall detector is computed with
   the agent's own planning code, not waited for.
2. Time from a tune to its effect: a ``live`` migration capped at 2 MiB/s (``max-downtime:
   300``), tuned to unlimited (``task: tune migration``, ``bandwidth: 0``) 2 s into its first
   pass: publish -> the ``tuned`` result, -> the first progress event whose transfer-rate
   exceeds 4x the old cap, -> the migration's result. 2'. the same for ``max-downtime``: a
   ``live`` migration capped at 8 MiB/s without a ``max-downtime`` (QEMU's 300 ms target,
   which the agent then never changes; dirty16 leaves ~2 s of data per pass at that rate) is
   tuned to ``max-downtime: 5000`` in its third pass.
3. ``compression: [xbzrle]`` against none, at a bandwidth cap (default 8 MiB/s: without
   compression the copy takes several seconds there and QEMU estimates a downtime of ~2 s,
   so it does not switch over at its default 300 ms target, see 2') with a raised
   ``max-downtime`` (default 3000 ms), rounds interleaved: time, passes, downtime and bytes
   (libvirt's completed-job statistics on the destination, and what rig-a sent on the veth).
   ``zlib``/``zstd``: one task each, whose refusal (libvirt < 9.4) is printed.

The agents log at ``error`` level here: the progress timeout's warning is what section 1
provokes.

Everything is torn down on every exit path: the link is brought back up, guests after each
section, the agents, the rig (also from ``atexit`` and, if this process is SIGKILLed, by the
rig's guard process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import libvirt
from asyncmigfra.logs import configure_logging
from asyncmigfra.migration.plan import plan_migration
from asyncmigfra.model import MigrateSpec
from asyncmigfra.settings import LoggingSettings, default_settings
from asyncmigfra.transport.mqtt import ToolClient
from asyncmigfra.wire.parsing import parse_task
from bench.rig_bench import (
    MIB,
    RigConns,
    Sched,
    cache_dir,
    fmt,
    machine_facts,
    med,
    migrate_body,
    note,
    prefix_of,
    ratio,
    rig_conns,
    rig_session,
    scheduler_of,
    standalone,
    table,
    timed_section,
)
from bench.storage import sent_bytes

# bench.rig_bench put tests/ and tests/real on the path.
from agents import rig_agent_settings  # isort: skip
from harness import running_agent  # isort: skip
from rig import (  # isort: skip
    VARIANTS,
    Rig,
    RigUnavailable,
    build_guests,
    ensure_system,
    read_state,
    wait_counter_above,
)
from rig.hosts import VETH  # isort: skip

#: s to wait for the rig lock (another session's rig tests or benchmarks).
LOCK_WAIT = 900.0
GIB = 1024 * MIB
MEMORY_MIB = 128
#: Section 1: the cap (MiB/s) and the progress timeout (s).
STALL_CAP = 4
PROGRESS_TIMEOUT = 5
#: Section 2: the cap before the tune (MiB/s); an event above FACTOR x it shows the effect.
TUNE_CAP = 2
FACTOR = 4
#: Section 2': the cap (MiB/s) and the downtime target the tune sets (ms).
DOWNTIME_CAP = 8
DOWNTIME_TUNED = 5000
#: s a VM may take to settle on rig-a after a round of section 1 (libvirt finishes the
#: aborted job when its peer connection gives up, about 30 s).
SETTLE_LIMIT = 90.0


# --------------------------------------------------------------------------- a timed scheduler


class TimedSched(Sched):
    """:class:`bench.rig_bench.Sched` that also keeps when each event arrived."""

    def __init__(self, tool: ToolClient, prefix: str) -> None:
        super().__init__(tool, prefix)
        #: perf_counter at arrival, one per entry of ``events``
        self.arrived: list[float] = []

    async def pump(self) -> None:
        async for msg in self.tool.messages():
            now = time.perf_counter()
            if msg.topic.endswith("/event"):
                self.events.append(msg.payload)
                self.arrived.append(now)
                if b"event: progress" in msg.payload:
                    self.progress += 1
            elif msg.topic.endswith("/result"):
                text = msg.payload.decode()
                idx = text.rfind("\nid: ")
                if idx < 0:
                    continue
                tid = text[idx + 5 :].split("\n", 1)[0].strip().strip('"')
                fut = self.waiters.pop(tid, None)
                if fut is not None and not fut.done():
                    fut.set_result((now, msg.payload))

    def timed(self, tid: str, kind: str = "progress") -> list[tuple[float, dict[str, Any]]]:
        """(arrival, event) of task ``tid``'s events of ``kind``, in arrival order."""
        self.events_for(tid)  # parses what arrived so far
        return [
            (t, e)
            for t, e in zip(self.arrived, self._parsed, strict=False)
            if str(e.get("id")) == tid and e.get("event") == kind
        ]


def timed_sched(port: int, prefix: str) -> contextlib.AbstractAsyncContextManager[TimedSched]:
    return scheduler_of(port, prefix, TimedSched)


@contextlib.asynccontextmanager
async def agents(port: int, rig: Rig, interval: float) -> AsyncIterator[TimedSched]:
    """One agent per rig host (the rig tests' configuration, ``progress-interval``
    ``interval``); a scheduler client for rig-a's, which starts every migration."""
    run = uuid.uuid4().hex[:6]
    sections = {"agent": {"progress_interval": interval}}
    sa = rig_agent_settings(port, rig, rig.a, run=run, **sections)
    sb = rig_agent_settings(port, rig, rig.b, run=run, **sections)
    async with timed_sched(port, prefix_of(sa)) as to_a, running_agent(sa), running_agent(sb):
        yield to_a


async def until(what: str, probe: Callable[[], Any], limit: float) -> Any:
    """Poll ``probe`` (cheap, on the loop) until it returns something true; its value."""
    deadline = time.monotonic() + limit
    while not (got := probe()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {limit:.0f} s")
        await asyncio.sleep(0.02)
    return got


async def result_of(
    fut: asyncio.Future[tuple[float, bytes]], limit: float
) -> tuple[float, dict[str, Any]]:
    t, payload = await asyncio.wait_for(fut, limit)
    return t, yaml.safe_load(payload) or {}


def in_pass(s: TimedSched, tid: str, n: int) -> Callable[[], bool]:
    return lambda: any(int(e.get("iteration") or 0) >= n for _, e in s.timed(tid))


def processed(e: dict[str, Any]) -> int:
    return int(e.get("memory-processed") or 0) + int(e.get("disk-processed") or 0)


def mib(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value / MIB:.{digits}f}"


def link(rig: Rig, state: str) -> None:
    assert rig.a.netns is not None
    subprocess.run(["ip", "-n", rig.a.netns, "link", "set", VETH, state], check=True)


def where(conns: RigConns, name: str) -> dict[str, tuple[bool, bool]]:
    """host -> (active, persistent) for every rig host that knows the domain."""
    out = {}
    for host, conn in conns.ctl.items():
        with contextlib.suppress(libvirt.libvirtError):
            dom = conn.lookupByName(name)
            out[host] = (bool(dom.isActive()), bool(dom.isPersistent()))
    return out


def completed_stats(conns: RigConns, host: str, name: str) -> dict[str, Any]:
    with contextlib.suppress(libvirt.libvirtError):
        dom = conns.ctl[host].lookupByName(name)
        return dict(dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED))
    return {}


def default_limits(memory_mib: int) -> tuple[float, float]:
    """(completion timeout, progress timeout) in s that the agent's defaults give a
    ``live`` migration of a guest of ``memory_mib`` MiB without a storage copy: the task
    parsed and planned by the agent's own code."""
    body = f"id: limits\n{migrate_body('vm', 'elsewhere', **{'migration-type': 'live'})}"
    spec = parse_task(body.encode()).subtasks[0]
    assert isinstance(spec, MigrateSpec), spec
    settings = default_settings(hostname="bench")
    plan = plan_migration(
        spec,
        defaults=settings.migration,
        driver=settings.hypervisor.driver,
        transport=settings.hypervisor.transport,
        memory_kib=memory_mib * 1024,
    )
    return plan.completion_timeout, plan.progress_timeout


# --------------------------------------------------------------------------- 1. stall detection


@dataclass
class StallRound:
    to_abort: float
    to_result: float
    #: link down -> the last progress event whose bytes processed had grown
    moved_after: float
    #: the abort event's ``elapsed`` (s since the job started)
    elapsed: float | None
    #: link up -> active and persistent on rig-a only
    settle: float
    outcome: str
    reason: str
    details: str


async def stall_round(rig: Rig, conns: RigConns, s: TimedSched, name: str) -> StallRound:
    params = {
        "migration-type": "live",
        "bandwidth": STALL_CAP,
        "progress-timeout": PROGRESS_TIMEOUT,
    }
    tid, _, fut = await s.send(migrate_body(name, rig.b.name, **params))
    try:
        await until("the second pass", in_pass(s, tid, 2), 120)
        t_cut = time.perf_counter()
        await asyncio.to_thread(link, rig, "down")

        def abort() -> tuple[float, dict[str, Any]] | None:
            return next(((t, e) for t, e in s.timed(tid) if e.get("action") == "abort"), None)

        t_abort, ev = await until("the abort event", abort, 60)
        t_result, doc = await result_of(fut, 180)
    finally:
        await asyncio.to_thread(link, rig, "up")
    t_up = time.perf_counter()
    last_growth, before = t_cut, -1
    for t, e in s.timed(tid):
        if before >= 0 and processed(e) > before:
            last_growth = max(last_growth, t)
        before = processed(e)
    want = {rig.a.name: (True, True)}
    deadline = time.monotonic() + SETTLE_LIMIT
    while (seen := await asyncio.to_thread(where, conns, name)) != want:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} not settled on rig-a: {seen}")
        await asyncio.sleep(0.25)
    settle = time.perf_counter() - t_up
    dom = conns.ctl[rig.a.name].lookupByName(name)
    counter = (await asyncio.to_thread(read_state, dom)).counter
    await asyncio.to_thread(wait_counter_above, dom, counter)  # still running there
    return StallRound(
        to_abort=t_abort - t_cut,
        to_result=t_result - t_cut,
        moved_after=last_growth - t_cut,
        elapsed=ev.get("elapsed"),
        settle=settle,
        outcome=f"{doc.get('status')}/{doc.get('code')}",
        reason=str(ev.get("reason")),
        details=str(doc.get("details")),
    )


async def bench_stall(rig: Rig, conns: RigConns, s: TimedSched, kernel: Path, rounds: int) -> None:
    name = f"bench-stall-{uuid.uuid4().hex[:6]}"
    done: list[StallRound] = []
    try:
        await asyncio.to_thread(conns.start_guest, rig.a, name, kernel)
        for _ in range(rounds):
            done.append(await stall_round(rig, conns, s, name))
    finally:
        await asyncio.to_thread(conns.remove_everywhere, name)
        if done:
            stall_tables(done, rounds)


def stall_tables(done: list[StallRound], rounds: int) -> None:
    table(
        f"1. stalled migration: dirty16 {MEMORY_MIB} MiB, live at {STALL_CAP} MiB/s, "
        f"progress-timeout {PROGRESS_TIMEOUT} s, veth down in the second pass "
        f"({len(done)}/{rounds} rounds; s from link down)",
        [
            "round",
            "data moved until",
            "abort event",
            "abort elapsed (job)",
            "result",
            "outcome",
            "reason",
            "settled after link up",
        ],
        [
            [
                i + 1,
                fmt(r.moved_after, 2),
                fmt(r.to_abort, 2),
                fmt(r.elapsed, 1),
                fmt(r.to_result, 2),
                r.outcome,
                r.reason,
                fmt(r.settle, 2),
            ]
            for i, r in enumerate(done)
        ]
        + [
            [
                "median",
                fmt(med([r.moved_after for r in done]), 2),
                fmt(med([r.to_abort for r in done]), 2),
                "",
                fmt(med([r.to_result for r in done]), 2),
                "",
                "",
                fmt(med([r.settle for r in done]), 2),
            ]
        ],
    )
    completion, progress = default_limits(MEMORY_MIB)
    rows = []
    for mem in (MEMORY_MIB, 4 * 1024, 16 * 1024, 64 * 1024):
        c, _ = default_limits(mem)
        rows.append([f"{mem / 1024:g} GiB" if mem >= 1024 else f"{mem} MiB", f"{c:.0f}"])
    table(
        "1'. the default completion timeout (not waited for: computed by the agent's planning "
        "code for a live migration without storage copy)",
        ["guest memory", "completion timeout s"],
        rows,
    )
    note(
        f"the agent's defaults: completion-timeout 150 s per GiB of memory, at least 120 s\n"
        f"({completion:.0f} s for this {MEMORY_MIB} MiB guest: a stream cut at the same moment\n"
        f"would be aborted by it only {completion:.0f} s after the job started, against\n"
        f"{fmt(med([r.elapsed for r in done if r.elapsed is not None]), 0)} s (median abort "
        f"elapsed) with progress-timeout {PROGRESS_TIMEOUT}); the configured default\n"
        f"progress-timeout is {progress:.0f} s.\n"
        "data moved until = the last progress event showing the bytes processed (memory +\n"
        "disks) grown, after the cut (socket buffers drain); the agent counts the progress\n"
        "timeout from the sample that showed the growth, so abort - data moved ~ the timeout +\n"
        "up to one progress interval. result = the migration's result, which comes when the\n"
        "source libvirtd has finished the aborted job (its peer connection over the dead link\n"
        "gives up). settled = link up -> the domain active and persistent on rig-a only, then\n"
        "its pass counter seen moving. details of the first round's result:\n"
        f"  {done[0].details}"
    )


# --------------------------------------------------------------------------- 2. tune


@dataclass
class TuneRound:
    tuned_result: float
    #: publish -> the progress event carrying ``action: tuned``
    tuned_event: float | None
    #: publish -> the first event with the effect (None: none seen)
    effect: float | None
    effect_rate: float | None
    migration_result: float
    rate_before: float | None
    outcome: str
    downtime_ms: float | None = None
    expected_before: float | None = None


async def tune_round(
    rig: Rig,
    conns: RigConns,
    s: TimedSched,
    kernel: Path,
    params: dict[str, object],
    tune: str,
    start_pass: int,
    delay: float,
    effect: Callable[[dict[str, Any]], bool] | None,
) -> TuneRound:
    name = f"bench-tune-{uuid.uuid4().hex[:6]}"
    try:
        await asyncio.to_thread(conns.start_guest, rig.a, name, kernel)
        tid, _, fut = await s.send(migrate_body(name, rig.b.name, **params))
        await until(f"pass {start_pass}", in_pass(s, tid, start_pass), 120)
        await asyncio.sleep(delay)
        before = [e for _, e in s.timed(tid)]
        rates = [float(e["transfer-rate"]) for e in before[-5:] if e.get("transfer-rate")]
        expected = [float(e["expected-downtime"]) for e in before if e.get("expected-downtime")]
        ttid, t_tune, tfut = await s.send(f"task: tune migration\ntarget: {tid}\n{tune}")
        t_tuned, tdoc = await result_of(tfut, 30)
        entries = tdoc.get("list") or [{}]
        if tdoc.get("result") != "tuned" or entries[0].get("status") != "success":
            raise RuntimeError(f"tune {ttid} refused: {tdoc}")
        t_done, doc = await result_of(fut, 180)
        after = [(t, e) for t, e in s.timed(tid) if t > t_tune]
        tuned_ev = next((t for t, e in after if e.get("action") == "tuned"), None)
        hit = next(((t, e) for t, e in after if effect is not None and effect(e)), None)
        tm = doc.get("time-measurement") or {}
        return TuneRound(
            tuned_result=t_tuned - t_tune,
            tuned_event=None if tuned_ev is None else tuned_ev - t_tune,
            effect=None if hit is None else hit[0] - t_tune,
            effect_rate=None if hit is None else float(hit[1]["transfer-rate"]),
            migration_result=t_done - t_tune,
            rate_before=max(rates) if rates else None,
            outcome=f"{doc.get('status')}" + (f"/{doc['code']}" if doc.get("code") else ""),
            downtime_ms=float(tm["downtime"]) * 1000 if "downtime" in tm else None,
            expected_before=expected[-1] if expected else None,
        )
    finally:
        await asyncio.to_thread(conns.remove_everywhere, name)


async def bench_tune(rig: Rig, conns: RigConns, s: TimedSched, kernel: Path, rounds: int) -> None:
    bw: list[TuneRound] = []
    dt: list[TuneRound] = []
    try:
        for _ in range(rounds):
            bw.append(
                await tune_round(
                    rig,
                    conns,
                    s,
                    kernel,
                    {"migration-type": "live", "bandwidth": TUNE_CAP, "max-downtime": 300},
                    "bandwidth: 0\n",
                    start_pass=1,
                    delay=2.0,
                    effect=lambda e: float(e.get("transfer-rate") or 0) > FACTOR * TUNE_CAP * MIB,
                )
            )
        for _ in range(rounds):
            dt.append(
                await tune_round(
                    rig,
                    conns,
                    s,
                    kernel,
                    {"migration-type": "live", "bandwidth": DOWNTIME_CAP},
                    f"max-downtime: {DOWNTIME_TUNED}\n",
                    start_pass=3,
                    delay=0.0,
                    effect=None,
                )
            )
    finally:
        if bw:
            table(
                f"2. tune bandwidth {TUNE_CAP} MiB/s -> 0 (unlimited): dirty16 {MEMORY_MIB} MiB, "
                f"live, max-downtime 300, tuned 2 s into the first pass ({len(bw)}/{rounds} "
                "rounds; s from publishing the tune)",
                [
                    "round",
                    "rate before MiB/s",
                    "tuned result",
                    "tuned event",
                    f"first rate > {FACTOR}x cap",
                    "that rate MiB/s",
                    "migration result",
                    "outcome",
                ],
                [
                    [
                        i + 1,
                        mib(r.rate_before, 2),
                        fmt(r.tuned_result, 3),
                        fmt(r.tuned_event, 3),
                        fmt(r.effect, 3),
                        mib(r.effect_rate),
                        fmt(r.migration_result, 2),
                        r.outcome,
                    ]
                    for i, r in enumerate(bw)
                ]
                + [
                    [
                        "median",
                        "",
                        fmt(med([r.tuned_result for r in bw]), 3),
                        fmt(med([r.tuned_event for r in bw if r.tuned_event is not None]), 3),
                        fmt(med([r.effect for r in bw if r.effect is not None]), 3),
                        "",
                        fmt(med([r.migration_result for r in bw]), 2),
                        "",
                    ]
                ],
            )
        if dt:
            table(
                f"2'. tune max-downtime -> {DOWNTIME_TUNED} ms: dirty16 {MEMORY_MIB} MiB, live at "
                f"{DOWNTIME_CAP} MiB/s without max-downtime (QEMU's 300 ms target), tuned when "
                f"the third pass starts ({len(dt)}/{rounds} rounds; s from publishing the tune)",
                [
                    "round",
                    "expected downtime before ms",
                    "tuned result",
                    "tuned event",
                    "migration result",
                    "downtime ms",
                    "outcome",
                ],
                [
                    [
                        i + 1,
                        fmt(r.expected_before, 0),
                        fmt(r.tuned_result, 3),
                        fmt(r.tuned_event, 3),
                        fmt(r.migration_result, 2),
                        fmt(r.downtime_ms, 0),
                        r.outcome,
                    ]
                    for i, r in enumerate(dt)
                ]
                + [
                    [
                        "median",
                        "",
                        fmt(med([r.tuned_result for r in dt]), 3),
                        fmt(med([r.tuned_event for r in dt if r.tuned_event is not None]), 3),
                        fmt(med([r.migration_result for r in dt]), 2),
                        fmt(med([r.downtime_ms for r in dt if r.downtime_ms is not None]), 0),
                        "",
                    ]
                ],
            )
        if bw or dt:
            note(
                "tuned result = publish -> the tune's `result: tuned` (the agent changed the job\n"
                "through its engine: virDomainMigrateSetMaxSpeed / SetMaxDowntime); tuned event =\n"
                "publish -> the progress event with `action: tuned` (published right after the\n"
                f"change); first rate > {FACTOR}x cap = publish -> the first progress event whose\n"
                "transfer-rate (QEMU's, as libvirt reports it) shows the new speed: sampled every\n"
                "progress-interval and at each pass's start, so read it to within one interval.\n"
                "migration result = publish -> the migration's result. rate before = the highest\n"
                "transfer-rate of the last 5 progress events before the tune. expected downtime\n"
                "before = QEMU's estimate in the last progress event before the tune, made at the\n"
                "capped rate; the downtime measured after the tune is far lower: the final copy\n"
                "with the guest stopped is evidently not held to the bandwidth cap (QEMU sends\n"
                "its last stage without the rate limit that gates the live passes)."
            )


# --------------------------------------------------------------------------- 3. compression


@dataclass
class CompressionRun:
    seconds: float
    migrate_s: float | None
    downtime_ms: float | None
    passes: int
    #: libvirt's completed-job statistics on the destination
    stats: dict[str, Any]
    #: memory-processed of the agent's ``completed`` progress event
    agent_processed: int | None
    #: bytes rig-a sent on the veth during the migration
    wire: int | None
    #: the downtime target (ms) of the agent's last progress event
    target: float | None


async def compression_run(
    rig: Rig,
    conns: RigConns,
    s: TimedSched,
    kernel: Path,
    cap: int,
    max_downtime: int,
    xbzrle: bool,
) -> CompressionRun:
    name = f"bench-cmp-{uuid.uuid4().hex[:6]}"
    params: dict[str, object] = {
        "migration-type": "live",
        "bandwidth": cap,
        "max-downtime": max_downtime,
    }
    if xbzrle:
        params["compression"] = "[xbzrle]"
    try:
        await asyncio.to_thread(conns.start_guest, rig.a, name, kernel)
        before = await asyncio.to_thread(sent_bytes, rig.a)
        tid, t0, fut = await s.send(migrate_body(name, rig.b.name, **params))
        t1, doc = await result_of(fut, 180)
        after = await asyncio.to_thread(sent_bytes, rig.a)
        if doc.get("status") != "success":
            raise RuntimeError(f"migration failed: {doc.get('code')}: {doc.get('details')}")
        events = [e for _, e in s.timed(tid)]
        last = next((e for e in reversed(events) if e.get("phase") == "completed"), None)
        tm = doc.get("time-measurement") or {}
        stats = await asyncio.to_thread(completed_stats, conns, rig.b.name, name)
        return CompressionRun(
            seconds=t1 - t0,
            migrate_s=float(tm["migrate"]) if "migrate" in tm else None,
            downtime_ms=float(tm["downtime"]) * 1000 if "downtime" in tm else None,
            passes=max((int(e.get("iteration") or 0) for e in events), default=0),
            stats=stats,
            agent_processed=None if last is None else int(last.get("memory-processed") or 0),
            wire=None if before is None or after is None else after - before,
            target=next(
                (float(e["max-downtime"]) for e in reversed(events) if e.get("max-downtime")),
                None,
            ),
        )
    finally:
        await asyncio.to_thread(conns.remove_everywhere, name)


async def refusals(rig: Rig, conns: RigConns, s: TimedSched, kernel: Path) -> None:
    name = f"bench-cmpref-{uuid.uuid4().hex[:6]}"
    rows = []
    try:
        await asyncio.to_thread(conns.start_guest, rig.a, name, kernel)
        for method, level in (("zstd", 3), ("zlib", 6)):
            params = {
                "migration-type": "live",
                "parallel-connections": 4,
                "compression": f"[{method}]",
                "compression-level": level,
            }
            _, t0, fut = await s.send(migrate_body(name, rig.b.name, **params))
            t1, doc = await result_of(fut, 60)
            tm = doc.get("time-measurement") or {}
            rows.append(
                [
                    method,
                    f"{doc.get('status')}/{doc.get('code')}",
                    fmt((t1 - t0) * 1000, 1),
                    "yes" if "migrate" in tm else "no",
                    str(await asyncio.to_thread(where, conns, name)),
                    doc.get("details"),
                ]
            )
    finally:
        await asyncio.to_thread(conns.remove_everywhere, name)
        if rows:
            table(
                "3'. zlib / zstd (4 multifd connections) on this libvirt",
                ["method", "outcome", "answer ms", "job started", "VM afterwards", "details"],
                rows,
            )


def stat(run: CompressionRun, key: str) -> float | None:
    value = run.stats.get(key)
    return float(value) if isinstance(value, int | float) else None


async def bench_compression(
    rig: Rig,
    conns: RigConns,
    s: TimedSched,
    kernel: Path,
    rounds: int,
    cap: int,
    max_downtime: int,
) -> None:
    runs: dict[str, list[CompressionRun]] = {"none": [], "xbzrle": []}
    try:
        for i in range(rounds):
            for label in ("none", "xbzrle") if i % 2 == 0 else ("xbzrle", "none"):
                runs[label].append(
                    await compression_run(
                        rig, conns, s, kernel, cap, max_downtime, label == "xbzrle"
                    )
                )
    finally:
        if any(runs.values()):
            compression_tables(runs, rounds, cap, max_downtime)
    await refusals(rig, conns, s, kernel)


def compression_tables(
    runs: dict[str, list[CompressionRun]], rounds: int, cap: int, max_downtime: int
) -> None:
    rows = []
    for label, series in runs.items():
        for i, r in enumerate(series):
            rows.append(
                [
                    f"{label} #{i + 1}",
                    fmt(r.seconds, 2),
                    fmt(r.migrate_s, 2),
                    r.passes,
                    fmt(r.target, 0),
                    fmt(r.downtime_ms, 0),
                    mib(stat(r, "memory_processed")),
                    mib(r.agent_processed),
                    mib(r.wire),
                    mib(stat(r, "compression_bytes")),
                    fmt(stat(r, "compression_pages"), 0),
                    fmt(stat(r, "compression_cache_misses"), 0),
                ]
            )
    table(
        f"3. compression: dirty16 {MEMORY_MIB} MiB, live at {cap} MiB/s, max-downtime "
        f"{max_downtime} ms, {rounds} interleaved rounds (per run)",
        [
            "run",
            "total s",
            "migrate s",
            "passes",
            "target at end ms",
            "downtime ms",
            "libvirt memory_processed MiB",
            "agent memory-processed MiB",
            "sent on veth MiB",
            "xbzrle bytes MiB",
            "xbzrle pages",
            "cache misses",
        ],
        rows,
    )
    summary = []
    for label, series in runs.items():
        summary.append(
            [
                label,
                len(series),
                fmt(med([r.seconds for r in series]), 2),
                fmt(med([r.downtime_ms for r in series if r.downtime_ms is not None]), 0),
                fmt(med([r.passes for r in series]), 1),
                mib(med([x for r in series if (x := stat(r, "memory_processed")) is not None])),
                mib(med([r.wire for r in series if r.wire is not None])),
            ]
        )
    table(
        "3. medians",
        [
            "compression",
            "runs",
            "total s",
            "downtime ms",
            "passes",
            "memory_processed MiB",
            "sent on veth MiB",
        ],
        summary,
    )
    none, xb = runs["none"], runs["xbzrle"]
    at_max = sum(1 for r in (*none, *xb) if r.target == max_downtime)
    time_ratio = ratio(med([r.seconds for r in xb]), med([r.seconds for r in none]))
    wire_ratio = ratio(
        med([r.wire for r in xb if r.wire is not None]),
        med([r.wire for r in none if r.wire is not None]),
    )
    note(
        f"ratio xbzrle/none, median total time: {time_ratio}; median bytes on the veth: "
        f"{wire_ratio}\n"
        "total = publish -> result; migrate = the result's time-measurement 'migrate' (the\n"
        "job); passes = the highest iteration of the progress events; downtime = the result's\n"
        "'downtime' (libvirt's measured switchover). memory_processed, xbzrle bytes/pages/cache\n"
        "misses = jobStats(VIR_DOMAIN_JOB_STATS_COMPLETED) on rig-b after the migration\n"
        "(memory_processed: QEMU's RAM bytes transferred, xbzrle-encoded pages counted as\n"
        "encoded); agent memory-processed = the agent's `completed` progress event; sent on\n"
        "veth = bytes rig-a sent on the rig's veth during the task (RAM stream + libvirt RPC).\n"
        "dirty16 rewrites one 32-bit word in each of 4096 pages per pass: xbzrle's best case\n"
        "(a page differs from its cached copy by 4 bytes), not a typical guest's. xbzrle sent\n"
        "the dirty set (and the counter page) in full once more (cache misses: QEMU uses\n"
        "xbzrle from the second pass on), then deltas. target at end = the downtime target of\n"
        "the agent's last progress event (its schedule starts at a tenth of max-downtime and\n"
        f"rises one step per stalled pass): {at_max} of {len(none) + len(xb)} runs switched over\n"
        f"only once it reached max-downtime. downtime: compare 2' (the final copy is not held\n"
        "to the cap)."
    )


# --------------------------------------------------------------------------- running it


SECTIONS = ("1", "2", "3")


@dataclass
class Plan:
    quick: bool
    rounds: int
    cap: int
    max_downtime: int
    interval: float
    only: tuple[str, ...] = field(default=SECTIONS)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = bool(args.quick)
        default = default_settings(hostname="bench").agent.progress_interval
        return cls(
            quick=quick,
            rounds=getattr(args, "rounds", 0) or (2 if quick else 3),
            cap=getattr(args, "cap", 0) or 8,
            max_downtime=getattr(args, "max_downtime", 0) or 3000,
            interval=getattr(args, "progress_interval", 0.0) or default,
            only=tuple(getattr(args, "only", None) or SECTIONS),
        )


async def rig_sections(port: int, rig: Rig, kernel: Path, plan: Plan) -> None:
    async with rig_conns(rig) as conns, agents(port, rig, plan.interval) as to_a:
        if "1" in plan.only:
            if rig.mode != "netns":
                print(f"\n!! 1. skipped: needs the rig's network namespaces (mode {rig.mode})")
            else:
                await timed_section(
                    "1. stall detection",
                    lambda: bench_stall(rig, conns, to_a, kernel, plan.rounds),
                )
        if "2" in plan.only:
            await timed_section(
                "2. tune", lambda: bench_tune(rig, conns, to_a, kernel, plan.rounds)
            )
        if "3" in plan.only:
            await timed_section(
                "3. compression",
                lambda: bench_compression(
                    rig, conns, to_a, kernel, plan.rounds, plan.cap, plan.max_downtime
                ),
            )


async def run_steering(port: int, plan: Plan) -> None:
    """Everything, on mosquitto at 127.0.0.1:``port``; the rig is up only inside."""
    t_start = time.perf_counter()
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    main_thread = task is not None and threading.current_thread() is threading.main_thread()
    if main_thread:
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)  # unwinds like Ctrl-C: tears down
    try:
        configure_logging(LoggingSettings(level="error"))
        table("machine", ["fact", "value"], machine_facts())
        try:
            ensure_system()
            kernel = (await asyncio.to_thread(build_guests, cache_dir() / "guests", ("dirty16",)))[
                "dirty16"
            ]
        except (RigUnavailable, OSError, RuntimeError) as exc:
            print(f"\n!! rig unavailable, nothing measured: {exc}")
            return
        facts = [
            ["guest", f"dirty16, {MEMORY_MIB} MiB: {VARIANTS['dirty16'].doc}"],
            ["agents' progress-interval", f"{plan.interval:g} s"],
            ["rounds", plan.rounds],
        ]
        async with rig_session("steerbench", facts) as rig:
            try:
                await rig_sections(port, rig, kernel, plan)
            finally:
                if rig.is_up and rig.mode == "netns":
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(link, rig, "up")
    finally:
        if main_thread:
            loop.remove_signal_handler(signal.SIGTERM)
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"total {time.perf_counter() - t_start:.1f} s; load average (1/5/15 min) {load}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=0, help="rounds per figure (default 3, quick 2)")
    p.add_argument(
        "--cap", type=int, default=0, help="section 3's bandwidth cap, MiB/s (default 8)"
    )
    p.add_argument(
        "--max-downtime", type=int, default=0, help="section 3's max-downtime, ms (default 3000)"
    )
    p.add_argument(
        "--progress-interval",
        type=float,
        default=0.0,
        help="the agents' progress-interval, s (default: the agent's, 0.5)",
    )
    p.add_argument(
        "--only", nargs="+", choices=SECTIONS, help="run only these sections (default: all)"
    )


def main() -> None:
    standalone(
        "steering",
        __doc__,
        "2 rounds per figure instead of 3",
        add_arguments,
        lambda port, args: run_steering(port, Plan.from_args(args)),
    )


if __name__ == "__main__":
    main()
