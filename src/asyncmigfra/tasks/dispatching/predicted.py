"""Evacuations scheduled by prediction (protocol §3.7, ``parameter.schedule: predicted``).

After placement, :meth:`_Predicted._schedule_evacuation` gathers what predicts each placed
VM's migration: its memory, its migration parameters as the engine resolves them
(:func:`~asyncmigfra.migration.plan.plan_migration`), the disks a storage copy moves, its
guest's dirty rate and the link rates toward its destination (:meth:`_Predicted._link_rates`).
The dirty rates come from the agent's
:class:`~asyncmigfra.migration.forecast.Forecaster` (its
:class:`~asyncmigfra.migration.dirtyrates.DirtyRates`: a recent figure, else a probe through
:class:`~asyncmigfra.hypervisor.base.MeasuresDirtyRate`, else the VM's last migration's); a
paused guest dirties nothing, and a ``warm`` or ``offline`` one is not measured. It plans
waves (:func:`~asyncmigfra.tasks.waves.plan_waves`, off the event loop: :mod:`.planner`) and
announces them (``event: plan``, without ``vm-name``) before the first migration. When a
rate cannot be had for a VM or a destination, the evacuation runs as without ``schedule``
(placement order, ``max-parallel`` at once), and the plan event says why.

The link rates: a back-end that knows its NICs
(:class:`~asyncmigfra.hypervisor.base.KnowsLinkRate`, the ``fake``) tells one migration's
rate and the two NICs' separately. Otherwise (libvirt) the Forecaster's rate toward the
destination (learned from earlier migrations, else the configured ``migration.link-rate``)
stands for all three: one migration alone is taken to fill the source's NIC, and the
migrations out of this host, and those into one destination, to share that same rate.

:meth:`_Predicted._run_waves` then runs the moves (:mod:`.moving`: in the planned order as
the links have room, each capped at its share, the destinations' inbound shares reserved
with their agents). VMs the model sees converging in no way run last, each alone. When a
move took more than 1.5 times its prediction (or less than its prediction over 1.5), the
moves not yet started are planned again with links as slow as the moves so far were, the
running ones with what they have left (:func:`~asyncmigfra.tasks.waves.replan`), and
announced again.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping

import structlog

from asyncmigfra.errors import TaskError
from asyncmigfra.hypervisor.base import DomainInfo, DomainState, KnowsLinkRate, LinkRate
from asyncmigfra.migration.dirtyrates import DirtyRate
from asyncmigfra.migration.plan import MigrationPlan, plan_migration
from asyncmigfra.migration.prediction import PredictionInputs
from asyncmigfra.model import EvacuateSpec, MigrateSpec, ResultEntry
from asyncmigfra.peers.reserving import InboundReservations
from asyncmigfra.tasks.dispatching.base import _DispatcherBase
from asyncmigfra.tasks.dispatching.jobs import _Job
from asyncmigfra.tasks.dispatching.moving import Move, Moves, Moving, OperatorCap, Steer
from asyncmigfra.tasks.dispatching.planner import PLAN_WITHIN
from asyncmigfra.tasks.dispatching.schedule import _Schedule
from asyncmigfra.tasks.waves import (
    Observation,
    WavePlan,
    WaveVm,
    plan_waves,
    replan,
    slowdown,
)

log = structlog.stdlib.get_logger("asyncmigfra.dispatching")

_MIB = 1024 * 1024


#: VMs whose inputs are gathered between two turns of the event loop (a large evacuation's
#: would otherwise hold it for long).
_PER_TURN = 32


async def _breathe(count: int) -> None:
    """Let the event loop run after every :data:`_PER_TURN` VMs."""
    if count % _PER_TURN == 0:
        await asyncio.sleep(0)


def _live(plan: MigrationPlan) -> bool:
    """The guest runs while its memory moves (warm: paused; offline: nothing runs)."""
    return plan.request.mode in ("live", "post-copy")  # auto: live until it chooses


def _stream(link: LinkRate) -> float:
    """Bytes/s one migration alone gets on ``link``."""
    return min(link.single, link.outgoing, link.incoming)


def _nics(links: Mapping[str, LinkRate]) -> tuple[float, dict[str, float]]:
    """The source's NIC (the slowest figure told) and each destination's."""
    return min(link.outgoing for link in links.values()), {
        dest: link.incoming for dest, link in links.items()
    }


class _Predicted(_DispatcherBase):
    """Plans and runs an evacuation in waves (see the module)."""

    async def _schedule_evacuation(
        self,
        job: _Job,
        spec: EvacuateSpec,
        assignments: Mapping[str, str],
        domains: Mapping[str, DomainInfo],
        disks: Mapping[str, Mapping[str, int]],
    ) -> _Schedule | None:
        """The evacuation's waves, announced; ``None`` (announced too) when the inputs
        cannot be had: the evacuation then runs in placement order."""
        gathered = await self._wave_inputs(spec, assignments, domains, disks)
        if not isinstance(gathered, str):
            try:
                schedule, plan = await self._planned(spec, *gathered)
            except TimeoutError:
                gathered = f"planning took more than {PLAN_WITHIN:g} s"
        if isinstance(gathered, str):
            log.info("evacuation.schedule_fallback", task_id=job.msg.id, reason=gathered)
            self._events.plan(job.msg.id, None, {"schedule": "placement", "details": gathered})
            return None
        log.info(
            "evacuation.waves",
            task_id=job.msg.id,
            waves=[[m.name for m in w.moves] for w in plan.waves],
            makespan=round(plan.makespan, 3),
            unschedulable=[u.name for u in plan.unschedulable],
        )
        self._events.plan(job.msg.id, None, schedule.event(schedule.order, None))
        return schedule

    async def _wave_numbers(
        self,
        spec: EvacuateSpec,
        assignments: Mapping[str, str],
        domains: Mapping[str, DomainInfo],
        disks: Mapping[str, Mapping[str, int]],
    ) -> dict[str, int] | str:
        """The wave each placed VM's migration would run in with ``schedule: predicted``
        (``plan evacuation``; nothing announced), or why no waves can be planned."""
        gathered = await self._wave_inputs(spec, assignments, domains, disks)
        if isinstance(gathered, str):
            return gathered
        try:
            schedule, _ = await self._planned(spec, *gathered)
        except TimeoutError:
            return f"planning took more than {PLAN_WITHIN:g} s"
        return {name: step.wave for name, step in schedule.steps.items()}

    async def _planned(
        self, spec: EvacuateSpec, vms: list[WaveVm], outgoing: float, incoming: dict[str, float]
    ) -> tuple[_Schedule, WavePlan]:
        """The waves of ``vms`` (:func:`~asyncmigfra.tasks.waves.plan_waves`)."""
        limits = self._settings.migration
        schedule = _Schedule(
            vms={v.name: v for v in vms},
            link_rate=outgoing,
            destination_rates=incoming,
            max_parallel=min(spec.max_parallel or limits.max_outgoing, limits.max_outgoing),
            max_incoming=limits.max_incoming,
        )
        plan = await self._planner.run(
            len(vms),
            plan_waves,
            vms,
            link_rate=outgoing,
            max_parallel=schedule.max_parallel,
            max_incoming=schedule.max_incoming,
            destination_rates=incoming,
        )
        schedule.adopt(plan, started=[], unschedulable=[])
        return schedule, plan

    async def _wave_inputs(
        self,
        spec: EvacuateSpec,
        assignments: Mapping[str, str],
        domains: Mapping[str, DomainInfo],
        disks: Mapping[str, Mapping[str, int]],
    ) -> tuple[list[WaveVm], float, dict[str, float]] | str:
        """Each VM's prediction inputs and the links' rates, or why they cannot be had."""
        links = await self._link_rates(assignments.values())
        if isinstance(links, str):
            return links
        plans: dict[str, MigrationPlan] = {}
        for count, (name, dest) in enumerate(assignments.items(), start=1):
            try:
                plans[name] = self._resolved(spec, name, dest, domains[name], disks)
            except TaskError as exc:
                return f"{name}: {exc}"
            await _breathe(count)
        dirty = await self._dirty_rates(
            [n for n, p in plans.items() if _live(p) and domains[n].state is DomainState.RUNNING]
        )
        if isinstance(dirty, str):
            return dirty
        memory = {name: await self._memory_to_send(domains[name]) for name in assignments}
        vms: list[WaveVm] = []
        for count, (name, dest) in enumerate(assignments.items(), start=1):
            vms.append(
                self._wave_vm(
                    plans[name],
                    memory=memory[name],
                    dirty=dirty.get(name),
                    stream=_stream(links[dest]),
                    disk=sum(disks.get(name, {}).values()),
                )
            )
            await _breathe(count)
        outgoing, incoming = _nics(links)
        return vms, outgoing, incoming

    async def _link_rates(self, destinations: Iterable[str]) -> dict[str, LinkRate] | str:
        """The rates toward each destination (see the module), or why one cannot be had."""
        hv = self._hv
        links: dict[str, LinkRate] = {}
        for dest in dict.fromkeys(destinations):
            link: LinkRate | None = None
            if isinstance(hv, KnowsLinkRate):
                try:
                    link = await hv.link_rate(dest)
                except TaskError as exc:
                    return f"the link rates could not be told: {exc}"
            if link is None:  # the learned or configured rate, for one and for all
                rate, _ = self._forecaster.link_rate(dest, None)
                link = LinkRate(single=rate, outgoing=rate, incoming=rate)
            stream = _stream(link)
            if not math.isfinite(stream):
                return f"no link rate known toward {dest}"
            if not stream > 0:
                return f"the link toward {dest} moves nothing"
            links[dest] = link
        return links

    async def _dirty_rates(self, names: list[str]) -> dict[str, DirtyRate] | str:
        """The dirty rates of ``names`` through the Forecaster (a probe may run for each),
        or why one cannot be had."""
        rates = self._forecaster.dirty_rates
        answers = await asyncio.gather(*(rates.rate(self._hv, n, measure=True) for n in names))
        out: dict[str, DirtyRate] = {}
        for name, answer in zip(names, answers, strict=True):
            if answer.rate is None:
                why = f" ({answer.note})" if answer.note else ""
                return f"no dirty rate known for {name}{why}"
            out[name] = answer
        return out

    async def _memory_to_send(self, dom: DomainInfo) -> int:
        """Bytes ``dom``'s migration sends in full (``Forecaster.memory_to_send``)."""
        memory = max(0, dom.memory) * 1024
        if dom.state is not DomainState.RUNNING:
            return memory
        return await self._forecaster.memory_to_send(self._hv, dom.name, memory)

    def _resolved(
        self,
        spec: EvacuateSpec,
        name: str,
        dest: str,
        dom: DomainInfo,
        disks: Mapping[str, Mapping[str, int]],
    ) -> MigrationPlan:
        """``name``'s migration parameters, resolved as its migration will resolve them."""
        settings = self._settings
        return plan_migration(
            MigrateSpec(vm_name=name, destination=dest, parameter=spec.parameter),
            defaults=settings.migration,
            driver=spec.driver or settings.hypervisor.driver,
            transport=settings.hypervisor.transport,
            memory_kib=dom.memory,
            disk_bytes=sum(disks.get(name, {}).values()),
        )

    def _wave_vm(
        self,
        mplan: MigrationPlan,
        *,
        memory: int,
        dirty: DirtyRate | None,
        stream: float,
        disk: int,
    ) -> WaveVm:
        """One VM's inputs."""
        request = mplan.request
        if request.bandwidth:
            stream = min(stream, request.bandwidth * _MIB)
        live = _live(mplan) and dirty is not None and dirty.rate is not None
        inputs = PredictionInputs(
            memory=memory,
            guest_memory=mplan.memory or None,
            link_rate=stream,
            completion_timeout=mplan.completion_timeout,
            dirty_rate=max(0.0, dirty.rate or 0.0) if live and dirty is not None else 0.0,
            dirty_rate_bound=dirty.bound if live and dirty is not None else None,
            dirty_period=dirty.period if live and dirty is not None else 0.0,
            disk_bytes=disk if request.copy_storage != "none" else 0,
            max_downtime=mplan.max_downtime,
            post_copy_allowed=(
                self._settings.migration.allow_post_copy
                if mplan.auto
                else request.mode == "post-copy"
            ),
            auto_converge=request.auto_converge,
            costs=self._forecaster.costs(self._hv, request.destination),
        )
        return WaveVm(name=request.vm_name, destination=request.destination, inputs=inputs)

    async def _run_waves(
        self,
        job: _Job,
        schedule: _Schedule,
        move: Move,
        steer: Steer,
        *,
        moving: Moving,
        tasks: dict[str, asyncio.Task[ResultEntry]],
        operator_cap: OperatorCap,
    ) -> None:
        """Run the moves (see the module); each move's task goes into ``tasks`` as it
        starts."""

        async def again(
            pending: list[str], running: dict[str, float], seen: list[Observation], why: Observation
        ) -> list[str]:
            return await self._replan(
                job, schedule, pending=pending, running=running, seen=seen, why=why
            )

        settings = self._settings
        async with (
            InboundReservations(
                self._bus,
                task_topic=settings.mqtt.task_topic,
                hostname=settings.hostname,
                task_id=job.msg.id,
            ) as reservations,
            asyncio.TaskGroup() as tg,
        ):
            moves = Moves(
                schedule=schedule,
                move=move,
                steer=steer,
                moving=moving,
                operator_cap=operator_cap,
                replan=again,
                reservations=reservations,
                tasks=tasks,
            )
            await moves.run(tg)
        for name in [n for n in schedule.order if schedule.steps[n].member is None]:
            step = schedule.steps[name]  # converges in no way the model knows: alone, last
            async with asyncio.TaskGroup() as tg:
                tasks[name] = tg.create_task(
                    move(name, None), name=f"asyncmigfra.evacuate[{name}->{step.destination}]"
                )

    async def _replan(
        self,
        job: _Job,
        schedule: _Schedule,
        *,
        pending: list[str],
        running: dict[str, float],
        seen: list[Observation],
        why: Observation,
    ) -> list[str]:
        """Plan the moves of ``pending`` (not started) again with what ``seen`` shows
        (``running``: the moves under way, with the share of their work done); the pending
        VMs that the model sees converging, in their new order."""
        plannable = [n for n in pending if schedule.steps[n].member is not None]
        if not plannable:
            return plannable
        started = [n for n in schedule.order if n not in pending]
        first = max((schedule.steps[n].wave for n in started), default=0) + 1
        vms = [schedule.vms[n] for n in [*running, *plannable]]
        try:
            plan = await self._planner.run(
                len(vms),
                replan,
                vms,
                seen,
                link_rate=schedule.link_rate,
                max_parallel=schedule.max_parallel,
                max_incoming=schedule.max_incoming,
                destination_rates=schedule.destination_rates,
                first_wave=first,
                running=running,
            )
        except TimeoutError:
            log.warning("evacuation.replan_abandoned", task_id=job.msg.id, vms=len(vms))
            return plannable  # the order planned before stands
        except Exception as exc:  # noqa: BLE001 - a re-plan is advice: the evacuation goes on
            log.error("evacuation.replan_failed", task_id=job.msg.id, error=str(exc))  # noqa: TRY400
            return plannable
        unschedulable = [schedule.steps[n] for n in pending if schedule.steps[n].member is None]
        schedule.adopt(plan, started=started, unschedulable=unschedulable)
        schedule.slowdown = slowdown(seen)
        took = "took" if why.finished else "has run"
        reason = (
            f"{why.name} {took} {why.actual:.1f} s, predicted {why.predicted:.1f} s:"
            " the rest planned again"
        )
        log.info("evacuation.replanned", task_id=job.msg.id, reason=reason)
        rest = [n for n in schedule.order if n not in started]
        self._events.plan(job.msg.id, None, schedule.event(rest, reason))
        return [n for n in rest if schedule.steps[n].member is not None]
