"""Example-based tests of :func:`asyncmigfra.wire.parsing.parse_task`.

Each test names the section of ``spec/migfra-original.md`` (or ``spec/extensions.md``,
"ext") whose rule it checks.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from asyncmigfra.errors import TaskRejected
from asyncmigfra.model import (
    CancelSpec,
    EvacuateSpec,
    Ivshmem,
    MigrateSpec,
    MigrationParams,
    PciAddress,
    PciId,
    QuitSpec,
    RepinSpec,
    ResumeSpec,
    StartSpec,
    StatusSpec,
    StopSpec,
    SuspendSpec,
    SwapWith,
    TaskKind,
    TaskMessage,
)
from asyncmigfra.wire.parsing import load_yaml, parse_task
from asyncmigfra.wire.parsing.fastpath import _compose_fast

BAD = "Exception while parsing message: yaml-cpp: error at line {}, column {}: bad conversion ({})"


def parse(text: str, **limits: int) -> TaskMessage:
    return parse_task(text.encode(), **limits)


def reject(payload: str | bytes, **limits: int) -> TaskRejected:
    data = payload.encode() if isinstance(payload, str) else payload
    with pytest.raises(TaskRejected) as info:
        parse_task(data, **limits)
    return info.value


def migrate(extra: str = "", parameter: str = "") -> str:
    text = "task: migrate vm\nid: m1\nvm-name: vm1\ndestination: node2\n" + extra
    if parameter:
        text += "parameter:\n" + "".join(f"  {line}\n" for line in parameter.splitlines())
    return text


def migrate_params(parameter: str) -> MigrationParams:
    spec = parse(migrate(parameter=parameter)).subtasks[0]
    assert isinstance(spec, MigrateSpec)
    return spec.parameter


def start_item(item: str) -> StartSpec:
    text = "task: start vm\nvm-configurations:\n  - " + item.replace("\n", "\n    ") + "\n"
    spec = parse(text).subtasks[0]
    assert isinstance(spec, StartSpec)
    return spec


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
# 5 parse errors


@pytest.mark.parametrize(
    ("payload", "details"),
    [
        pytest.param(
            "{a",
            "yaml-cpp: error at line 1, column 3: expected ',' or '}', but got '<stream end>'",
            id="flow-map-unterminated",
        ),
        pytest.param(
            "task: [a",
            "yaml-cpp: error at line 1, column 9: expected ',' or ']', but got '<stream end>'",
            id="flow-seq-unterminated",
        ),
        pytest.param(
            "a: b: c",
            "yaml-cpp: error at line 1, column 5: mapping values are not allowed here",
            id="nested-colon",
        ),
        pytest.param(
            "task: quit\n  x: y",
            "yaml-cpp: error at line 2, column 4: mapping values are not allowed here",
            id="bad-indent",
        ),
        pytest.param(
            "\tx: 1",
            "yaml-cpp: error at line 1, column 1: found character '\\t' that cannot start any "
            "token",
            id="tab",
        ),
        pytest.param(
            "task: quit\n\x00",
            "yaml-cpp: error at line 2, column 1: unacceptable character #x0000: special "
            "characters are not allowed",
            id="nul-character",
        ),
        pytest.param(
            "task: *nope",
            "yaml-cpp: error at line 1, column 7: the referenced anchor is not defined (*nope)",
            id="undefined-alias",
        ),
        pytest.param(
            "task: &a [*a]",
            "yaml-cpp: error at line 1, column 11: recursive alias (*a)",
            id="recursive-alias",
        ),
    ],
)
def test_spec_5_malformed_yaml(payload: str, details: str) -> None:
    exc = reject(payload)
    assert exc.code == "invalid-message"
    assert exc.details == "Exception while parsing message: " + details


def test_spec_5_malformed_yaml_keeps_an_id_read_before_the_error() -> None:
    exc = reject("task: quit\nid: early\nbroken: [\n")
    assert exc.details.startswith("Exception while parsing message: yaml-cpp: error at line 4")
    assert exc.task_id == "early"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param("", id="empty-payload"),
        pytest.param("# only a comment\n", id="comment-only"),
        pytest.param("---\n...\n", id="empty-document"),
        pytest.param("just a scalar", id="scalar"),
        pytest.param("- task: quit\n", id="sequence"),
        pytest.param("id: x\nlist: []\n", id="no-task-key"),
        pytest.param("~", id="null"),
    ],
)
def test_spec_5_not_a_task_container(payload: str) -> None:
    exc = reject(payload)
    assert (exc.code, exc.details) == (
        "invalid-message",
        "Parsed message not being a Task_container.",
    )


def test_spec_5_not_a_task_container_keeps_the_id() -> None:
    assert reject("id: abc\nlist: []\n").task_id == "abc"


@pytest.mark.parametrize(
    ("task", "shown"),
    [
        pytest.param("migrate start", "migrate start", id="old-name"),
        pytest.param("Quit", "Quit", id="case-sensitive"),
        pytest.param("'start vm '", "start vm ", id="trailing-space"),
        pytest.param("x" * 150, "x" * 100 + "...", id="long-value-is-cut"),
    ],
)
def test_spec_5_unknown_task(task: str, shown: str) -> None:
    exc = reject(f"task: {task}\nid: u1\n")
    assert exc.code == "unknown-task"
    assert exc.details == f"Exception: Unknown type of Task while loading. (task: '{shown}')"
    assert exc.task_id == "u1"


@pytest.mark.parametrize(
    ("raw", "found"),
    [pytest.param("", "null", id="null"), pytest.param("[quit]", "a sequence", id="sequence")],
)
def test_spec_5_task_must_be_a_string(raw: str, found: str) -> None:
    exc = reject(f"id: t\ntask: {raw}\n")
    assert exc.details == BAD.format(1, 1, f"task: expected a string, {'found ' + found}")
    assert exc.task_id == "t"


@pytest.mark.parametrize(
    ("payload", "key"),
    [
        pytest.param("task: start vm\nlist:\n  - vm-name: a\n", "vm-configurations", id="start"),
        pytest.param(
            "task: stop vm\nvm-configurations:\n  - vm-name: a\n", "list", id="stop-old-key"
        ),
        pytest.param("task: suspend vm\n", "list", id="suspend"),
        pytest.param("task: resume vm\nvm-configuration: []\n", "list", id="resume"),
    ],
)
def test_spec_5_missing_list_key(payload: str, key: str) -> None:
    exc = reject(payload + "id: L\n")
    assert exc.code == "invalid-message"
    assert exc.details == (
        f"Exception: Error loading YAML-node: Node is not valid. (missing '{key}')"
    )
    assert exc.task_id == "L"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param("task: start vm\nvm-configurations: []\n", id="start"),
        pytest.param("task: stop vm\nlist: []\n", id="stop"),
        pytest.param("task: suspend vm\nlist: []\n", id="suspend"),
        pytest.param("task: resume vm\nlist: [ ]\n", id="resume"),
    ],
)
def test_spec_5_empty_task_container(payload: str) -> None:
    exc = reject(payload + "id: E\n")
    assert (exc.code, exc.details, exc.task_id) == (
        "invalid-message",
        "Empty task container executed.",
        "E",
    )


@pytest.mark.parametrize(
    ("payload", "line", "column", "problem"),
    [
        pytest.param(
            "task: suspend vm\nid: X\nlist:\n  - vm-name: a\n  - force: true\n",
            5,
            5,
            "list[1].vm-name: expected a string, the key is missing",
            id="suspend-item-without-vm-name",
        ),
        pytest.param(
            "task: stop vm\nid: X\nlist:\n- vm-name: a\n-   vm-name: b\n    force: 1\n",
            5,
            5,
            "list[1].force: expected a boolean (true/false, yes/no, on/off, y/n), found '1'",
            id="item-mark-is-the-item-map",
        ),
        pytest.param(
            "task: stop vm\nid: X\nlist: [a]\n",
            3,
            8,
            "list[0]: expected a map, found 'a'",
            id="item-not-a-map",
        ),
        pytest.param(
            "task: stop vm\nid: X\nlist: ok\n",
            1,
            1,
            "list: expected a sequence, found 'ok'",
            id="list-not-a-sequence",
        ),
        pytest.param(
            "task: stop vm\nid: X\nlist:\n",
            1,
            1,
            "list: expected a sequence, found null",
            id="list-null",
        ),
        pytest.param(
            "task: start vm\nid: X\nconcurrent-execution: 0\nvm-configurations:\n  - vm-name: a\n",
            1,
            1,
            "concurrent-execution: expected a boolean (true/false, yes/no, on/off, y/n), found '0'",
            id="container-key-at-top-mark",
        ),
        pytest.param(
            "---\nid: X\ntask: migrate vm\nvm-name: a\n",
            2,
            1,
            "destination: expected a string, the key is missing",
            id="migrate-without-destination-top-mark",
        ),
        pytest.param(
            "task: migrate vm\nid: X\nvm-name: a\ndestination: b\nparameter:\n  swap-with: vm2\n",
            1,
            1,
            "parameter.swap-with: expected a map, found 'vm2'",
            id="swap-with-scalar",
        ),
        pytest.param(
            "task: migrate vm\nid: X\nvm-name: a\ndestination: b\nparameter:\n"
            "  swap-with:\n    pscom-hook-procs: 2\n",
            1,
            1,
            "parameter.swap-with.vm-name: expected a string, the key is missing",
            id="swap-with-without-vm-name",
        ),
        pytest.param(
            "task: repin vm\nid: X\nvm-name: a\n",
            1,
            1,
            "vcpu-map: expected a sequence of sequences of CPU numbers, the key is missing",
            id="repin-without-vcpu-map",
        ),
        pytest.param(
            "task: repin vm\nid: X\nvm-name: a\nvcpu-map: [[1], 2]\n",
            1,
            1,
            "vcpu-map[1]: expected a sequence of sequences of CPU numbers, found '2'",
            id="vcpu-map-flat",
        ),
        pytest.param(
            "task: start vm\nid: X\nvm-configurations:\n  - vm-name: a\n  - vm-name: b\n"
            "    devs:\n      - pci-addr: 82:00\n",
            5,
            5,
            "vm-configurations[1].devs[0].pci-addr: expected a PCI address [DDDD:]BB:SS.F, "
            "found '82:00'",
            id="bad-pci-addr",
        ),
    ],
)
def test_spec_5_bad_conversion_names_the_field_and_the_mark(
    payload: str, line: int, column: int, problem: str
) -> None:
    exc = reject(payload)
    assert exc.code == "invalid-message"
    assert exc.details == BAD.format(line, column, problem)
    assert exc.task_id == "X"


def test_spec_5_one_bad_item_rejects_the_whole_message() -> None:
    exc = reject("task: resume vm\nlist:\n  - vm-name: ok\n  - vm-name: [bad]\n  - vm-name: ok2\n")
    assert "list[1].vm-name: expected a string, found a sequence" in exc.details


def test_spec_5_long_scalars_are_cut_in_details() -> None:
    exc = reject("task: quit\ntime-measurement: " + "z" * 500 + "\n")
    assert exc.details.endswith("found '" + "z" * 40 + "...')")


# --------------------------------------------------------------------------------------------
# Limits (asyncmigfra hardening; reported as invalid-message)


def test_ext_size_limit_is_checked_before_parsing() -> None:
    exc = reject(b"\xff" * 101, max_size=100)
    assert exc.details == "Message of 101 bytes exceeds the limit of 100 bytes."
    assert exc.code == "invalid-message"
    assert parse("task: quit\n", max_size=11).kind is TaskKind.QUIT


@pytest.mark.parametrize(
    "payload",
    [pytest.param(b"task: quit\nid: \xff\n", id="bad-byte"), pytest.param(b"\xc3", id="cut")],
)
def test_ext_not_utf8(payload: bytes) -> None:
    exc = reject(payload)
    assert exc.code == "invalid-message"
    assert exc.details.startswith("Exception while parsing message: the message is not valid UTF-8")


def billion_laughs(levels: int = 9) -> str:
    lines = ["task: quit", "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def test_ext_alias_bomb_is_rejected_fast() -> None:
    started = time.perf_counter()
    exc = reject(billion_laughs())
    assert time.perf_counter() - started < 1.0
    assert exc.code == "invalid-message"
    assert "the document has more than 100000 nodes (aliases expanded)" in exc.details


def test_ext_aliases_within_the_limit_are_followed() -> None:
    msg = parse("task: repin vm\nvm-name: &n vm1\nvcpu-map: [&c [1, 2], *c]\nx: *n\n")
    assert msg.subtasks == (RepinSpec(vm_name="vm1", vcpu_map=((1, 2), (1, 2))),)


def test_ext_node_limit_is_configurable() -> None:
    text = "task: quit\nlist: [" + ", ".join(["x"] * 50) + "]\n"
    assert parse(text, max_nodes=200).kind is TaskKind.QUIT
    assert "more than 20 nodes" in reject(text, max_nodes=20).details


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param("[" * 100_000, id="100k-flow-brackets"),
        pytest.param("task: quit\nx: " + "[" * 100 + "]" * 100 + "\n", id="deep-flow"),
        pytest.param(
            "task: quit\n" + "".join(" " * i + f"k{i}:\n" for i in range(100)) + " " * 100 + "v\n",
            id="deep-block",
        ),
        pytest.param("- " * 5000 + "x\n", id="deep-compact-sequences"),
        pytest.param(
            "task: quit\nd: &d " + "[" * 40 + "]" * 40 + "\ne: " + "[" * 30 + "*d" + "]" * 30,
            id="deep-through-alias",
        ),
    ],
)
def test_ext_nesting_limit(payload: str) -> None:
    exc = reject(payload)
    assert exc.code == "invalid-message"
    assert "the document nests deeper than 64 levels" in exc.details


def test_ext_nesting_limit_is_configurable() -> None:
    text = "task: quit\nx: [[[[1]]]]\n"  # the top-level map plus four sequences
    assert parse(text, max_depth=5).kind is TaskKind.QUIT
    assert "nests deeper than 4 levels" in reject(text, max_depth=4).details


# --------------------------------------------------------------------------------------------
# 1.3 start vm


def test_spec_1_3_start_all_fields() -> None:
    msg = parse(
        """\
