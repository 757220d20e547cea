"""Example-based tests of :func:`asyncmigfra.wire.parsing.parse_task`: the size, alias and
nesting limits, and the names that reach URIs, topics and files.

Each test names the section of ``spec/migfra-original.md`` (or ``spec/extensions.md``,
"ext") whose rule it checks.
"""

from __future__ import annotations

import time

import pytest
from parsing_support import parse, reject

from asyncmigfra.errors import TaskRejected
from asyncmigfra.model import MigrateSpec, RepinSpec, StartSpec, TaskKind

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
