"""Property tests of the task parser (spec 1.1, 5: every bad input is a ``TaskRejected``).

* ``parse_task`` never raises anything but ``TaskRejected``, for arbitrary bytes, YAML-ish
  text and mutated valid messages.
* The line-based fast path returns either nothing (fall back) or exactly the node graph of the
  ruamel.yaml reference path, and never accepts a document ruamel rejects.
* Values written by our own emitter (``rendering``) read back unchanged.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from asyncmigfra.errors import TaskRejected
from asyncmigfra.model import MigrateSpec, MigrationParams, StartSpec, StopSpec, TaskKind
from asyncmigfra.wire.parsing import (
    TRANSPORTS,
    parse_task,
    valid_task_id,
    valid_vm_name,
)
from asyncmigfra.wire.parsing import nodes as parsing
from asyncmigfra.wire.parsing.fastpath import _compose_fast
from asyncmigfra.wire.parsing.nodes import _compose_slow, _Map, _Node, _Scalar
from asyncmigfra.wire.rendering import render_event

PROPS = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])

VALID_MESSAGES = [
    "task: migrate vm\nid: 0012\nvm-name: vm1\ndestination: node2\ntime-measurement: true\n"
    "parameter:\n  migration-type: live\n  pscom-hook-procs: auto\n  vcpu-map: [[4], [5]]\n"
    "  swap-with:\n    vm-name: vm2\n",
    "---\ntask: start vm\nid: 42\nvm-configurations:\n  - vm-name: vm1\n    vcpus: 2\n"
    "    memory: 0x100000\n    pci-ids:\n      - vendor: 0x15b3\n        device: 0x1004\n"
    "    devs:\n      - pci-addr: '0000:82:00.1'\n  - xml: \"<name>vm2</name>\"\n...\n",
    "task: stop vm\nlist:\n- vm-name: a\n  force: yes\n- regex: 'b.*'\n  undefine: on\n",
    "task: suspend vm\nid: s\nlist: [{vm-name: a}, {vm-name: b}]\n",
    "task: evacuate node\ndestinations: [a, b]\nparameter:\n  mode: compact\n"
    "  overbooking: false\n",
    "task: migrate vm\nid: d1\nvm-name: vm1\ndestination: node2\nparameter:\n"
    "  copy-storage: inc\n  migrate-disks: [vda, 'vdb']\n  copy-storage-synchronous-writes: yes\n",
    "task: repin vm\nvm-name: v\nvcpu-map:\n  - [1, 2]\n  - [3]\n",
    "task: cancel\nid: c\ntarget: 'x'\n",
    "task: quit\n",
]


def only_rejections(payload: bytes) -> None:
    try:
        msg = parse_task(payload)
    except TaskRejected as exc:
        rejection = exc
    else:
        assert isinstance(msg.kind, TaskKind)
        assert msg.subtasks
        return
    assert rejection.code in {"invalid-message", "unknown-task"}
    assert rejection.details


def norm(node: _Node | None) -> Any:
    """Comparable form; the mark of an empty value (``key:``) is never reported, so skip it."""
    if node is None:
        return None
    if isinstance(node, _Scalar):
        mark = () if node.null and node.text == "" else (node.line, node.col)
        return ("scalar", node.text, node.null, *mark)
    if isinstance(node, _Map):
        return ("map", node.line, node.col, [(k, norm(v)) for k, v in node.items.items()])
    return ("seq", node.line, node.col, [norm(v) for v in node.items])


# --------------------------------------------------------------------------------------------
# Strategies

YAML_TOKENS = [
    "task", "id", "list", "vm-name", ": ", ":", "- ", "-", "\n", "\n  ", "\n    ", "\n- ",
    " ", "[", "]", "{", "}", ", ", "'", '"', "#", " # c", "---", "...", "\n---\n", "\n...\n",
    "&a ", "*a", "!!str ", "|\n  ", ">-\n  ", "?", "%YAML 1.2\n", "\\", "\t", "\r\n", "~",
    "0012", "yes", "0x1F", "-1", "stop vm", "quit", "migrate vm", "start vm", "\x00", "é",
    "\ufeff", "\u2028", "vm-configurations", "parameter", "swap-with", "vcpu-map",
    "copy-storage", "migrate-disks", "[vda, vdb]",
]  # fmt: skip

yamlish = st.lists(st.sampled_from(YAML_TOKENS), max_size=40).map("".join)

SCALAR_ALPHABET = "abcxyz019_-.:#'\"[]{},&*!|>%@`?~ "
scalar_texts = st.one_of(
    st.from_regex(r"[a-z0-9_][a-z0-9 _.+-]{0,8}", fullmatch=True),
    st.sampled_from(["", "a", "0012", "null", "~", "yes", "x y", "a: b", "a #b", "-", "- a"]),
    st.text(alphabet=SCALAR_ALPHABET, max_size=10),
)
keys = st.one_of(
    st.from_regex(r"[a-z0-9_][a-z0-9_.-]{0,6}", fullmatch=True),
    st.sampled_from(["task", "id", "list", "a b", "-x", "k:", "'q'"]),
)
trees = st.recursive(
    scalar_texts,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=20,
)


def style_scalar(draw: st.DrawFn, text: str) -> str:
    style = draw(st.sampled_from(["plain", "plain", "single", "double"]))
    if style == "single":
        return "'" + text.replace("'", "''") + "'"
    if style == "double":
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def is_flat_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) or is_flat_list(v) for v in value)


def flow(draw: st.DrawFn, value: object) -> str:
    if isinstance(value, list):
        sep = draw(st.sampled_from([", ", ",", " , "]))
        return "[" + sep.join(flow(draw, v) for v in value) + "]"
    assert isinstance(value, str)
    return style_scalar(draw, value)


def comment(draw: st.DrawFn) -> str:
    return draw(st.sampled_from(["", "", "", " # note", "  #x"]))


def block(draw: st.DrawFn, value: object, indent: int, out: list[str]) -> None:
    """Append ``value`` as block lines at ``indent`` (a non-empty dict or list)."""
    pad = " " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            head = f"{pad}{key}:"
            emit_value(draw, head, item, indent, out, allow_indentless=True)
    else:
        assert isinstance(value, list)
        for item in value:
            if isinstance(item, dict) and item and draw(st.booleans()):
                sub: list[str] = []
                block(draw, item, indent + 2, sub)
                sub[0] = pad + "- " + sub[0][indent + 2 :]
                out.extend(sub)
            else:
                emit_value(draw, f"{pad}-", item, indent, out, allow_indentless=False)
    if draw(st.integers(0, 9)) == 0:
        out.append(draw(st.sampled_from(["", "# c", "   # deep comment", "  "])))


def emit_value(
    draw: st.DrawFn, head: str, item: object, indent: int, out: list[str], *, allow_indentless: bool
) -> None:
    if isinstance(item, str):
        out.append(
            f"{head} {style_scalar(draw, item)}{comment(draw)}".rstrip(" ")
            if item or draw(st.booleans())
            else head
        )
    elif not item:
        out.append(head + (" []" if isinstance(item, list) else " {}"))
    elif is_flat_list(item) and draw(st.booleans()):
        out.append(f"{head} {flow(draw, item)}{comment(draw)}")
    else:
        out.append(head + comment(draw))
        step = draw(st.integers(1, 4))
        if isinstance(item, list) and allow_indentless and draw(st.booleans()):
            step = 0
        block(draw, item, indent + step, out)


@st.composite
def block_documents(draw: st.DrawFn) -> str:
    tree = draw(trees)
    out: list[str] = []
    if draw(st.booleans()):
        out.append("---")
    if isinstance(tree, dict) and not tree:
        out.append("{}")
    elif isinstance(tree, str) or not tree:
        out.append(flow(draw, tree))
    else:
        block(draw, tree, draw(st.sampled_from([0, 0, 0, 1, 2])), out)
    out.append(draw(st.sampled_from(["", "...", "---", "--- ]]] {{", "...\n'unterminated"])))
    return "\n".join(out) + draw(st.sampled_from(["", "\n"]))


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[str]) -> str:
    text = draw(base)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "dup-line"]))
        pos = draw(st.integers(0, len(text)))
        if op == "insert":
            text = text[:pos] + draw(st.sampled_from(list(" -:#'\"[]{}\n\t&*!|>%~,?"))) + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + 1 :]
        elif op == "replace":
            text = text[:pos] + draw(st.sampled_from(YAML_TOKENS)) + text[pos + 1 :]
        else:
            lines = text.split("\n")
            i = pos % len(lines)
            lines.insert(i, lines[i])
            text = "\n".join(lines)
    return text


# --------------------------------------------------------------------------------------------
# Never anything but TaskRejected


@PROPS
@given(st.binary(max_size=2000))
def test_spec_5_arbitrary_bytes_only_raise_task_rejected(payload: bytes) -> None:
    only_rejections(payload)


@PROPS
@given(yamlish)
def test_spec_5_yamlish_text_only_raises_task_rejected(text: str) -> None:
    only_rejections(text.encode("utf-8", "surrogatepass"))


@PROPS
@given(mutated(st.sampled_from(VALID_MESSAGES)))
def test_spec_5_mutated_valid_messages_only_raise_task_rejected(text: str) -> None:
    only_rejections(text.encode())


@PROPS
@given(block_documents())
def test_spec_5_generated_documents_only_raise_task_rejected(text: str) -> None:
    only_rejections(text.encode())


# --------------------------------------------------------------------------------------------
# Fast path == ruamel.yaml path


def assert_fast_path_agrees(text: str) -> None:
    fast = _compose_fast(text, 100_000, 64)
    try:
        slow = _compose_slow(text, 100_000, 64)
    except TaskRejected:
        assert fast is None, "the fast path accepted a document ruamel.yaml rejects"
        return
    if fast is not None:
        assert norm(fast) == norm(slow)


@PROPS
@given(block_documents())
def test_spec_1_1_fast_path_agrees_with_ruamel_on_block_documents(text: str) -> None:
    assert_fast_path_agrees(text)


@PROPS
@given(mutated(block_documents()))
def test_spec_1_1_fast_path_agrees_with_ruamel_on_mutated_documents(text: str) -> None:
    assert_fast_path_agrees(text)


@PROPS
@given(st.one_of(yamlish, mutated(st.sampled_from(VALID_MESSAGES))))
def test_spec_1_1_fast_path_agrees_with_ruamel_on_yamlish_text(text: str) -> None:
    assert_fast_path_agrees(text)


def slow_outcome(text: str) -> Any:
    try:
        return norm(_compose_slow(text, 100_000, 64))
    except TaskRejected as exc:
        return exc.details


@PROPS
@given(
    before=st.one_of(st.sampled_from(["%YAML 1.1\n---\na: b\n", "{a", "- [&x"]), yamlish),
    text=st.one_of(yamlish, block_documents()),
)
@example(before="%YAML 1.1\n---\na: b\n", text="{task: quit, id: x?y}")
def test_spec_1_1_ruamel_path_keeps_no_state_between_messages(before: str, text: str) -> None:
    """The cached ruamel instance must read ``text`` as a fresh one would, whatever came before
    (a ``%YAML 1.1`` directive used to switch it to YAML 1.1 for good)."""
    parsing._local.yaml = None
    fresh = slow_outcome(text)
    slow_outcome(before)
    assert slow_outcome(text) == fresh
    assert len(parsing._ruamel().doc_infos) == 0


@pytest.mark.parametrize("text", [pytest.param(m, id=m.split("\n")[0]) for m in VALID_MESSAGES])
def test_spec_1_1_fast_path_reads_typical_messages(text: str) -> None:
    """Typical scheduler messages must not fall back to the (20x slower) ruamel path."""
    if "{" in text:
        assert _compose_fast(text, 100_000, 64) is None  # flow maps are outside the subset
        return
    fast = _compose_fast(text, 100_000, 64)
    assert fast is not None
    assert norm(fast) == norm(_compose_slow(text, 100_000, 64))


# --------------------------------------------------------------------------------------------
# What our emitter writes, our parser reads back

any_text = st.text(max_size=40)
# The fields that name things are validated (VM names, host names, transports): generate
# only what is valid there; other characters are covered by the rejection tests.
vm_names = st.text(max_size=40).filter(valid_vm_name)
task_ids = st.text(max_size=40).filter(valid_task_id)
hosts = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,30}", fullmatch=True)
transports = st.sampled_from(TRANSPORTS)


@PROPS
@given(vm_name=vm_names, destination=hosts, task_id=task_ids, transport=transports)
def test_spec_1_7_rendered_migrate_round_trips(
    vm_name: str, destination: str, task_id: str, transport: str
) -> None:
    payload = render_event(
        {
            "task": "migrate vm",
            "id": task_id,
            "vm-name": vm_name,
            "destination": destination,
            "time-measurement": True,
            "parameter": {"transport": transport, "vcpu-map": [[1, 2], [3]], "bandwidth": 10},
        }
    )
    msg = parse_task(payload)
    assert msg.id == task_id
    (spec,) = msg.subtasks
    assert isinstance(spec, MigrateSpec)
    assert (spec.vm_name, spec.destination, spec.time_measurement) == (
        vm_name,
        destination,
        True,
    )
    assert spec.parameter == MigrationParams(
        transport=transport, vcpu_map=((1, 2), (3,)), bandwidth=10
    )


@PROPS
@given(names=st.lists(vm_names, min_size=1, max_size=4))
def test_spec_1_3_and_1_4_rendered_lists_round_trip(names: list[str]) -> None:
    stop = parse_task(
        render_event({"task": "stop vm", "list": [{"vm-name": n, "force": True} for n in names]})
    )
    assert stop.subtasks == tuple(StopSpec(vm_name=n, force=True) for n in names)
    start = parse_task(
        render_event({"task": "start vm", "vm-configurations": [{"vm-name": n} for n in names]})
    )
    assert [s.vm_name for s in start.subtasks if isinstance(s, StartSpec)] == names
