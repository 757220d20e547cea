"""Storage migration on the rig: copy-storage through the agent vs direct, sparse copies.

Issue 16 item 7: ``copy-storage all`` through the agent against libvirt called directly, and
how sparse a copied image stays.

``python -m bench.storage [--quick] [--rounds N]``. Figures are printed, not asserted. It starts
its own mosquitto, brings the project's two-host rig up (``tests/rig``; it takes the rig lock
and waits up to 15 minutes while another session uses the rig) and runs one agent per rig host
in this process with the ``libvirt`` back-end, as ``bench/rig_bench.py`` does. Every agent
figure is end to end as a scheduler sees it: publish the task (QoS 2), wait for the result;
every direct figure is the bare libvirt-python call in a worker thread, on a connection of its
own.

1. Agent vs direct: an ``idle`` 128 MiB guest with one local qcow2 disk (256 MiB virtual,
   64 MiB of it written with a pattern before) in each host's ``default`` pool, migrated with
   ``copy-storage: all`` A->B and back, through the agent (``migrate vm``, ``parameter:
   {migration-type: live, copy-storage: all}``, ``time-measurement: true``) and directly
   (``migrateToURI3(p2p_uri, {URI: migrate_uri, MIGRATE_DISKS: [vda]},
   LIVE|PEER2PEER|PERSIST_DEST|UNDEFINE_SOURCE|NON_SHARED_DISK)``). The direct call's flags
   and parameters are checked against what the agent's own code
   (``migration_flags``/``migration_params`` on the parsed task, with ``migrate-disks`` filled
   in as ``_prepare_storage`` does) gives for the same task. Rounds interleaved, the order
   flipping every round (agent, direct, direct, agent, ...), after one warm-up trip of each.
   A copy never writes over an image: before every leg the stale image that the previous leg
   left on its destination is removed (the agent refuses to copy over one; the direct run gets
   the same empty destination), outside the timed part.
2. Sparse images: a 1 GiB qcow2 holding 64 MiB of data, copied directly A->B (a) as is and
   (b) with the disk's ``<driver discard='unmap' detect_zeroes='unmap'>``: bytes allocated on
   the source and on the destination, the copy's time and the bytes sent on the rig's veth.

Everything is torn down on every exit path: the guests on both hosts and the images this run
made (after each section), the agents, the rig (also from ``atexit`` and, if this process is
SIGKILLed, by the rig's guard process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.rig_bench import (
    MIB,
    ROOT,
    AgentLeg,
    RigConns,
    Sched,
    agent_migrate,
    agent_pair,
    cache_dir,
    fmt,
    machine_facts,
    med,
    migrate_body,
    note,
    qemu_version,
    ratio,
    rig_conns,
    rig_session,
    spread,
    standalone,
    table,
    timed_section,
)

# The rig and the agents' settings live with the tests: bench.rig_bench put them on the path.
if str(ROOT / "tests" / "real") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests" / "real"))

from agents import rig_agent_settings

import libvirt
from asyncmigfra.hypervisor.virt.migrationparams import (
    MigrationTarget,
    migration_flags,
    migration_params,
)
from asyncmigfra.migration.plan import plan_migration
from asyncmigfra.model import MigrateSpec
from asyncmigfra.wire.parsing import parse_task
from rig import (
    Disk,
    Host,
    Rig,
    RigUnavailable,
    build_guests,
    domain_xml,
    ensure_system,
    wait_counter_above,
)
from rig.hosts import VETH
from rig.storage import (
    IMAGES,
    Scratch,
    allocated_bytes,
    create_image,
    flush_disk,
    remove_images,
    verify_pattern,
    write_pattern,
)

#: s to wait for the rig lock (another session's rig tests or benchmarks).
LOCK_WAIT = 900.0
GIB = 1024 * MIB
#: What the direct runs pass: the agent's flags for ``live`` + ``copy-storage: all`` on a
#: persistent domain, peer to peer (checked against the agent's code by ``agent_call``).
COPY_ALL_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    | libvirt.VIR_MIGRATE_NON_SHARED_DISK
)
COPY_ALL = {"migration-type": "live", "copy-storage": "all"}
#: libvirt >= 10.9: zero detection on the listed disks for the migration only (not in 9.0).
DETECT_ZEROES_PARAM = "VIR_MIGRATE_PARAM_MIGRATE_DISKS_DETECT_ZEROES"
#: s before a direct migration is aborted (libvirtd would keep a stuck p2p job forever).
DIRECT_CAP = 120.0
#: s an agent migration may take, publish -> result.
AGENT_LIMIT = 180.0
PATTERN = 0x5A


def flag_names(flags: int) -> str:
    names = [
        n.removeprefix("VIR_MIGRATE_")
        for n in dir(libvirt)
        if n.startswith("VIR_MIGRATE_")
        and not n.startswith("VIR_MIGRATE_PARAM")
        and isinstance(getattr(libvirt, n), int)
        and getattr(libvirt, n)
        and getattr(libvirt, n) & (getattr(libvirt, n) - 1) == 0  # single bits only
        and flags & getattr(libvirt, n)
    ]
    return "|".join(sorted(names)) or "0"


def agent_call(port: int, rig: Rig, vm: str, src: Host, dst: Host) -> tuple[int, dict[str, Any]]:
    """What the agent passes to ``migrateToURI3`` for this benchmark's task: the task parsed
    as the agent parses it, planned with the agent's settings (those ``agent_pair`` runs),
    ``migrate-disks`` filled in as ``LibvirtHypervisor._prepare_storage`` fills it, then the
    back-end's own ``migration_flags``/``migration_params``. The target is what the agent
    resolves from the ``hosts:`` map of ``tests/real/agents.py``."""
    settings = rig_agent_settings(port, rig, src, run="flagcheck")
    body = f"id: flagcheck\n{migrate_body(vm, dst.name, **COPY_ALL)}"
    spec = parse_task(body.encode()).subtasks[0]
    assert isinstance(spec, MigrateSpec), spec
    request = plan_migration(
        spec,
        defaults=settings.migration,
        driver=settings.hypervisor.driver,
        transport=settings.hypervisor.transport,
        memory_kib=128 * 1024,
    ).request
    request = replace(request, migrate_disks=("vda",))
    hosts = settings.hypervisor.options["hosts"]
    assert isinstance(hosts, Mapping), hosts
    target = MigrationTarget(
        host=dst.name,
        uri=str(hosts[dst.name]["uri"]),
        p2p_uri=str(hosts[dst.name]["p2p-uri"]),
        migrate_uri=str(hosts[dst.name]["migrate-uri"]),
    )
    return migration_flags(request, persistent=True), migration_params(request, target)


def direct_params(dst: Host, disks: Sequence[str] = ("vda",)) -> dict[str, object]:
    return {
        libvirt.VIR_MIGRATE_PARAM_URI: dst.migrate_uri,
        libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: list(disks),
    }


# --------------------------------------------------------------------------- guests, images


def mib_p50(values: Sequence[int]) -> str:
    return f"{(med(values) or 0) / MIB:.1f}" if values else "-"


def image_path(name: str) -> str:
    return f"{IMAGES}/{name}.qcow2"


def chunks(size: int, data: int, n: int = 8) -> list[tuple[int, int]]:
    """``n`` (offset, length) pieces of ``data`` bytes in all, spread evenly over ``size``."""
    step, length = size // n, data // n
    return [(i * step, length) for i in range(n)]


def start_with_disk(
    conns: RigConns,
    host: Host,
    name: str,
    kernel: Path,
    size: int,
    data: int,
    driver: dict[str, str] | None = None,
) -> str:
    """Create ``<name>.qcow2`` (``size``, sparse) in ``host``'s default pool, start a 128 MiB
    guest with it as ``vda`` and write ``data`` bytes of :data:`PATTERN` into it through
    QEMU (see :func:`chunks`); return the image's path."""
    path = create_image(host, image_path(name), size)
    disk = Disk(path, driver=driver or {})
    dom = conns.ctl[host.name].defineXML(domain_xml(name, kernel, 128, disks=[disk]))
    dom.create()
    wait_counter_above(dom, 0)
    for offset, length in chunks(size, data):
        write_pattern(dom, PATTERN, offset, length)
    flush_disk(dom)
    return path


