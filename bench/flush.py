"""What one durable write costs on this machine's disk: the floor of the agent's promise.

``python -m bench.flush [--dir DIR] [--writes N]`` (on its own; not part of ``python -m bench``).

The agent sends ``accepted`` only once the task is on disk (the journal's ``synchronous=FULL``
commit, one flush per task or per batch of tasks arriving together). A sequential scheduler
gives the disk an idle moment between two tasks, so what counts is a flush *after an idle
moment*, which on a virtual disk can cost ten times a flush back to back. This prints, in
interleaved rounds, each way of making a small record durable, after 1 ms idle and back to
back:

- ``append + fdatasync``: what ``bench.echo --durable`` does;
- ``overwrite + fdatasync``: into a pre-allocated file (no size change, no metadata);
- ``O_DSYNC``, ``O_DIRECT|O_DSYNC``: a synchronous write without a separate flush;
- ``journal``: the agent's own :class:`~asyncmigfra.tasks.journal.Journal`, an ``accepted``
  record awaited from the event loop (thread hand-off, SQLite, flush);
- ``append + fdatasync, to_thread``: the same hand-off done as the durable echo does.

``DIR`` (default: a temporary directory in ``/var/tmp``) should be on the file system of
``agent.state-dir``. Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from asyncmigfra.tasks.journal import Journal

_RECORD = b"task: start vm\nvm-configurations:\n  - name: vm1\n" * 4
_SPAN = 4 << 20  # bytes of the pre-allocated files (written round)


def _preallocated(path: Path, flags: int = 0) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    os.write(fd, b"\0" * _SPAN)
    os.fsync(fd)
    os.close(fd)
    return os.open(path, os.O_RDWR | flags)


def _sync_ways(directory: Path) -> dict[str, Callable[[int], None]]:
    """name -> one durable write of the ``i``-th record."""
    append = os.open(directory / "append", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    over = _preallocated(directory / "over")
    dsync = _preallocated(directory / "dsync", os.O_DSYNC)
    direct = _preallocated(directory / "direct", os.O_DSYNC | os.O_DIRECT)
    block = mmap.mmap(-1, 4096)  # O_DIRECT wants an aligned buffer
    block.write(_RECORD.ljust(4096, b"\0"))

    def appended(i: int) -> None:
        os.write(append, _RECORD)
        os.fdatasync(append)

    def overwritten(i: int) -> None:
        os.pwrite(over, _RECORD, i * 4096 % _SPAN)
        os.fdatasync(over)

    return {
        "append + fdatasync": appended,
        "overwrite + fdatasync": overwritten,
        "O_DSYNC": lambda i: os.pwrite(dsync, _RECORD, i * 4096 % _SPAN) and None,
        "O_DIRECT|O_DSYNC": lambda i: os.pwritev(direct, [block], i * 4096 % _SPAN) and None,
    }


async def run(directory: Path, writes: int, rounds: int) -> dict[tuple[str, str], list[float]]:
    """ms of each way, after 1 ms idle and back to back; ``writes`` a round, interleaved."""
    ways = _sync_ways(directory)
    (directory / "journal").mkdir()
    journal = Journal(directory / "journal")
    await journal.open()
    echo = ways["append + fdatasync"]

    async def journaled(i: int) -> None:
        key = str(uuid.uuid4())
        await journal.accepted(
            key, task_id=key, payload=_RECORD, response_topic="t", correlation=None, running=True
        )
        journal.finished(key, b"result")
        journal.delivered(key)

    async def threaded(i: int) -> None:
        await asyncio.to_thread(echo, i)

    out: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(rounds):
            for gap, label in ((0.001, "after 1 ms idle"), (0.0, "back to back")):
                for name, way in ways.items():
                    times = out.setdefault((name, label), [])
                    for i in range(writes):
                        time.sleep(gap)  # noqa: ASYNC251 - measured as a thread would (nothing else runs)
                        t0 = time.perf_counter()
                        way(i)
                        times.append((time.perf_counter() - t0) * 1000.0)
                for name, coro in (
                    ("journal (accepted, awaited)", journaled),
                    ("append + fdatasync, to_thread", threaded),
                ):
                    times = out.setdefault((name, label), [])
                    for i in range(writes):
                        await asyncio.sleep(gap)
                        t0 = time.perf_counter()
                        await coro(i)
                        times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        await journal.close()
    return out


def table(figures: dict[tuple[str, str], list[float]]) -> list[str]:
    lines = [f"  {'':32s} {'':16s} {'p50 ms':>8s} {'p90 ms':>8s}"]
    for (name, label), times in sorted(figures.items(), key=lambda kv: kv[0][1]):
        ordered = sorted(times)
        p90 = ordered[int(len(ordered) * 0.9)]
        lines.append(f"  {name:32s} {label:16s} {statistics.median(ordered):8.3f} {p90:8.3f}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.flush")
    p.add_argument("--dir", type=Path, help="a directory on agent.state-dir's file system")
    p.add_argument("--writes", type=int, default=100, help="writes of each way a round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = p.parse_args()
    base = args.dir or Path("/var/tmp")
    with tempfile.TemporaryDirectory(dir=base, prefix="asyncmigfra-flush-") as tmp:
        figures = asyncio.run(run(Path(tmp), args.writes, args.rounds))
    print(f"\n== one durable write on {base} (bench/flush.py), {args.rounds} rounds")
    for line in table(figures):
        print(line)
    print("  the flush after an idle moment is the floor of a sequential task with the journal on")


if __name__ == "__main__":
    main()
