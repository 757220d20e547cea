"""Which of an evacuation's migrations run together, and in which order: *waves* planned
from predictions (issue 18). Pure: no I/O, no asyncio.

Migrations out of one host share its NIC (and those into one destination share that one's),
and a migration that gets too little of a link never converges: its guest dirties memory
faster than its share sends it. Placing VMs by CPU and memory and then starting them at most
``max-parallel`` at once in placement order (as Nova and KubeVirt do, with 1 and 2) lets two
hot guests share a link and both fail while idle ones wait. The planner instead groups the
placed VMs into waves, run one after another (a wave starts when the previous one has
ended), such that every VM of a wave still converges at the share it gets there, and the
predicted end of the last wave (the *makespan*) is as early as the heuristic below finds.

**The model of a wave.** Every migration of a wave starts at once, moves nothing during its
setup, and then is a flow out of the source's link (``link_rate``) and into its
destination's (``destination_rates``), limited by itself to what it can move alone (its
``inputs.link_rate``: its stream, or its ``bandwidth`` cap) and by any cap the planner sets.
The flows divide the links max-min fairly (:func:`~asyncmigfra.fairshare.max_min_rates`, as
TCP streams and the ``fake`` back-end do), so a migration's rate is smallest at the start and
grows as others end. Each migration is predicted (:func:`~asyncmigfra.migration.prediction.
predict_run`) at its starting rate, which gives its work: ``(duration - setup) x rate``;
the wave then runs as a fluid, each flow spending its work at its max-min rate of the moment,
recomputed whenever one ends. A wave's duration is the end of its last migration.

**What each VM needs.** ``alone``: the smallest of its own rate, the source's link and its
destination's. ``needed``: the smallest rate at which pre-copy still converges
(:func:`~asyncmigfra.migration.prediction.smallest_link_share` of ``alone``). A VM whose
pre-copy does not converge even alone but whose post-copy does (and is allowed) needs all of
``alone``; one that converges in neither way is not scheduled: it is reported in
:attr:`WavePlan.unschedulable` with the model's reasons, and the caller decides (the
evacuation runs such VMs last, each alone).

**The heuristic.**

1. The VMs are taken hottest first: by ``needed / alone`` (the share of what they could get
   that they need), then largest (memory and disks) first, then by name.
2. Each VM joins the existing wave where it adds least to the makespan (the wave's predicted
   duration with it minus without it), or opens a new wave when every join would cost more
   than the new wave's duration (ties: join, the earliest wave). A join must keep the
   wave within ``max_parallel`` migrations and ``max_incoming`` per destination, and every
   member's starting rate at or above its ``needed``. Two hot VMs that each need more than
   half of a link therefore never share a wave, and cold ones gather: their work adds up
   on a saturated link while their setups overlap.
3. A join is tried with plain fair shares, and with **caps** that protect the VMs whose
   fair share is below their need, and these plus the hottest VM of the wave: the
   protected get what they would get among themselves, the others divide what is left and
   are capped at it (whole MiB/s, since the wire's ``bandwidth`` is). Caps let cold VMs use
   what a hot one leaves (a hot VM limited by its stream or its destination) without
   slowing it: a hot guest that merely converges at its fair share sends far more (each
   pass resends more of what it dirtied) than with its whole stream. The variant that ends
   soonest counts.
4. Then single VMs move to another wave, or to a wave of their own, while that shortens
   the makespan (a few passes): the greedy order cannot foresee the VMs after each one.
5. The waves are ordered by Smith's rule, duration per VM ascending (many quick VMs first):
   the order does not change the makespan but moves most VMs off the host soonest.

A greedy rule does not guarantee the shortest makespan (the problem contains bin packing);
it is a sorted first-fit with a cost, which is what the tests pin down: every VM is scheduled
once or reported, no wave exceeds its limits, no link is oversubscribed by the needs.

**Re-planning.** :func:`replan` plans the VMs not yet started again once moves ran slower (or
faster) than predicted (:func:`deviates`): the links are assumed :func:`slowdown` times
slower (the usual cause is other traffic on them; a guest dirtying more than measured looks
the same from here), and the plan is made afresh for what remains.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from asyncmigfra.fairshare import Flow, max_min_rates
from asyncmigfra.migration.prediction import (
    PredictionInputs,
    RunMode,
    RunPrediction,
    cautious,
    predict,
    predict_run,
    smallest_link_share,
)

__all__ = [
    "Observation",
    "PlannedMove",
    "Unschedulable",
    "Wave",
    "WavePlan",
    "WaveVm",
    "deviates",
    "plan_waves",
    "replan",
    "slowdown",
]

_MIB = 1024 * 1024
#: Rates are predicted in steps of this share of a VM's ``alone`` rate, rounded down.
_RATE_STEPS = 256
#: A deviation beyond this factor either way makes the rest worth planning again.
DEVIATION = 1.5
#: :func:`slowdown` is kept within [1/x, x]: a wild measurement does not wreck the plan.
_SLOWDOWN_LIMIT = 4.0
_OUT = "out"


@dataclass(frozen=True, slots=True, kw_only=True)
class WaveVm:
    """A placed VM to schedule: its name, destination and what predicts its migration."""

    name: str
    destination: str
    #: Its ``link_rate`` is what this one migration can move alone (its stream, or its
    #: ``bandwidth`` cap); the planner predicts it at the share it gets in a wave.
    inputs: PredictionInputs


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannedMove:
    name: str
    destination: str
    wave: int
    mode: RunMode
    #: Bytes/s it gets when its wave starts (at least ``needed``; more as others end).
    rate: float
    #: Bytes/s it needs to converge.
    needed: float
    #: Bytes/s (whole MiB/s) to cap its migration at; ``None``: no cap.
    bandwidth: float | None
    #: s from its wave's start to its end.
    predicted_duration: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Wave:
    number: int
    moves: tuple[PlannedMove, ...]
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
    #: s: the waves' durations added up.
    makespan: float

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
    """How much slower than predicted the moves ran: total actual over total predicted, each
    without its ``fixed`` part, of the finished moves and of the running ones already past
    their prediction (one that is not yet tells nothing); 1 without any, and within
    [1/4, 4]."""
    actual = predicted = 0.0
    for o in observations:
        if o.predicted > o.fixed and (o.finished or o.actual > o.predicted):
            actual += max(0.0, o.actual - o.fixed)
            predicted += o.predicted - o.fixed
    if predicted <= 0 or actual <= 0:
        return 1.0
    return min(_SLOWDOWN_LIMIT, max(1 / _SLOWDOWN_LIMIT, actual / predicted))


def replan(
    remaining: Sequence[WaveVm],
    observations: Sequence[Observation],
    *,
    link_rate: float,
    max_parallel: int,
    max_incoming: int | None = None,
    destination_rates: Mapping[str, float] | None = None,
    first_wave: int = 1,
) -> WavePlan:
    """:func:`plan_waves` for the VMs not yet started, every link and every VM's own rate
    divided by the :func:`slowdown` the observed moves show (see the module)."""
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
    )


def plan_waves(
    vms: Sequence[WaveVm],
    *,
    link_rate: float,
    max_parallel: int,
    max_incoming: int | None = None,
    destination_rates: Mapping[str, float] | None = None,
    first_wave: int = 1,
) -> WavePlan:
    """Group and order ``vms`` into waves (see the module). ``link_rate``: bytes/s of the
    source's link, ``destination_rates``: of each destination's (missing: unlimited; both may
    be ``inf``); ``max_parallel``: migrations per wave; ``max_incoming``: per destination and
    wave (``None``: no limit); waves are numbered from ``first_wave``."""
    if max_parallel < 1:
        raise ValueError(f"max_parallel must be >= 1, got {max_parallel!r}")
    if max_incoming is not None and max_incoming < 1:
        raise ValueError(f"max_incoming must be >= 1 or None, got {max_incoming!r}")
    rates = dict(destination_rates or {})
    if not link_rate > 0 or any(not r > 0 for r in rates.values()):
        raise ValueError("link rates must be > 0 (inf: unlimited)")
    if len({v.name for v in vms}) != len(vms):
        raise ValueError("every VM may be planned once")
    links = _Links(link_rate, rates)
    needs: list[_Need] = []
    unschedulable: list[Unschedulable] = []
    for vm in vms:
        need = _need(vm, links)
        if isinstance(need, Unschedulable):
            unschedulable.append(need)
        else:
            needs.append(need)
    needs.sort(key=lambda n: (-n.needed / n.alone, -n.size, n.vm.name))
    groups: list[list[_Need]] = []
    timings: list[_Timing] = []
    for need in needs:
        alone = _time_wave([need], links)
        assert alone is not None  # alone it gets its alone rate, at least what it needs
        best: tuple[float, int | None, _Timing] = (alone.duration * (1 + 1e-9), None, alone)
        for index, group in enumerate(groups):
            if not _room(group, need, max_parallel, max_incoming):
                continue
            timing = _time_wave([*group, need], links)
            if timing is not None and timing.duration - timings[index].duration < best[0]:
                best = (timing.duration - timings[index].duration, index, timing)
        _, chosen, timing = best
        if chosen is None:
            groups.append([need])
            timings.append(timing)
        else:
            groups[chosen].append(need)
            timings[chosen] = timing
    _improve(groups, timings, links, max_parallel=max_parallel, max_incoming=max_incoming)
    order = sorted(range(len(groups)), key=lambda i: (timings[i].duration / len(groups[i]), i))
    waves: list[Wave] = []
    for number, i in enumerate(order, start=first_wave):
        timing = timings[i]
        moves = tuple(
            PlannedMove(
                name=n.vm.name,
                destination=n.vm.destination,
                wave=number,
                mode=n.mode,
                rate=timing.rates[n.vm.name],
                needed=n.needed,
                bandwidth=timing.caps.get(n.vm.name),
                predicted_duration=timing.finish[n.vm.name],
            )
            for n in groups[i]
        )
        waves.append(Wave(number=number, moves=moves, duration=timing.duration))
    return WavePlan(
        waves=tuple(waves),
        unschedulable=tuple(unschedulable),
        makespan=sum(w.duration for w in waves),
    )


# ---- what one VM needs -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Links:
    out: float
    into: Mapping[str, float]

    def capacities(self) -> dict[str, float]:
        caps = {f"in:{d}": r for d, r in self.into.items() if math.isfinite(r)}
        if math.isfinite(self.out):
            caps[_OUT] = self.out
        return caps

    def of(self, destination: str) -> tuple[str, str]:
        return (_OUT, f"in:{destination}")


@dataclass(slots=True, eq=False)
class _Need:
    vm: WaveVm
    #: Bytes/s it can get alone, and what it needs to converge.
    alone: float
    needed: float
    mode: RunMode
    runs: dict[float, RunPrediction] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.vm.inputs.memory + self.vm.inputs.disk_bytes

    @property
    def setup(self) -> float:
        return self.vm.inputs.costs.setup

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


def _need(vm: WaveVm, links: _Links) -> _Need | Unschedulable:
    alone = min(vm.inputs.link_rate, links.out, links.into.get(vm.destination, math.inf))
    inputs = replace(vm.inputs, link_rate=alone)
    if predict_run(cautious(inputs), "live").converges:  # judged at the dirty rate's bound
        share = smallest_link_share(inputs)
        assert share is not None
        return _Need(vm=vm, alone=alone, needed=share * alone, mode="live")
    verdict = predict(inputs)
    if verdict.mode == "post-copy":
        return _Need(vm=vm, alone=alone, needed=alone, mode="post-copy")
    return Unschedulable(name=vm.name, destination=vm.destination, reason=verdict.reason)


def _improve(
    groups: list[list[_Need]],
    timings: list[_Timing],
    links: _Links,
    *,
    max_parallel: int,
    max_incoming: int | None,
    rounds: int = 3,
) -> None:
    """Move single VMs to another wave (or a wave of their own) while that shortens the
    makespan, at most ``rounds`` passes over the VMs (in place)."""
    for _ in range(rounds):
        moved = False
        for need in [n for g in groups for n in g]:
            src = next(i for i, g in enumerate(groups) if need in g)
            rest = [n for n in groups[src] if n is not need]
            without = _time_wave(rest, links) if rest else None
            if rest and without is None:
                continue
            saved = timings[src].duration - (without.duration if without else 0.0)
            best: tuple[float, int | None, _Timing | None] = (0.0, None, None)
            alone = _time_wave([need], links)
            assert alone is not None
            if rest and alone.duration < saved * (1 - 1e-9):
                best = (alone.duration - saved, None, alone)
            for i, group in enumerate(groups):
                if i == src or not _room(group, need, max_parallel, max_incoming):
                    continue
                timing = _time_wave([*group, need], links)
                if timing is None:
                    continue
                gain = timing.duration - timings[i].duration - saved
                if gain < best[0] - 1e-9 * max(1.0, saved):
                    best = (gain, i, timing)
            if best[2] is None:
                continue
            moved = True
            groups[src] = rest
            if without is not None:
                timings[src] = without
            if best[1] is None:
                groups.append([need])
                timings.append(best[2])
            else:
                groups[best[1]].append(need)
                timings[best[1]] = best[2]
        empty = [i for i, g in enumerate(groups) if not g]
        for i in reversed(empty):
            del groups[i], timings[i]
        if not moved:
            return


def _room(group: list[_Need], need: _Need, max_parallel: int, max_incoming: int | None) -> bool:
    if len(group) >= max_parallel:
        return False
    if max_incoming is None:
        return True
    return sum(1 for g in group if g.vm.destination == need.vm.destination) < max_incoming


# ---- the model of a wave ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Timing:
    duration: float
    #: name -> s from the wave's start to its end.
    finish: dict[str, float]
    #: name -> bytes/s when the wave starts.
    rates: dict[str, float]
    #: name -> bytes/s it is capped at.
    caps: dict[str, float]


def _time_wave(members: list[_Need], links: _Links) -> _Timing | None:
    """The wave's timing with fair shares, with caps protecting the needy, or with caps
    protecting them and the hottest member, whichever ends soonest; ``None`` when none
    lets every member converge."""
    fair = _rates(members, links, {})
    best = _simulate(members, links, {}, fair)
    needy = [m for m in members if fair[m.vm.name] < m.needed]
    hottest = max(members, key=lambda m: (m.needed / m.alone, m.size, m.vm.name))
    protect = [needy] if needy else []
    if hottest not in needy and fair[hottest.vm.name] < hottest.alone:
        protect.append([*needy, hottest])
    for protected in protect:
        others = [m for m in members if m not in protected]
        caps = _protecting(protected, others, links) if others else None
        if caps is None:
            continue
        capped = _simulate(members, links, caps, _rates(members, links, caps))
        if capped is not None and (best is None or capped.duration < best.duration):
            best = capped
    return best


def _rates(members: list[_Need], links: _Links, caps: Mapping[str, float]) -> dict[str, float]:
    flows = {
        m.vm.name: Flow(min(m.alone, caps.get(m.vm.name, math.inf)), links.of(m.vm.destination))
        for m in members
    }
    return max_min_rates(flows, links.capacities())


def _protecting(needy: list[_Need], others: list[_Need], links: _Links) -> dict[str, float] | None:
    """Caps for ``others`` that leave ``needy`` what they get among themselves; ``None``
    when that is not enough for them, or leaves nothing for the others."""
    among = _rates(needy, links, {})
    if any(among[m.vm.name] < m.needed for m in needy):
        return None
    left = links.capacities()
    for m in needy:
        for link in links.of(m.vm.destination):
            if link in left:
                left[link] = max(0.0, left[link] - among[m.vm.name])
    rest = _rates(others, _Links(left.get(_OUT, math.inf), _into(left)), {})
    caps = {name: float(math.floor(rate / _MIB) * _MIB) for name, rate in rest.items()}
    if any(cap <= 0 for cap in caps.values()):
        return None
    return caps


def _into(capacities: Mapping[str, float]) -> dict[str, float]:
    return {link[3:]: rate for link, rate in capacities.items() if link.startswith("in:")}


def _simulate(
    members: list[_Need], links: _Links, caps: Mapping[str, float], start: Mapping[str, float]
) -> _Timing | None:
    """The wave as a fluid (see the module); ``start``: the rates when all move."""
    if any(start[m.vm.name] < m.needed * (1 - 1e-9) for m in members):
        return None
    work: dict[str, float] = {}
    for m in members:
        rate, run = m.run_at(start[m.vm.name])
        assert run.duration is not None
        work[m.vm.name] = max(0.0, run.duration - m.setup) * rate
    by_name = {m.vm.name: m for m in members}
    waiting = sorted(members, key=lambda m: m.setup)
    moving: set[str] = set()
    finish: dict[str, float] = {}
    t = 0.0
    while waiting or moving:
        while waiting and waiting[0].setup <= t:
            name = waiting.pop(0).vm.name
            if work[name] > 0:
                moving.add(name)
            else:
                finish[name] = t
        if not moving:
            if waiting:
                t = waiting[0].setup
            continue
        now = _rates([by_name[n] for n in moving], links, caps)
        step = min(work[n] / now[n] for n in moving)
        if waiting:
            step = min(step, waiting[0].setup - t)
        t += step
        for name in list(moving):
            work[name] -= now[name] * step
            if work[name] <= 1e-9 * now[name]:
                finish[name] = t
                moving.discard(name)
    return _Timing(
        duration=max(finish.values(), default=0.0),
        finish=finish,
        rates=dict(start),
        caps={n: c for n, c in caps.items() if c < by_name[n].alone},
    )
