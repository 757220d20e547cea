"""Rig benchmarks: the agent against libvirt called directly, on real libvirtd + QEMU.

``python -m bench.rig_bench [--quick]`` (or ``python -m bench --rig``). Figures are printed,
not asserted. It starts its own mosquitto, brings the project's two-host rig up
(``tests/rig``: two libvirtds in network namespaces, TCG guests; it takes the rig lock, so it
waits while another session uses the rig) and runs two agents in this process with the
``libvirt`` back-end, configured as ``tests/real/agents.py`` configures them. Every agent
figure is taken end to end as a scheduler sees it: publish the task (QoS 2), wait for the
result. Every direct figure is the bare libvirt-python call(s) in a worker thread.

1. Lifecycle overhead (issue 3 item 9): start (from XML, no SSH probe) + stop (force) and
   suspend + resume, direct vs through the agent, on libvirt's ``test`` driver and on the rig.
   Target: ratio <= 1.05 on the rig. On the test driver a call takes microseconds, so the
   ratio there is the MQTT round trip; the absolute overhead is printed too.
2. Migration (issue 4 item 11):
   a. live migration A->B->A of a 128 MiB guest (``idle``, ``dirty16``), agent vs a direct
      p2p ``migrateToURI3`` with the agent's flags, rounds interleaved. Target: ratio <= 1.02.
   b. ``dirty16`` at 8 MiB/s: the agent's policy (post-copy, max-downtime 300; live,
      max-downtime 2500 with stepwise raising) against direct pre-copy at 300 ms and direct
      auto-converge, both capped. Target: completes in < 10 s, downtime within max-downtime.
   c. event-loop lag while one agent streams the progress of 8 concurrent migrations, against
      the same probe in an idle process (the machine's own contention) and against 8 direct
      migrate calls in threads of this process.

The rig lock is taken first (waiting up to 10 minutes) and held for the whole run, the
test-driver section included, so another session's rig tests do not load the CPU under the
figures. ``--only 2b`` etc. runs single sections.

Everything is torn down on every exit path: guests after each section, the agents, the rig
(also from ``atexit`` and, if this process is SIGKILLed, by the rig's guard process).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

import libvirt
from asyncmigfra.logs import configure_logging
from asyncmigfra.settings import LoggingSettings
from asyncmigfra.transport.mqtt import ToolClient
from bench.common import mosquitto, pct

ROOT = Path(__file__).resolve().parent.parent
# The rig and the agent helpers live with the tests (imported the way pytest imports them).
for _p in (ROOT / "tests" / "real", ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from agents import rig_agent_settings  # noqa: E402

from harness import agent_settings, running_agent  # noqa: E402
from rig import (  # noqa: E402
    Host,
    Rig,
    RigUnavailable,
    build_guests,
    domain_xml,
    ensure_system,
    remove_domain,
    wait_counter_above,
)

TEST_NODE = ROOT / "tests" / "libvirt" / "data" / "hostA.xml"
MIB = 1024 * 1024
P2P_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
)


# --------------------------------------------------------------------------- output


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(title: str, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    rows = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    print(f"\n== {title}")
    print(
        "  "
        + "  ".join(
            h.rjust(w) if i else h.ljust(w)
            for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    )
    print("  " + "  ".join("-" * w for w in widths))
    for row in rows:
        print(
            "  "
            + "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    sys.stdout.flush()


def note(text: str) -> None:
    for line in text.strip().splitlines():
        print(f"  {line}")
    sys.stdout.flush()


#: Sections that failed in this run (the rig's logs are then kept).
FAILURES: list[str] = []


def failed(section: str, exc: BaseException) -> None:
    FAILURES.append(section)
    print(f"\n!! {section} FAILED: {type(exc).__name__}: {exc}")
    tb = traceback.format_exception(exc)
    print("   " + "   ".join(tb[-6:]).rstrip())
    sys.stdout.flush()


def med(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.3f}"


def spread(values: Sequence[float]) -> str:
    return f"{pct(values, 0.1):.3f}-{pct(values, 0.9):.3f}" if values else "-"


# --------------------------------------------------------------------------- a scheduler


@dataclass
class Reply:
    id: str
    ms: float
    doc: dict[str, Any]


class Sched:
    """A scheduler as the agent sees one: publishes tasks (QoS 2), matches results by id.

    Cheap on the loop (the agents run in it): a result's id is found without a YAML parse and
    the payload is parsed after the clock stopped; events are only stored (and counted) and
    parsed when asked for.
    """

    def __init__(self, tool: ToolClient, prefix: str) -> None:
        self.tool = tool
        self.prefix = prefix
        self.waiters: dict[str, asyncio.Future[tuple[float, bytes]]] = {}
        self.events: list[bytes] = []
        #: When each of ``events`` arrived (``time.perf_counter``).
        self.event_times: list[float] = []
        self.progress = 0
        self._parsed: list[dict[str, Any]] = []

    async def pump(self) -> None:
        async for msg in self.tool.messages():
            now = time.perf_counter()
            if msg.topic.endswith("/result"):
                text = msg.payload.decode()
                idx = text.rfind("\nid: ")
                if idx < 0:
                    continue
                tid = text[idx + 5 :].split("\n", 1)[0].strip().strip('"')
                fut = self.waiters.pop(tid, None)
                if fut is not None and not fut.done():
                    fut.set_result((now, msg.payload))
            elif msg.topic.endswith("/event"):
                self.events.append(msg.payload)
                self.event_times.append(now)
                if b"event: progress" in msg.payload:
                    self.progress += 1

    async def send(self, body: str) -> tuple[str, float, asyncio.Future[tuple[float, bytes]]]:
        tid = f"b-{uuid.uuid4().hex[:10]}"
        fut: asyncio.Future[tuple[float, bytes]] = asyncio.get_running_loop().create_future()
        self.waiters[tid] = fut
        t0 = time.perf_counter()
        await self.tool.publish(f"{self.prefix}/task", f"id: {tid}\n{body}".encode(), qos=2)
        return tid, t0, fut

    async def call(self, body: str, limit: float = 60.0) -> Reply:
        tid, t0, fut = await self.send(body)
        try:
            t1, payload = await asyncio.wait_for(fut, limit)
        finally:
            self.waiters.pop(tid, None)
        return Reply(tid, (t1 - t0) * 1000.0, yaml.safe_load(payload))

    def events_for(self, tid: str, kind: str | None = None) -> list[dict[str, Any]]:
        return [e for _, e in self.timed_events_for(tid, kind)]

    def timed_events_for(
        self, tid: str, kind: str | None = None
    ) -> list[tuple[float, dict[str, Any]]]:
        """``events_for`` with each event's arrival time (``time.perf_counter``)."""
        while len(self._parsed) < len(self.events):
            self._parsed.append(yaml.safe_load(self.events[len(self._parsed)]) or {})
        return [
            (t, e)
            for t, e in zip(self.event_times, self._parsed, strict=True)
            if str(e.get("id")) == tid and (kind is None or e.get("event") == kind)
        ]


