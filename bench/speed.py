"""The agent against a bare aiomqtt echo of the same packet pattern (issue 20).

``python -m bench.speed [--quick] [--rounds N]`` (also part of ``python -m bench``).

Each row is its own process answering ``start vm`` tasks through one loopback mosquitto
(``set_tcp_nodelay true``), driven by the same load generator (:mod:`bench.load`): sequential
tasks (p50, p99), then tasks with 20 in flight (tasks/s). Rows:

- ``echo``: :mod:`bench.echo`, a canned result and the agent's two events (``accepted``,
  ``done``) at QoS 1, no parsing, no journal, every publish pipelined (the stronger echo);
- ``echo, awaiting each``: the same, awaiting each publish's acknowledgement in turn (most
  likely the issue's reference echo, 1.63 ms / 911 tasks/s there);
- ``echo, no events``: the result only;
- ``echo, events QoS 0``: the events at QoS 0 (what ``communicator.event-qos: 0`` sends);
- ``echo, QoS 0, awaiting``: the same, awaiting each publish in turn;
- ``echo, durable``: the pipelined echo that first writes each task to a file and
  ``fdatasync``-s it (in a thread) before any of its answer: the floor of the agent's promise
  (``accepted`` only once the task is durable) on this machine's disk, without the agent's work;
- ``agent``: the agent, ``dummy`` hypervisor, default config (journal on);
- ``agent, journal off``: ``agent.state-dir: none``;
- ``agent, event-qos 0``: journal on, ``communicator.event-qos: 0``;
- ``original``: the original C++ migfra daemon (:mod:`bench.original`), ``dummy``
  hypervisor, ``TCP_NODELAY`` forced on its sockets; only when built (``bench/original.sh``,
  or ``MIGFRA_ORIGINAL=/path/to/migfra``), else the table says it was not. ``agent`` and
  ``agent, event-qos 0`` are also compared with it. It answers with its result only (no
  events, no journal): the packets of ``echo, no events``.

``--baseline DIR`` adds ``agent, baseline`` and ``journal off, baseline`` (the package from
another checkout's ``src``, e.g. a ``git worktree`` of the commit before a change), compared
with the echoes and with ``agent`` and ``agent, journal off``; ``--only NAME`` (repeatable)
runs only those rows (and the rows they are compared with), for a quicker before/after.

Rounds are interleaved (every row once per round, in turn) and the medians of the rounds
are printed, with the answering process's CPU time per task, and each agent row's ratios to
both its echoes, labelled (``echo`` and ``echo, awaiting each``; for ``event-qos 0`` the
QoS 0 pair; ``agent`` also to ``echo, durable``; both also to ``original`` when it runs):
p50 ratio = agent / echo (target <= 1.15), throughput ratio = agent / echo (target >= 0.95).
Absolute figures move with the machine's load; the ratios from one run are what counts.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from asyncmigfra.logs import configure_logging
from asyncmigfra.settings import LoggingSettings
from bench.common import mosquitto
from bench.load import Round, agent_process, connected, measure
from bench.original import NOT_BUILT, find_binary, original_process


@contextmanager
def echo_process(
    port: int,
    host: str,
    *,
    events: bool = True,
    event_qos: int = 1,
    await_each: bool = False,
    durable: bool = False,
) -> Iterator[subprocess.Popen[bytes]]:
    cmd = [sys.executable, "-m", "bench.echo", "--port", str(port), "--host", host]
    cmd += ["--event-qos", str(event_qos)]
    if not events:
        cmd.append("--no-events")
    if await_each:
        cmd.append("--await-each")
    # The same file system as the agent's journal (bench.load puts it in a temporary dir).
    with tempfile.TemporaryDirectory() as tmp:
        if durable:
            cmd += ["--durable", tmp]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        try:
            yield proc
        finally:
            proc.terminate()
            proc.wait(timeout=30)


Starter = Callable[[int, str], AbstractContextManager[subprocess.Popen[bytes]]]


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    start: Starter
    #: The rows this one is compared with: the pipelined echo, then the awaiting one
    #: (empty: an echo row, no ratio).
    references: tuple[str, ...] = ()
    #: False: the process says nothing on the status topic (the original); the load
    #: generator sends it tasks until one is answered.
    announces_online: bool = True


QOS1 = ("echo", "echo, awaiting each")
QOS0 = ("echo, events QoS 0", "echo, QoS 0, awaiting")
ORIGINAL = "original"

ROWS = (
    Row("echo", echo_process),
    Row("echo, awaiting each", lambda port, host: echo_process(port, host, await_each=True)),
    Row("echo, no events", lambda port, host: echo_process(port, host, events=False)),
    Row("echo, events QoS 0", lambda port, host: echo_process(port, host, event_qos=0)),
    Row(
        "echo, QoS 0, awaiting",
        lambda port, host: echo_process(port, host, event_qos=0, await_each=True),
    ),
    Row("echo, durable", lambda port, host: echo_process(port, host, durable=True)),
    Row(
        "agent",
        lambda port, host: agent_process(port, host, journal=True),
        (*QOS1, "echo, durable", ORIGINAL),
    ),
    Row("agent, journal off", lambda port, host: agent_process(port, host, journal=False), QOS1),
    Row(
        "agent, event-qos 0",
        lambda port, host: agent_process(port, host, journal=True, event_qos=0),
        (*QOS0, ORIGINAL),
    ),
)


@dataclass(frozen=True, slots=True)
class Plan:
    rounds: int
    n_seq: int
    n_tput: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        rounds, n_seq, n_tput = (2, 200, 600) if args.quick else (5, 500, 2000)
        return cls(getattr(args, "rounds", None) or rounds, n_seq, n_tput)


async def one_round(port: int, row: Row, plan: Plan) -> Round:
    host = f"speed-{uuid.uuid4().hex[:6]}"
    with row.start(port, host) as proc:
        async with connected(port, host, probe=None if row.announces_online else proc) as c:
            return await measure(c, n_seq=plan.n_seq, n_tput=plan.n_tput, pid=proc.pid)


def baseline_rows(src: Path) -> tuple[Row, ...]:
    return (
        Row(
            "agent, baseline",
            lambda port, host: agent_process(port, host, src=src, journal=True),
            (*QOS1, "agent"),
        ),
        Row(
            "journal off, baseline",
            lambda port, host: agent_process(port, host, src=src, journal=False),
            (*QOS1, "agent, journal off"),
        ),
    )


def original_rows() -> tuple[Row, ...]:
    """The original's row if it is built, else none."""
    binary = find_binary()
    if binary is None:
        return ()
    return (
        Row(
            ORIGINAL,
            lambda port, host: original_process(binary, port, host),
            announces_online=False,
        ),
    )


