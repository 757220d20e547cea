"""A predicted evacuation's moves as they run (protocol §3.7, ``schedule: predicted``).

:class:`Moves` starts the planned moves in the planned order, each as soon as the links have
room for it by the planner's own rules (:func:`~asyncmigfra.tasks.shares.admissible`, on
the links as told, with the moves running now, not the planned ones: a move that ends late
delays the next, never overloads a link). One that cannot start yet may be passed by the
next ones only if they leave it a slot and room for its need
(:func:`~asyncmigfra.tasks.shares.leaves_room`). Whenever a move starts or ends, and when a
move's setup ends, every running move's bandwidth cap is set for its share
(:func:`~asyncmigfra.tasks.shares.allocate`, on the links as granted) through the steering
``tune migration`` also uses (a move whose job has not started yet gets its cap when it
has). A move's setup ends when its job shows data moving (``moving``, asked every
:data:`_CAP_RETRY` s while it is in setup), not when the prediction's setup time has passed:
a loaded host's setup can take several times as long, and a move in its setup sends
nothing, so its share stays with the moves that do. A bandwidth an operator set with
``tune migration`` holds: that move's cap is no longer changed, and the others divide the
links as if it moved at most that (:data:`OperatorCap`).

Destinations are shared with other hosts' evacuations: before its moves into a destination
use more of its inbound NIC, this agent reserves that share with the destination's agent
(:class:`~asyncmigfra.peers.inbound.InboundReservations`) and divides only what it was
granted; a move waits until the grants cover its need beside the needs of the moves
running into the same destination (asking again every :data:`_GRANT_RETRY` s, as for
running moves granted less than they would use) while moves to other destinations go on.
The first move waiting for each destination keeps its ask there meanwhile, so that the
destination's agent keeps its turn (and cuts a source that holds more than its fair share
for long, :mod:`asyncmigfra.peers.inbound`). A move that waited :data:`GRANT_PATIENCE` s
makes its destination uncoordinated: a destination's agent never stalls an evacuation.
A destination whose agent does not answer is divided as if this host were alone.

The moves not started are planned again (the ``replan`` given) when a move strayed from its
prediction, also one still running that has run :data:`~asyncmigfra.tasks.waves.DEVIATION`
times its prediction (not while in its setup: it has sent nothing), and the slowdown the
moves show differs that much from the one the plan in force assumed (:meth:`Moves._ended`);
the loop wakes when a running move may tell, and at once when a re-plan became due while it
was busy (planning takes seconds for many VMs).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any

from asyncmigfra.model import ResultEntry
from asyncmigfra.peers.reserving import InboundReservations
from asyncmigfra.tasks.dispatching.schedule import _Schedule
from asyncmigfra.tasks.shares import Links, Member, admissible, allocate, caps, leaves_room
from asyncmigfra.tasks.waves import DEVIATION, Observation, deviates, slowdown, slowdown_reaches

__all__ = ["Move", "Moves", "Moving", "OperatorCap", "Replan", "Steer"]

#: ``move(name, bandwidth)``: migrate a placed VM, capped at ``bandwidth`` MiB/s (``None``:
#: as the task says); its result entry.
Move = Callable[[str, int | None], Coroutine[Any, Any, ResultEntry]]
#: ``steer(name, bandwidth)``: cap a VM's running migration at ``bandwidth`` MiB/s (``None``:
#: as the task says); ``False`` when it has no running job to change (not yet, or no more;
#: ``True`` also when an operator's bandwidth holds and nothing changed).
Steer = Callable[[str, int | None], Awaitable[bool]]
#: ``moving(name)``: the VM's migration job has ended its setup (it shows data moving);
#: ``False`` while it has not, or has no job yet.
Moving = Callable[[str], Awaitable[bool]]
#: ``operator_cap(name)``: the bandwidth (MiB/s, 0: unlimited) an operator set on a VM's
#: running migration with ``tune migration``, which holds (``None``: none set).
OperatorCap = Callable[[str], int | None]
#: ``replan(pending, running, seen, why)``: plan the pending moves again (``running``: the
#: share of its work each running move has done); the pending VMs in their new order.
Replan = Callable[
    [list[str], dict[str, float], list[Observation], Observation], Awaitable[list[str]]
]
#: s between attempts to set a cap on a move whose job has not started yet.
_CAP_RETRY = 0.2
#: s between requests for a destination's inbound share that did not cover a move's need.
_GRANT_RETRY = 0.5
#: s a move waits for a destination's grant before that destination is divided as if this
#: host were alone.
GRANT_PATIENCE = 600.0
#: Moves after the first waiting one considered at each event.
_LOOKAHEAD = 8
_MIB = 1024 * 1024


class Moves:
    """The planned moves of one predicted evacuation as they run (see the module)."""

    def __init__(
        self,
        *,
        schedule: _Schedule,
        move: Move,
        steer: Steer,
        moving: Moving,
        replan: Replan,
        reservations: InboundReservations,
        tasks: dict[str, asyncio.Task[ResultEntry]],
        operator_cap: OperatorCap = lambda name: None,
    ) -> None:
        self._schedule = schedule
        self._move = move
        self._steer = steer
        self._moving = moving
        self._operator_cap = operator_cap
        self._replan = replan
        self._reservations = reservations
        self._tasks = tasks
        #: VMs not started, in the planned order.
        self._pending = [n for n in schedule.order if schedule.steps[n].member is not None]
        #: VM -> when its move started (monotonic s).
        self._running: dict[str, float] = {}
        #: VM -> the slowdown its prediction was made for (the schedule's when it started).
        self._basis: dict[str, float] = {}
        #: The moves whose bandwidth an operator set: their time tells nothing of the links.
        self._held: set[str] = set()
        #: The running VMs whose jobs have not shown data moving yet.
        self._setting_up: set[str] = set()
        #: VM -> the cap (MiB/s) it should have now, and the one it has.
        self._caps: dict[str, int | None] = {}
        self._applied: dict[str, int | None] = {}
        #: The moves that ended, as predicted and as they took.
        self._seen: list[Observation] = []
        #: The slowdown the plan in force was made for (what the moves showed at the last
        #: re-plan): running moves re-plan the rest once they show :data:`DEVIATION` times
        #: that.
        self._assumed = schedule.slowdown
        #: A move waits for a destination's grant (asked again in :data:`_GRANT_RETRY` s).
        self._short = False
        #: destination -> the first move waiting for its grant (its ask is kept), and since
        #: when (monotonic s) a move waits for it.
        self._queued: dict[str, Member] = {}
        self._waiting_since: dict[str, float] = {}

    async def run(self, tg: asyncio.TaskGroup) -> None:
        """Start, cap and follow the moves until every planned one has ended."""
        steps = self._schedule.steps
        await self._reservations.probe({steps[n].destination for n in self._pending})
        while self._pending or self._running:
            await self._start(tg)
            await self._setups_ended()
            self._recap()
            await self._apply_caps()
            wake = self._next_wake()
            if self._running:
                await asyncio.wait(
                    {self._tasks[n] for n in self._running},
                    timeout=wake,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            else:
                await asyncio.sleep(wake or _GRANT_RETRY)
            await self._ended()

    def _members(self, names: list[str]) -> list[Member]:
        """The moves of ``names`` as the rules see them; a running one whose bandwidth an
        operator set is held to it (it gets no more, the others share the rest)."""
        steps = self._schedule.steps
        out = []
        for name in names:
            member = steps[name].member
            if member is None:
                continue
            held = self._operator_cap(name) if name in self._running else None
            if held is not None:
                self._held.add(name)
            if held:
                rate = float(held) * _MIB
                member = replace(
                    member,
                    alone=min(member.alone, rate),
                    needed=min(member.needed, rate),
                    wanted=min(member.wanted, rate),
                )
            out.append(member)
        return out

    def _links(self) -> Links:
        """The links as this evacuation may use them: the plan's, each destination's inbound
        NIC no more than its grant."""
        nominal = self._schedule.links
        grants = self._reservations.held
        into = dict(nominal.into)
        for dest, granted in grants.items():
            into[dest] = min(into.get(dest, granted), granted)
        return Links(nominal.out, into)

    async def _reserve(self, members: list[Member]) -> None:
        """Ask each destination for what ``members`` would use of its inbound NIC (the
        division at the plan's links), and release what none uses."""
        nominal = self._schedule.links
        rates = allocate(members, nominal)
        wanted = dict.fromkeys(self._reservations.held, 0.0)
        for m in members:
            wanted[m.destination] = wanted.get(m.destination, 0.0) + rates[m.name]
        await self._reservations.reserve(wanted, nominal.into)

    async def _start(self, tg: asyncio.TaskGroup) -> None:
        """Start what may start now (see the module), each capped at its share once it
        moves."""
        schedule = self._schedule
        members = self._members(list(self._running))
        limits = {"max_parallel": schedule.max_parallel, "max_incoming": schedule.max_incoming}
        new: list[str] = []
        head: Member | None = None
        self._short = False
        queued: dict[str, Member] = {}
        for name in list(self._pending)[: _LOOKAHEAD + 1]:
            member = schedule.steps[name].member
            assert member is not None
            if head is not None and not leaves_room(
                members, member, head, schedule.links, **limits
            ):
                continue
            if self._may_start(members, member, schedule.links):
                asking = [*members, *queued.values(), member]
                await self._reserve(asking)
                if self._granted([m for m in asking if m.destination == member.destination]):
                    members.append(member)
                    new.append(name)
                    self._pending.remove(name)
                    continue
                self._short = True  # another host's moves hold that destination: ask again
                queued.setdefault(member.destination, member)
            head = head or member
        self._wait_no_longer(queued)
        # What was asked for moves that wait goes back, but for the first one waiting for
        # each destination's grant: its ask stays, so it keeps its turn there.
        self._queued = queued
        await self._reserve([*members, *queued.values()])
        if not new:
            return
        moving = caps(members, allocate(members, self._links()))
        now = time.monotonic()
        for name in new:
            step = schedule.steps[name]
            self._running[name] = now
            self._basis[name] = schedule.slowdown
            self._setting_up.add(name)
            self._caps[name] = self._applied[name] = moving[name]
            self._tasks[name] = tg.create_task(
                self._move(name, moving[name]),
                name=f"asyncmigfra.evacuate[{name}->{step.destination}]#{step.wave}",
            )

    def _wait_no_longer(self, queued: dict[str, Member]) -> None:
        """Note since when a move waits for each destination's grant; one that waited
        :data:`GRANT_PATIENCE` s makes that destination uncoordinated (divided as if this
        host were alone: its agent gives what the move needs to nobody, or to others only)."""
        now = time.monotonic()
        for dest in [d for d in self._waiting_since if d not in queued]:
            del self._waiting_since[dest]
        for dest in queued:
            since = self._waiting_since.setdefault(dest, now)
            if now - since >= GRANT_PATIENCE:
                self._reservations.give_up(
                    dest, f"granted less than a migration needs for {GRANT_PATIENCE:g} s"
                )
                del self._waiting_since[dest]

    def _granted(self, members: list[Member]) -> bool:
        """The grants cover the needs of ``members`` into every destination."""
        return all(
            _fits_alone(Member(d, d, 0, need, need), self._links())
            for d, need in _needs_into(members).items()
        )

    def _may_start(self, members: list[Member], member: Member, links: Links) -> bool:
        """``member`` may start beside ``members`` on ``links``: by the planner's rules, or,
        with nothing running, when its need fits."""
        schedule = self._schedule
        if not members:
            return _fits_alone(member, links)
        return admissible(
            members,
            member,
            links,
            max_parallel=schedule.max_parallel,
            max_incoming=schedule.max_incoming,
        )

    async def _setups_ended(self) -> None:
        """Note the moves whose jobs now show data moving."""
        asking = sorted(self._setting_up)
        if not asking:
            return
        seen = await asyncio.gather(*(self._moving(n) for n in asking))
        self._setting_up.difference_update(n for n, yes in zip(asking, seen, strict=True) if yes)

    def _recap(self) -> None:
        """Every running move's cap for its share now: the moves in their setup keep the
        cap they started with and their needs free, the others share the rest
        (:func:`~asyncmigfra.tasks.shares.allocate`)."""
        setups = self._members([n for n in self._running if n in self._setting_up])
        moving = self._members([n for n in self._running if n not in self._setting_up])
        self._caps.update(caps(moving, allocate(moving, self._links(), starting=setups)))

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

    def _next_wake(self) -> float | None:
        """s until a move in its setup is asked again whether it moves, a cap not yet set
        is tried again, or a destination is asked again for a share; ``None``: until a move
        ends."""
        wakes: list[float] = []
        if self._setting_up or any(self._caps[n] != self._applied.get(n) for n in self._running):
            wakes.append(_CAP_RETRY)
        if self._short or self._reservations.short:
            wakes.append(_GRANT_RETRY)
        if self._pending and (overdue := self._overdue_in(time.monotonic())) is not None:
            wakes.append(overdue)
        return max(0.0, min(wakes)) if wakes else None

    def _overdue_in(self, now: float) -> float | None:
        """s until the running moves may make the rest worth planning again (see
        :meth:`_ended`): one reaching its prediction (its time counts from then on) or
        :data:`DEVIATION` times it, or the slowdown they show reaching :data:`DEVIATION`
        times the one the plan assumes; ``None``: not by running on."""
        running = self._running_observations(now)
        if self._witness([*self._seen, *running], [], running) is not None:
            return 0.0  # due already: it became so while the loop was busy (a re-plan)
        waits = [
            limit - o.actual + 1e-3
            for o in running
            for limit in (o.predicted, o.predicted * DEVIATION)
            if o.actual <= limit
        ]
        if reach := slowdown_reaches([*self._seen, *running], self._assumed * DEVIATION):
            waits.append(reach)  # (0: reached, and waiting for a move to stray as well)
        return min(waits) if waits else None

    def _witness(
        self, evidence: list[Observation], strays: list[Observation], running: list[Observation]
    ) -> Observation | None:
        """The move that makes the rest worth planning again now (see :meth:`_ended`), when
        ``evidence`` shows the links :data:`DEVIATION` times slower (or faster) than the
        plan in force assumes: a slow stray of ``strays`` or a move of ``running`` past
        :data:`DEVIATION` times its prediction (the furthest first), or for faster links a
        fast stray; ``None``: not now."""
        shown = slowdown(evidence)
        if shown >= self._assumed * DEVIATION:
            overdue = sorted(
                (o for o in running if deviates(o)), key=lambda o: o.predicted / o.actual
            )
            slower = [o for o in strays if o.actual > o.predicted] + overdue
            return slower[0] if slower else None
        if shown * DEVIATION <= self._assumed:
            return next((o for o in strays if o.actual < o.predicted), None)
        return None

    def _running_observations(self, now: float) -> list[Observation]:
        """The running moves with a prediction, as long as they have run so far; not those
        still in their setup (they have sent nothing: their time tells nothing of the links)
        nor those an operator capped."""
        return [
            o
            for name, started in self._running.items()
            if name not in self._setting_up
            and (o := self._observed(name, now - started, finished=False)) is not None
        ]

    def _observed(self, name: str, actual: float, *, finished: bool) -> Observation | None:
        """``name``'s move as evidence of the links: ``None`` without a prediction, or when
        an operator set its bandwidth."""
        predicted = self._schedule.steps[name].predicted
        if predicted is None or name in self._held:
            return None
        return Observation(
            name=name,
            predicted=predicted,
            actual=actual,
            finished=finished,
            fixed=self._schedule.vms[name].inputs.costs.setup,
            basis=self._basis.get(name, 1.0),
        )

    async def _ended(self) -> None:
        """Note the moves that ended; plan the rest again when a move strayed (it ended
        :data:`DEVIATION` times faster or slower than predicted, or has run
        :data:`DEVIATION` times its prediction: a crawling or stuck move tells before it
        ends) and the moves so far show the links :data:`DEVIATION` times slower or faster
        than the plan in force assumes (:func:`~asyncmigfra.tasks.waves.slowdown`): once
        for each such step of the evidence, not at every look."""
        now = time.monotonic()
        strays: list[Observation] = []
        for name in [n for n in self._running if self._tasks[n].done()]:
            started = self._running.pop(name)
            self._applied.pop(name, None)
            self._caps.pop(name, None)
            self._setting_up.discard(name)
            seen = self._observed(name, now - started, finished=True)
            if seen is None or not _succeeded(self._tasks[name]):
                continue  # a move that failed or was cancelled tells nothing of the links
            self._seen.append(seen)
            if deviates(seen):
                strays.append(seen)
        if self._pending:
            running = self._running_observations(now)
            evidence = [*self._seen, *running]
            if (why := self._witness(evidence, strays, running)) is not None:
                # Also when the planner gives up: not asked again at once.
                self._assumed = slowdown(evidence)
                self._pending = await self._replan(
                    self._pending, self._progress(now, self._assumed), evidence, why
                )
        queued = [m for m in self._queued.values() if m.name in self._pending]
        await self._reserve([*self._members(list(self._running)), *queued])

    def _progress(self, now: float, slowed: float) -> dict[str, float]:
        """The share of its work each running move has done, its work taking as long as on
        links ``slowed`` times slower than told (the slowdown the re-plan assumes: a move
        that crawls is not taken for nearly done); at most 0.95: it has not ended."""
        out: dict[str, float] = {}
        for name, started in self._running.items():
            step = self._schedule.steps[name]
            setup = self._schedule.vms[name].inputs.costs.setup
            work = ((step.predicted or 0.0) - setup) / self._basis.get(name, 1.0) * slowed
            done = (now - started - setup) / work if work > 0 else 0.0
            out[name] = min(0.95, max(0.0, done))
        return out


def _succeeded(task: asyncio.Task[ResultEntry]) -> bool:
    return not task.cancelled() and task.exception() is None and task.result().status == "success"


def _needs_into(members: list[Member]) -> dict[str, float]:
    """Bytes/s the ``members`` need into each destination, together."""
    out: dict[str, float] = {}
    for m in members:
        out[m.destination] = out.get(m.destination, 0.0) + m.needed
    return out


def _fits_alone(member: Member, links: Links) -> bool:
    """``member``'s need fits its links (a grant may be smaller than it)."""
    capacities = links.capacities()
    return all(
        member.needed <= capacities[link] * (1 + 1e-9)
        for link in links.of(member.destination)
        if link in capacities
    )
