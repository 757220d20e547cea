"""Max-min fair rates (``asyncmigfra.fairshare``): hand-computed cases and the defining
property (every flow is held back by its own limit or by a full link on which no flow gets
more than it)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncmigfra.fairshare import Flow, max_min_rates


async def test_equal_flows_split_a_link_evenly() -> None:
    rates = max_min_rates(
        {"a": Flow(math.inf, ("nic",)), "b": Flow(math.inf, ("nic",))}, {"nic": 100}
    )
    assert rates == {"a": 50.0, "b": 50.0}


async def test_a_capped_flow_leaves_the_rest_to_the_others() -> None:
    flows = {
        "capped": Flow(10, ("nic",)),
        "b": Flow(math.inf, ("nic",)),
        "c": Flow(math.inf, ("nic",)),
    }
    assert max_min_rates(flows, {"nic": 100}) == {"capped": 10.0, "b": 45.0, "c": 45.0}


async def test_the_tightest_of_two_links_holds_a_flow_back() -> None:
    # a->x and a->y share a's NIC (120); y receives only 20, so a->y gets 20 and a->x 100.
    flows = {"to-x": Flow(math.inf, ("a>", ">x")), "to-y": Flow(math.inf, ("a>", ">y"))}
    rates = max_min_rates(flows, {"a>": 120, ">y": 20})
    assert rates == pytest.approx({"to-x": 100.0, "to-y": 20.0})


async def test_unlimited_flows_and_empty_input() -> None:
    assert max_min_rates({}, {"nic": 1}) == {}
    assert max_min_rates({"free": Flow(math.inf)}, {}) == {"free": math.inf}
    assert max_min_rates({"own": Flow(7.5, ("unknown-link",))}, {}) == {"own": 7.5}


async def test_negative_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="limit"):
        max_min_rates({"a": Flow(-1)}, {})
    with pytest.raises(ValueError, match="capacity"):
        max_min_rates({"a": Flow(1, ("l",))}, {"l": -1})


LINKS = ("l0", "l1", "l2", "l3")


@st.composite
def networks(draw: st.DrawFn) -> tuple[dict[int, Flow], dict[str, float]]:
    capacities = {
        link: draw(st.floats(0, 1000, allow_nan=False)) for link in LINKS if draw(st.booleans())
    }
    flows: dict[int, Flow] = {}
    for key in range(draw(st.integers(0, 8))):
        limit = draw(st.one_of(st.just(math.inf), st.floats(0, 1000, allow_nan=False)))
        links = tuple(draw(st.sets(st.sampled_from(LINKS), max_size=3)))
        flows[key] = Flow(limit, links)
    return flows, capacities


@given(networks())
def test_rates_are_feasible_and_max_min_fair(
    network: tuple[dict[int, Flow], dict[str, float]],
) -> None:
    flows, capacities = network
    rates = max_min_rates(flows, capacities)
    assert set(rates) == set(flows)
    tolerance = 1e-6
    used = dict.fromkeys(capacities, 0.0)
    for key, flow in flows.items():
        assert 0 <= rates[key] <= flow.limit + tolerance
        for link in flow.links:
            if link in capacities:
                used[link] += rates[key]
    for link, capacity in capacities.items():
        assert used[link] <= capacity * (1 + 1e-9) + tolerance
    for key, flow in flows.items():
        if rates[key] >= flow.limit - tolerance:
            continue  # held back by its own limit
        # Else a full link holds it back, and no flow on that link gets more than it.
        bottlenecks = [
            link
            for link in flow.links
            if link in capacities
            and used[link] >= capacities[link] - tolerance * max(1.0, capacities[link])
            and all(
                rates[other] <= rates[key] + tolerance
                for other, f in flows.items()
                if link in f.links
            )
        ]
        assert bottlenecks, (key, rates, used)