def verify_data(conns: RigConns, host: Host, name: str, path: str, size: int, data: int) -> None:
    """The pattern is in the image on ``host`` (the running guest's disk, flushed first)."""
    flush_disk(conns.ctl[host.name].lookupByName(name))
    for offset, length in chunks(size, data):
        verify_pattern(host, path, PATTERN, offset, length)


def clean_up(conns: RigConns, rig: Rig, name: str, path: str) -> None:
    """The guest on both hosts, then its image on both (blocking)."""
    conns.remove_everywhere(name)
    for host in rig.hosts:
        with contextlib.suppress(Exception):
            remove_images(host, [path])


def direct_copy(
    conns: RigConns, name: str, src: Host, dst: Host, disks: Sequence[str] = ("vda",)
) -> float:
    """One direct p2p storage migration (blocking; run it in a thread); seconds. The call
    runs on the source's migrate-only connection; a timer aborts the job after
    :data:`DIRECT_CAP` on the control connection."""
    params = direct_params(dst, disks)

    def abort() -> None:
        with contextlib.suppress(libvirt.libvirtError):
            conns.ctl[src.name].lookupByName(name).abortJob()

    timer = threading.Timer(DIRECT_CAP, abort)
    timer.daemon = True
    t0 = time.perf_counter()
    timer.start()
    try:
        dom = conns.mig[src.name].lookupByName(name)
        dom.migrateToURI3(dst.p2p_uri, params, COPY_ALL_FLAGS)
    finally:
        timer.cancel()
    return time.perf_counter() - t0


