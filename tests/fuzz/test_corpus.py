"""The fuzz corpus itself: deterministic, distinct, complete, and labelled right.

The labels (which id the answer must carry, accepted or rejected with which code) are checked
against ``parse_task`` in-process, so a wrong label fails here, quickly and without a broker,
instead of as a mysterious failure of the agent fuzz test. The expensive special cases (huge
lists, deep nesting: seconds of ruamel.yaml time) are left to the agent test.
"""

from __future__ import annotations

import pytest
from corpus import (
    DEFAULT_COUNT,
    DEFAULT_SEED,
    MAX_MESSAGE_SIZE,
    MAX_SUBTASKS,
    RESULT_NAMES,
    Case,
    generate,
)

from asyncmigfra.errors import TaskRejected
from asyncmigfra.wire.parsing import parse_task


@pytest.fixture(scope="module")
def corpus() -> list[Case]:
    return generate(DEFAULT_SEED, DEFAULT_COUNT)


def test_same_seed_same_bytes_other_seed_other_bytes():
    a = generate(7, 800)
    assert [c.payload for c in a] == [c.payload for c in generate(7, 800)]
    assert [c.payload for c in a] != [c.payload for c in generate(8, 800)]


def test_corpus_is_large_distinct_and_covers_every_kind_of_damage(corpus):
    assert len(corpus) >= 10_000
    assert [c.index for c in corpus] == list(range(len(corpus)))
    assert len({c.payload for c in corpus}) == len(corpus), "a repeated payload is a duplicate"
    ids = [c.id for c in corpus if c.id is not None]
    assert len(set(ids)) == len(ids)
    families = {c.family for c in corpus}
    assert families >= {
        "valid", "flip", "null", "truncate", "mutate", "dupkey", "unknown-task", "multidoc",
        "anchors", "alias-bomb", "deep", "huge", "oversize", "binary", "bad-utf8",
        "not-a-task", "bad-id", "weird-id", "regex", "host-grab", "unicode", "tags",
    }  # fmt: skip
    valid_kinds = {c.result for c in corpus if c.family == "valid"}
    assert valid_kinds == set(RESULT_NAMES.values()), "a valid message of every task type"
    assert b"" in {c.payload for c in corpus}
    assert any(len(c.payload) > MAX_MESSAGE_SIZE for c in corpus)
    assert any(len(c.payload) == MAX_MESSAGE_SIZE and c.outcome == "accept" for c in corpus)
    assert any("5000 items" in c.note for c in corpus)
    assert any(f"{MAX_SUBTASKS} items" in c.note and c.outcome == "accept" for c in corpus)
    assert any("billion laughs" in c.note for c in corpus)
    assert any("recursive alias" in c.note for c in corpus)
    rules = {c.id_rule for c in corpus}
    assert rules == {"exact", "none", "maybe"}
    assert sum(c.id_rule == "none" for c in corpus) > 1000, "id-less and id-unreadable ones"


def verdict(case: Case) -> tuple[str, str | None, str | None]:
    """(outcome, id, code or result name) as the agent decides before running anything."""
    try:
        msg = parse_task(case.payload)
    except TaskRejected as exc:
        return "reject", exc.task_id or None, exc.code
    if len(msg.subtasks) > MAX_SUBTASKS:
        return "reject", msg.id or None, "invalid-message"
    return "accept", msg.id or None, RESULT_NAMES[msg.kind.value]


def test_labels_agree_with_the_parser(corpus):
    wrong = []
    for case in corpus:
        if case.family in {"huge", "deep"} and len(case.payload) > 1000:
            continue  # seconds each; the agent test covers them
        outcome, task_id, what = verdict(case)
        if case.outcome != "any" and outcome != case.outcome:
            wrong.append((case, f"{outcome} {what}"))
        elif case.outcome == "reject" and what != case.code:
            wrong.append((case, f"code {what}"))
        elif case.outcome == "accept" and case.result and what != case.result:
            wrong.append((case, f"result {what}"))
        elif task_id != {"exact": case.id, "none": None}.get(case.id_rule, task_id):
            wrong.append((case, f"id {task_id!r}"))
    assert not wrong, "\n".join(
        f"#{c.index} {c.family} ({c.note}): {got}: {c.payload[:120]!r}" for c, got in wrong[:20]
    )
