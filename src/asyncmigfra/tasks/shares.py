"""How an evacuation's migrations divide the links they share, and which may start now: the
rules the wave planner (:mod:`asyncmigfra.tasks.waves`) simulates and a predicted evacuation
(``tasks.dispatching.predicted``) applies as its migrations start and end. Pure.

Every migration of one evacuation leaves through the source host's NIC (link ``out``) and
enters its destination's (``in:<host>``); each is a :class:`Member` with a *rank* (the
planner's priority: hottest first), the rate it can move alone (its stream, the NICs) and
the rate it *needs* to converge.

**Division** (:func:`allocate`). Every running member first gets its ``needed``; then, in
rank order, up to what it ``wanted`` (the rate below which its migration sends much more
than alone: a hot guest wants most of its stream, an idle one no more than it needs); the
rest of the links is divided max-min fairly, each up to what it moves alone. A hot guest
ranked first so runs at (nearly) its whole stream, and the others divide what it leaves.
The division is enforced with bandwidth caps (:func:`caps`: whole MiB/s, as the wire's
``bandwidth``), since the links themselves divide fairly (TCP, the ``fake``'s NICs): with
every member at most its cap and the caps adding up to at most each link, each member moves
at its cap.

**Admission** (:func:`admissible`). A pending member may start beside the running ones when

* a slot is free (``max_parallel``, ``max_incoming`` per destination) and the ``needed`` of
  the running members and of it together fit on every link: then every running member keeps
  at least its ``needed``, whatever starts or ends later, since needs are given first and a
  member that ends only frees capacity;
* it leaves every running member ranked above it at least what that one ``wanted``, and
  every other one more than a crawl (:func:`_floor`);
* it does not crawl itself, and gets what it ``wanted`` if it lowers anyone's rate.

A migration that crawls holds a slot and ends last: two idle guests beside a hot one share
what it leaves no faster than one does. :func:`admissions` (the planner's choice) takes the
first-ranked pending member whenever it may start, else the one the caller prefers among
those that may (the planner: the one whose migration sends least more than alone at the
rate it would get), but only one that leaves the first-ranked a slot and room for its
``needed`` beside it, so a hot guest waiting for the link is not starved by cold ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from asyncmigfra.fairshare import Flow, max_min_rates

__all__ = [
    "Links",
    "Member",
    "admissible",
    "admissions",
    "allocate",
    "capped",
    "caps",
    "leaves_room",
]

_MIB = 1024 * 1024
#: Relative slack when adding up needs against a link.
_SLACK = 1e-9
#: A migration starts with at least this share of what it would get with ``max_parallel``
#: migrations dividing its slowest link evenly (see :func:`_floor`).
_CRAWL = 0.5
_OUT = "out"


@dataclass(frozen=True, slots=True)
class Links:
    """Bytes/s of the source's NIC (``out``) and of each destination's (``into``; missing:
    unlimited). ``inf``: unlimited."""

    out: float
    into: Mapping[str, float]

    def capacities(self) -> dict[str, float]:
        caps = {f"in:{d}": r for d, r in self.into.items() if math.isfinite(r)}
        if math.isfinite(self.out):
            caps[_OUT] = self.out
        return caps

    def of(self, destination: str) -> tuple[str, str]:
        return (_OUT, f"in:{destination}")

    def scaled(self, factor: float) -> Links:
        """Every link ``factor`` times as fast."""
        return Links(self.out * factor, {d: r * factor for d, r in self.into.items()})


@dataclass(frozen=True, slots=True)
class Member:
    """One migration as the rules see it."""

    name: str
    destination: str
    #: Lower ranks go first and are served first.
    rank: int
    #: Bytes/s it moves alone, and what it needs to converge (at most ``alone``).
    alone: float
    needed: float
    #: Bytes/s it should get to start when it takes from others (``needed`` to ``alone``:
    #: below it, its migration sends much more than alone).
    wanted: float = 0.0


def allocate(
    members: Iterable[Member], links: Links, *, starting: Iterable[Member] = ()
) -> dict[str, float]:
    """Each member's rate (bytes/s): its ``needed``; then, in rank order, up to what it
    ``wanted``; then the rest divided max-min fairly up to what each moves alone (see the
    module). Needs that do not fit are given anyway (admission prevents that). The needs of
    ``starting`` (migrations in their setup, which move nothing yet) are kept free."""
    ranked = sorted(members, key=lambda m: m.rank)
    left = links.capacities()
    for m in starting:
        for link in links.of(m.destination):
            if link in left:
                left[link] = max(0.0, left[link] - m.needed)

    def take(m: Member, amount: float) -> None:
        for link in links.of(m.destination):
            if link in left:
                left[link] = max(0.0, left[link] - amount)

    rates: dict[str, float] = {}
    for m in ranked:
        rates[m.name] = m.needed
        take(m, m.needed)
    for m in ranked:
        room = min((left[n] for n in links.of(m.destination) if n in left), default=math.inf)
        more = max(0.0, min(max(m.wanted, m.needed) - m.needed, room))
        rates[m.name] += more
        take(m, more)
    flows = {
        m.name: Flow(max(0.0, m.alone - rates[m.name]), links.of(m.destination)) for m in ranked
    }
    for name, more in max_min_rates(flows, left).items():
        rates[name] += more
    return rates


def caps(members: Iterable[Member], rates: Mapping[str, float]) -> dict[str, int | None]:
    """The bandwidth cap (whole MiB/s, at least 1) that holds each member to its rate:
    rounded down, or up where down would be below its need; ``None`` for one whose rate is
    all it moves alone (nothing to hold back)."""
    out: dict[str, int | None] = {}
    for m in members:
        rate = rates[m.name]
        if rate >= m.alone * (1 - _SLACK):
            out[m.name] = None
            continue
        cap = max(1, int(rate // _MIB))
        out[m.name] = cap if cap * _MIB >= m.needed else math.ceil(m.needed / _MIB)
    return out


def capped(rates: Mapping[str, float], held: Mapping[str, int | None]) -> dict[str, float]:
    """The rates as the caps of :func:`caps` hold them (bytes/s)."""
    return {n: r if held.get(n) is None else float(held[n] or 0) * _MIB for n, r in rates.items()}


def admissions(
    running: Sequence[Member],
    pending: Sequence[Member],
    links: Links,
    *,
    max_parallel: int,
    max_incoming: int | None,
    prefer: Callable[[Member, float], float] | None = None,
) -> list[Member]:
    """The members of ``pending`` that may start now beside ``running`` (see the module), in
    the order they start: the first ranked of those not started whenever it may, else the
    one that ``prefer`` (member, the rate it would get -> lower is better) likes most among
    those that may (default: by rank)."""
    started: list[Member] = []
    queue = sorted(pending, key=lambda m: m.rank)
    while queue:
        now = [*running, *started]
        head = queue[0]
        may: list[tuple[Member, float]] = []
        for candidate in queue:
            rate = _worth(
                now, candidate, links, max_parallel=max_parallel, max_incoming=max_incoming
            )
            if rate is None:
                continue
            if candidate is head:
                may = [(head, rate)]
                break
            if not leaves_room(
                now, candidate, head, links, max_parallel=max_parallel, max_incoming=max_incoming
            ):
                continue  # it would keep the head waiting once what blocks the head ends
            may.append((candidate, rate))
            if prefer is None:
                break
        if not may:
            break
        if prefer is None or may[0][0] is head:
            chosen = may[0][0]
        else:
            chosen = min(may, key=lambda mr: (prefer(*mr), mr[0].rank))[0]
        started.append(chosen)
        queue.remove(chosen)
    return started


def admissible(
    running: Sequence[Member],
    candidate: Member,
    links: Links,
    *,
    max_parallel: int,
    max_incoming: int | None,
) -> bool:
    """``candidate`` may start now beside ``running``: it fits, lowers no member ranked
    above it, and gets what it ``wanted`` if it lowers any (a predicted evacuation starts
    its moves in the planned order with this rule)."""
    rate = _worth(running, candidate, links, max_parallel=max_parallel, max_incoming=max_incoming)
    return rate is not None


def leaves_room(
    running: Sequence[Member],
    candidate: Member,
    waiting: Member,
    links: Links,
    *,
    max_parallel: int,
    max_incoming: int | None,
) -> bool:
    """``candidate`` may pass ``waiting`` (ranked or planned before it, which cannot start
    yet): it leaves ``waiting`` a slot beside ``running``, and the two fit together, so
    ``waiting`` can start once what keeps it waiting has ended."""
    return len(running) + 2 <= max_parallel and _fits(
        [candidate, waiting], links, max_parallel=2, max_incoming=max_incoming
    )


def _worth(
    now: Sequence[Member],
    candidate: Member,
    links: Links,
    *,
    max_parallel: int,
    max_incoming: int | None,
) -> float | None:
    """The rate ``candidate`` would get beside ``now``, if it may start (see the module):
    it fits, leaves every member ranked above it at least what that one ``wanted`` and
    every other one more than a crawl (:func:`_floor`), gets what it ``wanted`` itself when
    it lowers any, and does not crawl either. ``None``: it may not."""
    if not _fits([*now, candidate], links, max_parallel=max_parallel, max_incoming=max_incoming):
        return None
    before = allocate(now, links)
    after = allocate([*now, candidate], links)
    lowered = [m for m in now if after[m.name] < before[m.name] * (1 - _SLACK)]
    for m in lowered:
        keep = m.wanted if m.rank < candidate.rank else _floor(m, links, max_parallel)
        if after[m.name] < keep * (1 - _SLACK):
            return None
    rate = after[candidate.name]
    if lowered and rate < candidate.wanted * (1 - _SLACK):
        return None
    if rate < _floor(candidate, links, max_parallel) * (1 - _SLACK):
        return None
    return rate


def _floor(member: Member, links: Links, max_parallel: int) -> float:
    """The least a migration starts with: :data:`_CRAWL` of its slowest link's share of
    ``max_parallel`` (or all it moves alone, if less): a migration that would crawl
    beside the others holds a slot and ends last."""
    capacities = links.capacities()
    link = min(
        (capacities[n] for n in links.of(member.destination) if n in capacities), default=math.inf
    )
    return min(member.alone, member.needed + _CRAWL * link / max_parallel)


def _fits(
    members: Sequence[Member], links: Links, *, max_parallel: int, max_incoming: int | None
) -> bool:
    """The members' slots and needs fit the limits and every link."""
    if len(members) > max_parallel:
        return False
    used: dict[str, float] = {}
    count: dict[str, int] = {}
    for m in members:
        count[m.destination] = count.get(m.destination, 0) + 1
        for link in links.of(m.destination):
            used[link] = used.get(link, 0.0) + m.needed
    if max_incoming is not None and any(n > max_incoming for n in count.values()):
        return False
    capacities = links.capacities()
    return all(
        need <= capacities[link] * (1 + _SLACK) for link, need in used.items() if link in capacities
    )
