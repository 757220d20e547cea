"""Which of an evacuation's migrations run together, and in which order, planned from
predictions (issue 18). Pure: no I/O, no asyncio.

Migrations out of one host share its NIC (and those into one destination share that one's),
and a migration that gets too little of a link never converges: its guest dirties memory
faster than its share sends it. Placing VMs by CPU and memory and then starting them at most
``max-parallel`` at once in placement order (as Nova and KubeVirt do, with 1 and 2) lets two
hot guests share a link and both fail while idle ones wait. The planner instead ranks the
placed VMs and starts each as soon as the links have room for what it needs
(:mod:`asyncmigfra.tasks.shares`), so that every migration converges at the share it gets
and the predicted end of the last one (the *makespan*) is early.

**What each VM needs.** ``alone``: the smallest of its own rate (its stream, or its
``bandwidth`` cap), the source's link and its destination's. ``needed``: the smallest rate
at which pre-copy still converges (:func:`~asyncmigfra.migration.prediction.
smallest_link_share` of ``alone``). A VM whose pre-copy does not converge even alone but
whose post-copy does (and is allowed) needs the smallest rate at which post-copy finishes in
time (any rate that moves its first pass before the completion timeout: post-copy always
ends); what it *wants* (its rate when others share) keeps it from crawling. One that
converges in neither way is not scheduled: it is reported in
:attr:`WavePlan.unschedulable` with the model's reasons, and the caller decides (the
evacuation runs such VMs last, each alone).

**The rank.** Hottest first: those that converge only in post-copy (pre-copy does not even
alone; their ``needed``, a first pass before the timeout, says nothing of how hot they
are), then by ``needed / alone`` (the share of what they could get that they need), then
largest (memory and disks) first, then by name. A hot guest sends far
less at its whole stream than at a fair share (each pass resends what it dirtied meanwhile),
so it is served first; the cold ones take what it leaves, and all of the link between hot
ones.

**The schedule** is :mod:`~asyncmigfra.tasks.shares`' rules run forward in time: at the
start, whenever a migration ends and whenever one's setup ends, the pending VMs that may
start do (:func:`~asyncmigfra.tasks.shares.admissions`: limits, needs, what the ranked
want, no crawling; the first-ranked whenever it may, else the one whose migration sends
least more than alone at the rate it would get, an idle guest before a cold one), and the
running ones divide the links (:func:`~asyncmigfra.tasks.shares.allocate`: needs, then
what the ranked want, then fair shares), held there by bandwidth caps. No barrier: a VM
starts as soon as it fits, not when a group ends. The VMs that start at the same moment
form a *wave* (numbered in start order), which is what the plan announces.

**The model of a migration in it.** It moves nothing during its setup: the others keep its
share meanwhile (its need is kept free) and are capped again when its setup ends. Then it
sends its *work*: the bytes its run sends at its current rate
(:func:`~asyncmigfra.migration.prediction.predict_run` at that rate, minus the setup, times
the rate). When its rate changes (others start or end), the share of its work already done
is kept and the rest is that share of the work at the new rate: a fluid approximation of
the passes.

The schedule is a list schedule, not an optimum (the problem contains bin packing); what
the tests pin down: every VM is scheduled once or reported, no moment exceeds the limits,
no running migration ever gets less than its ``needed``.

**Re-planning.** :func:`replan` plans the VMs not yet started again once moves ran slower
(or faster) than predicted (:func:`deviates`), or once the moves still running past their
prediction show the links :data:`DEVIATION` times slower than the plan in force assumes
(:func:`slowdown_reaches`): the links are assumed :func:`slowdown` times slower (the usual
cause is other traffic on them; a guest dirtying more than measured looks the same from
here), the running ones with what they have left.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from asyncmigfra.migration.prediction import (
    PredictionInputs,
    RunMode,
    RunPrediction,
    cautious,
    predict,
    predict_run,
    smallest_link_share,
)
from asyncmigfra.tasks.shares import Links, Member, admissions, allocate, capped, caps

__all__ = [
    "Observation",
    "PlannedMove",
    "Unschedulable",
    "Wave",
    "WavePlan",
    "WaveVm",
    "deviates",
    "lower_bound",
    "plan_waves",
    "replan",
    "slowdown",
    "slowdown_reaches",
]

#: Rates are predicted in steps of this share of a VM's ``alone`` rate, rounded down.
_RATE_STEPS = 256
#: A deviation beyond this factor either way makes the rest worth planning again.
DEVIATION = 1.5
#: :func:`slowdown` is kept within [1/x, x]: a wild measurement does not wreck the plan.
_SLOWDOWN_LIMIT = 4.0
#: Relative progress at which a migration counts as ended (float noise).
_DONE = 1e-9
#: A VM that takes from others to start wants a rate at which it sends at most this much
#: more than alone (:attr:`~asyncmigfra.tasks.shares.Member.wanted`).
_WORK_SLACK = 0.05


@dataclass(frozen=True, slots=True, kw_only=True)
class WaveVm:
    """A placed VM to schedule: its name, destination and what predicts its migration."""

    name: str
    destination: str
    #: Its ``link_rate`` is what this one migration can move alone (its stream, or its
    #: ``bandwidth`` cap); the planner predicts it at the share it gets.
    inputs: PredictionInputs


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannedMove:
    name: str
    destination: str
    wave: int
    mode: RunMode
    #: Its place in the service order (0 first: the links serve it first).
    rank: int
    #: Bytes/s it gets when it starts (at least ``needed``; it changes as others come and go).
    rate: float
    #: Bytes/s it needs to converge, and what it moves alone.
    needed: float
    alone: float
    #: Bytes/s it should get to start when it takes from others.
    wanted: float
    #: Bytes/s (whole MiB/s) its migration is capped at when it starts; ``None``: no cap.
    bandwidth: float | None
    #: s from its wave's start (its own start) to its end.
    predicted_duration: float

    @property
    def member(self) -> Member:
        """The move as :mod:`~asyncmigfra.tasks.shares` sees it."""
        return Member(self.name, self.destination, self.rank, self.alone, self.needed, self.wanted)


@dataclass(frozen=True, slots=True, kw_only=True)
class Wave:
    """The moves that start at the same moment."""

    number: int
    moves: tuple[PlannedMove, ...]
    #: s from the plan's start to the wave's start.
    start: float
    #: s from its start to the end of its last move.
    duration: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Unschedulable:
    """A VM that converges in no way the model knows, even alone, and why."""

    name: str
    destination: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WavePlan:
    waves: tuple[Wave, ...]
    unschedulable: tuple[Unschedulable, ...]
    #: s: the predicted end of the last move.
    makespan: float

    #: Moves already under way when it was planned (:func:`plan_waves`' ``running``), their
    #: ``predicted_duration`` counted from the plan's start.
    running: tuple[PlannedMove, ...] = ()

    @property
    def moves(self) -> tuple[PlannedMove, ...]:
        return tuple(m for w in self.waves for m in w.moves)


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    """One move of the plan so far: its predicted and its actual (or so far) duration."""

    name: str
    predicted: float
    actual: float
    #: ``False``: it still runs, ``actual`` is how long it has run.
    finished: bool = True
    #: s of ``predicted`` that no link rate changes (the setup).
    fixed: float = 0.0
    #: The slowdown the prediction was made for (a re-plan's: the prediction already counts
    #: the links that much slower than told); :func:`slowdown` measures against the links
    #: as told.
    basis: float = 1.0


def deviates(observation: Observation, tolerance: float = DEVIATION) -> bool:
    """It ran (or has been running) more than ``tolerance`` times its prediction, or ended in
    less than its prediction over ``tolerance``."""
    predicted, actual = observation.predicted, observation.actual
    if predicted <= 0:
        return False
    return actual > tolerance * predicted or (
        observation.finished and actual * tolerance < predicted
    )


def slowdown(observations: Sequence[Observation]) -> float:
    """How much slower than the links as told the moves ran: total actual over total
    predicted, each without its ``fixed`` part and each prediction taken back to the links
    as told (its ``basis``), of the finished moves and of the running ones already past
    their prediction (one that is not yet tells nothing); 1 without any, and within
    [1/4, 4]."""
    actual, predicted, _ = _totals(observations)
    if predicted <= 0 or actual <= 0:
        return 1.0
    return min(_SLOWDOWN_LIMIT, max(1 / _SLOWDOWN_LIMIT, actual / predicted))


def slowdown_reaches(observations: Sequence[Observation], factor: float) -> float | None:
    """s until :func:`slowdown` of ``observations`` reaches ``factor`` as the running moves
    already past their prediction run on (each adds its time to the actual total); 0 when
    it has, ``None`` when it does not that way (none runs past its prediction, or ``factor``
    is beyond the slowdown's bound). A running move that has not reached its prediction yet
    adds nothing until it does (ask again then)."""
    if slowdown(observations) >= factor:
        return 0.0
    if factor > _SLOWDOWN_LIMIT:
        return None
    actual, predicted, growing = _totals(observations)
    if not growing:
        return None
    return max(0.0, (factor * predicted - actual) / growing)


def _totals(observations: Sequence[Observation]) -> tuple[float, float, int]:
    """(s actual, s predicted for the links as told, how many still run) of the moves that
    tell (see :func:`slowdown`)."""
    actual = predicted = 0.0
    growing = 0
    for o in observations:
        if o.predicted > o.fixed and (o.finished or o.actual > o.predicted):
            actual += max(0.0, o.actual - o.fixed)
            predicted += (o.predicted - o.fixed) / o.basis
            growing += not o.finished
    return actual, predicted, growing


def replan(
    remaining: Sequence[WaveVm],
    observations: Sequence[Observation],
    *,
    link_rate: float,
    max_parallel: int,
    max_incoming: int | None = None,
    destination_rates: Mapping[str, float] | None = None,
    first_wave: int = 1,
    running: Mapping[str, float] | None = None,
) -> WavePlan:
    """:func:`plan_waves` for the VMs not yet started (and those of ``running``), every link
    and every VM's own rate divided by the :func:`slowdown` the observed moves show (see the
    module)."""
    factor = slowdown(observations)
    return plan_waves(
        [
            replace(v, inputs=replace(v.inputs, link_rate=v.inputs.link_rate / factor))
            for v in remaining
        ],
        link_rate=link_rate / factor,
        max_parallel=max_parallel,
        max_incoming=max_incoming,
        destination_rates={d: r / factor for d, r in (destination_rates or {}).items()},
        first_wave=first_wave,
        running=running,
    )


def plan_waves(
    vms: Sequence[WaveVm],
    *,
    link_rate: float,
    max_parallel: int,
    max_incoming: int | None = None,
    destination_rates: Mapping[str, float] | None = None,
    first_wave: int = 1,
    running: Mapping[str, float] | None = None,
) -> WavePlan:
    """Rank ``vms`` and plan when each starts (see the module). ``link_rate``: bytes/s of
    the source's link, ``destination_rates``: of each destination's (missing: unlimited; both
    may be ``inf``); ``max_parallel``: migrations at once; ``max_incoming``: per destination
    (``None``: no limit); waves are numbered from ``first_wave``. ``running``: VMs of ``vms``
    already migrating, with the share (0-1) of their work done: they run from the start
    (past their setup), are not in :attr:`WavePlan.waves` but in :attr:`WavePlan.running`."""
    if max_parallel < 1:
        raise ValueError(f"max_parallel must be >= 1, got {max_parallel!r}")
    if max_incoming is not None and max_incoming < 1:
        raise ValueError(f"max_incoming must be >= 1 or None, got {max_incoming!r}")
    rates = dict(destination_rates or {})
    if not link_rate > 0 or any(not r > 0 for r in rates.values()):
        raise ValueError("link rates must be > 0 (inf: unlimited)")
    if len({v.name for v in vms}) != len(vms):
        raise ValueError("every VM may be planned once")
    done = dict(running or {})
    if not set(done) <= {v.name for v in vms}:
        raise ValueError("running VMs must be among the VMs planned")
    links = Links(link_rate, rates)
    needs: list[_Need] = []
    unschedulable: list[Unschedulable] = []
    for vm in vms:
        need = _need(vm, links)
        if isinstance(need, Unschedulable) and vm.name not in done:
            unschedulable.append(need)
        elif isinstance(need, _Need):
            needs.append(need)
    needs.sort(key=lambda n: (n.mode != "post-copy", -n.needed / n.alone, -n.size, n.vm.name))
    for rank, need in enumerate(needs):
        need.rank = rank
    schedule = _Simulation(links, max_parallel=max_parallel, max_incoming=max_incoming)
    schedule.run(needs, {n: min(1.0, max(0.0, p)) for n, p in done.items()})
    return schedule.plan(first_wave, unschedulable, done)


def lower_bound(
    vms: Sequence[WaveVm],
    *,
    link_rate: float,
    destination_rates: Mapping[str, float] | None = None,
) -> float:
    """s no schedule of ``vms`` can beat, as the model counts: the bytes of every migration
    at the rate it moves alone (the fewest it sends) through the source's link, and into
    each destination's, at their full rates; and the longest migration alone. The VMs that
    converge in no way are left out."""
    links = Links(link_rate, dict(destination_rates or {}))
    needs = [n for n in (_need(v, links) for v in vms) if isinstance(n, _Need)]
    bound = max((n.setup + n.work(n.alone) / n.alone for n in needs), default=0.0)
    for link, capacity in links.capacities().items():
        crossing = [n for n in needs if link in links.of(n.vm.destination)]
        if crossing:
            setup = min(n.setup for n in crossing)
            bound = max(bound, setup + sum(n.work(n.alone) for n in crossing) / capacity)
    return bound


# ---- what one VM needs -----------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Need:
    vm: WaveVm
    #: Bytes/s it can get alone, and what it needs to converge.
    alone: float
    needed: float
    mode: RunMode
    rank: int = 0
    runs: dict[float, RunPrediction] = field(default_factory=dict)
    wanted: float = 0.0

    def __post_init__(self) -> None:
        self.wanted = self._wanted()

    def _wanted(self) -> float:
        """The smallest rate (in steps of ``alone``) at which it sends at most
        :data:`_WORK_SLACK` more than alone."""
        most = self.work(self.alone) * (1 + _WORK_SLACK)
        step = self.alone / _RATE_STEPS
        low, high = math.floor(self.needed / step), _RATE_STEPS  # in steps
        if self.work(low * step) <= most:
            return self.needed
        while high - low > 1:  # work(low) too much, work(high) not
            middle = (low + high) // 2
            if self.work(middle * step) <= most:
                high = middle
            else:
                low = middle
        return max(self.needed, high * step)

    @property
    def size(self) -> int:
        return self.vm.inputs.memory + self.vm.inputs.disk_bytes

    @property
    def setup(self) -> float:
        return self.vm.inputs.costs.setup

    @property
    def member(self) -> Member:
        return Member(
            self.vm.name, self.vm.destination, self.rank, self.alone, self.needed, self.wanted
        )

    def work(self, rate: float) -> float:
        """Bytes its run sends at ``rate`` (after its setup)."""
        rate, run = self.run_at(rate)
        assert run.duration is not None
        return max(0.0, run.duration - self.setup) * rate

    def run_at(self, rate: float) -> tuple[float, RunPrediction]:
        """Its run at ``rate`` (rounded down to a step of ``alone``, never below ``needed``),
        and the rate predicted. The engine's policy is not monotone in the rate: where a run
        at a rate above ``needed`` does not converge, the run at ``needed`` (which does)
        stands for it."""
        if rate >= self.alone:
            rate = self.alone
        else:
            step = self.alone / _RATE_STEPS
            rate = max(self.needed, math.floor(rate / step) * step)
        run = self._run(rate)
        if not run.converges and rate != self.needed:
            rate = self.needed
            run = self._run(rate)
        return rate, run

    def _run(self, rate: float) -> RunPrediction:
        run = self.runs.get(rate)
        if run is None:
            run = self.runs[rate] = predict_run(replace(self.vm.inputs, link_rate=rate), self.mode)
        return run


def _need(vm: WaveVm, links: Links) -> _Need | Unschedulable:
    alone = min(vm.inputs.link_rate, links.out, links.into.get(vm.destination, math.inf))
    inputs = replace(vm.inputs, link_rate=alone)
    if predict_run(cautious(inputs), "live").converges:  # judged at the dirty rate's bound
        share = smallest_link_share(inputs)
        assert share is not None
        return _Need(vm=vm, alone=alone, needed=min(alone, share * alone), mode="live")
    verdict = predict(inputs)
    if verdict.mode == "post-copy":  # it finishes at any share that moves it in time
        share = smallest_link_share(inputs, live=False)
        assert share is not None
        return _Need(vm=vm, alone=alone, needed=min(alone, share * alone), mode="post-copy")
    return Unschedulable(name=vm.name, destination=vm.destination, reason=verdict.reason)


# ---- the schedule, run forward -----------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Moving:
    need: _Need
    start: float
    #: When it starts to move data (after its setup).
    moves_at: float
    #: Share of its work done.
    done: float = 0.0
    rate: float = 0.0
    cap: int | None = None


class _Simulation:
    """:mod:`~asyncmigfra.tasks.shares`' rules, run forward in time (see the module)."""

    def __init__(self, links: Links, *, max_parallel: int, max_incoming: int | None) -> None:
        self.links = links
        self.max_parallel = max_parallel
        self.max_incoming = max_incoming
        #: name -> (start, end, rate and cap when it started).
        self.timeline: dict[str, tuple[float, float, float, int | None]] = {}
        self.needs: dict[str, _Need] = {}

    def run(self, needs: list[_Need], running: Mapping[str, float]) -> None:
        self.needs = {n.vm.name: n for n in needs}
        moving = {
            n.vm.name: _Moving(n, 0.0, 0.0, done=running[n.vm.name])
            for n in needs
            if n.vm.name in running
        }
        pending = [n for n in needs if n.vm.name not in running]
        t = 0.0
        while pending or moving:
            members = [m.need.member for m in moving.values()]
            for member in admissions(
                members,
                [n.member for n in pending],
                self.links,
                max_parallel=self.max_parallel,
                max_incoming=self.max_incoming,
                prefer=self._inflation,
            ):
                need = self.needs[member.name]
                pending.remove(need)
                moving[member.name] = _Moving(need, t, t + need.setup)
            if not moving:  # cannot happen: a lone VM always fits (needed <= alone <= links)
                raise AssertionError("no VM can start")
            members = [m.need.member for m in moving.values()]
            started = caps(members, allocate(members, self.links))  # its cap when it moves
            setups = [m.need.member for m in moving.values() if m.moves_at > t]
            now = [m for m in members if m not in setups]
            held = caps(now, allocate(now, self.links, starting=setups))
            rates = capped(allocate(now, self.links, starting=setups), held)
            for name, m in moving.items():
                m.rate, m.cap = rates.get(name, 0.0), held.get(name, started[name])
                if m.start == t and name not in self.timeline:
                    rate = capped(allocate(members, self.links), started)[name]
                    self.timeline[name] = (t, math.inf, rate, started[name])
            t = self._advance(t, moving)

    def _inflation(self, member: Member, rate: float) -> float:
        """How much more ``member`` sends at ``rate`` than alone (the fillers beside a VM
        that takes most of a link are those it costs least), larger VMs first."""
        need = self.needs[member.name]
        alone = need.work(need.alone)
        return round(need.work(rate) / alone, 2) - need.size * 1e-15 if alone > 0 else 0.0

    def _advance(self, t: float, moving: dict[str, _Moving]) -> float:
        """Run until the next migration ends or starts to move data; the ended leave."""
        speeds: dict[str, float] = {}
        step = math.inf
        for name, m in moving.items():
            if m.moves_at > t:
                step = min(step, m.moves_at - t)
                continue
            work = m.need.work(m.rate)
            if work <= 0:
                speeds[name] = math.inf
                step = 0.0
                continue
            speeds[name] = m.rate / work
            step = min(step, (1 - m.done) / speeds[name])
        assert math.isfinite(step)
        t += step
        for name, speed in speeds.items():
            m = moving[name]
            m.done = 1.0 if math.isinf(speed) else m.done + speed * step
            if m.done >= 1 - _DONE:
                start, _, rate, cap = self.timeline.get(name, (0.0, 0.0, m.rate, m.cap))
                self.timeline[name] = (start, t, rate, cap)
                del moving[name]
        return t

    def plan(
        self, first_wave: int, unschedulable: list[Unschedulable], running: Mapping[str, float]
    ) -> WavePlan:
        starts = sorted({start for n, (start, *_) in self.timeline.items() if n not in running})
        numbers = {start: number for number, start in enumerate(starts, start=first_wave)}
        grouped: dict[float, list[PlannedMove]] = {s: [] for s in starts}
        now: list[PlannedMove] = []
        for name, need in self.needs.items():
            start, end, rate, cap = self.timeline[name]
            move = PlannedMove(
                name=name,
                destination=need.vm.destination,
                wave=numbers.get(start, 0) if name not in running else 0,
                mode=need.mode,
                rank=need.rank,
                rate=rate,
                needed=need.needed,
                alone=need.alone,
                wanted=need.wanted,
                bandwidth=None if cap is None else float(cap * 1024 * 1024),
                predicted_duration=end - start,
            )
            (now if name in running else grouped[start]).append(move)
        waves = tuple(
            Wave(
                number=numbers[s],
                moves=tuple(grouped[s]),
                start=s,
                duration=max(m.predicted_duration for m in grouped[s]),
            )
            for s in starts
        )
        ends = [end for _, end, _, _ in self.timeline.values()]
        return WavePlan(
            waves=waves,
            unschedulable=tuple(unschedulable),
            makespan=max(ends, default=0.0),
            running=tuple(now),
        )
