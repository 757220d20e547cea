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
waves (:func:`~asyncmigfra.tasks.waves.plan_waves`, in a worker thread: it is CPU work) and
announces them (``event: plan``, without ``vm-name``) before the first migration. When a
rate cannot be had for a VM or a destination, the evacuation runs as without ``schedule``
(placement order, ``max-parallel`` at once), and the plan event says why.

The link rates: a back-end that knows its NICs
(:class:`~asyncmigfra.hypervisor.base.KnowsLinkRate`, the ``fake``) tells one migration's
rate and the two NICs' separately. Otherwise (libvirt) the Forecaster's rate toward the
destination (learned from earlier migrations, else the configured ``migration.link-rate``)
stands for all three: one migration alone is taken to fill the source's NIC, and the
migrations out of this host, and those into one destination, to share that same rate.

:meth:`_Predicted._run_waves` then starts the moves in the planned order, each as soon as
the links have room for it by the planner's own rules
(:func:`~asyncmigfra.tasks.shares.admissible`, with the moves running now, not the planned
ones: a move that ends late delays the next, never overloads a link), and whenever a move
starts or ends sets every running move's bandwidth cap for its new share
(:func:`~asyncmigfra.tasks.shares.allocate`: needs first, then by rank) through the
steering ``tune migration`` also uses (a move whose job has not started yet gets its cap
when it has). VMs the model sees converging in no way run last, each alone. When a move
took more than 1.5 times its prediction (or less than its prediction over 1.5), the moves
not yet started are planned again with links as slow as the moves so far were, the running
ones with what they have left (:func:`~asyncmigfra.tasks.waves.replan`), and announced
again.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any

import structlog

from asyncmigfra.errors import TaskError
from asyncmigfra.hypervisor.base import DomainInfo, DomainState, KnowsLinkRate, LinkRate
from asyncmigfra.migration.plan import MigrationPlan, plan_migration
from asyncmigfra.migration.prediction import PredictionInputs
from asyncmigfra.model import EvacuateSpec, MigrateSpec, ResultEntry
from asyncmigfra.tasks.dispatching.base import _DispatcherBase
from asyncmigfra.tasks.dispatching.jobs import _Job
from asyncmigfra.tasks.dispatching.schedule import _Schedule
from asyncmigfra.tasks.shares import Member, admissible, allocate, caps
from asyncmigfra.tasks.waves import (
    Observation,
    WavePlan,
    WaveVm,
    deviates,
    plan_waves,
    replan,
    slowdown,
)

log = structlog.stdlib.get_logger("asyncmigfra.dispatching")

_MIB = 1024 * 1024