S = TypeVar("S", bound=Sched)


@contextlib.asynccontextmanager
async def scheduler_of(port: int, prefix: str, kind: type[S]) -> AsyncIterator[S]:
    """A ``kind`` scheduler on ``prefix``'s results and events while the block runs."""
    tool = ToolClient("127.0.0.1", port, client_id=f"rigbench-{uuid.uuid4().hex[:8]}")
    async with tool:
        for leaf in ("result", "event"):
            await tool.subscribe(f"{prefix}/{leaf}", qos=1)
        s = kind(tool, prefix)
        pump = asyncio.ensure_future(s.pump())
        try:
            yield s
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump


def sched(port: int, prefix: str) -> contextlib.AbstractAsyncContextManager[Sched]:
    return scheduler_of(port, prefix, Sched)


def prefix_of(settings: Any) -> str:
    return str(settings.mqtt.task_topic.rsplit("/", 1)[0])


def entry(reply: Reply) -> dict[str, Any]:
    """The (first) result entry of a list result, or the flat result itself."""
    doc = reply.doc
    if isinstance(doc.get("list"), list) and doc["list"]:
        return dict(doc["list"][0])
    return doc


def check(reply: Reply, what: str) -> dict[str, Any]:
    e = entry(reply)
    if e.get("status") != "success":
        raise RuntimeError(f"{what}: {e.get('code')}: {e.get('details')}")
    return e


def overall_ms(e: dict[str, Any]) -> float | None:
    tm = e.get("time-measurement") or {}
    return float(tm["overall"]) * 1000 if "overall" in tm else None


# --------------------------------------------------------------------------- 1. lifecycle


def test_domain_xml(name: str) -> str:
    return (
        f"<domain type='test'><name>{name}</name><memory unit='MiB'>128</memory>"
        "<vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>"
    )


def with_uuid(xml: str, name: str) -> str:
    """Give the domain a fixed UUID: a redefinition by name must keep it (libvirt refuses a
    second definition of a name under a new random UUID)."""
    return xml.replace("</name>", f"</name><uuid>{uuid.uuid5(uuid.NAMESPACE_DNS, name)}</uuid>", 1)


def start_body(xml: str) -> str:
    block = "\n".join("      " + line for line in xml.strip().splitlines())
    return (
        "task: start vm\nvm-configurations:\n"
        f"  - xml: |\n{block}\n    probe-with-ssh: false\n    time-measurement: true\n"
    )


def list_body(task: str, name: str, *extra: str) -> str:
    more = "".join(f"    {x}\n" for x in extra)
    return f"task: {task}\nlist:\n  - vm-name: {name}\n    time-measurement: true\n{more}"


OPS = ("start", "stop (force)", "suspend", "resume")


@dataclass
class LifecycleFigures:
    direct: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})
    agent: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})
    inside: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})
    errors: list[str] = field(default_factory=list)


