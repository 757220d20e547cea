"""The dirty rate of each VM for the prediction: measured, remembered, or seen in a migration.

:class:`DirtyRates` answers "how fast does this guest dirty its memory" for
``migration.forecast``. In order:

1. a figure younger than :data:`FRESH_FOR` s (measured, or seen in a migration of the VM);
2. a measurement, when asked for and the back-end can (``MeasuresDirtyRate``): at most
   :data:`MAX_PROBES` at once on this agent, and one per VM at a time (a second asker waits
   for the first's figure instead of starting another sample). Where the back-end samples
   pages and says how many (``SamplesDirtyPages``), the figure comes with its upper
   confidence bound (:mod:`~asyncmigfra.migration.dirtysample`), which the converges
   verdict uses; while the asker's ``settled`` says the figure and its bound would lead to
   different verdicts, the VM is probed again and the probes pooled, at most
   :data:`MAX_ROUNDS` in all (each probe of the same period adds as many pages again, so
   the bound narrows: QEMU's 512 pages per GiB make every dirty page found stand for 2 MiB
   per period, whatever the guest's size, and a probe that finds none bounds the rate only
   by about 6 MiB/s; four, by 1.5 MiB/s);
3. the figure seen in the VM's last migration by this agent, however old;
4. unknown (the prediction then treats the guest as idle and says so).

A probe that fails (the guest is not running, QEMU cannot sample) is no failure of the
task: the answer is the next source in the list, with the probe's error as a note.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from asyncmigfra.errors import TaskError
from asyncmigfra.hypervisor.base import (
    DirtyPageSample,
    Hypervisor,
    MeasuresDirtyRate,
    SamplesDirtyPages,
)
from asyncmigfra.migration.dirtysample import pooled, upper_rate

__all__ = [
    "FRESH_FOR",
    "MAX_PROBES",
    "MAX_ROUNDS",
    "PROBE_SECONDS",
    "DirtyRate",
    "DirtyRates",
]

#: s a figure is used without measuring again.
FRESH_FOR: Final = 30.0
#: VMs measured at once on this agent (a probe hashes a few pages per GiB in QEMU: cheap).
MAX_PROBES: Final = 8
#: Probes of one VM in one measurement at most (see the module).
MAX_ROUNDS: Final = 4
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
    #: Bytes/s the guest dirties at most, at ``dirtysample.CONFIDENCE``, when ``rate`` is a
    #: page sample of known size (``None``: a figure without sampling error, or unknown).
    bound: float | None = None
    #: Pages the figure was sampled from (0: not a sample of known size).
    sampled: int = 0


#: Whether a sampled figure is sure enough for its asker (see :meth:`DirtyRates.rate`).
Settled = Callable[[DirtyRate], bool]


@dataclass(frozen=True, slots=True)
class _Figure:
    rate: float
    at: float
    #: Seen in a migration rather than measured.
    migration: bool
    #: s sampled over (see :attr:`DirtyRate.period`).
    period: float = 0.0
    #: The pages behind a measured figure, when the back-end told them.
    sample: DirtyPageSample | None = None

    def answer(self, source: Source, note: str | None = None) -> DirtyRate:
        sample = self.sample
        if sample is None or sample.sampled == 0:
            return DirtyRate(self.rate, source, note, self.period)
        bound = max(self.rate, upper_rate(sample))
        return DirtyRate(self.rate, source, note, self.period, bound, sample.sampled)


class DirtyRates:
    """Per-agent memory of the VMs' dirty rates, and the bound on probes."""

    def __init__(
        self,
        *,
        fresh_for: float = FRESH_FOR,
        max_probes: int = MAX_PROBES,
        seconds: int = PROBE_SECONDS,
        max_rounds: int = MAX_ROUNDS,
    ) -> None:
        self.fresh_for = fresh_for
        self.seconds = seconds
        self.max_rounds = max(1, max_rounds)
        self._probes = asyncio.Semaphore(max_probes)
        self._figures: dict[str, _Figure] = {}
        self._running: dict[str, asyncio.Future[_Figure | None]] = {}
        #: Probes started (tests and logs).
        self.probes = 0

    def observed(self, vm_name: str, rate: float) -> None:
        """A migration of ``vm_name`` saw it dirty ``rate`` bytes/s."""
        if rate >= 0:
            self._keep(vm_name, _Figure(rate, time.monotonic(), migration=True))

    async def rate(
        self,
        hypervisor: Hypervisor,
        vm_name: str,
        *,
        measure: bool,
        settled: Settled | None = None,
    ) -> DirtyRate:
        """``vm_name``'s dirty rate (see the module); ``measure``: a probe may run;
        ``settled``: whether a sampled figure is sure enough for the asker (``None``: one
        probe is)."""
        figure = self._figures.get(vm_name)
        if figure is not None and time.monotonic() - figure.at <= self.fresh_for:
            return figure.answer("recent")
        note: str | None = None
        if measure and isinstance(hypervisor, MeasuresDirtyRate):
            try:
                measured = await self._measure(hypervisor, vm_name, settled)
            except TaskError as exc:
                note = f"the dirty rate could not be measured: {exc}"
            else:
                if measured is not None:
                    return measured.answer("measured")
                note = "the dirty rate could not be measured"
        figure = self._figures.get(vm_name)
        if figure is not None:
            return figure.answer("last-migration" if figure.migration else "recent", note)
        return DirtyRate(None, "unknown", note)

    async def _measure(
        self, hypervisor: MeasuresDirtyRate, vm_name: str, settled: Settled | None
    ) -> _Figure | None:
        running = self._running.get(vm_name)
        if running is not None:
            await asyncio.wait({running})
            if running.cancelled() or running.exception() is not None:
                return None
            return running.result()
        future: asyncio.Future[_Figure | None] = asyncio.get_running_loop().create_future()
        self._running[vm_name] = future
        try:
            async with self._probes:
                if isinstance(hypervisor, SamplesDirtyPages):
                    figure = await self._sample(hypervisor, vm_name, settled)
                else:
                    self.probes += 1
                    rate = await hypervisor.measure_dirty_rate(vm_name, seconds=self.seconds)
                    figure = _Figure(
                        rate, time.monotonic(), migration=False, period=self._period(hypervisor)
                    )
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # retrieved: waiters read it, nobody must log it
            raise
        else:
            future.set_result(figure)
            self._keep(vm_name, figure)
            return figure
        finally:
            self._running.pop(vm_name, None)

    async def _sample(
        self, hypervisor: SamplesDirtyPages, vm_name: str, settled: Settled | None
    ) -> _Figure:
        """Probes of ``vm_name``, pooled, until ``settled`` (see the module), at most
        :attr:`max_rounds`; a probe that fails after the first ends the series with what
        the earlier ones saw."""
        samples = [await self._probe(hypervisor, vm_name)]
        while True:
            total = pooled(samples) or samples[0]
            figure = _Figure(
                total.rate, time.monotonic(), migration=False, period=total.period, sample=total
            )
            if len(samples) >= self.max_rounds or total.sampled == 0 or settled is None:
                return figure
            if settled(figure.answer("measured")):
                return figure
            try:
                samples.append(await self._probe(hypervisor, vm_name))
            except TaskError:
                return figure

    async def _probe(self, hypervisor: SamplesDirtyPages, vm_name: str) -> DirtyPageSample:
        self.probes += 1
        return await hypervisor.sample_dirty_pages(vm_name, seconds=self.seconds)

    def _period(self, hypervisor: MeasuresDirtyRate) -> float:
        """The probe's sample period, unless the back-end's figure holds at every time
        scale (``samples_pages = False``, see ``MeasuresDirtyRate``)."""
        return float(self.seconds) if getattr(hypervisor, "samples_pages", True) else 0.0

    def _keep(self, vm_name: str, figure: _Figure) -> None:
        self._figures.pop(vm_name, None)
        self._figures[vm_name] = figure
        while len(self._figures) > MAX_REMEMBERED:
            del self._figures[next(iter(self._figures))]
