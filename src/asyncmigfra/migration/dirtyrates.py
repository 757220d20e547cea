"""The dirty rate of each VM for the prediction: measured, remembered, or seen in a migration.

:class:`DirtyRates` answers "how fast does this guest dirty its memory" for
``migration.forecast``. In order:

1. a figure younger than :data:`FRESH_FOR` s (measured, or seen in a migration of the VM);
2. a measurement, when asked for and the back-end can (``MeasuresDirtyRate``): at most
   :data:`MAX_PROBES` at once on this agent, and one per VM at a time (a second asker waits
   for the first's figure instead of starting another sample);
3. the figure seen in the VM's last migration by this agent, however old;
4. unknown (the prediction then treats the guest as idle and says so).

A probe that fails (the guest is not running, QEMU cannot sample) is no failure of the
task: the answer is the next source in the list, with the probe's error as a note.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Final, Literal

from asyncmigfra.errors import TaskError
from asyncmigfra.hypervisor.base import Hypervisor, MeasuresDirtyRate

__all__ = ["FRESH_FOR", "MAX_PROBES", "PROBE_SECONDS", "DirtyRate", "DirtyRates"]

#: s a figure is used without measuring again.
FRESH_FOR: Final = 30.0
#: Probes running at once on this agent.
MAX_PROBES: Final = 2
#: s of each sample (the rig measured 12 MB/s for its dirty16 guest with 1 s).
PROBE_SECONDS: Final = 1
#: VMs remembered at most (the oldest figures go first).
MAX_REMEMBERED: Final = 4096

Source = Literal["measured", "recent", "last-migration", "unknown"]


@dataclass(frozen=True, slots=True)
class DirtyRate:
    """A VM's dirty rate and where it comes from."""

    #: Bytes/s; ``None``: unknown.
    rate: float | None
    source: Source
    #: Why a probe gave no figure (``None``: none failed).
    note: str | None = None
    #: s the figure was sampled over (a probe's sample; 0: seen in a migration, whose
    #: passes set their own periods).
    period: float = 0.0


@dataclass(frozen=True, slots=True)
class _Figure:
    rate: float
    at: float
    #: Seen in a migration rather than measured.
    migration: bool
    #: s sampled over (see :attr:`DirtyRate.period`).
    period: float = 0.0


class DirtyRates:
    """Per-agent memory of the VMs' dirty rates, and the bound on probes."""

    def __init__(
        self,
        *,
        fresh_for: float = FRESH_FOR,
        max_probes: int = MAX_PROBES,
        seconds: int = PROBE_SECONDS,
    ) -> None:
        self.fresh_for = fresh_for
        self.seconds = seconds
        self._probes = asyncio.Semaphore(max_probes)
        self._figures: dict[str, _Figure] = {}
        self._running: dict[str, asyncio.Future[float | None]] = {}
        #: Probes started (tests and logs).
        self.probes = 0

    def observed(self, vm_name: str, rate: float) -> None:
        """A migration of ``vm_name`` saw it dirty ``rate`` bytes/s."""
        if rate >= 0:
            self._keep(vm_name, _Figure(rate, time.monotonic(), migration=True))

    async def rate(self, hypervisor: Hypervisor, vm_name: str, *, measure: bool) -> DirtyRate:
        """``vm_name``'s dirty rate (see the module); ``measure``: a probe may run."""
        figure = self._figures.get(vm_name)
        if figure is not None and time.monotonic() - figure.at <= self.fresh_for:
            return DirtyRate(figure.rate, "recent", period=figure.period)
        note: str | None = None
        if measure and isinstance(hypervisor, MeasuresDirtyRate):
            try:
                measured = await self._measure(hypervisor, vm_name)
            except TaskError as exc:
                note = f"the dirty rate could not be measured: {exc}"
            else:
                if measured is not None:
                    return DirtyRate(measured, "measured", period=self._period(hypervisor))
                note = "the dirty rate could not be measured"
        figure = self._figures.get(vm_name)
        if figure is not None:
            source: Source = "last-migration" if figure.migration else "recent"
            return DirtyRate(figure.rate, source, note, figure.period)
        return DirtyRate(None, "unknown", note)

    async def _measure(self, hypervisor: MeasuresDirtyRate, vm_name: str) -> float | None:
        running = self._running.get(vm_name)
        if running is not None:
            await asyncio.wait({running})
            if running.cancelled() or running.exception() is not None:
                return None
            return running.result()
        future: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()
        self._running[vm_name] = future
        try:
            async with self._probes:
                self.probes += 1
                rate = await hypervisor.measure_dirty_rate(vm_name, seconds=self.seconds)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # retrieved: waiters read it, nobody must log it
            raise
        else:
            future.set_result(rate)
            figure = _Figure(
                rate, time.monotonic(), migration=False, period=self._period(hypervisor)
            )
            self._keep(vm_name, figure)
            return rate
        finally:
            self._running.pop(vm_name, None)

    def _period(self, hypervisor: MeasuresDirtyRate) -> float:
        """The probe's sample period, unless the back-end's figure holds at every time
        scale (``samples_pages = False``, see ``MeasuresDirtyRate``)."""
        return float(self.seconds) if getattr(hypervisor, "samples_pages", True) else 0.0

    def _keep(self, vm_name: str, figure: _Figure) -> None:
        self._figures.pop(vm_name, None)
        self._figures[vm_name] = figure
        while len(self._figures) > MAX_REMEMBERED:
            del self._figures[next(iter(self._figures))]