def select_rows(only: list[str] | None = None, baseline: Path | None = None) -> tuple[Row, ...]:
    """The rows to run: all (with the baseline's, if given, and the original's, if built),
    or only those named and the rows they are compared with, in the table's order."""
    rows = ROWS + original_rows() + (baseline_rows(baseline) if baseline is not None else ())
    present = {row.name for row in rows}
    rows = tuple(
        replace(row, references=tuple(r for r in row.references if r in present)) for row in rows
    )
    if not only:
        return rows
    wanted = set(only)
    unknown = wanted - present
    if ORIGINAL in unknown:
        raise SystemExit(NOT_BUILT)
    if unknown:
        raise SystemExit(f"unknown rows: {', '.join(sorted(unknown))}")
    for row in rows:
        if row.name in wanted:
            wanted.update(row.references)
    return tuple(row for row in rows if row.name in wanted)


async def run_speed(port: int, plan: Plan, rows: tuple[Row, ...] | None = None) -> dict[str, Round]:
    """Every row once per round, rounds interleaved; the medians per row (default: every
    row, the original's if built)."""
    rows = select_rows() if rows is None else rows
    got: dict[str, list[Round]] = {row.name: [] for row in rows}
    for _ in range(plan.rounds):
        for row in rows:
            got[row.name].append(await one_round(port, row, plan))
    return {
        name: Round(
            statistics.median(r.p50_ms for r in rounds),
            statistics.median(r.p99_ms for r in rounds),
            statistics.median(r.tasks_per_s for r in rounds),
            statistics.median(r.cpu_ms_per_task for r in rounds),
        )
        for name, rounds in got.items()
    }


def table(medians: dict[str, Round], plan: Plan, rows: tuple[Row, ...] | None = None) -> list[str]:
    rows = select_rows() if rows is None else rows
    lines = [
        f"{plan.rounds} interleaved rounds; {plan.n_seq} sequential tasks, "
        f"{plan.n_tput} with 20 in flight; medians of the rounds",
        f"{'':22s} {'p50 ms':>8s} {'p99 ms':>8s} {'tasks/s':>8s} {'CPU ms/task':>11s}",
    ]
    for row in rows:
        m = medians[row.name]
        lines.append(
            f"{row.name:22s} {m.p50_ms:8.3f} {m.p99_ms:8.3f} {m.tasks_per_s:8.0f}"
            f" {m.cpu_ms_per_task:11.3f}"
        )
    lines.append("ratios (row / reference): p50, tasks/s, CPU ms per task")
    for row in rows:
        m = medians[row.name]
        for reference in row.references:
            ref = medians[reference]
            lines.append(
                f"  {row.name:20s} to {reference:22s} {m.p50_ms / ref.p50_ms:6.3f}"
                f" {m.tasks_per_s / ref.tasks_per_s:6.3f}"
                f" {m.cpu_ms_per_task / ref.cpu_ms_per_task:6.3f}"
            )
    lines.append(
        "targets (agent to echo, journal on): p50 ratio <= 1.15, tput ratio >= 0.95;"
        " the pipelined echo is the stronger reference; 'echo, durable' is the floor"
        " of a durable write per task on this disk"
    )
    if ORIGINAL in medians:
        lines.append(
            "'original': the C++ migfra (dummy hypervisor, TCP_NODELAY forced by an"
            " LD_PRELOAD shim), its result only, no events"
        )
    else:
        lines.append(NOT_BUILT)
    return lines


async def amain(args: argparse.Namespace) -> None:
    configure_logging(LoggingSettings(level="warning"))
    plan = Plan.from_args(args)
    rows = select_rows(args.only, args.baseline)
    with mosquitto() as port:
        medians = await run_speed(port, plan, rows)
    print("\n== the agent against a bare aiomqtt echo (bench/speed.py)")
    for line in table(medians, plan, rows):
        print(f"  {line}")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.speed")
    p.add_argument("--quick", action="store_true", help="fewer rounds and tasks (a smoke run)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5, --quick 2)")
    p.add_argument("--baseline", type=Path, help="also run the agent of this checkout")
    p.add_argument("--only", action="append", help="run only this row (repeatable)")
    asyncio.run(amain(p.parse_args()))


if __name__ == "__main__":
    main()
