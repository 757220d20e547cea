"""What each destination's link gave this agent's migrations, kept across restarts.

The prediction (``migration.forecast``) needs the rate at which a migration's pages reach a
destination. The agent learns it from its own migrations: after each successful one, the
median transfer rate of its memory passes is recorded here for that destination
(``migration.forecast.Forecaster.learn`` decides which runs count: not those a
``bandwidth`` cap held down). The estimate for a destination is the **median of its last
:data:`SAMPLES` rates**: one slow run (a busy network, a loaded host) moves it little, a
lasting change takes over after half the window.

Kept in ``linkrates.sqlite`` beside the journal in the agent's ``state-dir`` (the journal's
lock makes the directory this agent's alone); without a state dir (``state-dir: none``) only
in memory. The store is a cache, never a promise: a file that cannot be opened or written
(corrupt, read-only, disk full) is logged and the agent goes on with what it has in memory.
SQLite work runs in worker threads, one operation at a time.

The same store (:class:`LearnedFigures`) keeps the other figures the agent learns from its
migrations: :class:`ResidentOverheads` in ``residentoverhead.sqlite`` and
:class:`FixedCosts` in ``fixedcost.sqlite``.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Final, Self

import structlog

__all__ = [
    "FILE_NAME",
    "FIXED_COST_FILE_NAME",
    "MAX_DESTINATIONS",
    "OVERHEAD_FILE_NAME",
    "SAMPLES",
    "FixedCosts",
    "LearnedFigures",
    "LinkRates",
    "ResidentOverheads",
]

log = structlog.stdlib.get_logger(__name__)

#: The file in the state dir.
FILE_NAME: Final = "linkrates.sqlite"
#: The file of :class:`ResidentOverheads` in the state dir.
OVERHEAD_FILE_NAME: Final = "residentoverhead.sqlite"
#: The file of :class:`FixedCosts` in the state dir.
FIXED_COST_FILE_NAME: Final = "fixedcost.sqlite"
#: Rates kept per destination; the estimate is their median.
SAMPLES: Final = 9
#: Destinations kept at most (the least recently used go first).
MAX_DESTINATIONS: Final = 1000
#: Bytes/s accepted as a sample: above 0, at most 1 TiB/s.
MAX_RATE: Final = float(1 << 40)

# One table per file, named for its first use (link rates; files of earlier versions stay
# readable): the key (a destination, ...), when, the figure.
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS link_rates (
    destination TEXT NOT NULL,
    at REAL NOT NULL,
    rate REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS link_rates_destination ON link_rates(destination, at);
"""


