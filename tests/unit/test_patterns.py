"""Stop-task patterns: RE2, linear time, refusals that say why."""

from __future__ import annotations

import contextlib
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncmigfra.errors import InvalidTask
from asyncmigfra.wire.patterns import MAX_PATTERN, compile_name_pattern, matching_names

NAME = "vm-compute-node-00001"


def test_full_match_as_the_original():
    assert matching_names("vm[13]", ["vm1", "vm2", "vm3", "vm13"]) == ["vm1", "vm3"]
    assert matching_names("vm.*", ["vm1", "xvm1"]) == ["vm1"]


@pytest.mark.parametrize("groups", [12, 15, 40, 200])
def test_the_catastrophic_pattern_is_fast(groups):
    """Python's re took 135 s for 15 groups on this name; RE2 is linear."""
    pattern = "(.*)" * groups + "X"
    t0 = time.perf_counter()
    assert matching_names(pattern, [NAME] * 100) == []
    assert time.perf_counter() - t0 < 0.1


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"(a)\1", "no backreferences"),
        (r"(?=vm)vm1", "lookaround"),
        ("(", "missing )"),
        ("((a{1000}){1000}){1000}", "repetition"),
        ("a" * (MAX_PATTERN + 1), "longer than"),
    ],
)
def test_refusals_say_why(pattern, why):
    with pytest.raises(InvalidTask, match=why.replace("(", r"\(").replace(")", r"\)")):
        compile_name_pattern(pattern)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200), st.lists(st.text(max_size=255), max_size=20))
def test_any_pattern_is_answered_in_bounded_time(pattern, names):
    t0 = time.perf_counter()
    with contextlib.suppress(InvalidTask):
        matching_names(pattern, names)
    assert time.perf_counter() - t0 < 0.5
