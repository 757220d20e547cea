"""Max-min fair rates: how flows that cross shared links divide them. Pure.

Progressive filling: every flow's rate rises at the same pace from 0; a flow stops rising
when it reaches its own limit or when a link it crosses is full, and the others go on until
every flow has stopped. The result is the max-min fair allocation: no flow can get more
without taking from a flow that has as much or less. Migration streams sharing a NIC (TCP
flows) come close to it. The ``fake`` back-end divides its hosts' NICs this way, and the
wave planner (:mod:`asyncmigfra.tasks.waves`) predicts a wave with it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Flow", "max_min_rates"]

K = TypeVar("K", bound=Hashable)

#: Relative slack when deciding that a flow reached its limit or a link is full.
_SLACK = 1e-12


@dataclass(frozen=True, slots=True)
class Flow:
    """One flow: the most it can take by itself (``inf``: no limit of its own) and the links
    it crosses (a link missing from the capacities has no limit)."""

    limit: float
    links: tuple[str, ...] = ()


def max_min_rates(flows: Mapping[K, Flow], capacities: Mapping[str, float]) -> dict[K, float]:
    """The max-min fair rate of every flow (see the module). A flow limited neither by
    itself nor by a link gets ``inf``. Limits and capacities must be >= 0."""
    for key, flow in flows.items():
        if not flow.limit >= 0:
            raise ValueError(f"flow {key!r}: limit must be >= 0, got {flow.limit!r}")
    for link, capacity in capacities.items():
        if not capacity >= 0:
            raise ValueError(f"link {link!r}: capacity must be >= 0, got {capacity!r}")
    rates: dict[K, float] = dict.fromkeys(flows, 0.0)
    left = {
        link: capacities[link] for f in flows.values() for link in f.links if link in capacities
    }
    rising = set(flows)
    while rising:
        crossing: dict[str, int] = {}
        for key in rising:
            for link in flows[key].links:
                if link in left:
                    crossing[link] = crossing.get(link, 0) + 1
        own_room = {key: flows[key].limit - rates[key] for key in rising}
        link_room = {link: left[link] / n for link, n in crossing.items()}
        step = min([*own_room.values(), *link_room.values()])
        if math.isinf(step):
            for key in rising:
                rates[key] = math.inf
            break
        step = max(0.0, step)
        reached = step * (1 + _SLACK)
        full = {link for link, room in link_room.items() if room <= reached}
        for key in rising:
            rates[key] += step
        for link, n in crossing.items():
            left[link] = 0.0 if link in full else max(0.0, left[link] - step * n)
        rising = {
            key
            for key in rising
            if own_room[key] > reached and not any(link in full for link in flows[key].links)
        }
    return rates