class LearnedFigures:
    """Per key the last :data:`SAMPLES` figures and their median, kept in a SQLite file.

    ``path``: the SQLite file (``None``: memory only). Call :meth:`open` once before use;
    :meth:`estimate` never waits, :meth:`record` writes through (bounded, never raises)."""

    #: The file's name in a state dir.
    file_name = FILE_NAME
    #: Largest figure accepted.
    largest = MAX_RATE

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._rates: dict[str, deque[float]] = {}
        self._lock = asyncio.Lock()
        #: Why the file is not used (``None``: it is, or there is none).
        self.problem: str | None = None

    @classmethod
    def in_state_dir(cls, state_dir: Path | None) -> Self:
        return cls(state_dir / cls.file_name if state_dir is not None else None)

    async def open(self) -> None:
        """Load what earlier runs learned; a file that cannot be read is logged and left as
        it is (the agent then learns again, in memory)."""
        if self.path is None:
            return
        try:
            rows = await asyncio.to_thread(self._load)
        except (sqlite3.Error, OSError) as exc:
            self._give_up(exc)
            return
        for destination, rate in rows:
            if math.isfinite(rate) and 0 < rate <= self.largest:  # an edited file's, too
                self._remember(destination, rate)

    def estimate(self, destination: str) -> float | None:
        """Bytes/s: the median of what ``destination``'s link gave recent migrations;
        ``None`` before the first."""
        rates = self._rates.get(destination)
        return statistics.median(rates) if rates else None

    def samples(self, destination: str) -> int:
        rates = self._rates.get(destination)
        return len(rates) if rates else 0

    async def record(self, destination: str, rate: float) -> None:
        """Add one migration's transfer rate (bytes/s) for ``destination``. A rate that is
        not a finite number in (0, :attr:`largest`] is ignored."""
        if not (math.isfinite(rate) and 0 < rate <= self.largest) or not destination:
            return
        self._remember(destination, rate)
        if self.path is None or self.problem is not None:
            return
        async with self._lock:
            try:
                await asyncio.to_thread(self._write, destination, rate, time.time())
            except (sqlite3.Error, OSError) as exc:
                self._give_up(exc)

    # ---- memory ---------------------------------------------------------------------

    def _remember(self, destination: str, rate: float) -> None:
        rates = self._rates.pop(destination, None)  # re-inserted: most recently used last
        if rates is None:
            rates = deque(maxlen=SAMPLES)
        rates.append(rate)
        self._rates[destination] = rates
        while len(self._rates) > MAX_DESTINATIONS:
            del self._rates[next(iter(self._rates))]

    def _give_up(self, exc: BaseException) -> None:
        self.problem = str(exc) or exc.__class__.__name__
        log.warning("linkrates.unusable", path=str(self.path), error=self.problem)

    # ---- the file (worker threads) ---------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        assert self.path is not None
        db = sqlite3.connect(self.path, timeout=2.0, isolation_level=None)
        db.executescript(_SCHEMA)
        return db

    def _load(self) -> list[tuple[str, float]]:
        """Rows oldest first, the last :data:`SAMPLES` of each destination."""
        assert self.path is not None
        if not self.path.exists():
            return []
        db = self._connect()
        try:
            rows = db.execute(
                "SELECT destination, rate FROM link_rates ORDER BY at LIMIT ?",
                (SAMPLES * MAX_DESTINATIONS * 2,),
            ).fetchall()
        finally:
            db.close()
        out: list[tuple[str, float]] = []
        for destination, rate in rows:
            if isinstance(destination, str) and isinstance(rate, int | float):
                out.append((destination, float(rate)))
        return out

    def _write(self, destination: str, rate: float, at: float) -> None:
        db = self._connect()
        try:
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT INTO link_rates VALUES (?, ?, ?)", (destination, at, rate))
                db.execute(
                    "DELETE FROM link_rates WHERE destination = ? AND at NOT IN (SELECT at FROM"
                    " link_rates WHERE destination = ? ORDER BY at DESC LIMIT ?)",
                    (destination, destination, SAMPLES),
                )
                db.execute(
                    "DELETE FROM link_rates WHERE destination NOT IN (SELECT destination FROM"
                    " link_rates GROUP BY destination ORDER BY MAX(at) DESC LIMIT ?)",
                    (MAX_DESTINATIONS,),
                )
        finally:
            db.close()


class LinkRates(LearnedFigures):
    """Per destination the last :data:`SAMPLES` transfer rates (bytes/s) and their median."""

    file_name = FILE_NAME


class ResidentOverheads(LearnedFigures):
    """Bytes the hypervisor's process of a guest keeps resident beyond the guest's non-zero
    memory, as this agent's migrations showed it (one key, :data:`HOST_KEY`): what
    ``migration.forecast`` subtracts from a guest's resident memory to bound the memory a
    migration sends."""

    file_name = OVERHEAD_FILE_NAME


#: The key of the one figure of :class:`ResidentOverheads` (this agent's host).
HOST_KEY: Final = "this-host"


class FixedCosts(LearnedFigures):
    """Per destination the last :data:`SAMPLES` fixed costs of a migration (s: its duration
    less the model's transfer time, ``migration.fixedcosts``) and their median."""

    file_name = FIXED_COST_FILE_NAME
    #: s: a larger figure is no setup (``migration.fixedcosts`` bounds its samples here).
    largest = 60.0
