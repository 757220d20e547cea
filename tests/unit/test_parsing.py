"""Example-based tests of :func:`asyncmigfra.wire.parsing.parse_task`: framing and scalar
rules (spec 1.1), the shipped example tasks and :func:`load_yaml`.

Each test names the section of ``spec/migfra-original.md`` (or ``spec/extensions.md``,
"ext") whose rule it checks.

The other parts: ``test_parsing_errors.py`` (spec 5), ``test_parsing_limits.py`` (limits and
name validation), ``test_parsing_tasks.py`` (the task kinds but migrate),
``test_parsing_migrate.py`` (migrate vm and its parameters).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from parsing_support import BAD, migrate, parse, reject, start_item

from asyncmigfra.model import CancelSpec, StartSpec, StopSpec, TaskKind
from asyncmigfra.wire.parsing import load_yaml
from asyncmigfra.wire.parsing.fastpath import _compose_fast

# --------------------------------------------------------------------------------------------
# 1.1 framing and scalar rules


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("task: quit\nid: q\n", id="bare"),
        pytest.param("---\ntask: quit\nid: q\n", id="leading-marker"),
        pytest.param("---\ntask: quit\nid: q\n...\n", id="explicit-end"),
        pytest.param("task: quit\nid: q\n---\n]]] not yaml {{{\n", id="garbage-second-doc"),
        pytest.param('task: quit\nid: q\n...\n"unterminated\n', id="garbage-after-end"),
        pytest.param("task: quit\nid: q\n---\ntask: stop vm\n", id="second-task-ignored"),
        pytest.param("%YAML 1.2\n---\ntask: quit\nid: q\n", id="directive"),
        pytest.param("# comment\n\ntask: quit  # trailing\nid: q\n", id="comments"),
        pytest.param("task: quit\r\nid: q\r\n", id="crlf"),
        pytest.param("{task: quit, id: q}", id="flow-map"),
        pytest.param("\ufefftask: quit\nid: q\n", id="bom"),
    ],
)
def test_spec_1_1_only_the_first_document_is_read(text: str) -> None:
    msg = parse(text)
    assert msg.kind is TaskKind.QUIT
    assert msg.id == "q"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("0012", "0012", id="leading-zeros"),
        pytest.param("042", "042", id="octal-looking"),
        pytest.param("1e3", "1e3", id="float-looking"),
        pytest.param("yes", "yes", id="bool-looking"),
        pytest.param("0x1F", "0x1F", id="hex-looking"),
        pytest.param("12:30", "12:30", id="sexagesimal-looking"),
        pytest.param("'0012'", "0012", id="single-quoted"),
        pytest.param('"a b"', "a b", id="double-quoted"),
        pytest.param('"caf\\u00e9 \\x41"', "caf\u00e9 A", id="escapes"),
        pytest.param("''", "", id="empty-quoted"),
        pytest.param("!!int 7", "7", id="tag-ignored"),
        pytest.param("abc-123 # comment", "abc-123", id="comment-stripped"),
    ],
)
def test_spec_1_1_id_is_the_raw_scalar_text(raw: str, expected: str) -> None:
    assert parse(f"task: quit\nid: {raw}\n").id == expected


def test_spec_1_1_id_is_optional() -> None:
    assert parse("task: quit\n").id is None


@pytest.mark.parametrize(
    ("raw", "found"),
    [
        pytest.param("", "found null", id="empty"),
        pytest.param("~", "found null", id="tilde"),
        pytest.param("[a]", "found a sequence", id="sequence"),
        pytest.param("{a: b}", "found a map", id="map"),
    ],
)
def test_spec_1_1_id_must_be_a_scalar(raw: str, found: str) -> None:
    exc = reject(f"task: quit\nid: {raw}\n")
    assert exc.details == BAD.format(1, 1, f"id: expected a string, {found}")
    assert exc.task_id is None


TRUE_FORMS = ["y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON", '"true"']
FALSE_FORMS = ["n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF", "'no'"]


@pytest.mark.parametrize(
    ("raw", "value"),
    [pytest.param(f, True, id=f) for f in TRUE_FORMS]
    + [pytest.param(f, False, id=f) for f in FALSE_FORMS],
)
def test_spec_1_1_bool_forms(raw: str, value: bool) -> None:
    spec = parse(f"task: quit\ntime-measurement: {raw}\n").subtasks[0]
    assert spec.time_measurement is value


@pytest.mark.parametrize(
    ("raw", "found"),
    [
        pytest.param("1", "'1'", id="one"),
        pytest.param("0", "'0'", id="zero"),
        pytest.param("tRUE", "'tRUE'", id="mixed-case"),
        pytest.param("yES", "'yES'", id="mixed-case-yes"),
        pytest.param("enabled", "'enabled'", id="word"),
        pytest.param('"true "', "'true '", id="trailing-space"),
        pytest.param("", "null", id="null"),
        pytest.param("[true]", "a sequence", id="sequence"),
    ],
)
def test_spec_1_1_bool_rejects_other_forms(raw: str, found: str) -> None:
    exc = reject(f"task: quit\nid: q\ntime-measurement: {raw}\n")
    assert exc.code == "invalid-message"
    assert exc.details == BAD.format(
        1,
        1,
        "time-measurement: expected a boolean (true/false, yes/no, on/off, y/n), found " + found,
    )
    assert exc.task_id == "q"


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        pytest.param("10", 10, id="decimal"),
        pytest.param("0", 0, id="zero"),
        pytest.param("0x1F", 31, id="hex"),
        pytest.param("0X1f", 31, id="hex-upper-x"),
        pytest.param("017", 15, id="octal"),
        pytest.param("+5", 5, id="plus-sign"),
        pytest.param('"7"', 7, id="quoted"),
        pytest.param('"7 "', 7, id="trailing-space-like-cpp"),
        pytest.param("4294967295", 4294967295, id="uint32-max"),
    ],
)
def test_spec_1_1_unsigned_ints_use_cpp_base_detection(raw: str, value: int) -> None:
    assert start_item(f"vm-name: v\nvcpus: {raw}").vcpus == value


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("-1", id="negative-would-wrap-in-the-original"),
        pytest.param("-0", id="negative-zero"),
        pytest.param("4294967296", id="over-uint32"),
        pytest.param("08", id="bad-octal"),
        pytest.param("0x", id="hex-without-digits"),
        pytest.param("1.5", id="decimal-point"),
        pytest.param("5a", id="trailing-garbage"),
        pytest.param('" 5"', id="leading-space"),
        pytest.param("1e3", id="exponent"),
        pytest.param("''", id="empty-string"),
        pytest.param("~", id="null"),
    ],
)
def test_spec_1_1_unsigned_ints_reject_negative_overflow_and_garbage(raw: str) -> None:
    exc = reject(f"task: start vm\nvm-configurations:\n  - vm-name: v\n    vcpus: {raw}\n")
    assert exc.code == "invalid-message"
    assert "bad conversion (vm-configurations[0].vcpus: expected an unsigned integer up to " in (
        exc.details
    )


def test_spec_1_3_memory_is_uint64() -> None:
    assert start_item("vm-name: v\nmemory: 18446744073709551615").memory == 2**64 - 1
    assert start_item("vm-name: v\nmemory: 0x100000").memory == 1048576
    exc = reject(
        "task: start vm\nvm-configurations:\n  - vm-name: v\n    memory: 18446744073709551616\n"
    )
    assert "vm-configurations[0].memory: expected an unsigned integer up to 1844674" in (
        exc.details
    )


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        pytest.param("0012", "0012", id="leading-zeros"),
        pytest.param("yes", "yes", id="bool-word"),
        pytest.param("1.50", "1.50", id="float-text"),
        pytest.param("~x", "~x", id="tilde-prefix"),
        pytest.param('""', "", id="empty-quoted"),
        pytest.param('"null"', "null", id="quoted-null"),
        pytest.param("!!str", "", id="tagged-empty-is-not-null"),
        pytest.param("a b  c", "a b  c", id="inner-spaces"),
    ],
)
def test_spec_1_1_strings_are_verbatim(raw: str, value: str) -> None:
    spec = parse(f"task: cancel\ntarget: {raw}\n").subtasks[0]
    assert isinstance(spec, CancelSpec)
    assert spec.target == value


@pytest.mark.parametrize(
    ("raw", "found"),
    [
        pytest.param("", "null", id="empty"),
        pytest.param("~", "null", id="tilde"),
        pytest.param("null", "null", id="null"),
        pytest.param("Null", "null", id="Null"),
        pytest.param("NULL", "null", id="NULL"),
        pytest.param("[a]", "a sequence", id="sequence"),
        pytest.param("{a: b}", "a map", id="map"),
    ],
)
def test_spec_1_1_null_or_collection_where_a_string_is_expected(raw: str, found: str) -> None:
    exc = reject(f"task: migrate vm\nid: 7\nvm-name: v\ndestination: {raw}\n")
    assert exc.details == BAD.format(1, 1, f"destination: expected a string, found {found}")
    assert exc.task_id == "7"


def test_spec_1_1_unknown_keys_are_ignored() -> None:
    msg = parse(
        "task: start vm\nhost: somewhere\nlive-migration: true\nfuture: [1, {2: 3}]\n"
        "vm-configurations:\n  - vm-name: v\n    color: blue\n    nested: {deep: [x]}\n"
    )
    assert msg.subtasks == (StartSpec(vm_name="v"),)


def test_spec_1_1_duplicate_keys_first_one_wins() -> None:
    msg = parse("task: quit\nid: first\nid: second\ntask: stop vm\n")
    assert msg.kind is TaskKind.QUIT
    assert msg.id == "first"


def test_spec_1_1_top_level_concurrent_execution_sets_container_and_subtask() -> None:
    msg = parse(migrate("concurrent-execution: false\ntime-measurement: yes\ndriver: lxctools\n"))
    assert msg.concurrent_execution is False
    spec = msg.subtasks[0]
    assert (spec.concurrent_execution, spec.time_measurement, spec.driver) == (
        False,
        True,
        "lxctools",
    )


def test_spec_1_1_list_tasks_keep_container_and_item_keys_apart() -> None:
    msg = parse(
        "task: stop vm\nconcurrent-execution: false\ntime-measurement: true\ndriver: x\n"
        "list:\n  - vm-name: a\n  - vm-name: b\n    concurrent-execution: false\n"
        "    time-measurement: true\n    driver: lxctools\n"
    )
    assert msg.concurrent_execution is False
    assert msg.subtasks == (
        StopSpec(vm_name="a"),
        StopSpec(vm_name="b", concurrent_execution=False, time_measurement=True, driver="lxctools"),
    )


# --------------------------------------------------------------------------------------------
# The shipped examples, and load_yaml (tooling)

EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "tasks").glob("*.yaml"))


def test_spec_1_examples_exist() -> None:
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name) for p in EXAMPLES])
def test_spec_1_example_tasks_parse_on_the_fast_path(path: Path) -> None:
    text = path.read_text()
    msg = parse(text)
    assert msg.kind.value.replace(" ", "-") in path.stem
    assert msg.id is not None
    assert msg.id.startswith("example-")
    assert _compose_fast(text, 100_000, 64) is not None


def test_ext_load_yaml_reads_published_documents() -> None:
    doc = load_yaml(b'---\nresult: vm migrated\nid: "0012"\noverall: 0.020156\n...\n--- ]]\n')
    assert doc == {"result": "vm migrated", "id": "0012", "overall": 0.020156}
    assert load_yaml("a: [1, true]") == {"a": [1, True]}


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"{a", id="malformed"),
        pytest.param(b"\xff", id="not-utf8"),
        pytest.param(b"a: 1\na: 2\n", id="duplicate-key"),
        pytest.param(b"", id="empty"),
    ],
)
def test_ext_load_yaml_returns_none_for_unreadable_input(data: bytes) -> None:
    assert load_yaml(data) is None