def sent_bytes(host: Host) -> int | None:
    """Bytes ``host`` has sent on the rig's veth so far (``None`` in loopback mode, where the
    hosts share the root namespace's ``lo`` with everything else)."""
    if host.netns is None:
        return None
    proc = subprocess.run(
        ["ip", "-n", host.netns, "-j", "-s", "link", "show", VETH],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    with contextlib.suppress(ValueError, LookupError, TypeError):
        return int(json.loads(proc.stdout)[0]["stats64"]["tx"]["bytes"])
    return None


# --------------------------------------------------------------------------- 1. agent vs direct


@dataclass
class CopyFigures:
    direct_s: list[float] = field(default_factory=list)
    agent_s: list[float] = field(default_factory=list)
    legs: list[AgentLeg] = field(default_factory=list)
    #: s spent removing the stale image on the destination before each leg (untimed)
    clear_s: list[float] = field(default_factory=list)
    #: bytes the source sent on the rig's veth per leg
    sent_direct: list[int] = field(default_factory=list)
    sent_agent: list[int] = field(default_factory=list)

    def clear(self) -> None:
        for series in (
            self.direct_s,
            self.agent_s,
            self.legs,
            self.clear_s,
            self.sent_direct,
            self.sent_agent,
        ):
            series.clear()


async def copy_trips(
    rig: Rig,
    conns: RigConns,
    to_a: Sched,
    to_b: Sched,
    name: str,
    path: str,
    rounds: int,
) -> CopyFigures:
    """A->B->A of guest ``name`` (running on A): one warm-up trip each way, then ``rounds``
    rounds of an agent and a direct trip, the order flipping every round."""
    figs = CopyFigures()

    async def clear_destination(dst: Host) -> None:
        t0 = time.perf_counter()
        await asyncio.to_thread(remove_images, dst, [path])
        figs.clear_s.append(time.perf_counter() - t0)

    async def leg(
        src: Host, dst: Host, run: Callable[[], Awaitable[None]], sent: list[int]
    ) -> None:
        """Clear the destination, run the leg, count what ``src`` sent (all untimed)."""
        await clear_destination(dst)
        before = await asyncio.to_thread(sent_bytes, src)
        await run()
        after = await asyncio.to_thread(sent_bytes, src)
        if before is not None and after is not None:
            sent.append(after - before)

    async def direct_trip() -> None:
        for src, dst in ((rig.a, rig.b), (rig.b, rig.a)):

            async def run(src: Host = src, dst: Host = dst) -> None:
                figs.direct_s.append(await asyncio.to_thread(direct_copy, conns, name, src, dst))

            await leg(src, dst, run, figs.sent_direct)

    async def agent_trip() -> None:
        for s, src, dst in ((to_a, rig.a, rig.b), (to_b, rig.b, rig.a)):

            async def run(s: Sched = s, dst: Host = dst) -> None:
                _, result = await agent_migrate(s, name, dst, AGENT_LIMIT, **COPY_ALL)
                figs.agent_s.append(result.ms / 1000)
                figs.legs.append(result)

            await leg(src, dst, run, figs.sent_agent)

    await agent_trip()  # warm-up: both QEMUs' first storage migration, the agents' pools
    await direct_trip()
    figs.clear()
    for i in range(rounds):
        for trip in (agent_trip, direct_trip) if i % 2 == 0 else (direct_trip, agent_trip):
            await trip()
    return figs


async def bench_agent_vs_direct(
    port: int, rig: Rig, conns: RigConns, to_a: Sched, to_b: Sched, kernel: Path, rounds: int
) -> None:
    size, data = 256 * MIB, 64 * MIB
    name = f"bench-st-{uuid.uuid4().hex[:6]}"
    path = image_path(name)
    agent_flags, agent_params = agent_call(port, rig, name, rig.a, rig.b)
    ours = direct_params(rig.b)
    same = agent_flags == COPY_ALL_FLAGS and agent_params == ours
    figs = CopyFigures()
    verified = "not checked"
    try:
        await asyncio.to_thread(start_with_disk, conns, rig.a, name, kernel, size, data)
        figs = await copy_trips(rig, conns, to_a, to_b, name, path, rounds)
        await asyncio.to_thread(verify_data, conns, rig.a, name, path, size, data)
        verified = "all 64 MiB of the pattern read back on A after the last trip"
    finally:
        await asyncio.to_thread(clean_up, conns, rig, name, path)
    direct_s, agent_s, legs = figs.direct_s, figs.agent_s, figs.legs
    trips_d = [direct_s[i] + direct_s[i + 1] for i in range(0, len(direct_s) - 1, 2)]
    trips_a = [agent_s[i] + agent_s[i + 1] for i in range(0, len(agent_s) - 1, 2)]
    paired = [ta / td for td, ta in zip(trips_d, trips_a, strict=False) if td]
    pre_ms = [x.prechecks_ms for x in legs if x.prechecks_ms is not None]
    share = [x.prechecks_ms / x.ms for x in legs if x.prechecks_ms is not None and x.ms]
    outside = [x.ms - x.migrate_ms for x in legs if x.migrate_ms is not None]
    table(
        f"1. copy-storage all, A->B->A: 128 MiB 'idle' guest + 256 MiB qcow2 (64 MiB written), "
        f"{len(trips_a)} interleaved rounds (s)",
        ["run", "legs", "p50/leg", "p10-p90/leg", "min-max/leg", "p50/trip", "p10-p90/trip"],
        [
            [
                label,
                len(series),
                fmt(med(series), 3),
                spread(series),
                f"{min(series):.3f}-{max(series):.3f}" if series else "-",
                fmt(med(trips), 3),
                spread(trips),
            ]
            for label, series, trips in (
                ("direct migrateToURI3", direct_s, trips_d),
                ("agent (publish -> result)", agent_s, trips_a),
            )
        ],
    )
    table(
        "1'. ratio agent/direct, and where an agent leg's time goes",
        ["figure", "value"],
        [
            ["ratio p50 legs", ratio(med(agent_s), med(direct_s))],
            ["ratio p50 trips", ratio(med(trips_a), med(trips_d))],
            ["ratio paired p50 (agent trip / adjacent direct trip)", fmt(med(paired), 3)],
            [
                "agent - direct, p50 legs (ms)",
                fmt(((med(agent_s) or 0) - (med(direct_s) or 0)) * 1000, 0)
                if agent_s and direct_s
                else "-",
            ],
            [
                "agent overall p50 (s)",
                fmt(med([x.overall_ms / 1000 for x in legs if x.overall_ms is not None]), 3),
            ],
            [
                "agent migrate p50 (s)",
                fmt(med([x.migrate_ms / 1000 for x in legs if x.migrate_ms is not None]), 3),
            ],
            ["agent pre-checks p50 (ms)", fmt(med(pre_ms), 1)],
            ["agent pre-checks p10-p90 (ms)", f"{spread(pre_ms)}"],
            [
                "agent pre-checks share of the leg p50",
                f"{100 * (med(share) or 0):.2f} %" if share else "-",
            ],
            ["agent outside the job p50 (ms)", fmt(med(outside), 1)],
            [
                "untimed: removing the stale destination image p50 (ms)",
                fmt((med(figs.clear_s) or 0) * 1000, 1) if figs.clear_s else "-",
            ],
            [
                "sent by the source on the veth per leg, p50 direct / agent (MiB)",
                f"{mib_p50(figs.sent_direct)} / {mib_p50(figs.sent_agent)}",
            ],
            ["data check", verified],
        ],
    )
    note(
        f"direct = lookupByName + migrateToURI3(p2p_uri, {{URI: migrate_uri, MIGRATE_DISKS:\n"
        f"  [vda]}}, {flag_names(COPY_ALL_FLAGS)}) on a connection of its own, in a thread.\n"
        f"agent's call for the same task (its migration_flags/migration_params): "
        f"{flag_names(agent_flags)},\n"
        f"  {agent_params}: {'identical' if same else 'DIFFERENT'} to the direct call's.\n"
        "agent = 'migrate vm' with parameter {migration-type: live, copy-storage: all},\n"
        "  published and answered over MQTT. overall/migrate/pre-checks = the result's\n"
        "  time-measurement tags: pre-checks = the checks before the job (the destination's\n"
        "  pool, no image at the path, room; the disks again right before the job and the\n"
        "  record of what it creates are in 'migrate'); outside the job = end to end minus\n"
        "  'migrate' (MQTT, parsing, lanes, pre-checks, rendering).\n"
        "each leg mirrors the whole 256 MiB disk (NBD), then migrates the 128 MiB of RAM, over\n"
        "  the rig's veth; 'sent' = bytes the source sent there during the leg (untimed\n"
        "  count): only the 64 MiB of data crosses as data, the zero ranges and the idle\n"
        "  guest's zero pages do not, although each destination copy is fully allocated\n"
        "  (see 2.) and is the next leg's source. TCG QEMUs on "
        f"{os.cpu_count()} cores: read a ratio within the\n"
        "  p10-p90 spreads of 1 as 'no difference measurable at this n'."
    )
    if not same:
        raise RuntimeError(
            f"the direct call differs from the agent's: {flag_names(agent_flags)} "
            f"{agent_params} vs {flag_names(COPY_ALL_FLAGS)} {ours}"
        )


# --------------------------------------------------------------------------- 2. sparse copy


@dataclass
class SparseRun:
    label: str
    source: list[int] = field(default_factory=list)
    dest: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    #: bytes A sent on the veth during the copy (disk, RAM, libvirt's RPC)
    wire: list[int] = field(default_factory=list)


async def bench_sparse(rig: Rig, conns: RigConns, kernel: Path, repeats: int) -> None:
    size, data = 1 * GIB, 64 * MIB
    variants = {
        "as is": SparseRun("as is"),
        "discard=unmap detect_zeroes=unmap": SparseRun("discard=unmap detect_zeroes=unmap"),
    }
    drivers = {
        "as is": None,
        "discard=unmap detect_zeroes=unmap": {"discard": "unmap", "detect_zeroes": "unmap"},
    }
    labels = list(variants)
    for i in range(repeats):
        for label in labels if i % 2 == 0 else labels[::-1]:
            run = variants[label]
            name = f"bench-sp-{uuid.uuid4().hex[:6]}"
            path = image_path(name)
            try:
                await asyncio.to_thread(
                    start_with_disk, conns, rig.a, name, kernel, size, data, drivers[label]
                )
                run.source.append(await asyncio.to_thread(allocated_bytes, rig.a, path))
                before = await asyncio.to_thread(sent_bytes, rig.a)
                run.seconds.append(await asyncio.to_thread(direct_copy, conns, name, rig.a, rig.b))
                after = await asyncio.to_thread(sent_bytes, rig.a)
                if before is not None and after is not None:
                    run.wire.append(after - before)
                await asyncio.to_thread(verify_data, conns, rig.b, name, path, size, data)
                run.dest.append(await asyncio.to_thread(allocated_bytes, rig.b, path))
            finally:
                await asyncio.to_thread(clean_up, conns, rig, name, path)

    def mib(values: Sequence[int]) -> str:
        return "/".join(f"{v / MIB:.1f}" for v in values) or "-"

    table(
        f"2. allocated bytes after a direct copy-storage all A->B: 1 GiB qcow2 with 64 MiB of "
        f"data (8 x 8 MiB spread over the disk), {repeats} copies per variant",
        [
            "disk <driver>",
            "source allocated MiB",
            "destination allocated MiB",
            "copy time s",
            "copy p50 s",
            "sent A->B MiB",
        ],
        [
            [
                run.label,
                mib(run.source),
                mib(run.dest),
                "/".join(f"{s:.2f}" for s in run.seconds) or "-",
                fmt(med(run.seconds), 2),
                mib(run.wire),
            ]
            for run in variants.values()
        ],
    )
    daemon = "?"
    with contextlib.suppress(libvirt.libvirtError):
        v = conns.ctl[rig.a.name].getLibVersion()
        daemon = f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"
    qemu = (await asyncio.to_thread(qemu_version, rig.a.local_uri)).split()[0]
    note(
        "allocated = st_blocks * 512 of the image file (rig.storage.allocated_bytes), the\n"
        "destination's read after the guest's disk was flushed there; values per copy.\n"
        "copy time = the whole migrateToURI3 call (disk, then 128 MiB of RAM), the same flags\n"
        "and parameters as in 1. sent A->B = bytes rig-a sent on the rig's veth during the\n"
        "call (the NBD disk mirror, the RAM, libvirt's RPC; '-' in loopback mode).\n"
        f"what this libvirt ({daemon}) / QEMU ({qemu}) can do about zero blocks: the default\n"
        "copy (NBD drive-mirror of the whole disk) writes the whole virtual disk on the\n"
        "destination: the unallocated ranges do not cross the wire as data ('sent' is about\n"
        "the 64 MiB written), but the destination allocates them, so the copy of a\n"
        "sparse image is fully allocated there. With the disk's detect_zeroes='unmap' (and\n"
        "discard='unmap') in the domain XML, which the destination domain inherits, the\n"
        "destination QEMU unmaps zero writes instead and the copy stays sparse. libvirt 10.9\n"
        "adds "
        "VIR_MIGRATE_PARAM_MIGRATE_DISKS_DETECT_ZEROES (per migration, no XML change):\n"
        f"  hasattr(libvirt, {DETECT_ZEROES_PARAM!r}) = {hasattr(libvirt, DETECT_ZEROES_PARAM)} "
        f"here (libvirt-python {libvirt.getVersion() // 1_000_000}."
        f"{libvirt.getVersion() // 1000 % 1000}), so it is not available."
    )


# --------------------------------------------------------------------------- running it


@dataclass
class Plan:
    quick: bool
    rounds: int
    sparse_repeats: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = bool(args.quick)
        return cls(
            quick=quick,
            rounds=getattr(args, "rounds", 0) or (4 if quick else 15),
            sparse_repeats=1 if quick else 3,
        )


async def rig_sections(port: int, rig: Rig, kernel: Path, plan: Plan) -> None:
    async with rig_conns(rig) as conns:
        scratch = await asyncio.to_thread(Scratch, rig.hosts)
        try:
            async with agent_pair(port, rig) as (to_a, to_b):
                await timed_section(
                    "1. agent vs direct",
                    lambda: bench_agent_vs_direct(
                        port, rig, conns, to_a, to_b, kernel, plan.rounds
                    ),
                )
            await timed_section(
                "2. sparse images",
                lambda: bench_sparse(rig, conns, kernel, plan.sparse_repeats),
            )
        finally:
            await asyncio.to_thread(scratch.cleanup)


async def run_storage(port: int, plan: Plan) -> None:
    """Everything, on mosquitto at 127.0.0.1:``port``; the rig is up only inside."""
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
            kernel = (await asyncio.to_thread(build_guests, cache_dir() / "guests", ("idle",)))[
                "idle"
            ]
        except (RigUnavailable, OSError, RuntimeError) as exc:
            print(f"\n!! rig unavailable, nothing measured: {exc}")
            return
        facts = [
            [
                f"libvirt.{DETECT_ZEROES_PARAM}",
                "present" if hasattr(libvirt, DETECT_ZEROES_PARAM) else "absent",
            ],
            ["rounds (section 1)", plan.rounds],
        ]
        async with rig_session("storagebench", facts) as rig:
            await rig_sections(port, rig, kernel, plan)
    finally:
        if main_thread:
            loop.remove_signal_handler(signal.SIGTERM)
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"total {time.perf_counter() - t_start:.1f} s; load average (1/5/15 min) {load}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rounds", type=int, default=0, help="A->B->A rounds of section 1 (default 15, quick 4)"
    )


def main() -> None:
    standalone(
        "storage",
        __doc__,
        "fewer rounds and copies (~1 min)",
        add_arguments,
        lambda port, args: run_storage(port, Plan.from_args(args)),
    )


if __name__ == "__main__":
    main()
