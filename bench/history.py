"""What the history costs the journal (issue 19 item 2): ``python -m bench.history [--rounds N]``.

One task's journal cycle as the agent runs it, in this process with the real journal (SQLite
in its thread, in a temporary directory on ``/var/tmp``): ``accepted`` (awaited: fsynced),
``running`` (awaited), then ``finished`` with the result and ``delivered`` (not awaited; they
go into the next task's transaction, as in the agent). Timed from ``accepted`` to the end of
the cycle, sequentially, with the history off (``history-max-entries: 0``) and on (one entry
per task), rounds interleaved; the medians and their ratio are printed, not asserted. The
whole task round trip through a broker is ``python -m bench --baseline DIR``.

Then, on a history of 100000 entries: the time of a query of 1000 entries, and how long an
``accepted`` record (the promise a scheduler waits for) takes alone and while 8 history
queries of 1000 entries are in flight (the most the agent reads at once), side by side.

``--lag``: the event loop's lag while a client asks for 1000 entries continuously (rounds of 8
queries at once, the most the agent answers at once) through the dispatcher as ``app.Agent``
wires it (real journal of 100000 entries, results rendered as ``app.Agent._deliver`` renders
them, no broker): a probe sleeps 1 ms again and again and records how late it wakes. With
``--baseline DIR`` (a ``git worktree`` of the commit before a change) both checkouts run
as processes, rounds interleaved, and the medians are printed side by side with their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from asyncmigfra.hypervisor.dummy import DummyHypervisor
from asyncmigfra.model import ResultEntry, ResultMessage, TaskKind
from asyncmigfra.settings import default_settings
from asyncmigfra.tasks.dispatching import Dispatcher
from asyncmigfra.tasks.history import INSERT, HistoryQuery, history_rows
from asyncmigfra.tasks.journal import Journal
from asyncmigfra.wire.events import Events
from asyncmigfra.wire.parsing import parse_task
from asyncmigfra.wire.rendering import render_result


async def _cycles(directory: Path, *, history: bool, tasks: int) -> float:
    """Median ms of ``tasks`` sequential journal cycles."""
    journal = Journal(directory, history_max_entries=100_000 if history else 0)
    await journal.open()
    times = []
    for i in range(tasks):
        key = f"k{i}"
        started = time.perf_counter()
        await journal.accepted(
            key, task_id=f"t{i}", payload=b"x" * 200, response_topic=None, correlation=None
        )
        await journal.running(key)
        entry = ResultEntry(
            vm_name=f"vm{i % 7}", status="success", started=time.time(), seconds=0.1
        )
        result = ResultMessage(
            result="vm started", entries=[entry], id=f"t{i}", task=TaskKind.START
        )
        rows = history_rows(key, result, time.time()) if journal.keeps_history else ()
        journal.finished(key, b"result: vm started" * 8, rows)
        journal.delivered(key)
        times.append(time.perf_counter() - started)
    await journal.close()
    return statistics.median(times) * 1000


async def main(rounds: int, tasks: int) -> None:
    figures: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for history in (False, True):
            with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
                figures[history].append(await _cycles(Path(tmp), history=history, tasks=tasks))
    off = statistics.median(figures[False])
    on = statistics.median(figures[True])
    print(f"journal cycle per task, median of {rounds} rounds x {tasks} tasks:")
    print(f"  history off  {off:.3f} ms")
    print(f"  history on   {on:.3f} ms")
    print(f"  ratio        {on / off:.3f}")


async def _accepted_ms(journal: Journal, key: str) -> float:
    started = time.perf_counter()
    await journal.accepted(
        key, task_id=key, payload=b"x" * 200, response_topic=None, correlation=None
    )
    return (time.perf_counter() - started) * 1000


async def _full_history(directory: Path) -> None:
    """A journal in ``directory`` with a history of 100000 entries."""
    journal = Journal(directory)
    await journal.open()
    await journal.close()
    now = time.time()
    with sqlite3.connect(directory / "journal.sqlite") as db:
        db.executemany(
            INSERT,
            [(now - 100_000 + i, f"k{i}", 0, f"migrate-{i:010x}", "migrate vm",
              f"web-{i % 500}", "success", None, None, 2.5, "host-b", 100.0)
             for i in range(100_000)],
        )  # fmt: skip


async def contention(samples: int) -> None:
    """``accepted`` alone and behind 8 history queries, on a full history."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        directory = Path(tmp)
        await _full_history(directory)
        journal = Journal(directory)
        await journal.open()
        everything = HistoryQuery(vm_name=None, since=None, limit=1000)
        reads = []
        for _ in range(10):
            started = time.perf_counter()
            await journal.history(everything)
            reads.append((time.perf_counter() - started) * 1000)
        alone, behind = [], []
        for i in range(samples):
            alone.append(await _accepted_ms(journal, f"a{i}"))
            queries = [journal.history(everything) for _ in range(8)]
            await asyncio.sleep(random.random() * 0.005)  # the reads are under way by now
            behind.append(await _accepted_ms(journal, f"b{i}"))
            await asyncio.gather(*queries)
        await journal.close()

    def q(values: list[float], share: float) -> float:
        return sorted(values)[round(share * (len(values) - 1))]

    print(f"history of 100000 entries: a query of 1000 takes {statistics.median(reads):.1f} ms")
    print(f"accepted, {samples} samples      p50       p99       max")
    for name, values in (("alone", alone), ("behind 8 queries", behind)):
        print(
            f"  {name:18} {q(values, 0.5):6.2f} ms {q(values, 0.99):6.2f} ms {max(values):6.2f} ms"
        )
    print(f"  ratio p50          x{q(behind, 0.5) / q(alone, 0.5):.1f}")