#: ``move(name, bandwidth)``: migrate a placed VM, capped at ``bandwidth`` MiB/s (``None``:
#: as the task says); its result entry.
Move = Callable[[str, int | None], Coroutine[Any, Any, ResultEntry]]
#: ``steer(name, bandwidth)``: cap a VM's running migration at ``bandwidth`` MiB/s (``None``:
#: as the task says); ``False`` when it has no running job to change (not yet, or no more).
Steer = Callable[[str, int | None], Awaitable[bool]]
#: s between attempts to set a cap on a move whose job has not started yet.
_CAP_RETRY = 0.2


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
        if isinstance(gathered, str):
            log.info("evacuation.schedule_fallback", task_id=job.msg.id, reason=gathered)
            self._events.plan(job.msg.id, None, {"schedule": "placement", "details": gathered})
            return None
        schedule, plan = await self._planned(spec, *gathered)
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
        schedule, _ = await self._planned(spec, *gathered)
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
        plan = await asyncio.to_thread(
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
        for name, dest in assignments.items():
            try:
                plans[name] = self._resolved(spec, name, dest, domains[name], disks)
            except TaskError as exc:
                return f"{name}: {exc}"
        dirty = await self._dirty_rates(
            [n for n, p in plans.items() if _live(p) and domains[n].state is DomainState.RUNNING]
        )
        if isinstance(dirty, str):
            return dirty
        vms = [
            self._wave_vm(
                plans[name],
                dom=domains[name],
                dirty_rate=dirty.get(name, 0.0),
                stream=_stream(links[dest]),
                disk=sum(disks.get(name, {}).values()),
            )
            for name, dest in assignments.items()
        ]
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

    async def _dirty_rates(self, names: list[str]) -> dict[str, float] | str:
        """The dirty rates of ``names`` through the Forecaster (a probe may run for each),
        or why one cannot be had."""
        rates = self._forecaster.dirty_rates
        answers = await asyncio.gather(*(rates.rate(self._hv, n, measure=True) for n in names))
        out: dict[str, float] = {}
        for name, answer in zip(names, answers, strict=True):
            if answer.rate is None:
                why = f" ({answer.note})" if answer.note else ""
                return f"no dirty rate known for {name}{why}"
            out[name] = answer.rate
        return out

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
        self, mplan: MigrationPlan, *, dom: DomainInfo, dirty_rate: float, stream: float, disk: int
    ) -> WaveVm:
        """One VM's inputs."""
        request = mplan.request
        if request.bandwidth:
            stream = min(stream, request.bandwidth * _MIB)
        inputs = PredictionInputs(
            memory=max(0, dom.memory) * 1024,
            link_rate=stream,
            completion_timeout=mplan.completion_timeout,
            dirty_rate=max(0.0, dirty_rate) if _live(mplan) else 0.0,
            disk_bytes=disk if request.copy_storage != "none" else 0,
            max_downtime=mplan.max_downtime,
            post_copy_allowed=(
                self._settings.migration.allow_post_copy
                if mplan.auto
                else request.mode == "post-copy"
            ),
            auto_converge=request.auto_converge,
        )
        return WaveVm(name=request.vm_name, destination=request.destination, inputs=inputs)

    async def _run_waves(
        self,
        job: _Job,
        schedule: _Schedule,
        move: Move,
        steer: Steer,
        tasks: dict[str, asyncio.Task[ResultEntry]],
    ) -> None:
        """Run the moves (see the module); each move's task goes into ``tasks`` as it
        starts."""
        moves = _Moves(self, job, schedule=schedule, move=move, steer=steer, tasks=tasks)
        async with asyncio.TaskGroup() as tg:
            await moves.planned(tg)
        for name in [n for n in schedule.order if schedule.steps[n].member is None]:
            step = schedule.steps[name]  # converges in no way the model knows: alone, last
            tasks[name] = asyncio.create_task(
                move(name, None), name=f"asyncmigfra.evacuate[{name}->{step.destination}]"
            )
            await asyncio.wait({tasks[name]})

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
        plan = await asyncio.to_thread(
            replan,
            [schedule.vms[n] for n in [*running, *plannable]],
            seen,
            link_rate=schedule.link_rate,
            max_parallel=schedule.max_parallel,
            max_incoming=schedule.max_incoming,
            destination_rates=schedule.destination_rates,
            first_wave=first,
            running=running,
        )
        unschedulable = [schedule.steps[n] for n in pending if schedule.steps[n].member is None]
        schedule.adopt(plan, started=started, unschedulable=unschedulable)
        schedule.slowdown = slowdown(seen)
        reason = (
            f"{why.name} took {why.actual:.1f} s, predicted {why.predicted:.1f} s:"
            " the rest planned again"
        )
        log.info("evacuation.replanned", task_id=job.msg.id, reason=reason)
        rest = [n for n in schedule.order if n not in started]
        self._events.plan(job.msg.id, None, schedule.event(rest, reason))
        return [n for n in rest if schedule.steps[n].member is not None]


