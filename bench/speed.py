"""The agent against a bare aiomqtt echo of the same packet pattern (issue 20).

``python -m bench.speed [--quick] [--rounds N]`` (also part of ``python -m bench``).

Each row is its own process answering ``start vm`` tasks through one loopback mosquitto
(``set_tcp_nodelay true``), driven by the same load generator (:mod:`bench.load`): sequential
tasks (p50, p99), then tasks with 20 in flight (tasks/s). Rows:

- ``echo``: :mod:`bench.echo`, a canned result and the agent's two events (``accepted``,
  ``done``) at QoS 1, no parsing, no journal;
- ``echo, no events``: the result only;
- ``echo, events QoS 0``: the events at QoS 0 (what ``communicator.event-qos: 0`` sends);
- ``agent``: the agent, ``dummy`` hypervisor, default config (journal on);
- ``agent, journal off``: ``agent.state-dir: none``;
- ``agent, event-qos 0``: journal on, ``communicator.event-qos: 0``.

Rounds are interleaved (every row once per round, in turn) and the medians of the rounds
are printed with each agent row's ratios to its echo (``echo``, or ``echo, events QoS 0``
for ``event-qos 0``): p50 ratio = agent / echo (target <= 1.15), throughput ratio =
agent / echo (target >= 0.95). Absolute figures move with the machine's load; the ratios
from one run are what counts. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from asyncmigfra.logs import configure_logging
from asyncmigfra.settings import LoggingSettings
from bench.common import mosquitto
from bench.load import Round, agent_process, connected, measure


@contextmanager
def echo_process(
    port: int, host: str, *, events: bool = True, event_qos: int = 1
) -> Iterator[subprocess.Popen[bytes]]:
    cmd = [sys.executable, "-m", "bench.echo", "--port", str(port), "--host", host]
    cmd += ["--event-qos", str(event_qos)]
    if not events:
        cmd.append("--no-events")
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
    #: The row this one is compared with (``None``: an echo row, no ratio).
    reference: str | None = None


ROWS = (
    Row("echo", echo_process),
    Row("echo, no events", lambda port, host: echo_process(port, host, events=False)),
    Row("echo, events QoS 0", lambda port, host: echo_process(port, host, event_qos=0)),
    Row("agent", lambda port, host: agent_process(port, host, journal=True), "echo"),
    Row(
        "agent, journal off",
        lambda port, host: agent_process(port, host, journal=False),
        "echo",
    ),
    Row(
        "agent, event-qos 0",
        lambda port, host: agent_process(port, host, journal=True, event_qos=0),
        "echo, events QoS 0",
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
    with row.start(port, host):
        async with connected(port, host) as c:
            return await measure(c, n_seq=plan.n_seq, n_tput=plan.n_tput)


async def run_speed(port: int, plan: Plan) -> dict[str, Round]:
    """Every row once per round, rounds interleaved; the medians per row."""
    got: dict[str, list[Round]] = {row.name: [] for row in ROWS}
    for _ in range(plan.rounds):
        for row in ROWS:
            got[row.name].append(await one_round(port, row, plan))
    return {
        name: Round(
            statistics.median(r.p50_ms for r in rounds),
            statistics.median(r.p99_ms for r in rounds),
            statistics.median(r.tasks_per_s for r in rounds),
        )
        for name, rounds in got.items()
    }


def table(medians: dict[str, Round], plan: Plan) -> list[str]:
    lines = [
        f"{plan.rounds} interleaved rounds; {plan.n_seq} sequential tasks, "
        f"{plan.n_tput} with 20 in flight; medians of the rounds",
        f"{'':22s} {'p50 ms':>8s} {'p99 ms':>8s} {'tasks/s':>8s}   "
        f"{'p50 ratio':>9s} {'tput ratio':>10s}  (to)",
    ]
    for row in ROWS:
        m = medians[row.name]
        line = f"{row.name:22s} {m.p50_ms:8.3f} {m.p99_ms:8.3f} {m.tasks_per_s:8.0f}"
        if row.reference is not None:
            ref = medians[row.reference]
            line += (
                f"   {m.p50_ms / ref.p50_ms:9.3f} {m.tasks_per_s / ref.tasks_per_s:10.3f}"
                f"  ({row.reference})"
            )
        lines.append(line)
    lines.append("targets (agent to echo, journal on): p50 ratio <= 1.15, tput ratio >= 0.95")
    return lines


async def amain(args: argparse.Namespace) -> None:
    configure_logging(LoggingSettings(level="warning"))
    plan = Plan.from_args(args)
    with mosquitto() as port:
        medians = await run_speed(port, plan)
    print("\n== the agent against a bare aiomqtt echo (bench/speed.py)")
    for line in table(medians, plan):
        print(f"  {line}")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.speed")
    p.add_argument("--quick", action="store_true", help="fewer rounds and tasks (a smoke run)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5, --quick 2)")
    asyncio.run(amain(p.parse_args()))


if __name__ == "__main__":
    main()