task: start vm
id: s1
concurrent-execution: false
vm-configurations:
  - vm-name: vm1
    xml: "<domain><name>ignored</name></domain>"
    vcpus: 4
    memory: 0x100000
    transient: yes
    pci-ids:
      - vendor: 0x15b3
        device: 0x1004
      - {vendor: "4660", device: 017}
    devs:
      - pci-addr: "0000:82:00.1"
      - pci-addr: 3b:1f.7
      - pci-addr: "ABCD:ff:00.0"
    ivshmem:
      id: shm0
      size: 256
      path: /dev/shm/x
    probe-with-ssh: off
    probe-hostname: vm1.example.org
    vcpu-map: [[0, 1], [2]]
    memnode-map:
      - [0]
    time-measurement: true
    concurrent-execution: false
    driver: qemu
"""
    )
    assert msg.kind is TaskKind.START
    assert (msg.id, msg.concurrent_execution) == ("s1", False)
    assert msg.subtasks == (
        StartSpec(
            vm_name="vm1",
            xml="<domain><name>ignored</name></domain>",
            vcpus=4,
            memory=1048576,
            transient=True,
            pci_ids=(PciId(0x15B3, 0x1004), PciId(4660, 15)),
            devs=(
                PciAddress(0, 0x82, 0, 1),
                PciAddress(0, 0x3B, 0x1F, 7),
                PciAddress(0xABCD, 0xFF, 0, 0),
            ),
            ivshmem=Ivshmem("shm0", "256", "/dev/shm/x"),
            probe_with_ssh=False,
            probe_hostname="vm1.example.org",
            vcpu_map=((0, 1), (2,)),
            memnode_map=((0,),),
            time_measurement=True,
            concurrent_execution=False,
            driver="qemu",
        ),
    )


def test_spec_1_3_start_defaults() -> None:
    spec = start_item("vm-name: v")
    assert spec == StartSpec(vm_name="v")
    assert (spec.transient, spec.probe_with_ssh, spec.concurrent_execution) == (False, True, True)
    assert (spec.pci_ids, spec.devs, spec.ivshmem, spec.name_error) == ((), (), None, None)


@pytest.mark.parametrize(
    ("item", "name", "error"),
    [
        pytest.param("vm-name: given\nxml: '<name>other</name>'", "given", None, id="vm-name-wins"),
        pytest.param("xml: '<domain><name>vm7</name></domain>'", "vm7", None, id="from-xml"),
        pytest.param("xml: '<name>a</name><name>b</name>'", "a", None, id="first-name-non-greedy"),
        pytest.param("xml: '<name>  padded \t</name>'", "padded", None, id="stripped"),
        pytest.param(
            "xml: |\n  <domain>\n    <name>\n      ml\n    </name>\n  </domain>",
            "ml",
            None,
            id="multi-line",
        ),
        pytest.param("xml: '<name>a&amp;b</name>'", "a&b", None, id="entities-unescaped"),
        pytest.param("xml: '<domain/>'", "", "Could not find vm-name in xml.", id="no-name"),
        pytest.param("xml: '<name> </name>'", "", "Could not find vm-name in xml.", id="blank"),
        pytest.param("vcpus: 2", "", "vm-name is not valid.", id="neither"),
    ],
)
def test_spec_1_3_start_name_resolution(item: str, name: str, error: str | None) -> None:
    spec = start_item(item)
    assert (spec.vm_name, spec.name_error) == (name, error)


def test_spec_1_3_start_transient_without_xml_is_left_to_the_runner() -> None:
    spec = start_item("vm-name: v\ntransient: true")
    assert (spec.transient, spec.xml, spec.name_error) == (True, None, None)


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        pytest.param(
            "pci-ids:\n  - vendor: 0x10000\n    device: 1",
            "pci-ids[0].vendor: expected an integer from 0 to 0xffff, found '0x10000'",
            id="pci-id-range",
        ),
        pytest.param(
            "pci-ids:\n  - vendor: 1",
            "pci-ids[0].device: expected an integer from 0 to 0xffff, the key is missing",
            id="pci-id-missing-device",
        ),
        pytest.param(
            "pci-ids: [1]", "pci-ids[0]: expected a map, found '1'", id="pci-id-not-a-map"
        ),
        pytest.param(
            "devs:\n  - pci-addr: 0000:82:00:00.1",
            "devs[0].pci-addr: expected a PCI address [DDDD:]BB:SS.F, found '0000:82:00:00.1'",
            id="three-colons",
        ),
        pytest.param(
            "devs:\n  - pci-addr: 82:20.0",
            "devs[0].pci-addr: expected a PCI address [DDDD:]BB:SS.F, found '82:20.0'",
            id="slot-over-1f",
        ),
        pytest.param(
            "devs:\n  - pci-addr: 82:00.8",
            "devs[0].pci-addr: expected a PCI address [DDDD:]BB:SS.F, found '82:00.8'",
            id="function-over-7",
        ),
        pytest.param(
            "devs:\n  - {}",
            "devs[0].pci-addr: expected a PCI address [DDDD:]BB:SS.F, the key is missing",
            id="dev-without-addr",
        ),
        pytest.param(
            "ivshmem:\n  size: 1",
            "ivshmem.id: expected a string, the key is missing",
            id="ivshmem-id",
        ),
        pytest.param(
            "ivshmem:\n  id: x",
            "ivshmem.size: expected a string, the key is missing",
            id="ivshmem-size",
        ),
        pytest.param("ivshmem: shm", "ivshmem: expected a map, found 'shm'", id="ivshmem-scalar"),
        pytest.param(
            "memnode-map: [[-1]]",
            "memnode-map[0][0]: expected an unsigned integer up to 4294967295, found '-1'",
            id="memnode-map-negative",
        ),
        pytest.param("xml: [a]", "xml: expected a string, found a sequence", id="xml-not-a-string"),
        pytest.param("vm-name:", "vm-name: expected a string, found null", id="vm-name-null"),
    ],
)
def test_spec_1_3_start_bad_fields(item: str, problem: str) -> None:
    text = "task: start vm\nid: X\nvm-configurations:\n  - vcpus: 1\n    " + item.replace(
        "\n", "\n    "
    )
    exc = reject(text + "\n")
    assert exc.details == BAD.format(4, 5, "vm-configurations[0]." + problem)
    assert exc.task_id == "X"


# --------------------------------------------------------------------------------------------
# 1.4 stop vm, 1.5 suspend/resume


def test_spec_1_4_stop_fields_and_defaults() -> None:
    msg = parse(
        "task: stop vm\nlist:\n  - vm-name: a\n    force: true\n    undefine: yes\n"
        "    force-after-timeout: on\n  - regex: 'web-[0-9]+'\n  - {}\n"
    )
    assert msg.subtasks == (
        StopSpec(vm_name="a", force=True, undefine=True, force_after_timeout=True),
        StopSpec(regex="web-[0-9]+"),
        StopSpec(),
    )
    assert [s.result_name for s in msg.subtasks] == ["a", "web-[0-9]+", ""]


@pytest.mark.parametrize(
    ("task", "spec_type"),
    [
        pytest.param("suspend vm", SuspendSpec, id="suspend"),
        pytest.param("resume vm", ResumeSpec, id="resume"),
    ],
)
def test_spec_1_5_suspend_resume(task: str, spec_type: type[SuspendSpec | ResumeSpec]) -> None:
    msg = parse(f"task: {task}\nlist:\n  - vm-name: a\n  - vm-name: b\n    driver: lxctools\n")
    assert msg.subtasks == (spec_type(vm_name="a"), spec_type(vm_name="b", driver="lxctools"))


# --------------------------------------------------------------------------------------------
# 1.6 repin, 1.9 quit, ext status/cancel


def test_spec_1_6_repin() -> None:
    msg = parse("task: repin vm\nid: r\nvm-name: vm1\nvcpu-map: [[4], [5], [6, 0x7]]\n")
    assert msg.subtasks == (RepinSpec(vm_name="vm1", vcpu_map=((4,), (5,), (6, 7))),)


def test_spec_1_9_quit() -> None:
    msg = parse("task: quit\nid: q\ntime-measurement: true\n")
    assert msg.subtasks == (QuitSpec(time_measurement=True),)
    assert msg.vm_names == ()


def test_ext_status() -> None:
    msg = parse("task: status\nid: s\n")
    assert (msg.kind, msg.subtasks) == (TaskKind.STATUS, (StatusSpec(),))


def test_ext_cancel() -> None:
    msg = parse("task: cancel\nid: c\ntarget: 0012\n")
    assert (msg.kind, msg.subtasks) == (TaskKind.CANCEL, (CancelSpec(target="0012"),))
    exc = reject("task: cancel\nid: c\n")
    assert exc.details == BAD.format(1, 1, "target: expected a string, the key is missing")


# --------------------------------------------------------------------------------------------
# 1.7 migrate vm + ext parameters


def test_spec_1_7_migrate_minimal_defaults() -> None:
    msg = parse(migrate())
    assert msg.subtasks == (MigrateSpec(vm_name="vm1", destination="node2"),)
    spec = msg.subtasks[0]
    assert isinstance(spec, MigrateSpec)
    assert spec.parameter == MigrationParams()
    # No migration-type: the agent's configured default applies (migration.migration-type,
    # itself "warm" like the original), so the parser leaves it unset.
    assert (spec.parameter.migration_type, spec.parameter.rdma_migration) == (None, False)


def test_spec_1_7_migrate_all_parameters() -> None:
    params = migrate_params(
        """\
