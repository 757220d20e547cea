"""``plan migration`` and ``plan evacuation``: predict, change nothing (issue 18).

A plan is answered through the dispatcher like any task (``accepted``, its result, ``done``
events, cancel, duplicates), with two differences, both because it changes nothing:

* it takes **no VM lane** and **no task slot**: a plan of a VM whose migration runs or waits
  answers at once instead of queueing behind it (the entry's ``details`` then says that a
  task of this agent runs or waits on the VM, so the figures describe the VM as it is now);
  the dirty-rate probes it may run are bounded on their own
  (``migration.dirtyrates.MAX_PROBES``);
* each VM's entry is its prediction (``migration.forecastresult.plan_fields``) under
  ``result: plan``; an entry with blockers has ``status: error`` and the first blocker's
  code (``will-not-converge`` when only the prediction stands in the way).

``plan evacuation`` places the VMs exactly as ``evacuate node`` would
(``tasks.placement.place`` on the destinations' loads, ``_Expansion``) and predicts each
VM's migration to its destination; with ``schedule: predicted`` it also plans the waves that
evacuation would run (``_Predicted``, ``tasks.waves.plan_waves``) and gives each entry its
``wave``.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from asyncmigfra.errors import NoDestination, TaskError
from asyncmigfra.migration.forecastresult import Forecast, notes, plan_fields
from asyncmigfra.model import (
    MigrateSpec,
    PlanEvacuationSpec,
    PlanMigrationSpec,
    ResultEntry,
)
from asyncmigfra.tasks.dispatching.expansion import _Expansion
from asyncmigfra.tasks.dispatching.jobs import _Job, _Run
from asyncmigfra.tasks.placement import VmSize, place
from asyncmigfra.timing import TimeMeasurement

__all__ = ["plan_entry"]

log = structlog.stdlib.get_logger("asyncmigfra.dispatching")

#: A large evacuation's predictions run this many at a time, each turn of the event loop
#: (all at once, a thousand VMs' own work ran in one turn and held the loop for seconds).
_PREDICTIONS_AT_ONCE = 8

PlanSpec = PlanMigrationSpec | PlanEvacuationSpec


def plan_entry(forecast: Forecast, *, wave: int | None = None, note: str = "") -> ResultEntry:
    """One VM's ``plan`` entry: ``error`` with the first blocker's code when it has any."""
    extra = plan_fields(forecast)
    if wave is not None:
        extra["wave"] = wave
    texts = [note] if note else []
    if forecast.blockers:
        return ResultEntry(
            vm_name=forecast.vm_name,
            status="error",
            code=forecast.code,
            details="; ".join([forecast.reason, *texts]),
            extra=extra,
        )
    texts += notes(forecast)
    return ResultEntry(
        vm_name=forecast.vm_name,
        status="success",
        details="; ".join(texts) or None,
        extra=extra,
    )


class _Planning(_Expansion):
    """Answers ``plan migration`` and ``plan evacuation``."""

    async def _plan(self, job: _Job, run: _Run, spec: PlanSpec) -> list[ResultEntry]:
        """Run a plan subtask without lane or slot (see the module)."""
        self.queued -= 1
        self.running += 1
        run.state = "running"
        run.started = time.monotonic()
        timer = TimeMeasurement(enabled=spec.time_measurement)
        timer.tick("overall")
        try:
            if isinstance(spec, PlanMigrationSpec):
                entries = [await self._plan_one(job, spec.migration, wave=None)]
            else:
                entries = await self._plan_evacuation(job, spec, timer)
        finally:
            timer.tock("overall")
        if spec.time_measurement:
            job.header["time-measurement"] = timer.snapshot()
        return entries

    async def _plan_one(self, job: _Job, spec: MigrateSpec, *, wave: int | None) -> ResultEntry:
        started = time.monotonic()
        note = ""
        if self._lanes.busy(spec.vm_name):
            note = (
                f"a task of this agent runs or waits on {spec.vm_name}: the plan describes the"
                " VM as it is now"
            )
        forecast = await self._forecaster.forecast(spec, self._hv)
        entry = plan_entry(forecast, wave=wave, note=note)
        self._report(job, entry, time.monotonic() - started)
        return entry

    async def _plan_evacuation(
        self, job: _Job, spec: PlanEvacuationSpec, timer: TimeMeasurement
    ) -> list[ResultEntry]:
        evacuation = spec.evacuation
        try:
            domains = await self._hv.list_domains(active_only=True)
        except TaskError as exc:
            return [self._failed(job, "n/a", exc)]
        if not domains:
            return []
        with timer.measure("placement"):
            capacities = await self._capacities(evacuation.destinations)
            disks = await self._disk_needs(domains, evacuation)
            placement = place(
                [VmSize(d.name, d.vcpus, d.memory, disks.get(d.name, {})) for d in domains],
                capacities,
                mode=evacuation.mode,
                overbooking=evacuation.overbooking,
            )

        at_once = asyncio.Semaphore(_PREDICTIONS_AT_ONCE)
        listed = {d.name: d for d in domains}

        async def predict(name: str, destination: str) -> Forecast:
            migration = MigrateSpec(
                vm_name=name,
                destination=destination,
                parameter=evacuation.parameter,
                time_measurement=evacuation.time_measurement,
                driver=evacuation.driver,
            )
            async with at_once:
                forecast = await self._forecaster.forecast(
                    migration, self._hv, domain=listed.get(name)
                )
                await asyncio.sleep(0)  # the next ones in the next turn of the loop
                return forecast

        with timer.measure("prediction"):
            names = list(placement.assignments)
            forecasts = await asyncio.gather(
                *(predict(name, placement.assignments[name]) for name in names)
            )
        by_name = dict(zip(names, forecasts, strict=True))
        # The waves: those the evacuation would run (``tasks.waves.plan_waves``, through
        # ``_Predicted``, with the dirty rates the predictions just measured); every VM in
        # wave 1 in placement order, or when the waves' inputs cannot be had.
        waves = dict.fromkeys(names, 1)
        note = ""
        if evacuation.schedule == "predicted" and names:
            with timer.measure("planning"):
                planned = await self._wave_numbers(evacuation, placement.assignments, listed, disks)
            if isinstance(planned, str):
                note = f"no waves planned, placement order: {planned}"
            else:
                waves = planned
        entries: list[ResultEntry] = []
        for dom in domains:
            forecast = by_name.get(dom.name)
            if forecast is not None:
                entry = plan_entry(forecast, wave=waves[dom.name], note=note)
                self._report(job, entry, 0.0)
            elif dom.name in placement.unplaced:
                err = NoDestination(
                    "No destination host left to evacuate to."
                    if capacities
                    else "no destination could be reached"
                )
                entry = self._failed(job, dom.name, err)
                entry.extra["blockers"] = [str(err)]
            else:  # pragma: no cover - place() puts every VM in one of the two
                continue
            entries.append(entry)
        log.info("evacuation.planned", waves=waves, unplaced=list(placement.unplaced))
        return entries
