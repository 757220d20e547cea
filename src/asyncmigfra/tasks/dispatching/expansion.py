"""Subtasks that expand into one move per VM: stop-by-regex (protocol §3.3) and evacuate
(protocol §3.7, with the destinations' capacities and this agent's moves on their way;
``schedule: predicted`` runs it in waves, :mod:`.predicted`)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import PurePosixPath

import structlog

from asyncmigfra.errors import (
    NoDestination,
    TaskCancelled,
    TaskError,
)
from asyncmigfra.hypervisor.base import DomainInfo, MigrationRequest
from asyncmigfra.model import (
    EvacuateSpec,
    MigrateSpec,
    ResultEntry,
    StopSpec,
)
from asyncmigfra.tasks.dispatching.jobs import _Job, _Run
from asyncmigfra.tasks.dispatching.predicted import _Predicted
from asyncmigfra.tasks.outcomes import absorb_cancel, entry_for
from asyncmigfra.tasks.placement import Capacity, VmSize, place
from asyncmigfra.tasks.running import SubtaskContext
from asyncmigfra.timing import TimeMeasurement
from asyncmigfra.wire.patterns import MAX_PATTERN, matching_names

log = structlog.stdlib.get_logger("asyncmigfra.dispatching")


class _Expansion(_Predicted):
    """Stop-by-regex and evacuate: one lane-ordered move per matching VM."""

    async def _stop_regex(self, job: _Job, run: _Run, spec: StopSpec) -> list[ResultEntry]:
        """Stop every active domain whose name fully matches; one entry per VM (protocol §3.3)."""
        assert spec.regex is not None
        try:
            domains = await self._hv.list_domains(active_only=True)
            # RE2 (linear time, bounded memory), in a worker thread: no pattern stalls the loop.
            names = await asyncio.to_thread(matching_names, spec.regex, [d.name for d in domains])
        except TaskError as exc:
            return [self._failed(job, spec.regex[:MAX_PATTERN], exc)]
        if not names:
            return [ResultEntry(vm_name=spec.regex, status="success", details=None)]
        return list(await asyncio.gather(*(self._lane_stop(job, run, spec, n) for n in names)))

    async def _lane_stop(self, job: _Job, run: _Run, spec: StopSpec, name: str) -> ResultEntry:
        ticket = self._lanes.reserve(name)
        try:
            await ticket.acquire()
            return await self._one(job, run, spec, name)
        finally:
            ticket.release()

    async def _evacuate(self, job: _Job, run: _Run, spec: EvacuateSpec) -> list[ResultEntry]:
        """Move every active domain away (protocol §3.7, see ``placement``): measure the
        destinations, place the VMs, then migrate them, at most ``max-parallel`` at once and
        each destination within its incoming limit (waiting, never failing, for a slot), or
        in waves (``schedule: predicted``). Every placed VM's lane and room on its
        destination are reserved at once. A cancel stops what has not started and aborts
        what runs; finished moves keep their results."""
        timer = TimeMeasurement(enabled=spec.time_measurement)
        timer.tick("overall")
        try:
            domains = await self._hv.list_domains(active_only=True)
        except TaskError as exc:
            return [self._failed(job, "n/a", exc)]
        if not domains:
            return []
        run.ctx = SubtaskContext(
            task_id=job.msg.id, vm_name="n/a", events=self._events, timer=timer
        )
        run.ctx.phase("placement")
        with timer.measure("placement"):
            capacities = await self._capacities(spec.destinations)
            disks = await self._disk_needs(domains, spec)
            plan = place(
                [VmSize(d.name, d.vcpus, d.memory, disks.get(d.name, {})) for d in domains],
                capacities,
                mode=spec.mode,
                overbooking=spec.overbooking,
            )
        log.info(
            "evacuation.placed",
            assignments=dict(plan.assignments),
            unplaced=list(plan.unplaced),
            destinations=[c.host for c in capacities],
        )
        limit = asyncio.Semaphore(spec.max_parallel or self._settings.migration.max_outgoing)
        sizes = {d.name: d for d in domains}
        waves = None
        if spec.schedule == "predicted" and plan.assignments:
            with timer.measure("planning"):
                waves = await self._schedule_evacuation(job, spec, plan.assignments, sizes, disks)
        tickets = {}
        for name in waves.order if waves is not None else plan.assignments:
            self._reserve(plan.assignments[name], sizes[name], +1)
            tickets[name] = self._lanes.reserve(name)

        async def move(name: str, bandwidth: int | None = None) -> ResultEntry:
            dest = plan.assignments[name]
            parameter = spec.parameter
            if bandwidth is not None:
                parameter = replace(parameter, bandwidth=bandwidth)
            mspec = MigrateSpec(
                vm_name=name,
                destination=dest,
                parameter=parameter,
                time_measurement=spec.time_measurement,
                driver=spec.driver,
            )
            ticket = tickets.pop(name)
            try:
                await ticket.acquire()
                async with limit:
                    entry = await self._one(job, run, mspec, name)
            except asyncio.CancelledError as exc:
                entry = entry_for(name, absorb_cancel(exc, run.cancel_reason))
                self._report(job, entry, 0.0)
            finally:
                ticket.release()
                self._reserve(dest, sizes[name], -1)
            entry.extra.setdefault("destination", dest)
            return entry

        async def steer(name: str, bandwidth: int | None) -> bool:
            steering = run.steering.get(name)
            if steering is None or not steering.running:
                return False
            cap = bandwidth if bandwidth is not None else spec.parameter.bandwidth or 0
            try:
                if not await steering.cap(cap):
                    log.debug("evacuation.cap_held", vm=name, operator=steering.operator_bandwidth)
            except TaskError as exc:
                log.info("evacuation.cap_refused", vm=name, bandwidth=cap, error=str(exc))
                return False
            return True

        def operator_cap(name: str) -> int | None:
            steering = run.steering.get(name)
            return None if steering is None else steering.operator_bandwidth

        async def moving(name: str) -> bool:
            steering = run.steering.get(name)
            return steering is not None and await steering.moving()

        tasks: dict[str, asyncio.Task[ResultEntry]] = {}
        try:
            if waves is not None:
                await self._run_waves(
                    job, waves, move, steer, moving=moving, tasks=tasks, operator_cap=operator_cap
                )
            else:
                async with asyncio.TaskGroup() as tg:
                    for name, dest in plan.assignments.items():
                        tasks[name] = tg.create_task(
                            move(name), name=f"asyncmigfra.evacuate[{name}->{dest}]"
                        )
        except asyncio.CancelledError as exc:
            absorb_cancel(exc, run.cancel_reason)
        finally:
            for name, ticket in tickets.items():  # never started: lane and room given back
                ticket.release()
                self._reserve(plan.assignments[name], sizes[name], -1)
            tickets.clear()
        entries: dict[str, ResultEntry] = {}
        for name in plan.assignments:
            t = tasks.get(name)
            if t is None:  # a later wave's: never started
                entries[name] = self._failed(
                    job, name, TaskCancelled(run.cancel_reason or "cancelled")
                )
            elif t.done() and not t.cancelled():
                entries[name] = t.result()
            else:
                entries[name] = entry_for(name, TaskCancelled(run.cancel_reason or "cancelled"))
            entries[name].extra.setdefault("destination", plan.assignments[name])
            if waves is not None:  # the wave plan's prediction, not the lone migration's
                entries[name].extra.pop("predicted-duration", None)
                entries[name].extra.update(waves.keys(name))
        for name in plan.unplaced:
            err = NoDestination(
                "No destination host left to evacuate to."
                if capacities
                else "no destination could be reached"
            )
            entries[name] = self._failed(job, name, err)
        timer.tock("overall")
        job.header["time-measurement"] = timer.snapshot()
        return [entries[d.name] for d in domains if d.name in entries]

    async def _capacities(self, destinations: tuple[str, ...]) -> list[Capacity]:
        """Each destination's load now, minus what this agent already sends it."""
        out: list[Capacity] = []
        for dest in dict.fromkeys(destinations):
            if dest == self._settings.hostname:
                continue  # never evacuate onto the host being evacuated
            try:
                load = await self._hv.host_load(dest)
            except TaskError as exc:
                log.warning("evacuation.destination_unreachable", host=dest, error=str(exc))
                continue
            vcpus, memory = self._inbound.get(dest, (0, 0))
            out.append(
                Capacity(
                    host=dest,
                    cpus=load.cpus,
                    vcpus_used=load.vcpus_used + vcpus,
                    free_memory=load.free_memory - memory,
                    storage_free=dict(load.storage_free),
                )
            )
        return out

    async def _disk_needs(
        self, domains: list[DomainInfo], spec: EvacuateSpec
    ) -> dict[str, dict[str, int]]:
        """Bytes each VM's copied disks need on a destination, by image directory, when the
        evacuation copies storage. A VM whose disks cannot be read is placed on CPU and
        memory alone: its own pre-check then reports why it cannot move."""
        mode = spec.parameter.copy_storage or self._settings.migration.copy_storage
        if mode == "none":
            return {}
        driver = spec.driver or self._settings.hypervisor.driver
        needs: dict[str, dict[str, int]] = {}
        for dom in domains:
            request = MigrationRequest(
                vm_name=dom.name,
                destination="",
                driver=driver,
                copy_storage=mode,
                migrate_disks=spec.parameter.migrate_disks or (),
            )
            try:
                copies = await self._hv.disks_to_copy(request)
            except TaskError as exc:
                log.warning("evacuation.disks_unknown", vm=dom.name, error=str(exc))
                continue
            need: dict[str, int] = {}
            for copy in copies:
                directory = str(PurePosixPath(copy.path).parent)
                need[directory] = need.get(directory, 0) + copy.room
            needs[dom.name] = need
        return needs

    def _reserve(self, dest: str, dom: DomainInfo, sign: int) -> None:
        vcpus, memory = self._inbound.get(dest, (0, 0))
        vcpus, memory = vcpus + sign * dom.vcpus, memory + sign * dom.memory
        if vcpus or memory:
            self._inbound[dest] = (vcpus, memory)
        else:
            self._inbound.pop(dest, None)
