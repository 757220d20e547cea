"""A predicted evacuation's plan as it runs: each VM's planned move, the order the moves
start in, and what the ``plan`` event and the result entries say about them (protocol §3.7,
§5.8). Bookkeeping only; :mod:`.predicted` gathers the inputs and runs the moves."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from asyncmigfra.tasks.shares import Links, Member
from asyncmigfra.tasks.waves import PlannedMove, WavePlan, WaveVm

_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Step:
    """One VM's move as planned: its wave, its cap (MiB/s) when it starts, its predicted
    duration and how it shares the links (``member``); ``member`` and ``predicted`` are
    ``None`` for a VM the model sees converging in no way (``reason`` says why)."""

    name: str
    destination: str
    wave: int
    bandwidth: int | None
    predicted: float | None
    member: Member | None = None
    #: s from the plan's start to the move's start.
    start: float = 0.0
    reason: str | None = None


def _step(move: PlannedMove, start: float) -> _Step:
    cap = None if move.bandwidth is None else max(1, int(move.bandwidth // _MIB))
    return _Step(
        move.name,
        move.destination,
        move.wave,
        cap,
        move.predicted_duration,
        member=move.member,
        start=start,
    )


@dataclass(slots=True)
class _Schedule:
    """A predicted evacuation: its moves in start order (those planned, then one per VM
    that converges in no way) and what planning again needs."""

    vms: dict[str, WaveVm]
    link_rate: float
    destination_rates: dict[str, float]
    max_parallel: int
    max_incoming: int
    steps: dict[str, _Step] = field(default_factory=dict)
    #: The VM names in the order their moves start.
    order: list[str] = field(default_factory=list)
    revision: int = 0
    #: How much slower than told the links are taken to be (:func:`~.waves.slowdown`).
    slowdown: float = 1.0

    @property
    def links(self) -> Links:
        """The links as told (a re-plan's :attr:`slowdown` changes the predictions, not how
        the links are divided: caps lowered by it would make the moves as slow as feared)."""
        return Links(self.link_rate, self.destination_rates)

    def adopt(self, plan: WavePlan, *, started: list[str], unschedulable: list[_Step]) -> None:
        """Take ``plan`` for every VM not in ``started`` (those already moving keep their
        place and prediction), then the VMs that converge in no way (``unschedulable`` and
        the plan's), each alone, last. A VM planned before keeps how it shares the links
        (its ``member``: from the links as told, not as a re-plan fears them)."""
        planned = [
            replace(_step(m, w.start), member=old.member)
            if (old := self.steps.get(m.name)) is not None and old.member is not None
            else _step(m, w.start)
            for w in plan.waves
            for m in w.moves
        ]
        number = max([s.wave for s in planned] + [self.steps[n].wave for n in started], default=0)
        rest = unschedulable + [
            _Step(u.name, u.destination, 0, None, None, reason=u.reason) for u in plan.unschedulable
        ]
        for offset, step in enumerate(rest, start=1):
            planned.append(
                _Step(step.name, step.destination, number + offset, None, None, reason=step.reason)
            )
        self.steps.update((s.name, s) for s in planned)
        self.order = started + [s.name for s in planned]
        self.revision += 1

    def keys(self, name: str) -> dict[str, object]:
        """What a VM's result entry carries: its wave and predicted duration."""
        step = self.steps.get(name)
        if step is None:
            return {}
        out: dict[str, object] = {"wave": step.wave}
        if step.predicted is not None:
            out["predicted-duration"] = round(step.predicted, 3)
        return out

    def event(self, pending: list[str], reason: str | None) -> dict[str, object]:
        """The ``plan`` event's own keys for the moves of ``pending`` (those not started)."""
        fields: dict[str, object] = {"schedule": "predicted", "revision": self.revision}
        if reason:
            fields["reason"] = reason
        if math.isfinite(self.link_rate):
            fields["link-rate"] = round(self.link_rate / self.slowdown / _MIB, 1)
        steps = [self.steps[n] for n in pending]
        planned = [s for s in steps if s.predicted is not None]
        waves: dict[int, list[_Step]] = {}
        for step in planned:
            waves.setdefault(step.wave, []).append(step)
        fields["makespan"] = round(
            max((s.start + (s.predicted or 0.0) for s in planned), default=0.0), 3
        )
        fields["waves"] = [
            {
                "wave": number,
                "start": round(members[0].start, 3),
                "predicted-duration": round(max(s.predicted or 0.0 for s in members), 3),
                "vms": [_vm_keys(s) for s in members],
            }
            for number, members in waves.items()
        ]
        rest = [s for s in steps if s.predicted is None]
        if rest:
            fields["unschedulable"] = [
                {
                    "vm-name": s.name,
                    "destination": s.destination,
                    "wave": s.wave,
                    "details": s.reason,
                }
                for s in rest
            ]
        return fields


def _vm_keys(step: _Step) -> dict[str, object]:
    out: dict[str, object] = {
        "vm-name": step.name,
        "destination": step.destination,
        "predicted-duration": round(step.predicted or 0.0, 3),
        "needs": round((step.member.needed if step.member else 0.0) / _MIB, 1),
    }
    if step.bandwidth is not None:
        out["bandwidth"] = step.bandwidth
    return out