class _NoEvents:
    def emit(self, event: object, *, terminal: bool = False, qos: int = 1) -> None:
        pass


async def loop_lag(rounds: int) -> dict[str, Any]:
    """Lags (ms) of a 1 ms sleep while ``rounds`` rounds of 8 queries of 1000 entries are
    answered back to back, and the ms each round took."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        directory = Path(tmp)
        await _full_history(directory)
        journal = Journal(directory)
        await journal.open()
        answered = 0
        round_done = asyncio.Event()

        def deliver(result: ResultMessage, reply: object, key: object, *_: object,
                    rendered: Any = None) -> None:  # fmt: skip
            # As app.Agent._deliver: rendered here unless the answer came rendered.
            payload = render_result(result) if rendered is None else rendered.payload
            assert payload
            nonlocal answered
            answered += 1
            if answered % 8 == 0:
                round_done.set()

        settings = default_settings(hostname="bench")
        limits = replace(settings.limits, max_message_size=1 << 24)  # no answer cut short
        dispatcher = Dispatcher(
            hypervisor=DummyHypervisor(never_throw=True, hostname="bench"),
            settings=replace(settings, limits=limits),
            events=Events(_NoEvents(), host="bench"),
            deliver=deliver,  # type: ignore[arg-type]
            on_quit=lambda: None,
            journal=journal,
        )
        runner = asyncio.create_task(dispatcher.run())
        await asyncio.sleep(0)
        lags: list[float] = []
        stop = asyncio.Event()

        async def probe() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append((time.perf_counter() - started - 0.001) * 1000)

        probing = asyncio.create_task(probe())
        took = []
        for r in range(rounds):
            round_done.clear()
            started = time.perf_counter()
            for i in range(8):
                payload = f"id: h{r}-{i}\ntask: history\nlimit: 1000\n".encode()
                dispatcher.submit(parse_task(payload), payload=payload, reply=None)
            await round_done.wait()
            took.append((time.perf_counter() - started) * 1000)
        stop.set()
        await probing
        dispatcher.close()
        await runner
        await journal.close()
    return {"lags": lags, "rounds_ms": took}


def _quantile(values: list[float], share: float) -> float:
    return sorted(values)[round(share * (len(values) - 1))]


def _lag_row(name: str, lags: list[float], rounds_ms: list[float]) -> str:
    return (
        f"  {name:10} {_quantile(lags, 0.5):6.2f} {_quantile(lags, 0.99):7.2f} "
        f"{max(lags):7.2f} ms   {statistics.median(rounds_ms):6.1f} ms"
    )


def lag_side_by_side(baseline: Path, rounds: int, runs: int) -> None:
    """This checkout and ``baseline`` as processes, runs interleaved."""
    here = Path(__file__).resolve().parent.parent
    figures: dict[str, dict[str, list[float]]] = {}
    for _ in range(runs):
        for name, root in (("baseline", baseline), ("this", here)):
            env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{here}"}
            out = subprocess.run(
                [sys.executable, "-m", "bench.history", "--lag-json", "--lag-rounds", str(rounds)],
                env=env, cwd=here, check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            got = json.loads(out.strip().splitlines()[-1])
            row = figures.setdefault(name, {"lags": [], "rounds_ms": []})
            row["lags"].extend(got["lags"])
            row["rounds_ms"].extend(got["rounds_ms"])
    print(f"loop lag while 8 history queries of 1000 entries are answered, {runs} runs x {rounds}")
    print("rounds, interleaved (a 1 ms sleep's lateness; a round: 8 answers at once)")
    print("             p50     p99     max       round p50")
    for name in ("baseline", "this"):
        print(_lag_row(name, figures[name]["lags"], figures[name]["rounds_ms"]))
    base, this = figures["baseline"]["lags"], figures["this"]["lags"]
    print(
        f"  ratio p99 x{_quantile(this, 0.99) / _quantile(base, 0.99):.2f}, "
        f"max x{max(this) / max(base):.2f}"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tasks", type=int, default=400)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--lag", action="store_true", help="only the loop lag under history queries")
    p.add_argument("--lag-rounds", type=int, default=20)
    p.add_argument("--lag-runs", type=int, default=3)
    p.add_argument("--baseline", type=Path, help="with --lag: a checkout to compare with")
    p.add_argument("--lag-json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.lag_json:
        print(json.dumps(asyncio.run(loop_lag(args.lag_rounds))))
    elif args.lag and args.baseline is not None:
        lag_side_by_side(args.baseline, args.lag_rounds, args.lag_runs)
    elif args.lag:
        got = asyncio.run(loop_lag(args.lag_rounds))
        print("             p50     p99     max       round p50")
        print(_lag_row("this", got["lags"], got["rounds_ms"]))
    else:
        asyncio.run(main(args.rounds, args.tasks))
        asyncio.run(contention(args.samples))
