"""Example-based tests of :func:`asyncmigfra.wire.parsing.parse_task`: parse errors (spec 5).

Each test names the section of ``spec/migfra-original.md`` (or ``spec/extensions.md``,
"ext") whose rule it checks.
"""

from __future__ import annotations

import pytest
from parsing_support import BAD, reject

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