migration-type: post-copy
rdma-migration: true
pscom-hook-procs: 4
transport: tcp
vcpu-map: [[1], [2]]
retry_counter: 3
swap-with:
  vm-name: vm2
  pscom-hook-procs: auto
  vcpu-map: [[3]]
max-downtime: 300
bandwidth: 0x400
auto-converge: true
compressed: false
parallel-connections: 4
completion-timeout: 12.5
timeout-action: suspend
persist: false
tls: yes"""
    )
    assert params == MigrationParams(
        migration_type="post-copy",
        rdma_migration=True,
        pscom_hook_procs=4,
        transport="tcp",
        vcpu_map=((1,), (2,)),
        retry_counter=3,
        swap_with=SwapWith(vm_name="vm2", pscom_hook_procs="auto", vcpu_map=((3,),)),
        max_downtime=300,
        bandwidth=1024,
        auto_converge=True,
        compressed=False,
        parallel_connections=4,
        completion_timeout=12.5,
        timeout_action="suspend",
        persist=False,
        tls=True,
    )


@pytest.mark.parametrize(
    ("parameter", "value"),
    [
        pytest.param("retry_counter: 2", 2, id="underscore"),
        pytest.param("retry-counter: 5", 5, id="dash"),
        pytest.param("retry_counter: 2\nretry-counter: 5", 5, id="dash-wins"),
        pytest.param("retry-counter: 5\nretry_counter: 2", 5, id="dash-wins-either-order"),
    ],
)
def test_ext_retry_counter_either_spelling(parameter: str, value: int) -> None:
    assert migrate_params(parameter).retry_counter == value


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        pytest.param("4", 4, id="int"),
        pytest.param("'4'", 4, id="quoted"),
        pytest.param("0", 0, id="zero"),
        pytest.param("auto", "auto", id="auto"),
        pytest.param("010", 10, id="decimal-not-octal"),
    ],
)
def test_spec_1_10_pscom_hook_procs(raw: str, value: int | str) -> None:
    assert migrate_params(f"pscom-hook-procs: {raw}").pscom_hook_procs == value


@pytest.mark.parametrize(
    ("parameter", "problem"),
    [
        pytest.param(
            "migration-type: hot",
            "parameter.migration-type: expected one of live, warm, offline, post-copy, auto,"
            " found 'hot'",
            id="migration-type",
        ),
        pytest.param(
            "pscom-hook-procs: many",
            "parameter.pscom-hook-procs: expected a process count or 'auto', found 'many'",
            id="pscom-word",
        ),
        pytest.param(
            "pscom-hook-procs: -2",
            "parameter.pscom-hook-procs: expected a process count or 'auto', found '-2'",
            id="pscom-negative",
        ),
        pytest.param(
            "pscom-hook-procs: AUTO",
            "parameter.pscom-hook-procs: expected a process count or 'auto', found 'AUTO'",
            id="pscom-case",
        ),
        pytest.param(
            "timeout-action: retry",
            "parameter.timeout-action: expected one of abort, post-copy, suspend, found 'retry'",
            id="timeout-action",
        ),
        pytest.param(
            "parallel-connections: 0",
            "parameter.parallel-connections: expected an integer from 1 to 4294967295, found '0'",
            id="parallel-connections-zero",
        ),
        pytest.param(
            "completion-timeout: 0",
            "parameter.completion-timeout: expected a positive number of seconds, found '0'",
            id="completion-timeout-zero",
        ),
        pytest.param(
            "completion-timeout: -5",
            "parameter.completion-timeout: expected a positive number of seconds, found '-5'",
            id="completion-timeout-negative",
        ),
        pytest.param(
            "completion-timeout: .inf",
            "parameter.completion-timeout: expected a positive number of seconds, found '.inf'",
            id="completion-timeout-inf",
        ),
        pytest.param(
            "max-downtime: 1.5",
            "parameter.max-downtime: expected an unsigned integer up to 18446744073709551615, "
            "found '1.5'",
            id="max-downtime",
        ),
        pytest.param(
            "swap-with:\n  vm-name: b\n  vcpu-map: [1]",
            "parameter.swap-with.vcpu-map[0]: expected a sequence of sequences of CPU numbers, "
            "found '1'",
            id="swap-with-vcpu-map",
        ),
        pytest.param(
            "rdma-migration: 1",
            "parameter.rdma-migration: expected a boolean (true/false, yes/no, on/off, y/n), "
            "found '1'",
            id="rdma",
        ),
    ],
)
def test_ext_migrate_bad_parameters(parameter: str, problem: str) -> None:
    exc = reject(migrate(parameter=parameter))
    assert exc.details == BAD.format(1, 1, problem)
    assert exc.task_id == "m1"


def test_spec_1_7_parameter_must_be_a_map() -> None:
    exc = reject(migrate("parameter: live\n"))
    assert exc.details == BAD.format(1, 1, "parameter: expected a map, found 'live'")


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        pytest.param("120", 120.0, id="int"),
        pytest.param("0.5", 0.5, id="decimal"),
        pytest.param(".25", 0.25, id="leading-dot"),
        pytest.param("3.", 3.0, id="trailing-dot"),
    ],
)
def test_ext_completion_timeout_accepts_ints_and_decimals(raw: str, value: float) -> None:
    assert migrate_params(f"completion-timeout: {raw}").completion_timeout == value


# --------------------------------------------------------------------------------------------
# 1.8 evacuate node


def test_spec_1_8_evacuate() -> None:
    msg = parse(
        """\