class _Moves:
    """The planned moves of one predicted evacuation as they run (see the module)."""

    def __init__(
        self,
        owner: _Predicted,
        job: _Job,
        *,
        schedule: _Schedule,
        move: Move,
        steer: Steer,
        tasks: dict[str, asyncio.Task[ResultEntry]],
    ) -> None:
        self._owner = owner
        self._job = job
        self._schedule = schedule
        self._move = move
        self._steer = steer
        self._tasks = tasks
        #: VMs not started, in the planned order.
        self._pending = [n for n in schedule.order if schedule.steps[n].member is not None]
        #: VM -> when its move started (monotonic s).
        self._running: dict[str, float] = {}
        #: VM -> when its setup ends, as far as the prediction knows (monotonic s).
        self._moves_at: dict[str, float] = {}
        #: VM -> the cap (MiB/s) it should have now, and the one it has.
        self._caps: dict[str, int | None] = {}
        self._applied: dict[str, int | None] = {}
        self._seen: list[Observation] = []

    async def planned(self, tg: asyncio.TaskGroup) -> None:
        """Start, cap and follow the moves until every planned one has ended."""
        while self._pending or self._running:
            self._start(tg)
            self._recap()
            await self._apply_caps()
            await asyncio.wait(
                {self._tasks[n] for n in self._running},
                timeout=self._next_wake(),
                return_when=asyncio.FIRST_COMPLETED,
            )
            await self._ended()

    def _start(self, tg: asyncio.TaskGroup) -> None:
        """Start the pending moves, in the planned order, while the next one is admissible
        (:func:`~asyncmigfra.tasks.shares.admissible`; with nothing running, always), each
        capped at its share once it moves."""
        schedule = self._schedule
        links = schedule.links
        members = [m for n in self._running if (m := schedule.steps[n].member) is not None]
        new: list[str] = []
        while self._pending:
            member = schedule.steps[self._pending[0]].member
            assert member is not None
            if members and not admissible(
                members,
                member,
                links,
                max_parallel=schedule.max_parallel,
                max_incoming=schedule.max_incoming,
            ):
                break
            members.append(member)
            new.append(self._pending.pop(0))
        if not new:
            return
        moving = caps(members, allocate(members, links))
        now = time.monotonic()
        for name in new:
            step = schedule.steps[name]
            self._running[name] = now
            self._moves_at[name] = now + schedule.vms[name].inputs.costs.setup
            self._caps[name] = self._applied[name] = moving[name]
            self._tasks[name] = tg.create_task(
                self._move(name, moving[name]),
                name=f"asyncmigfra.evacuate[{name}->{step.destination}]#{step.wave}",
            )

    def _recap(self) -> None:
        """Every running move's cap for its share now: the moves in their setup (as far as
        the prediction knows) keep the cap they started with and their needs free, the
        others share the rest (:func:`~asyncmigfra.tasks.shares.allocate`)."""
        schedule = self._schedule
        now = time.monotonic()
        setups: list[Member] = []
        moving: list[Member] = []
        for name in self._running:
            member = schedule.steps[name].member
            if member is not None:
                (setups if self._moves_at[name] > now else moving).append(member)
        self._caps.update(caps(moving, allocate(moving, schedule.links, starting=setups)))

    def _next_wake(self) -> float | None:
        """s until a move's setup ends (its share changes) or a cap not yet set is tried
        again; ``None``: until a move ends."""
        now = time.monotonic()
        wakes = [at - now for n, at in self._moves_at.items() if n in self._running and at > now]
        if any(self._caps[n] != self._applied.get(n) for n in self._running):
            wakes.append(_CAP_RETRY)
        return max(0.0, min(wakes)) if wakes else None

    async def _apply_caps(self) -> None:
        """Set the caps that changed on the running moves (a move whose job has not started
        yet is tried again later)."""
        changed = [n for n in self._running if self._caps[n] != self._applied.get(n)]
        if not changed:
            return
        done = await asyncio.gather(*(self._steer(n, self._caps[n]) for n in changed))
        for name, ok in zip(changed, done, strict=True):
            if ok:
                self._applied[name] = self._caps[name]

    async def _ended(self) -> None:
        """Note the moves that ended; plan the rest again when one strayed."""
        now = time.monotonic()
        schedule = self._schedule
        strays: list[Observation] = []
        for name in [n for n in self._running if self._tasks[n].done()]:
            started = self._running.pop(name)
            self._applied.pop(name, None)
            self._caps.pop(name, None)
            self._moves_at.pop(name, None)
            step = schedule.steps[name]
            if step.predicted is None:
                continue
            seen = Observation(
                name=name,
                predicted=step.predicted,
                actual=now - started,
                fixed=schedule.vms[name].inputs.costs.setup,
            )
            self._seen.append(seen)
            if deviates(seen):
                strays.append(seen)
        if strays and self._pending:
            self._pending = await self._owner._replan(
                self._job,
                schedule,
                pending=self._pending,
                running=self._progress(now),
                seen=self._seen,
                why=strays[0],
            )

    def _progress(self, now: float) -> dict[str, float]:
        """The share of its work each running move has done, as far as its prediction
        tells (at most 0.95: it has not ended)."""
        out: dict[str, float] = {}
        for name, started in self._running.items():
            step = self._schedule.steps[name]
            setup = self._schedule.vms[name].inputs.costs.setup
            span = (step.predicted or 0.0) - setup
            out[name] = 0.0 if span <= 0 else min(0.95, max(0.0, (now - started - setup) / span))
        return out
