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
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from asyncmigfra.model import ResultEntry, ResultMessage, TaskKind
from asyncmigfra.tasks.history import INSERT, HistoryQuery, history_rows
from asyncmigfra.tasks.journal import Journal


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


async def contention(samples: int) -> None:
    """``accepted`` alone and behind 8 history queries, on a full history."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        directory = Path(tmp)
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


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tasks", type=int, default=400)
    p.add_argument("--samples", type=int, default=200)
    args = p.parse_args()
    asyncio.run(main(args.rounds, args.tasks))
    asyncio.run(contention(args.samples))