async def timed_thread(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    await asyncio.to_thread(fn)
    return (time.perf_counter() - t0) * 1000.0


async def lifecycle_rounds(
    conn: Any, s: Sched, xml_for: Callable[[str], str], rounds: int, warmup: int
) -> LifecycleFigures:
    """``rounds`` of start, suspend, resume, stop(force), direct and through the agent,
    interleaved (the order flips every round); the first ``warmup`` rounds are not counted."""
    figs = LifecycleFigures()
    run = uuid.uuid4().hex[:6]
    d_name, a_name = f"bench-lc-d-{run}", f"bench-lc-a-{run}"
    d_xml, a_xml = with_uuid(xml_for(d_name), d_name), with_uuid(xml_for(a_name), a_name)

    async def direct(record: bool) -> None:
        box: dict[str, Any] = {}

        def start() -> None:
            box["dom"] = conn.defineXML(d_xml)
            box["dom"].create()

        times = {
            "start": await timed_thread(start),
            "suspend": await timed_thread(box["dom"].suspend),
            "resume": await timed_thread(box["dom"].resume),
            "stop (force)": await timed_thread(box["dom"].destroy),
        }
        if record:
            for op, ms in times.items():
                figs.direct[op].append(ms)

    async def agent(record: bool) -> None:
        replies = {
            "start": await s.call(start_body(a_xml)),
            "suspend": await s.call(list_body("suspend vm", a_name)),
            "resume": await s.call(list_body("resume vm", a_name)),
            "stop (force)": await s.call(list_body("stop vm", a_name, "force: true")),
        }
        for op, reply in replies.items():
            e = check(reply, op)
            if record:
                figs.agent[op].append(reply.ms)
                inside = overall_ms(e)
                if inside is not None:
                    figs.inside[op].append(inside)

    try:
        for i in range(warmup + rounds):
            record = i >= warmup
            pair = (direct, agent) if i % 2 == 0 else (agent, direct)
            for fn in pair:
                await fn(record)
    finally:
        for name in (d_name, a_name):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(remove_domain, conn, name)
    return figs


def lifecycle_table(title: str, figs: LifecycleFigures) -> None:
    rows = []
    groups = [(op, (op,)) for op in OPS]
    groups += [
        ("start + stop", ("start", "stop (force)")),
        ("suspend + resume", ("suspend", "resume")),
    ]
    for label, ops in groups:

        def summed(series: dict[str, list[float]], ops: tuple[str, ...] = ops) -> list[float]:
            cols = [series[op] for op in ops]
            n = min(len(c) for c in cols)
            return [sum(c[i] for c in cols) for i in range(n)]

        d, a, ins = summed(figs.direct), summed(figs.agent), summed(figs.inside)
        rows.append(
            [
                label,
                len(a),
                fmt(mean(d), 3),
                fmt(med(d), 3),
                fmt(mean(a), 3),
                fmt(med(a), 3),
                fmt(med(ins), 3),
                ratio(mean(a), mean(d)),
                ratio(med(a), med(d)),
                fmt((med(a) or 0) - (med(d) or 0), 3) if a and d else "-",
            ]
        )
    table(
        title,
        [
            "operation",
            "n",
            "direct mean ms",
            "direct p50 ms",
            "agent mean ms",
            "agent p50 ms",
            "in-agent p50 ms",
            "ratio mean",
            "ratio p50",
            "overhead p50 ms",
        ],
        rows,
    )


async def bench_lifecycle_testdriver(port: int, rounds: int) -> None:
    uri = f"test://{TEST_NODE}"
    settings = agent_settings(
        port,
        hostname=f"bench-td-{uuid.uuid4().hex[:6]}",
        hv_type="libvirt",
        hv_options={"uri": uri, "stop-timeout": 5},
    )
    conn = await asyncio.to_thread(libvirt.open, uri)  # a private copy of the node file
    try:
        async with sched(port, prefix_of(settings)) as s, running_agent(settings):
            figs = await lifecycle_rounds(conn, s, test_domain_xml, rounds, warmup=2)
    finally:
        await asyncio.to_thread(conn.close)
    lifecycle_table(f"1a. lifecycle overhead, libvirt test driver ({uri}), {rounds} rounds", figs)
    note(
        "in-agent = the result's time-measurement 'overall' (the operation inside the agent);\n"
        "agent p50 - in-agent p50 = MQTT (QoS 2 in, QoS 1 out) + parsing, dispatch, rendering.\n"
        "A test-driver call takes microseconds: the ratio here is the broker round trip, not\n"
        "libvirt; read the absolute overhead."
    )


async def bench_lifecycle_rig(rig: Rig, s: Sched, kernel: Path, rounds: int) -> None:
    conn = await asyncio.to_thread(libvirt.open, rig.a.local_uri)
    try:
        figs = await lifecycle_rounds(
            conn, s, lambda n: domain_xml(n, kernel, 128), rounds, warmup=1
        )
    finally:
        await asyncio.to_thread(conn.close)
    lifecycle_table(
        f"1b. lifecycle overhead, rig ({rig.a.name}, QEMU/TCG 128 MiB idle guest), {rounds} rounds",
        figs,
    )
    note("target (issue 3 item 9): ratio <= 1.05 on the rig.")


# --------------------------------------------------------------------------- 2. migration


@dataclass
class DirectOutcome:
    seconds: float
    ok: bool
    error: str | None = None
    aborted: bool = False
    iterations: int = 0
    downtime_ms: float | None = None
    throttle: int | None = None
    expected_downtime_ms: float | None = None


class RigConns:
    """Connections for the direct runs: per host, one only for migrate calls (its own RPC
    stream, as the agent gives its migrate call) and one for stats, steering and aborts."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.mig: dict[str, Any] = {}
        self.ctl: dict[str, Any] = {}

    def open(self) -> None:
        for h in self.rig.hosts:
            self.mig[h.name] = libvirt.open(h.local_uri)
            self.ctl[h.name] = libvirt.open(h.local_uri)

    def close(self) -> None:
        for conn in (*self.mig.values(), *self.ctl.values()):
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def remove_everywhere(self, name: str) -> None:
        for conn in self.ctl.values():
            with contextlib.suppress(libvirt.libvirtError):
                remove_domain(conn, name)

    def start_guest(self, host: Host, name: str, kernel: Path) -> Any:
        conn = self.ctl[host.name]
        dom = conn.defineXML(domain_xml(name, kernel, 128))
        dom.create()
        wait_counter_above(dom, 0)
        return dom


def direct_migrate(
    conns: RigConns,
    name: str,
    src: Host,
    dst: Host,
    *,
    bandwidth: int | None = None,
    max_downtime: int | None = None,
    extra_flags: int = 0,
    cap: float | None = None,
) -> DirectOutcome:
    """One direct p2p ``migrateToURI3`` (blocking; run it in a thread). With ``cap`` or
    ``max_downtime`` a monitor thread watches ``jobStats()`` on the control connection: it sets
    the downtime target once the job shows and aborts the job after ``cap`` seconds."""
    params: dict[str, object] = {libvirt.VIR_MIGRATE_PARAM_URI: dst.migrate_uri}
    if bandwidth:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth
    flags = P2P_FLAGS | extra_flags
    seen: dict[str, Any] = {"iterations": 0, "throttle": None, "aborted": False, "expected": None}
    done = threading.Event()
    t0 = time.perf_counter()

    def monitor() -> None:
        try:
            ctl = conns.ctl[src.name].lookupByName(name)
        except libvirt.libvirtError:
            return
        downtime_set = max_downtime is None
        while not done.wait(0.1):
            try:
                raw = ctl.jobStats()
            except libvirt.libvirtError:
                return  # the domain left
            if raw.get("type", 0) == libvirt.VIR_DOMAIN_JOB_NONE:
                continue
            seen["iterations"] = max(seen["iterations"], int(raw.get("memory_iteration", 0)))
            if "auto_converge_throttle" in raw:
                seen["throttle"] = int(raw["auto_converge_throttle"])
            if isinstance(raw.get("downtime"), int | float):
                seen["expected"] = float(raw["downtime"])  # QEMU's expected downtime, ms
            if not downtime_set:
                with contextlib.suppress(libvirt.libvirtError):
                    ctl.migrateSetMaxDowntime(int(max_downtime or 0), 0)
                    downtime_set = True
            if cap is not None and time.perf_counter() - t0 > cap:
                with contextlib.suppress(libvirt.libvirtError):
                    ctl.abortJob()
                    seen["aborted"] = True
                return

    watcher = None
    if cap is not None or max_downtime is not None:
        watcher = threading.Thread(target=monitor, name="rigbench-monitor", daemon=True)
        watcher.start()
    try:
        dom = conns.mig[src.name].lookupByName(name)
        dom.migrateToURI3(dst.p2p_uri, params, flags)
        ok, error = True, None
    except libvirt.libvirtError as exc:
        ok, error = False, exc.get_error_message()
    seconds = time.perf_counter() - t0
    done.set()
    if watcher is not None:
        watcher.join(10)
    out = DirectOutcome(
        seconds,
        ok,
        error,
        aborted=bool(seen["aborted"]),
        iterations=int(seen["iterations"]),
        throttle=seen["throttle"],
        expected_downtime_ms=seen["expected"],
    )
    if ok:
        with contextlib.suppress(libvirt.libvirtError):
            stats = (
                conns.ctl[dst.name]
                .lookupByName(name)
                .jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            )
            if "downtime" in stats:
                out.downtime_ms = float(stats["downtime"])
            out.iterations = max(out.iterations, int(stats.get("memory_iteration", 0)))
    return out


def migrate_body(name: str, dest: str, **params: object) -> str:
    lines = "".join(f"  {k}: {v}\n" for k, v in params.items())
    return (
        f"task: migrate vm\nvm-name: {name}\ndestination: {dest}\ntime-measurement: true\n"
        f"parameter:\n{lines}"
    )


@dataclass
class AgentLeg:
    ms: float
    migrate_ms: float | None
    prechecks_ms: float | None
    downtime_ms: float | None
    overall_ms: float | None


async def agent_migrate(
    s: Sched, name: str, dest: Host, limit: float, **params: object
) -> tuple[Reply, AgentLeg]:
    reply = await s.call(migrate_body(name, dest.name, **params), limit)
    doc = reply.doc
    if doc.get("status") != "success":
        raise RuntimeError(f"agent migration failed: {doc.get('code')}: {doc.get('details')}")
    tm = doc.get("time-measurement") or {}

    def ms(tag: str) -> float | None:
        return float(tm[tag]) * 1000 if tag in tm else None

    return reply, AgentLeg(reply.ms, ms("migrate"), ms("pre-checks"), ms("downtime"), ms("overall"))


@dataclass
class TripFigures:
    direct_s: list[float] = field(default_factory=list)
    agent_s: list[float] = field(default_factory=list)
    direct_down: list[float] = field(default_factory=list)
    legs: list[AgentLeg] = field(default_factory=list)

    def clear(self) -> None:
        for series in (self.direct_s, self.agent_s, self.direct_down, self.legs):
            series.clear()


async def migration_trips(
    rig: Rig, conns: RigConns, to_a: Sched, to_b: Sched, name: str, rounds: int
) -> TripFigures:
    """A->B->A of guest ``name`` (running on A): one warm-up trip each way, then ``rounds``
    rounds of a direct and an agent trip, the order flipping every round."""
    figs = TripFigures()

    async def direct_trip() -> None:
        for src, dst in ((rig.a, rig.b), (rig.b, rig.a)):
            out = await asyncio.to_thread(direct_migrate, conns, name, src, dst)
            if not out.ok:
                raise RuntimeError(f"direct migration failed: {out.error}")
            figs.direct_s.append(out.seconds)
            if out.downtime_ms is not None:
                figs.direct_down.append(out.downtime_ms)

    async def agent_trip() -> None:
        for s, dst in ((to_a, rig.b), (to_b, rig.a)):
            _, leg = await agent_migrate(s, name, dst, 120, **{"migration-type": "live"})
            figs.agent_s.append(leg.ms / 1000)
            figs.legs.append(leg)

    await direct_trip()  # warm-up: both QEMUs' first migration, connections, caches
    await agent_trip()
    figs.clear()
    for i in range(rounds):
        for trip in (direct_trip, agent_trip) if i % 2 == 0 else (agent_trip, direct_trip):
            await trip()
    return figs


async def bench_migration_ab(
    rig: Rig, conns: RigConns, to_a: Sched, to_b: Sched, guests: dict[str, Path], rounds: int
) -> None:
    rows = []
    breakdown = []
    for variant in ("idle", "dirty16"):
        name = f"bench-mig-{variant}-{uuid.uuid4().hex[:6]}"
        figs = TripFigures()
        try:
            await asyncio.to_thread(conns.start_guest, rig.a, name, guests[variant])
            figs = await migration_trips(rig, conns, to_a, to_b, name, rounds)
        except Exception as exc:
            failed(f"2a. migration A->B->A ({variant})", exc)
        finally:
            await asyncio.to_thread(conns.remove_everywhere, name)
        direct_s, agent_s, d_down, a_legs = figs.direct_s, figs.agent_s, figs.direct_down, figs.legs
        a_down = [leg.downtime_ms for leg in a_legs if leg.downtime_ms is not None]
        trips_d = [direct_s[i] + direct_s[i + 1] for i in range(0, len(direct_s) - 1, 2)]
        trips_a = [agent_s[i] + agent_s[i + 1] for i in range(0, len(agent_s) - 1, 2)]
        paired = [ta / td for td, ta in zip(trips_d, trips_a, strict=False) if td]
        # The same leg (round, direction) of both: what the agent adds to one migration.
        fixed_ms = [(a - d) * 1000 for d, a in zip(direct_s, agent_s, strict=False)]
        paired_legs = [a / d for d, a in zip(direct_s, agent_s, strict=False) if d]
        rows.append(
            [
                variant,
                len(trips_a),
                fmt(med(direct_s), 3),
                fmt(med(agent_s), 3),
                ratio(med(agent_s), med(direct_s)),
                fmt(med(trips_d), 3),
                fmt(med(trips_a), 3),
                ratio(med(trips_a), med(trips_d)),
                fmt(med(paired), 3),
                fmt(med(paired_legs), 3),
                ratio(mean(agent_s), mean(direct_s)),
                fmt(med(fixed_ms), 1),
            ]
        )
        breakdown.append(
            [
                variant,
                spread(direct_s),
                spread(agent_s),
                fmt(med(d_down), 0),
                fmt(med(a_down), 0),
                fmt(med([x.overall_ms / 1000 for x in a_legs if x.overall_ms is not None]), 3),
                fmt(med([x.prechecks_ms for x in a_legs if x.prechecks_ms is not None]), 1),
                fmt(med([x.migrate_ms / 1000 for x in a_legs if x.migrate_ms is not None]), 3),
                fmt(med([x.ms - x.migrate_ms for x in a_legs if x.migrate_ms is not None]), 1),
            ]
        )
    table(
        f"2a. live migration A->B->A, 128 MiB guest, {rounds} interleaved rounds "
        "(direct p2p migrateToURI3 vs agent)",
        [
            "guest",
            "rounds",
            "direct p50 s/leg",
            "agent p50 s/leg",
            "ratio p50 legs",
            "direct p50 s/trip",
            "agent p50 s/trip",
            "ratio p50 trips",
            "ratio paired p50",
            "ratio paired legs p50",
            "ratio mean legs",
            "fixed ms/leg p50",
        ],
        rows,
    )
    table(
        "2a'. spread, downtime and where an agent migration's time goes (per leg)",
        [
            "guest",
            "direct p10-p90 s",
            "agent p10-p90 s",
            "direct downtime p50 ms",
            "agent downtime p50 ms",
            "agent overall p50 s",
            "agent pre-checks p50 ms",
            "agent migrate p50 s",
            "agent outside job p50 ms",
        ],
        breakdown,
    )
    note(
        "direct = lookupByName + migrateToURI3(p2p_uri, {URI: migrate_uri},\n"
        "  LIVE|PEER2PEER|PERSIST_DEST|UNDEFINE_SOURCE) on a connection of its own, in a thread.\n"
        "agent = 'migrate vm', migration-type live, published and answered over MQTT.\n"
        "ratio paired = median over rounds of (agent trip / direct trip), each pair adjacent in\n"
        "time; ratio paired legs = median over legs of (agent leg / direct leg), the same round\n"
        "and direction (TCG's drift between rounds cancels). fixed ms/leg = median over legs\n"
        "of (agent leg - direct leg), the same round and direction (target <= 10 ms).\n"
        "overall = the agent's time for the subtask (end-to-end minus MQTT and dispatch);\n"
        "pre-checks = the destination checks before the job; migrate = the job from the call\n"
        "that starts it to the result (includes reading JOB_COMPLETED); outside job = per leg,\n"
        "end-to-end minus migrate: MQTT, parsing, lanes, pre-checks, rendering (low noise).\n"
        "target (issues 4 item 11, 20): ratio <= 1.02. TCG legs vary by tens of % (p10-p90):\n"
        "read a ratio within a few % of 1 as 'no difference measurable at this n'."
    )


def policy_trace(events: list[dict[str, Any]]) -> list[str]:
    """What the agent saw at each memory pass and what it did, from its progress events (the
    sample its policy decided on: the event carrying the action, else the pass's first)."""
    by_pass: dict[int, dict[str, Any]] = {}
    for e in events:
        it = int(e.get("iteration") or 0)
        if it and e.get("phase") != "completed" and (it not in by_pass or e.get("action")):
            by_pass[it] = e
    lines = []
    for it, e in sorted(by_pass.items()):
        action = e.get("action")
        if action == "raise-downtime":
            action = f"raise-downtime -> {e.get('max-downtime')} ms"
        lines.append(
            f"pass {it:2d}: remaining {(e.get('memory-remaining') or 0) / MIB:6.1f} MiB, "
            f"dirty {(e.get('dirty-rate') or 0) / MIB:5.1f} MiB/s, "
            f"sent {(e.get('transfer-rate') or 0) / MIB:5.1f} MiB/s, "
            f"expected downtime {fmt(e.get('expected-downtime'), 0):>5} ms, "
            f"target {e.get('max-downtime', '-')} ms" + (f"  => {action}" if action else "")
        )
    return lines


async def bench_dirty_capped(
    rig: Rig, conns: RigConns, to_a: Sched, kernel: Path, cap: float
) -> None:
    rows: list[list[object]] = []
    traces: list[str] = []

    async def scenario(label: str, run: Callable[[str], Awaitable[list[object]]]) -> None:
        name = f"bench-cap-{uuid.uuid4().hex[:6]}"
        try:
            await asyncio.to_thread(conns.start_guest, rig.a, name, kernel)
            rows.append([label, *await run(name)])
        except Exception as exc:
            failed(f"2b. {label}", exc)
            rows.append([label, "FAILED", "-", "-", "-", "-", str(exc)[:60]])
        finally:
            await asyncio.to_thread(conns.remove_everywhere, name)

    def direct_runner(
        max_downtime: int, extra_flags: int
    ) -> Callable[[str], Awaitable[list[object]]]:
        async def run(name: str) -> list[object]:
            out = await asyncio.to_thread(
                direct_migrate,
                conns,
                name,
                rig.a,
                rig.b,
                bandwidth=8,
                max_downtime=max_downtime,
                extra_flags=extra_flags,
                cap=cap,
            )
            if out.ok:
                verdict = "completed"
            elif out.aborted:
                verdict = f"did not converge in {cap:.0f} s, {out.iterations} iterations (aborted)"
            else:
                verdict = f"error: {out.error}"
            if out.throttle is not None:
                verdict += f"; throttle reached {out.throttle} %"
            if out.expected_downtime_ms is not None and not out.ok:
                verdict += f"; expected downtime {out.expected_downtime_ms:.0f} ms"
            return [
                "completed" if out.ok else "no",
                fmt(out.seconds, 2),
                out.iterations,
                fmt(out.downtime_ms, 0),
                max_downtime,
                verdict,
            ]

        return run

    def agent_runner(**params: object) -> Callable[[str], Awaitable[list[object]]]:
        async def run(name: str) -> list[object]:
            reply, leg = await agent_migrate(to_a, name, rig.b, cap + 120, bandwidth=8, **params)
            progress = to_a.events_for(reply.id, "progress")
            iterations = max((int(e.get("iteration") or 0) for e in progress), default=0)
            final_down = next(
                (e.get("downtime") for e in reversed(progress) if "downtime" in e), None
            )
            kind, top = params.get("migration-type"), params.get("max-downtime")
            traces.append(f"{kind}, max-downtime {top}:")
            traces.extend(f"  {line}" for line in policy_trace(progress))
            within = leg.downtime_ms is not None and leg.downtime_ms <= float(
                str(params.get("max-downtime"))
            )
            return [
                "completed",
                fmt(leg.ms / 1000, 2),
                iterations,
                fmt(leg.downtime_ms if leg.downtime_ms is not None else final_down, 0),
                params.get("max-downtime"),
                f"{'<' if leg.ms < 10_000 else '>='} 10 s; downtime "
                f"{'within' if within else 'NOT within'} max-downtime",
            ]

        return run

    await scenario(
        "agent, post-copy, max-downtime 300",
        agent_runner(**{"migration-type": "post-copy", "max-downtime": 300}),
    )
    await scenario(
        "agent, live, max-downtime 2500",
        agent_runner(**{"migration-type": "live", "max-downtime": 2500}),
    )
    await scenario("direct pre-copy, max downtime 300", direct_runner(300, 0))
    await scenario(
        "direct auto-converge, max downtime 300",
        direct_runner(300, libvirt.VIR_MIGRATE_AUTO_CONVERGE),
    )
    table(
        f"2b. dirty16 (rewrites 16 MiB per pass) A->B at a bandwidth cap of 8 MiB/s "
        f"(direct runs capped at {cap:.0f} s)",
        ["run", "done", "time s", "iterations", "downtime ms", "max-downtime ms", "verdict"],
        rows,
    )
    note(
        "what the agent's policy saw at each pass and did (its progress events):\n"
        + "\n".join(f"  {t}" for t in traces)
    )
    note(
        "time = end to end (agent: publish -> result; direct: the migrate call until it returned\n"
        "or was aborted). downtime = libvirt's measured switchover downtime (agent: the result's\n"
        "time-measurement 'downtime'; direct: jobStats(COMPLETED) on the destination).\n"
        "target (issue 4 item 11): completes in < 10 s with downtime within max-downtime."
    )


#: The same probe in a process of its own with an idle loop: what the machine's CPU contention
#: alone does to a loop. It stops when its stdin closes and prints its samples.
CONTROL_PROBE = """
import asyncio, json, sys, time
async def main():
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), stop.set)
    lags = []
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(0.005)
        lags.append((time.perf_counter() - t0 - 0.005) * 1000)
    print(json.dumps(lags))
asyncio.run(main())
"""


@dataclass
class LagWindow:
    label: str
    ours: list[float]
    control: list[float]
    seconds: float
    cpu_s: float
    progress: int

    def row(self, which: str) -> list[object]:
        lags = self.ours if which == "agents' loop" else self.control
        if not lags:
            return [self.label, which, 0, "-", "-", "-", "-", "-", "-"]
        own = which == "agents' loop"
        return [
            self.label,
            which,
            len(lags),
            fmt(pct(lags, 0.5), 3),
            fmt(pct(lags, 0.99), 3),
            fmt(max(lags), 3),
            self.progress if own else "-",
            fmt(self.seconds, 2),
            f"{100 * self.cpu_s / self.seconds:.0f} %" if own and self.seconds else "-",
        ]


@contextlib.asynccontextmanager
async def lag_window(label: str, progress: Callable[[], int]) -> AsyncIterator[LagWindow]:
    """Probe this loop and, as a control, an idle loop in another process, for the block."""
    window = LagWindow(label, [], [], 0.0, 0.0, 0)
    control = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CONTROL_PROBE,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.005)
            window.ours.append((time.perf_counter() - t0 - 0.005) * 1000)

    task = asyncio.ensure_future(probe())
    p0, t0, c0 = progress(), time.perf_counter(), time.process_time()
    try:
        yield window
    finally:
        window.seconds = time.perf_counter() - t0
        window.cpu_s = time.process_time() - c0
        window.progress = progress() - p0
        stop.set()
        await task
        out, _ = await control.communicate(b"")
        with contextlib.suppress(ValueError):
            window.control = [float(x) for x in json.loads(out or b"[]")]


async def bench_loop_lag(
    port: int, rig: Rig, conns: RigConns, kernel: Path, variant: str, n: int, baseline: float
) -> None:
    names = [f"bench-lag-{i}-{uuid.uuid4().hex[:4]}" for i in range(n)]
    sections: dict[str, Any] = {
        "migration": {"max_outgoing": n, "max_incoming": n},
        "agent": {"progress_interval": 0.1},
    }
    run = uuid.uuid4().hex[:6]
    sa = rig_agent_settings(port, rig, rig.a, run=run, **sections)
    sb = rig_agent_settings(port, rig, rig.b, run=run, **sections)
    windows: list[LagWindow] = []
    outcomes: dict[str, list[tuple[float, str]]] = {}

    async def migrate_all(s: Sched, dest: Host, label: str) -> None:
        sent = [
            await s.send(migrate_body(name, dest.name, **{"migration-type": "live"}))
            for name in names
        ]
        for _tid, t_sent, fut in sent:
            t1, payload = await asyncio.wait_for(fut, 180)
            status = str((yaml.safe_load(payload) or {}).get("status"))
            outcomes.setdefault(label, []).append((t1 - t_sent, status))

    def suspend_all(host: Host) -> None:
        for name in names:
            with contextlib.suppress(libvirt.libvirtError):
                conns.ctl[host.name].lookupByName(name).suspend()

    try:
        await asyncio.gather(
            *(asyncio.to_thread(conns.start_guest, rig.a, name, kernel) for name in names)
        )
        async with (
            sched(port, prefix_of(sa)) as to_a,
            sched(port, prefix_of(sb)) as to_b,
            running_agent(sa),
            running_agent(sb),
        ):
            label = f"{n} guests running, no task"
            async with lag_window(label, lambda: to_a.progress) as window:
                await asyncio.sleep(baseline)
            windows.append(window)
            label = f"{n} migrations A->B"
            async with lag_window(label, lambda: to_a.progress) as window:
                await migrate_all(to_a, rig.b, label)
            windows.append(window)
            # The same with the guests paused: no vCPU spins, so much less CPU contention (the
            # destination QEMUs still start); agent B sends them back.
            await asyncio.to_thread(suspend_all, rig.b)
            label = f"{n} migrations B->A, paused"
            async with lag_window(label, lambda: to_b.progress) as window:
                await migrate_all(to_b, rig.a, label)
            windows.append(window)
            # Control: the same paused migrations without the agent, as 8 direct migrate calls
            # in threads of this process: the loop has nothing to do but the probe.
            label = f"{n} direct calls A->B, paused"
            async with lag_window(label, lambda: 0) as window:
                outs = await asyncio.gather(
                    *(
                        asyncio.to_thread(direct_migrate, conns, name, rig.a, rig.b)
                        for name in names
                    )
                )
                outcomes[label] = [(o.seconds, "success" if o.ok else str(o.error)) for o in outs]
            windows.append(window)
    finally:
        await asyncio.gather(*(asyncio.to_thread(conns.remove_everywhere, name) for name in names))
    table(
        f"2c. event-loop lag (asyncio.sleep(0.005) overshoot), {n} concurrent '{variant}' "
        f"128 MiB live migrations by one agent (max-outgoing/incoming {n}, "
        "progress-interval 0.1 s)",
        [
            "window",
            "loop probed",
            "samples",
            "lag p50 ms",
            "lag p99 ms",
            "lag max ms",
            "progress events",
            "wall s",
            "process CPU",
        ],
        [w.row(which) for w in windows for which in ("agents' loop", "idle process")],
    )
    for label, results in outcomes.items():
        times = [t for t, _ in results]
        ok = sum(1 for _, status in results if status == "success")
        note(
            f"{label}: {ok}/{len(results)} succeeded; per migration (publish -> result) "
            f"min/median/max {min(times):.2f}/{statistics.median(times):.2f}/{max(times):.2f} s"
        )
    note(
        "agents' loop = the loop running both agents, the scheduler clients and the probe;\n"
        "process CPU = this process (all threads) / wall. idle process = the same probe in a\n"
        "separate process with nothing else to do: the lag that the machine's CPU contention\n"
        f"alone causes ({n} TCG guests spin a vCPU each unless paused, {n} destination QEMUs\n"
        f"start, on {os.cpu_count()} cores)."
    )


# --------------------------------------------------------------------------- running it


def cache_dir() -> Path:
    """The rig tests' cache (guest kernels, QEMU capabilities): ``RIG_CACHE`` or
    ``/tmp/asyncmigfra-rig`` (as tests/real/conftest.py: visible inside the rig's hosts)."""
    path = Path(os.environ.get("RIG_CACHE") or Path(tempfile.gettempdir()) / "asyncmigfra-rig")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.is_symlink() or path.lstat().st_uid != os.geteuid():
        raise RuntimeError(f"{path} is not a directory of ours; set RIG_CACHE")
    return path


def machine_facts() -> list[list[object]]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mosq = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["/usr/sbin/mosquitto", "-h"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
        mosq = out.splitlines()[0].replace("mosquitto version ", "") if out else "?"
    lv = libvirt.getVersion()
    return [
        ["command", " ".join(sys.orig_argv)],
        ["code measured", source_version()],
        ["nproc", os.cpu_count()],
        ["load average at start", " / ".join(f"{x:.2f}" for x in os.getloadavg())],
        ["cpu", cpu],
        ["kernel", platform.release()],
        ["python", platform.python_version()],
        ["libvirt (library)", f"{lv // 1_000_000}.{lv // 1000 % 1000}.{lv % 1000}"],
        ["mosquitto", mosq],
    ]


SECTIONS = frozenset({"1a", "1b", "2a", "2b", "2c"})
#: s to wait for the rig lock (another session's rig tests); the rig tests wait 45 s.
LOCK_WAIT = 600.0


def source_version() -> str:
    """The agent code this run measured: HEAD, and whether src/ differs from it (the package
    is installed editable, so uncommitted changes in the work tree are what runs)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD") or "?"
        dirty = [line for line in git("status", "--porcelain", "--", "src").splitlines() if line]
    except (OSError, subprocess.SubprocessError):
        return "?"
    return f"git {head}" + (f" + uncommitted changes in {len(dirty)} src/ files" if dirty else "")


@dataclass
class Plan:
    quick: bool
    lifecycle_rounds: int
    migration_rounds: int
    cap: float
    lag_variant: str
    lag_guests: int
    only: frozenset[str] = SECTIONS

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = bool(args.quick)
        return cls(
            quick=quick,
            lifecycle_rounds=getattr(args, "rounds", 0) or (5 if quick else 20),
            migration_rounds=getattr(args, "migration_rounds", 0) or (4 if quick else 12),
            cap=getattr(args, "cap", 0.0) or (20.0 if quick else 60.0),
            lag_variant=getattr(args, "lag_variant", "idle"),
            lag_guests=8,
            only=frozenset(getattr(args, "only", None) or SECTIONS),
        )


@contextlib.asynccontextmanager
async def rig_session(
    prefix: str, extra_facts: Sequence[Sequence[object]] = ()
) -> AsyncIterator[Rig]:
    """The rig up for one benchmark run: waits for the rig lock (another session's rig),
    prints the ``rig`` table (with ``extra_facts`` rows), and goes down on every exit path;
    its state and logs are kept only when a section failed."""
    statedir = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))
    rig = Rig(statedir, cachedir=cache_dir(), lock_timeout=LOCK_WAIT)
    atexit.register(rig.down)
    try:
        t0 = time.perf_counter()
        print(f"\n(taking the rig lock; waits up to {LOCK_WAIT:.0f} s for another session)")
        await asyncio.to_thread(rig.up)
        why = f" ({rig.fallback_reason})" if rig.fallback_reason else ""
        t = rig.timings
        table(
            "rig",
            ["fact", "value"],
            [
                ["mode", f"{rig.mode}{why}"],
                ["capabilities cache", "cold" if rig.cold else "warm"],
                [
                    "up",
                    f"{t['up']:.2f} s (lock wait {t['lock']:.2f} s; "
                    f"{time.perf_counter() - t0:.2f} s here)",
                ],
                ["hosts", ", ".join(f"{h.name} {h.ip}" for h in rig.hosts)],
                ["libvirtd", await asyncio.to_thread(libvirtd_version, rig.a.local_uri)],
                ["QEMU", await asyncio.to_thread(qemu_version, rig.a.local_uri)],
                *extra_facts,
            ],
        )
        yield rig
    finally:
        await asyncio.to_thread(rig.down)
        atexit.unregister(rig.down)
        print(f"\nrig down in {rig.timings.get('down', 0):.2f} s")
        if FAILURES:
            print(f"rig state and logs kept for the failures above: {statedir}")
        else:
            shutil.rmtree(statedir, ignore_errors=True)


def libvirtd_version(uri: str) -> str:
    conn = libvirt.open(uri)
    try:
        v = conn.getLibVersion()
        return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"
    finally:
        conn.close()


async def run_rig_benchmarks(port: int, plan: Plan) -> None:
    """Everything, on mosquitto at 127.0.0.1:``port``; the rig is up only inside."""
    t_start = time.perf_counter()
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None and threading.current_thread() is threading.main_thread():
        loop.add_signal_handler(signal.SIGTERM, task.cancel)  # unwinds like Ctrl-C: tears down
    try:
        table("machine", ["fact", "value"], machine_facts())

        async def testdriver() -> None:
            if "1a" in plan.only:
                try:
                    await bench_lifecycle_testdriver(port, plan.lifecycle_rounds)
                except Exception as exc:
                    failed("1a. lifecycle on the test driver", exc)

        if not plan.only - {"1a"}:
            await testdriver()
            return
        try:
            ensure_system()
            guests = await asyncio.to_thread(
                build_guests, cache_dir() / "guests", ("idle", "dirty16")
            )
        except (RigUnavailable, OSError, RuntimeError) as exc:
            print(f"\n!! rig unavailable, rig sections skipped: {exc}")
            await testdriver()
            return
        async with rig_session("rigbench") as rig:
            # The test-driver section needs no rig, but runs while this run holds the rig
            # lock: another session's rig tests would otherwise load the CPU under it.
            await testdriver()
            await rig_sections(port, rig, guests, plan)
    finally:
        if task is not None and threading.current_thread() is threading.main_thread():
            loop.remove_signal_handler(signal.SIGTERM)
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"total {time.perf_counter() - t_start:.1f} s; load average (1/5/15 min) {load}")


def qemu_version(uri: str) -> str:
    conn = libvirt.open(uri)
    try:
        v = conn.getVersion()
        return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000} (TCG)"
    finally:
        conn.close()


@contextlib.asynccontextmanager
async def rig_conns(rig: Rig) -> AsyncIterator[RigConns]:
    """The direct runs' libvirt connections to both rig hosts, closed on every exit path."""
    conns = RigConns(rig)
    await asyncio.to_thread(conns.open)
    try:
        yield conns
    finally:
        await asyncio.to_thread(conns.close)


@contextlib.asynccontextmanager
async def agent_pair(port: int, rig: Rig, **sections: Any) -> AsyncIterator[tuple[Sched, Sched]]:
    """One agent per rig host (configured as tests/real/agents.py does, plus ``sections``)
    and a scheduler client for each. Their domain XML may boot the rig's guest kernels (in
    the rig's cache, outside every storage pool) under the default ``xml-policy: strict``."""
    run = uuid.uuid4().hex[:6]
    agent = {"xml_allowed_paths": (str(cache_dir() / "guests"),), **sections.pop("agent", {})}
    sections["agent"] = agent
    sa = rig_agent_settings(port, rig, rig.a, run=run, **sections)
    sb = rig_agent_settings(port, rig, rig.b, run=run, **sections)
    async with (
        sched(port, prefix_of(sa)) as to_a,
        sched(port, prefix_of(sb)) as to_b,
        running_agent(sa),
        running_agent(sb),
    ):
        yield to_a, to_b


async def timed_section(label: str, step: Callable[[], Awaitable[object]]) -> None:
    """Run one section; a failure is reported (``failed``) and the next section runs."""
    t0 = time.perf_counter()
    try:
        await step()
    except Exception as exc:
        failed(label, exc)
    print(f"  ({label}: {time.perf_counter() - t0:.1f} s)")


async def rig_sections(port: int, rig: Rig, guests: dict[str, Path], plan: Plan) -> None:
    async with rig_conns(rig) as conns:
        async with agent_pair(port, rig) as (to_a, to_b):
            for key, label, step in (
                (
                    "1b",
                    "1b. lifecycle on the rig",
                    lambda: bench_lifecycle_rig(rig, to_a, guests["idle"], plan.lifecycle_rounds),
                ),
                (
                    "2a",
                    "2a. migration A->B->A",
                    lambda: bench_migration_ab(
                        rig, conns, to_a, to_b, guests, plan.migration_rounds
                    ),
                ),
                (
                    "2b",
                    "2b. dirty16 at 8 MiB/s",
                    lambda: bench_dirty_capped(rig, conns, to_a, guests["dirty16"], plan.cap),
                ),
            ):
                if key in plan.only:
                    await timed_section(label, step)
        if "2c" in plan.only:
            await timed_section(
                "2c. event-loop lag",
                lambda: bench_loop_lag(
                    port,
                    rig,
                    conns,
                    guests[plan.lag_variant],
                    plan.lag_variant,
                    plan.lag_guests,
                    baseline=3.0,
                ),
            )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=0, help="lifecycle rounds (default 20, quick 5)")
    p.add_argument(
        "--migration-rounds", type=int, default=0, help="A->B->A rounds (default 12, quick 4)"
    )
    p.add_argument(
        "--cap", type=float, default=0.0, help="s before a non-converging direct run is aborted"
    )
    p.add_argument(
        "--lag-variant", choices=("idle", "dirty16"), default="idle", help="guests of section 2c"
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=sorted(SECTIONS),
        help="run only these sections (default: all)",
    )


def standalone(
    module: str,
    doc: str,
    quick_help: str,
    add: Callable[[argparse.ArgumentParser], None],
    run: Callable[[int, argparse.Namespace], Awaitable[None]],
) -> None:
    """``python -m bench.<module>``: parse the arguments, start mosquitto, run."""
    p = argparse.ArgumentParser(
        prog=f"python -m bench.{module}", description=doc.split("\n", maxsplit=1)[0]
    )
    p.add_argument("--quick", action="store_true", help=quick_help)
    add(p)
    args = p.parse_args()
    configure_logging(LoggingSettings(level="warning"))
    with mosquitto() as port:
        asyncio.run(run(port, args))


def main() -> None:
    standalone(
        "rig_bench",
        __doc__,
        "fewer rounds, shorter caps (~2 min)",
        add_arguments,
        lambda port, args: run_rig_benchmarks(port, Plan.from_args(args)),
    )


if __name__ == "__main__":
    main()
