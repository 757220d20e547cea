"""What the history costs the journal (issue 19 item 2): ``python -m bench.history [--rounds N]``.

One task's journal cycle as the agent runs it, in this process with the real journal (SQLite
in its thread, in a temporary directory on ``/var/tmp``): ``accepted`` (awaited: fsynced),
``running`` (awaited), then ``finished`` with the result and ``delivered`` (not awaited; they
go into the next task's transaction, as in the agent). Timed from ``accepted`` to the end of
the cycle, sequentially, with the history off (``history-max-entries: 0``) and on (one entry
per task), rounds interleaved; the medians and their ratio are printed, not asserted. The
whole task round trip through a broker is ``python -m bench --baseline DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from asyncmigfra.model import ResultEntry, ResultMessage, TaskKind
from asyncmigfra.tasks.history import history_rows
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


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tasks", type=int, default=400)
    args = p.parse_args()
    asyncio.run(main(args.rounds, args.tasks))