task: evacuate node
id: e
time-measurement: true
destinations: [node2, "0012"]
parameter:
  mode: scatter
  overbooking: false
  max-parallel: 2
  migration-type: live
  retry-counter: 1
  swap-with: {vm-name: ignored}
  vcpu-map: [[1]]
"""
    )
    assert msg.subtasks == (
        EvacuateSpec(
            destinations=("node2", "0012"),
            mode="scatter",
            overbooking=False,
            max_parallel=2,
            parameter=MigrationParams(migration_type="live", retry_counter=1),
            time_measurement=True,
        ),
    )


def test_spec_1_8_evacuate_defaults() -> None:
    spec = parse("task: evacuate node\ndestinations: [a]\n").subtasks[0]
    assert spec == EvacuateSpec(destinations=("a",))
    assert isinstance(spec, EvacuateSpec)
    assert (spec.mode, spec.overbooking, spec.max_parallel) == ("auto", True, None)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        pytest.param("", "destinations: expected a sequence, the key is missing", id="missing"),
        pytest.param(
            "destinations: a", "destinations: expected a sequence, found 'a'", id="scalar"
        ),
        pytest.param(
            "destinations: [[a]]",
            "destinations[0]: expected a string, found a sequence",
            id="nested",
        ),
        pytest.param(
            "destinations: [a]\nparameter:\n  mode: spread",
            "parameter.mode: expected one of auto, compact, scatter, found 'spread'",
            id="mode",
        ),
        pytest.param(
            "destinations: [a]\nparameter:\n  max-parallel: 0",
            "parameter.max-parallel: expected an integer from 1 to 4294967295, found '0'",
            id="max-parallel",
        ),
    ],
)
def test_spec_1_8_evacuate_bad_fields(body: str, problem: str) -> None:
    exc = reject("task: evacuate node\nid: X\n" + body + "\n")
    assert exc.details == BAD.format(1, 1, problem)


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


# --------------------------------------------------------------------------------------------
# Names that end up in URIs, topics and files are validated (found by the fuzz/security run)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param(
            "task: migrate vm\nvm-name: v\ndestination: 'x/system?command=/tmp/evil&x='\n",
            "destination",
            id="uri-injection-destination",
        ),
        pytest.param(
            "task: migrate vm\nvm-name: v\ndestination: b\nparameter:\n  transport: ext\n",
            "parameter.transport",
            id="ext-transport-runs-programs",
        ),
        pytest.param(
            "task: migrate vm\nvm-name: v\ndestination: b\ndriver: 'qemu+ext'\n",
            "driver",
            id="driver-with-transport",
        ),
        pytest.param(
            "task: evacuate node\ndestinations: [ok, 'user@host:22/x']\n",
            "destinations[1]",
            id="evacuate-destination",
        ),
        pytest.param(
            "task: suspend vm\nlist:\n  - vm-name: '../etc/passwd'\n",
            "list[0].vm-name",
            id="vm-name-path",
        ),
        pytest.param(
            'task: stop vm\nlist:\n  - vm-name: "a\\nb"\n', "list[0].vm-name", id="vm-name-newline"
        ),
        pytest.param(
            "task: repin vm\nvm-name: '-rf'\nvcpu-map: [[0]]\n", "vm-name", id="vm-name-dash"
        ),
    ],
)
def test_names_that_reach_uris_topics_or_files_are_validated(body: str, field: str) -> None:
    with pytest.raises(TaskRejected) as err:
        parse(body)
    assert err.value.code == "invalid-message"
    assert f"bad conversion ({field}:" in err.value.details


@pytest.mark.parametrize("transport", ["ssh", "libssh", "libssh2", "tcp", "tls"])
def test_remote_transports_are_accepted(transport: str) -> None:
    spec = parse(
        f"task: migrate vm\nvm-name: web-1.prod\ndestination: node-7.example.org\n"
        f"parameter:\n  transport: {transport}\n"
    ).subtasks[0]
    assert isinstance(spec, MigrateSpec)
    assert spec.parameter.transport == transport


def test_ip_literals_are_host_names() -> None:
    for dest in ("10.200.0.2", "'[fe80::1]'"):
        spec = parse(f"task: migrate vm\nvm-name: v\ndestination: {dest}\n").subtasks[0]
        assert isinstance(spec, MigrateSpec)
        assert spec.destination == dest.strip("'")


def test_a_name_from_xml_is_validated_per_vm() -> None:
    spec = parse(
        'task: start vm\nvm-configurations:\n  - xml: "<domain><name>a/b</name></domain>"\n'
    ).subtasks[0]
    assert isinstance(spec, StartSpec)
    assert spec.name_error == "The <name> in the xml is not a valid VM name."


def test_lone_surrogate_escapes_are_refused() -> None:
    with pytest.raises(TaskRejected) as err:
        parse('id: "a\\udfff"\ntask: suspend vm\nlist: [{vm-name: v}]\n')
    assert err.value.code == "invalid-message"
    assert "surrogate" in err.value.details


def test_deep_flow_nesting_is_refused_before_the_yaml_parser_runs() -> None:
    t0 = time.perf_counter()
    with pytest.raises(TaskRejected) as err:
        parse("task: status\nx: " + "[" * 1000)
    assert time.perf_counter() - t0 < 0.05
    assert "nests deeper than 64 levels" in err.value.details


def test_a_huge_block_list_is_refused_from_the_fast_path() -> None:
    body = "task: stop vm\nlist:\n" + "".join(f"  - vm-name: v{i}\n" for i in range(60_000))
    t0 = time.perf_counter()
    with pytest.raises(TaskRejected) as err:
        parse(body, max_size=10 * 1024 * 1024)
    assert time.perf_counter() - t0 < 2.0
    assert "more than 100000 nodes" in err.value.details


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param('"x\\e[2J\\e[Hweb-1 migrated"', id="esc-sequence"),
        pytest.param('"x\\e]52;c;ZXZpbA==\\a"', id="osc-52"),
        pytest.param('"x\\u202eevil"', id="bidi-override"),
        pytest.param('"x\\rfake"', id="carriage-return"),
        pytest.param("x" * 257, id="too-long"),
    ],
)
def test_ids_that_cannot_be_shown_or_remembered_are_refused(raw: str) -> None:
    """issue 13: an id is echoed everywhere; one that would take a terminal over, or cost
    a megabyte per remembered task, is refused and not echoed."""
    with pytest.raises(TaskRejected) as err:
        parse(f"id: {raw}\ntask: status\n")
    assert err.value.code == "invalid-message"
    assert err.value.task_id is None
    assert "id: expected an id of at most 256 characters" in err.value.details
    assert "\x1b" not in err.value.details
    assert "\u202e" not in err.value.details


def test_a_256_character_id_is_fine() -> None:
    assert parse("id: " + "x" * 256 + "\ntask: status\n").id == "x" * 256
