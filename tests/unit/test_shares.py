"""How an evacuation's migrations divide their links and which may start
(``asyncmigfra.tasks.shares``): hand-computed cases and properties (hypothesis)."""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from asyncmigfra.tasks.shares import Links, Member, admissible, admissions, allocate, caps

MIB = 1024 * 1024
LINK = Links(100.0, {})


def member(name: str, rank: int, *, alone: float, needed: float, **extra: object) -> Member:
    wanted = extra.pop("wanted", needed)
    dest = extra.pop("dest", "b")
    assert not extra
    return Member(name, str(dest), rank, alone, needed, float(str(wanted)))


def test_needs_come_first_then_what_the_ranked_want_then_fair_shares() -> None:
    hot = member("hot", 0, alone=70, needed=40, wanted=65)
    cold = member("cold", 1, alone=70, needed=10)
    assert allocate([cold, hot], LINK) == {"hot": 70, "cold": 30}
    # Ranked the other way, the cold one wants no more than it needs: the hot one still
    # gets what it wants, the rest is shared.
    assert allocate([hot, member("cold", -1, alone=70, needed=10)], LINK) == {
        "hot": 70,
        "cold": 30,
    }
    # Two that want nothing more than they need share fairly.
    idle = [member(f"i{n}", n, alone=70, needed=1) for n in range(2)]
    assert allocate(idle, LINK) == {"i0": 50, "i1": 50}


def test_a_destination_limits_what_goes_there() -> None:
    links = Links(100.0, {"b": 20.0})
    first = member("to-b", 0, alone=100, needed=1, dest="b")
    second = member("to-c", 1, alone=100, needed=1, dest="c")
    assert allocate([first, second], links) == {"to-b": 20, "to-c": 80}


def test_caps_hold_only_those_below_what_they_move_alone() -> None:
    hot = member("hot", 0, alone=70 * MIB, needed=40 * MIB)
    cold = member("cold", 1, alone=70 * MIB, needed=1 * MIB)
    rates = {"hot": 70.0 * MIB, "cold": 30.5 * MIB}
    assert caps([hot, cold], rates) == {"hot": None, "cold": 30}
    assert caps([cold], {"cold": 0.1}) == {"cold": 1}
    # Never below the need: rounded up where down would be.
    needy = member("needy", 0, alone=70 * MIB, needed=30.2 * MIB)
    assert caps([needy], {"needy": 30.2 * MIB}) == {"needy": 31}


def test_a_filler_takes_what_the_hot_one_leaves_and_no_more() -> None:
    hot = member("hot", 0, alone=70, needed=60, wanted=65)
    c1 = member("c1", 1, alone=70, needed=5)
    c2 = member("c2", 2, alone=70, needed=5)
    started = admissions([hot], [c1, c2], LINK, max_parallel=4, max_incoming=None)
    # c1 gets the 30 the hot one leaves; c2 would have c1 crawl (the two at 15 each).
    assert started == [c1]
    assert allocate([hot, c1], LINK) == {"hot": 70, "c1": 30}


def test_a_hot_one_ranked_first_waits_for_the_link_and_is_not_starved() -> None:
    h1 = member("h1", 0, alone=70, needed=60, wanted=65)
    h2 = member("h2", 1, alone=70, needed=60, wanted=65)
    cold = member("cold", 2, alone=70, needed=5)
    # h2 cannot start beside h1 (the needs add up to 120); cold may start beside h1 (it
    # fits beside h2 later, and leaves it a slot) ...
    assert admissions([h1], [h2, cold], LINK, max_parallel=3, max_incoming=None) == [cold]
    # ... but not when it would take the last slot h2 waits for.
    assert admissions([h1], [h2, cold], LINK, max_parallel=2, max_incoming=None) == []
    # Once h1 has ended, h2 goes first and takes from cold (ranked below it) what it wants.
    assert admissible([cold], h2, LINK, max_parallel=3, max_incoming=None)
    assert allocate([cold, h2], LINK) == {"h2": 70, "cold": 30}


def test_limits_bound_what_starts() -> None:
    idle = [member(f"i{n}", n, alone=30, needed=1, dest="b") for n in range(4)]
    assert len(admissions([], idle, LINK, max_parallel=2, max_incoming=None)) == 2
    assert len(admissions([], idle, LINK, max_parallel=4, max_incoming=1)) == 1


# ---- properties --------------------------------------------------------------------------

DESTINATIONS = ("d0", "d1")


@st.composite
def situations(draw: st.DrawFn) -> tuple[list[Member], list[Member], Links, int, int | None]:
    links = Links(
        draw(st.sampled_from([100.0, 250.0, math.inf])),
        {d: draw(st.sampled_from([40.0, 100.0])) for d in DESTINATIONS if draw(st.booleans())},
    )
    members = []
    for i in range(draw(st.integers(0, 7))):
        dest = draw(st.sampled_from(DESTINATIONS))
        alone = min(
            draw(st.sampled_from([30.0, 70.0, 100.0])), links.out, links.into.get(dest, 1e9)
        )
        needed = alone * draw(st.sampled_from([0.01, 0.2, 0.6, 0.95]))
        wanted = needed + (alone - needed) * draw(st.sampled_from([0.0, 0.5, 1.0]))
        members.append(Member(f"v{i}", dest, draw(st.integers(0, 9)), alone, needed, wanted))
    split = draw(st.integers(0, len(members)))
    max_parallel = draw(st.integers(1, 5))
    max_incoming = draw(st.sampled_from([None, 1, 2]))
    running = admissions(
        [], members[:split], links, max_parallel=max_parallel, max_incoming=max_incoming
    )
    return running, members[split:], links, max_parallel, max_incoming


@settings(max_examples=200, deadline=None)
@given(situations())
def test_what_starts_keeps_every_promise(
    case: tuple[list[Member], list[Member], Links, int, int | None],
) -> None:
    running, pending, links, max_parallel, max_incoming = case
    started = admissions(
        running, pending, links, max_parallel=max_parallel, max_incoming=max_incoming
    )
    assert len({m.name for m in started}) == len(started)
    assert all(m in pending for m in started)
    now = [*running, *started]
    assert len(now) <= max_parallel
    if max_incoming is not None and now:
        assert max(Counter(m.destination for m in now).values()) <= max_incoming
    rates = allocate(now, links)
    capacities = links.capacities()
    for link, capacity in capacities.items():
        on = [m for m in now if link in links.of(m.destination)]
        assert sum(m.needed for m in on) <= capacity * (1 + 1e-6)
        assert sum(rates[m.name] for m in on) <= capacity * (1 + 1e-6)
    for m in now:
        # Nobody below its need, nobody above what it moves alone.
        assert m.needed * (1 - 1e-9) <= rates[m.name] <= m.alone * (1 + 1e-9)
    # Whatever ends, the rest keep their needs (needs are reserved first).
    for gone in now:
        rest = [m for m in now if m is not gone]
        after = allocate(rest, links)
        assert all(after[m.name] >= m.needed * (1 - 1e-9) for m in rest)
    # Members that started below one in rank never pushed it below what it wanted.
    before = allocate(running, links)
    for m in running:
        if all(s.rank > m.rank for s in started):
            assert rates[m.name] >= min(before[m.name], m.wanted) * (1 - 1e-9)
