"""A deterministic fuzz corpus of task messages (issue item 5).

``generate(seed, count)`` returns ``count`` :class:`Case` objects, the same bytes for the same
seed on every machine (only :class:`random.Random` and ``hashlib`` are used, never ``hash()``).
Every case is one MQTT payload plus what the agent must do with it, as far as the generator
knows:

* ``id`` is the unique id written into the payload (``fz-<index>-<check>``, or a weird variant
  of it), or ``None`` when none was written;
* ``id_rule`` says whether the answer must carry exactly that id (``exact``), must carry no id
  (``none``: id-less, id unreadable, or rejected before the YAML is read), or either (``maybe``:
  the damage may come before or inside the id, so the id may be missing or truncated);
* ``outcome`` is ``accept`` (parsed into a task: the answer is the task's own ``result``),
  ``reject`` (``result: unknown`` with ``code``) or ``any``.

Families (see ``_FAMILIES`` for the share of each): valid tasks of every type in block and flow
style; type flips; null values; truncations at random offsets; byte/line mutations; duplicate
keys; unknown tasks; multi-document payloads; legitimate anchors and aliases; alias bombs
(billion laughs, recursive and undefined aliases); deep nesting; huge lists (5,000 items,
exactly ``max-subtasks`` and one more, 50,000-item lists over the node limit); payloads over
1 MiB and of exactly 1 MiB; binary junk; invalid UTF-8; empty and non-map payloads;
unreadable ids; weird ids (escapes, line separators, lone surrogates, 10 KB); hostile stop
regexes; Unicode and control characters; tags and directives.

All payloads are distinct: a copy of a payload with the same id would be a duplicate (§7.4 of
the protocol), which is answered once for both messages.

``python tests/fuzz/corpus.py [--seed N] [--count N] [--out DIR]`` prints a summary and can
write the corpus to a directory (one file per case) for replaying with ``mosquitto_pub -f``.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Union

__all__ = ["DEFAULT_COUNT", "DEFAULT_SEED", "MAX_MESSAGE_SIZE", "MAX_SUBTASKS", "Case", "generate"]

DEFAULT_SEED = 20261122
DEFAULT_COUNT = 10_000
#: The agent's defaults (``limits.max-message-size``, ``limits.max-subtasks``).
MAX_MESSAGE_SIZE = 1_048_576
MAX_SUBTASKS = 1000

IdRule = Literal["exact", "none", "maybe"]
Outcome = Literal["accept", "reject", "any"]


@dataclass(frozen=True, slots=True)
class Case:
    index: int
    family: str
    payload: bytes
    #: The id written into the payload; ``None``: none was written.
    id: str | None
    id_rule: IdRule
    outcome: Outcome
    #: For ``reject``: the expected ``code``.
    code: str | None = None
    #: For ``accept``: the expected ``result:`` name.
    result: str | None = None
    #: One line on what this case is (for reports).
    note: str = ""


# --------------------------------------------------------------------------------------------
# A tiny YAML writer. Leaves are raw YAML scalar text, written verbatim, so a case can hold
# any spelling (``0x10``, ``'quoted'``, ``~``). ``Dup`` holds a map with duplicate keys.

Node = Union[str, dict[str, "Node"], list["Node"], "Dup"]


@dataclass(frozen=True, slots=True)
class Dup:
    """A map whose keys may repeat (a dict cannot hold that)."""

    items: tuple[tuple[str, Node], ...]


def _pairs(node: dict[str, Node] | Dup) -> list[tuple[str, Node]]:
    return list(node.items) if isinstance(node, Dup) else list(node.items())


def _is_map(node: Node) -> bool:
    return isinstance(node, dict | Dup)


def flow(node: Node) -> str:
    if _is_map(node):
        assert isinstance(node, dict | Dup)
        inner = ", ".join(f"{k}: {flow(v) if v != '' else '~'}" for k, v in _pairs(node))
        return "{" + inner + "}"
    if isinstance(node, list):
        return "[" + ", ".join(flow(v) if v != "" else "~" for v in node) + "]"
    assert isinstance(node, str)
    return node


def block(node: Node, indent: int = 0, *, flow_lists: bool = False) -> list[str]:
    """Block-style lines; nested lists inside lists and empty collections go flow style."""
    pad = " " * indent
    if _is_map(node):
        assert isinstance(node, dict | Dup)
        pairs = _pairs(node)
        if not pairs:
            return [pad + "{}"]
        lines: list[str] = []
        for key, value in pairs:
            head = f"{pad}{key}:"
            nested_map = _is_map(value) and bool(_pairs(value))  # type: ignore[arg-type]
            nested_list = isinstance(value, list) and bool(value) and not flow_lists
            if nested_map or nested_list:
                lines.append(head)
                lines.extend(block(value, indent + 2, flow_lists=flow_lists))
            elif isinstance(value, list | dict | Dup):
                lines.append(f"{head} {flow(value)}")
            else:
                lines.append(f"{head} {value}" if value != "" else head)
        return lines
    if isinstance(node, list):
        if not node:
            return [pad + "[]"]
        lines = []
        for item in node:
            if _is_map(item) and _pairs(item):  # type: ignore[arg-type]
                sub = block(item, indent + 2, flow_lists=flow_lists)
                sub[0] = f"{pad}- {sub[0][indent + 2 :]}"
                lines.extend(sub)
            elif isinstance(item, list | dict | Dup):
                lines.append(f"{pad}- {flow(item)}")
            else:
                lines.append(f"{pad}- {item}" if item != "" else f"{pad}-")
        return lines
    assert isinstance(node, str)
    return [pad + node]


def dq(text: str) -> str:
    """A YAML double-quoted scalar; controls, line separators and surrogates escaped."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif (
            code < 0x20
            or 0x7F <= code <= 0x9F
            or 0xD800 <= code <= 0xDFFF
            or ch in "\u2028\u2029\ufeff\ufffe\uffff"
        ):
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def sq(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# --------------------------------------------------------------------------------------------
# Valid tasks

VMS = ["web-1", "web-2", "db-1", "batch-7", "vm1", "vm2", "cache-3", "node_x", "a", "vm.9"]
HOSTS = ["host-a", "host-b", "host-c", "pandora1"]
BOOL_WORDS = [
    form
    for word in ("y", "n", "yes", "no", "true", "false", "on", "off")
    for form in (word, word.upper(), word.capitalize())
]
RESULT_NAMES = {
    "start vm": "vm started",
    "stop vm": "vm stopped",
    "suspend vm": "vm suspended",
    "resume vm": "vm resumed",
    "repin vm": "vm repinned",
    "migrate vm": "vm migrated",
    "evacuate node": "node evacuated",
    "quit": "quit",
    "status": "status",
    "cancel": "cancelled",
    "tune migration": "tuned",
}
LIST_KEYS = {
    "start vm": "vm-configurations",
    "stop vm": "list",
    "suspend vm": "list",
    "resume vm": "list",
}


def _name(r: random.Random) -> str:
    name = r.choice(VMS)
    style = r.random()
    if style < 0.1:
        return sq(name)
    if style < 0.2:
        return dq(name)
    return name


def _bool(r: random.Random) -> str:
    word = r.choice(BOOL_WORDS)
    return dq(word) if r.random() < 0.05 else word


def _uint(r: random.Random, low: int, high: int) -> str:
    value = r.randint(low, high)
    style = r.random()
    if style < 0.15:
        return hex(value)
    if style < 0.2:
        return f"+{value}"
    if style < 0.25:
        return sq(str(value))
    return str(value)


def _vcpu_map(r: random.Random, rows: int | None = None) -> list[Node]:
    n = rows if rows is not None else r.randint(1, 4)
    return [[_uint(r, 0, 7) for _ in range(r.randint(1, 3))] for _ in range(n)]


def _xml(r: random.Random) -> str:
    name = r.choice(VMS)
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>{r.randint(64, 4096)}"
        "</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>"
    )


def _optional(r: random.Random, out: dict[str, Node], key: str, make: Callable[[], Node]) -> None:
    if r.random() < 0.3:
        out[key] = make()


def _start_item(r: random.Random) -> dict[str, Node]:
    item: dict[str, Node] = {}
    if r.random() < 0.85:
        item["vm-name"] = _name(r)
    else:
        item["xml"] = dq(_xml(r))
        _optional(r, item, "transient", lambda: _bool(r))
    _optional(r, item, "vcpus", lambda: _uint(r, 1, 64))
    _optional(r, item, "memory", lambda: _uint(r, 65536, 1 << 26))
    _optional(r, item, "probe-with-ssh", lambda: _bool(r))
    _optional(r, item, "time-measurement", lambda: _bool(r))
    _optional(r, item, "concurrent-execution", lambda: _bool(r))
    if r.random() < 0.1:
        item["pci-ids"] = [{"vendor": "0x15b3", "device": _uint(r, 0, 0xFFFF)}]
    if r.random() < 0.1:
        item["devs"] = [{"pci-addr": sq(f"0000:{r.randint(0, 255):02x}:00.{r.randint(0, 7)}")}]
    if r.random() < 0.05:
        item["ivshmem"] = {"id": "shm0", "size": _uint(r, 1, 1024), "path": "/dev/shm/x"}
    if r.random() < 0.1:
        item["vcpu-map"] = _vcpu_map(r)
    if r.random() < 0.05:
        item["memnode-map"] = _vcpu_map(r)
    if r.random() < 0.05:
        item["probe-hostname"] = r.choice(HOSTS)
    if r.random() < 0.05:
        item["driver"] = r.choice(["qemu", "lxctools"])
    return item


def _stop_item(r: random.Random) -> dict[str, Node]:
    item: dict[str, Node] = {}
    if r.random() < 0.8:
        item["vm-name"] = _name(r)
    else:
        item["regex"] = r.choice(["batch-\\d+", "'web-[12]'", "vm.*", "'(db|cache)-\\d'"])
    _optional(r, item, "force", lambda: _bool(r))
    _optional(r, item, "undefine", lambda: _bool(r))
    _optional(r, item, "force-after-timeout", lambda: _bool(r))
    _optional(r, item, "time-measurement", lambda: _bool(r))
    return item


def _parameter(r: random.Random, *, evacuate: bool = False) -> dict[str, Node]:
    p: dict[str, Node] = {}
    choices: list[tuple[str, Callable[[], Node]]] = [
        ("migration-type", lambda: r.choice(["live", "warm", "offline", "post-copy"])),
        ("rdma-migration", lambda: _bool(r)),
        ("transport", lambda: r.choice(["ssh", "tcp", "tls"])),
        ("max-downtime", lambda: _uint(r, 1, 2000)),
        ("bandwidth", lambda: _uint(r, 1, 10000)),
        ("auto-converge", lambda: _bool(r)),
        ("compressed", lambda: _bool(r)),
        ("parallel-connections", lambda: _uint(r, 1, 8)),
        ("completion-timeout", lambda: r.choice(["120", "90.5", ".5", "600"])),
        ("timeout-action", lambda: r.choice(["abort", "post-copy", "suspend"])),
        ("persist", lambda: _bool(r)),
        ("tls", lambda: _bool(r)),
        ("retry-counter", lambda: _uint(r, 0, 3)),
        ("retry_counter", lambda: _uint(r, 0, 3)),
        ("pscom-hook-procs", lambda: r.choice(["0", "0", "4", "auto"])),
        ("copy-storage", lambda: r.choice(["none", "all", "inc", "'all'"])),
        # Issue 17: keys that go with any other (the stream rules judge the rest).
        ("progress-timeout", lambda: r.choice(["0", "5", "150", "2.5"])),
        ("postcopy-bandwidth", lambda: _uint(r, 0, 1000)),
    ]
    if evacuate:
        choices += [
            ("mode", lambda: r.choice(["auto", "compact", "scatter"])),
            ("overbooking", lambda: _bool(r)),
            ("max-parallel", lambda: _uint(r, 1, 4)),
        ]
    else:
        choices += [
            ("vcpu-map", lambda: _vcpu_map(r)),
            ("swap-with", lambda: {"vm-name": _name(r)}),
        ]
    for key, make in r.sample(choices, r.randint(0, 5)):
        p[key] = make()
    if p.get("copy-storage", "none") != "none":
        # Only with a storage copy (issue 16): with none either key rejects the message.
        _optional(r, p, "migrate-disks", lambda: r.sample(DISKS, r.randint(0, 3)))
        _optional(r, p, "copy-storage-synchronous-writes", lambda: _bool(r))
    return p


#: ``migrate-disks`` entries: distinct target devs.
DISKS = ["vda", "vdb", "vdc", "sda", "hdc", "xvda", "'vde'", "nvme0n1"]


def _body(r: random.Random, kind: str, items: int | None = None) -> dict[str, Node]:
    """The task-specific keys of a valid message of ``kind``."""
    body: dict[str, Node] = {}
    if kind in LIST_KEYS:
        n = items if items is not None else r.choice([1, 1, 1, 2, 2, 3, 4])
        make = {
            "start vm": _start_item,
            "stop vm": _stop_item,
        }.get(kind, lambda r: {"vm-name": _name(r)})
        body[LIST_KEYS[kind]] = [make(r) for _ in range(n)]
    elif kind == "repin vm":
        body["vm-name"] = _name(r)
        body["vcpu-map"] = _vcpu_map(r)
    elif kind == "migrate vm":
        body["vm-name"] = _name(r)
        body["destination"] = r.choice(HOSTS)
        _optional(r, body, "time-measurement", lambda: _bool(r))
        if r.random() < 0.7:
            body["parameter"] = _parameter(r)
    elif kind == "evacuate node":
        body["destinations"] = r.sample(HOSTS, r.randint(1, 3))
        _optional(r, body, "time-measurement", lambda: _bool(r))
        if r.random() < 0.6:
            body["parameter"] = _parameter(r, evacuate=True)
    elif kind == "cancel":
        body["target"] = f"nothing-{r.randint(0, 10**9)}"
    elif kind == "tune migration":
        body.update(_tune(r))
    return body


def _true(r: random.Random) -> str:
    return r.choice([w for w in BOOL_WORDS if w.lower() in {"y", "yes", "true", "on"}])


def _tune(r: random.Random) -> dict[str, Node]:
    """``tune migration``: a target, maybe a VM, at least one change, never both post-copy
    and force-complete (issue 17)."""
    body: dict[str, Node] = {"target": r.choice([f"mig-{r.randint(0, 10**9)}", sq("0012")])}
    _optional(r, body, "vm-name", lambda: _name(r))
    changes: list[tuple[str, Callable[[], Node]]] = [
        ("bandwidth", lambda: _uint(r, 0, 10000)),
        ("max-downtime", lambda: _uint(r, 1, 2000)),
        (r.choice(["post-copy", "force-complete"]), lambda: _true(r)),
    ]
    for key, make in r.sample(changes, r.randint(1, 3)):
        body[key] = make()
    return body


KIND_WEIGHTS = {
    "start vm": 18,
    "stop vm": 14,
    "suspend vm": 8,
    "resume vm": 8,
    "repin vm": 8,
    "migrate vm": 18,
    "evacuate node": 8,
    "quit": 4,
    "status": 8,
    "cancel": 6,
    "tune migration": 4,
}


def make_id(index: int) -> str:
    """``fz-00042-1a2b``: fixed width, so a truncated id never equals another case's id."""
    check = hashlib.blake2b(str(index).encode(), digest_size=2).hexdigest()
    return f"fz-{index:05d}-{check}"


@dataclass(slots=True)
class Message:
    """A valid message before writing: its map, and how to write it."""

    kind: str
    tree: dict[str, Node]
    id: str | None
    style: Literal["block", "flow", "block-flow-lists"]

    def text(self) -> str:
        if self.style == "flow":
            return flow(self.tree) + "\n"
        lines = block(self.tree, flow_lists=self.style == "block-flow-lists")
        return "\n".join(lines) + "\n"


def valid_message(
    r: random.Random,
    task_id: str | None,
    *,
    kind: str | None = None,
    id_first: bool = False,
    style: str | None = None,
    items: int | None = None,
) -> Message:
    kinds = list(KIND_WEIGHTS)
    kind = kind or r.choices(kinds, weights=[KIND_WEIGHTS[k] for k in kinds])[0]
    body = _body(r, kind, items)
    tree: dict[str, Node] = {}
    placement = "first" if id_first else r.choice(["first", "first", "first", "second", "last"])
    if task_id is not None and placement == "first":
        tree["id"] = task_id
    tree["task"] = kind if r.random() < 0.9 else sq(kind)
    if task_id is not None and placement == "second":
        tree["id"] = task_id
    tree.update(body)
    if r.random() < 0.1:
        tree["concurrent-execution"] = _bool(r)
    if r.random() < 0.05:
        tree["host"] = r.choice(HOSTS)  # unknown keys are ignored
    if r.random() < 0.03:
        tree["live-migration"] = _bool(r)
    if task_id is not None and placement == "last":
        tree["id"] = task_id
    chosen = style or r.choices(["block", "flow", "block-flow-lists"], weights=[70, 15, 15])[0]
    return Message(kind, tree, task_id, chosen)  # type: ignore[arg-type]


def _decorate(r: random.Random, text: str) -> str:
    """Harmless framing: document markers, comments, trailing blank lines."""
    if r.random() < 0.2:
        text = "---\n" + text
    if r.random() < 0.1:
        text = text + "...\n"
    if r.random() < 0.1:
        text = "# a comment\n" + text
    if r.random() < 0.05:
        text = text + "\n\n"
    return text


# --------------------------------------------------------------------------------------------
# Families. Each returns a Case without its index (filled in by ``generate``).

Family = Callable[[random.Random, str], Case]


def _case(family: str, payload: bytes | str, task_id: str | None, id_rule: IdRule, **kw: object):
    data = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    return Case(index=-1, family=family, payload=data, id=task_id, id_rule=id_rule, **kw)  # type: ignore[arg-type]


def fam_valid(r: random.Random, tid: str) -> Case:
    with_id = r.random() >= 0.08
    msg = valid_message(r, tid if with_id else None)
    text = _decorate(r, msg.text())
    return _case(
        "valid",
        text,
        msg.id,
        "exact" if with_id else "none",
        outcome="accept",
        result=RESULT_NAMES[msg.kind],
        note=f"{msg.kind}, {msg.style}",
    )


#: Values of another type than the field expects (all valid YAML in block and flow context).
FLIPS: list[Node] = [
    [],
    {},
    ["a", "b"],
    {"x": "1"},
    [["0"]],
    "-1",
    "4294967296",
    "18446744073709551616",
    "1e3",
    "12.0",
    "0x",
    "0xFFFFFFFFFFFFFFFFFF",
    "1_000",
    "maybe",
    "tRuE",
    "'yes'",
    "!!binary aGVsbG8=",
    ".inf",
    "-.5",
    "0o17",
    "0b101",
    "''",
    "' '",
    "x" * 300,
    "2026-11-22",
    "12:30:00",
    "!!int 7",
]


def _paths(node: Node, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Every path below the root (map keys and list indices)."""
    out: list[tuple[object, ...]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append((*prefix, key))
            out.extend(_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.append((*prefix, i))
            out.extend(_paths(value, (*prefix, i)))
    return out


def _set(tree: Node, path: tuple[object, ...], value: Node) -> None:
    node = tree
    for step in path[:-1]:
        node = node[step]  # type: ignore[index]
    node[path[-1]] = value  # type: ignore[index]


def fam_flip(r: random.Random, tid: str) -> Case:
    msg = valid_message(r, tid)
    paths = [p for p in _paths(msg.tree) if p != ("id",)]
    path = r.choice(paths)
    flipped: Node = r.choice(FLIPS)
    _set(msg.tree, path, flipped)
    return _case(
        "flip",
        msg.text(),
        tid,
        "exact",
        outcome="any",
        note=f"{msg.kind}: {'.'.join(map(str, path))} = {str(flipped)[:30]}",
    )


NULLS = ["", "~", "null", "Null", "NULL"]


def fam_null(r: random.Random, tid: str) -> Case:
    msg = valid_message(r, tid)
    paths = [p for p in _paths(msg.tree) if p != ("id",) and p[0] not in {"host", "live-migration"}]
    if not paths:  # quit / status: only id and task
        paths = [("task",)]
    path = r.choice(paths)
    null = r.choice(NULLS)
    _set(msg.tree, path, null)
    return _case(
        "null",
        msg.text(),
        tid,
        "exact",
        outcome="reject",
        code="invalid-message",
        note=f"{msg.kind}: {'.'.join(map(str, path))} = {null!r}",
    )


def fam_truncate(r: random.Random, tid: str) -> Case:
    msg = valid_message(r, tid)
    data = _decorate(r, msg.text()).encode()
    cut = r.randrange(0, len(data))
    return _case("truncate", data[:cut], tid, "maybe", outcome="any", note=f"cut at {cut}")


TOKENS = [
    ": ", ":", "- ", "-", "\n", "\n  ", "\n- ", " ", "[", "]", "{", "}", ", ", "'", '"', "#",
    "---", "...", "\n---\n", "\n...\n", "&a ", "*a", "!!str ", "|\n  ", ">-\n  ", "? ", "%",
    "\\", "\t", "\r\n", "~", "@", "`", "|", ">", "!", "&", "*", "\x00", "\x7f", "\u2028",
]  # fmt: skip


def fam_mutate(r: random.Random, tid: str) -> Case:
    msg = valid_message(r, tid)
    text = msg.text()
    ops = []
    for _ in range(r.randint(1, 3)):
        op = r.choice(["insert", "delete", "replace", "dup-line", "swap-lines", "indent"])
        ops.append(op)
        pos = r.randrange(0, len(text) + 1)
        if op == "insert":
            text = text[:pos] + r.choice(TOKENS) + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + r.randint(1, 8) :]
        elif op == "replace" and text:
            pos = min(pos, len(text) - 1)
            text = text[:pos] + chr(r.choice([*range(0x20, 0x7F), 0x09, 0x0A])) + text[pos + 1 :]
        else:
            lines = text.split("\n")
            i, j = r.randrange(len(lines)), r.randrange(len(lines))
            if op == "dup-line":
                lines.insert(j, lines[i])
            elif op == "swap-lines":
                lines[i], lines[j] = lines[j], lines[i]
            else:
                lines[i] = " " * r.randint(1, 5) + lines[i]
            text = "\n".join(lines)
    return _case("mutate", text, tid, "maybe", outcome="any", note=",".join(ops))


def fam_dupkey(r: random.Random, tid: str) -> Case:
    """A repeated key: the first occurrence wins, so the message means what it meant."""
    msg = valid_message(r, tid, style=r.choice(["block", "flow"]))
    pairs = list(msg.tree.items())
    where = r.random()
    note = ""
    if where < 0.4:
        # A second top-level key, e.g. task: dance vm, id: decoy-...; first one wins.
        key = r.choice(["task", "id", *[k for k, _ in pairs]])
        value: Node = {"task": "dance vm", "id": f"decoy-{tid}"}.get(key, r.choice(FLIPS))
        pairs.append((key, value))
        note = f"top-level {key} twice"
    else:
        items = next((v for v in msg.tree.values() if isinstance(v, list) and v), None)
        first = items[0] if items else None
        if isinstance(first, dict) and first:
            key = r.choice(list(first))
            items[0] = Dup((*first.items(), (key, r.choice(FLIPS))))  # type: ignore[index]
            note = f"item key {key} twice"
        else:
            pairs.insert(0, ("task", msg.tree["task"]))
            note = "task twice (same value)"
    tree = Dup(tuple(pairs))
    text = flow(tree) + "\n" if msg.style == "flow" else "\n".join(block(tree)) + "\n"
    return _case(
        "dupkey", text, tid, "exact", outcome="accept", result=RESULT_NAMES[msg.kind], note=note
    )


UNKNOWN_TASKS = [
    "dance vm", "Start VM", "start  vm", "startvm", "start-vm", "START VM", "migrate", "vm start",
    "stop", "'stop vm '", "\"\\tquit\"", "123", "0x10", "yes", "'~'", "\"\"", "\"start vm\\n\"",
    "héllo", "'Quit'", "\"status\\u0000\"", "'evacuate  node'", "nop", "'-'", "'- start vm'",
    "'" + "a" * 5000 + "'",
]  # fmt: skip


def fam_unknown_task(r: random.Random, tid: str) -> Case:
    msg = valid_message(r, tid)
    task = r.choice(UNKNOWN_TASKS)
    if r.random() < 0.5:
        task = sq(f"task-{r.randint(0, 10**6)}")
    msg.tree["task"] = task
    return _case(
        "unknown-task", msg.text(), tid, "exact", outcome="reject", code="unknown-task", note=task
    )


def fam_multidoc(r: random.Random, tid: str) -> Case:
    """Only the first document counts; later ones (with a decoy id) are never read."""
    first = valid_message(r, tid)
    second = valid_message(r, f"decoy-{tid}")
    variant = r.randrange(6)
    text = first.text()
    if variant == 0:
        payload = text + "---\n" + second.text()
    elif variant == 1:
        payload = "---\n" + text + "...\n---\n" + second.text() + "...\n"
    elif variant == 2:
        payload = text + "...\n" + "garbage: [unclosed\n\x01\x02 {{{"
    elif variant == 3:
        payload = text + "---\n"  # the original's trailing marker
    elif variant == 4:
        payload = "%YAML 1.2\n---\n" + text + "...\n%YAML 1.1\n---\n" + second.text()
    else:
        # The first document is empty: not a task, and the decoy must not be read either.
        payload = "---\n# nothing\n---\n" + second.text()
        return _case(
            "multidoc",
            payload,
            None,
            "none",
            outcome="reject",
            code="invalid-message",
            note="empty first document",
        )
    return _case(
        "multidoc",
        payload,
        tid,
        "exact",
        outcome="accept",
        result=RESULT_NAMES[first.kind],
        note=f"variant {variant}",
    )


def fam_anchors(r: random.Random, tid: str) -> Case:
    """Legitimate anchors and aliases."""
    variant = r.randrange(5)
    name = r.choice(VMS)
    if variant == 0:
        text = (
            f"id: {tid}\ntask: stop vm\nlist:\n  - vm-name: &n {name}\n    force: &f yes\n"
            "  - vm-name: *n\n    force: *f\n"
        )
        kind = "stop vm"
    elif variant == 1:
        text = (
            f"id: {tid}\ntask: start vm\nvm-configurations:\n  - &item\n    vm-name: {name}\n"
            "    probe-with-ssh: false\n  - *item\n"
        )
        kind = "start vm"
    elif variant == 2:
        text = (
            f"id: {tid}\ntask: migrate vm\nvm-name: {name}\ndestination: &d host-b\n"
            "parameter: &p\n  migration-type: live\n  max-downtime: 300\nunused: [*d, *p]\n"
        )
        kind = "migrate vm"
    elif variant == 3:
        text = f"id: {tid}\ntask: &t status\nalso: *t\n"
        kind = "status"
    else:
        # A merge key is just an unknown key here (yaml-cpp has no merge): only optional
        # keys come through it, so the message stays valid.
        text = (
            f"id: {tid}\ntask: repin vm\nbase: &b\n  time-measurement: true\n"
            f"vm-name: {name}\nvcpu-map: [[0], [1]]\n<<: *b\n"
        )
        kind = "repin vm"
    return _case(
        "anchors", text, tid, "exact", outcome="accept", result=RESULT_NAMES[kind], note=kind
    )


def _laughs(levels: int, fan: int) -> str:
    lines = ["lol0: &l0 lol"]
    for i in range(1, levels + 1):
        lines.append(f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan)}]")
    return "\n".join(lines)


def fam_alias_bomb(r: random.Random, tid: str) -> Case:
    variant = r.randrange(6)
    if variant == 0:
        # The classic: 10^9 nodes when expanded.
        text = f"id: {tid}\ntask: status\n{_laughs(9, 10)}\n"
        return _case(
            "alias-bomb",
            text,
            tid,
            "exact",
            outcome="reject",
            code="invalid-message",
            note="billion laughs 10^9",
        )
    if variant == 1:
        levels, fan = r.choice([(5, 10), (17, 2), (4, 20), (3, 50)])
        bomb = _laughs(levels, fan)
        # Alias bomb inside a list item of a real task.
        text = f"id: {tid}\ntask: stop vm\n{bomb}\nlist:\n  - vm-name: x\n    extra: *l{levels}\n"
        return _case(
            "alias-bomb",
            text,
            tid,
            "exact",
            outcome="reject",
            code="invalid-message",
            note=f"bomb {fan}^{levels} in an item",
        )
    if variant == 2:
        # Small enough to be fine: 10^3 nodes in an unknown key.
        text = f"id: {tid}\ntask: status\n{_laughs(3, 10)}\n"
        return _case(
            "alias-bomb",
            text,
            tid,
            "exact",
            outcome="accept",
            result="status",
            note="10^3 nodes: under the limit",
        )
    if variant == 3:
        text = f"id: {tid}\ntask: status\nloop: &a [x, *a]\n"
        return _case(
            "alias-bomb",
            text,
            tid,
            "exact",
            outcome="reject",
            code="invalid-message",
            note="recursive alias",
        )
    if variant == 4:
        text = f"id: {tid}\ntask: status\nx: *nowhere\n"
        return _case(
            "alias-bomb",
            text,
            tid,
            "exact",
            outcome="reject",
            code="invalid-message",
            note="undefined alias",
        )
    # Deep via aliases: each level nests the previous one.
    lines = [f"id: {tid}", "task: status", "d0: &d0 [x]"]
    for i in range(1, 70):
        lines.append(f"d{i}: &d{i} [*d{i - 1}]")
    return _case(
        "alias-bomb",
        "\n".join(lines) + "\n",
        tid,
        "exact",
        outcome="reject",
        code="invalid-message",
        note="70 levels through aliases",
    )


def fam_deep(r: random.Random, tid: str) -> Case:
    """Nesting around and over ``max-yaml-depth`` (64). Each ``[`` costs ruamel.yaml time
    (quadratic up to about 1,000), so the random ones stay shallow; see ``SPECIALS``."""
    variant = r.randrange(5)
    if variant == 0:
        depth = r.randint(1, 55)
        nested = "[" * depth + "x" + "]" * depth
        return _case(
            "deep",
            f"id: {tid}\ntask: status\nx: {nested}\n",
            tid,
            "exact",
            outcome="accept",
            result="status",
            note=f"depth {depth}",
        )
    if variant == 1:
        depth = r.randint(70, 150)
        nested = "[" * depth + "x" + "]" * depth
        return _case(
            "deep",
            f"id: {tid}\ntask: status\nx: {nested}\n",
            tid,
            "exact",
            outcome="reject",
            code="invalid-message",
            note=f"depth {depth}",
        )
    if variant == 2:
        depth = r.randint(70, 400)
        lines = [f"id: {tid}", "task: status"]
        lines += [" " * i + f"k{i}:" for i in range(depth)]
        return _case(
            "deep",
            "\n".join(lines) + " v\n",
            tid,
            "exact",
            outcome="reject",
            code="invalid-message",
            note=f"{depth} nested block maps",
        )
    if variant == 3:
        depth = r.randint(70, 2000)
        nested = "{a: " * depth + "x" + "}" * depth
        return _case(
            "deep",
            f"id: {tid}\ntask: status\nx: {nested}\n",
            tid,
            "exact",
            outcome="reject",
            code="invalid-message",
            note=f"flow maps {depth}",
        )
    depth = r.randint(56, 69)  # around the limit of 64: either answer is fine
    nested = "[" * depth + "x" + "]" * depth
    return _case(
        "deep",
        f"id: {tid}\ntask: status\nx: {nested}\n",
        tid,
        "exact",
        outcome="any",
        note=f"depth {depth} (near the limit)",
    )


def _items(kind: str, n: int, *, flow_style: bool = False) -> str:
    key = LIST_KEYS[kind]
    if flow_style:
        return f"{key}: [" + ", ".join(f"{{vm-name: v{i}}}" for i in range(n)) + "]\n"
    return f"{key}:\n" + "".join(f"  - vm-name: v{i}\n" for i in range(n))


def _special_cases() -> list[Callable[[random.Random, str], Case]]:
    """Expensive or boundary cases, each in the corpus exactly once (whatever the count).

    Costs are ruamel.yaml's (a 2-core machine): the 50,000-item list takes about 6 s to reach
    the node limit, 1,000 nested ``[`` about 0.5 s; the rest well under 0.5 s.
    """
    reject = {"outcome": "reject", "code": "invalid-message"}

    def huge(
        kind: str, n: int, *, flow_style: bool = False
    ) -> Callable[[random.Random, str], Case]:
        def make(r: random.Random, tid: str) -> Case:
            text = f"id: {tid}\ntask: {kind}\n" + _items(kind, n, flow_style=flow_style)
            note = f"{kind} with {n} items{' (flow)' if flow_style else ''}"
            if n <= MAX_SUBTASKS:
                return _case(
                    "huge",
                    text,
                    tid,
                    "exact",
                    outcome="accept",
                    result=RESULT_NAMES[kind],
                    note=note,
                )
            return _case("huge", text, tid, "exact", note=note, **reject)  # type: ignore[arg-type]

        return make

    def fixed(
        family: str, text_of: Callable[[str], str | bytes], id_rule: IdRule, note: str, **kw: object
    ) -> Callable[[random.Random, str], Case]:
        def make(r: random.Random, tid: str) -> Case:
            return _case(
                family, text_of(tid), tid if id_rule == "exact" else None, id_rule, note=note, **kw
            )

        return make

    def over_limit(tid: str) -> str:
        head = f"id: {tid}\ntask: status\npad: "
        return head + "x" * (MAX_MESSAGE_SIZE - len(head) - 1) + "\n\n"

    def at_limit(tid: str) -> str:
        head = f'id: {tid}\ntask: start vm\nvm-configurations:\n  - xml: "<name>big</name><!--'
        tail = '-->"\n    probe-with-ssh: false\n'
        return head + "z" * (MAX_MESSAGE_SIZE - len(head) - len(tail)) + tail

    def big_xml(tid: str) -> str:
        head = f'id: {tid}\ntask: start vm\nvm-configurations:\n  - xml: "<name>big</name>'
        return head + "z" * (MAX_MESSAGE_SIZE * 3 // 2) + '"\n'

    def junk(size: int) -> Callable[[str], bytes]:
        return lambda tid: random.Random(size).randbytes(size)

    def nested(depth: int, *, closed: bool = True) -> Callable[[str], str]:
        tail = "x" + "]" * depth if closed else ""
        return lambda tid: f"id: {tid}\ntask: status\nx: " + "[" * depth + tail + "\n"

    return [
        huge("suspend vm", 5000),
        huge("start vm", 5000),
        huge("resume vm", 5000, flow_style=True),
        huge("stop vm", MAX_SUBTASKS),
        huge("resume vm", MAX_SUBTASKS + 1),
        fixed(
            "huge",
            lambda tid: f"id: {tid}\ntask: suspend vm\nlist:\n" + "  - vm-name: v\n" * 50_000,
            "exact",
            "50000 items: over max-yaml-nodes",
            **reject,
        ),
        fixed(
            "huge",
            lambda tid: (
                f"id: {tid}\ntask: repin vm\nvm-name: v\nvcpu-map:\n"
                + "".join(f"  - [{i % 8}]\n" for i in range(5000))
            ),
            "exact",
            "vcpu-map of 5000 rows",
            outcome="accept",
            result="vm repinned",
        ),
        fixed(
            "huge",
            lambda tid: (
                f"id: {tid}\ntask: evacuate node\ndestinations: ["
                + ", ".join(f"h{i}" for i in range(5000))
                + "]\n"
            ),
            "exact",
            "5000 destinations",
            outcome="accept",
            result="node evacuated",
        ),
        fixed(
            "huge",
            lambda tid: f"id: {tid}\ntask: status\npad: [" + ", ".join(["0"] * 20000) + "]\n",
            "exact",
            "20000 items in an unknown key",
            outcome="accept",
            result="status",
        ),
        fixed("deep", nested(1000), "exact", "1000 nested [", **reject),
        fixed("deep", nested(4000), "exact", "4000 nested [", **reject),
        fixed("deep", nested(300_000, closed=False), "exact", "300000 unclosed [", **reject),
        # Over max-message-size: rejected before the YAML is read, so without the id.
        fixed("oversize", over_limit, "none", "max-message-size + 1", **reject),
        fixed("oversize", big_xml, "none", "1.5 MiB start item", **reject),
        fixed("oversize", junk(MAX_MESSAGE_SIZE + 4096), "none", "binary over the limit", **reject),
        fixed(
            "oversize",
            at_limit,
            "exact",
            "exactly max-message-size",
            outcome="accept",
            result="vm started",
        ),
        fixed("oversize", junk(MAX_MESSAGE_SIZE), "none", "binary at the limit", **reject),
    ]


def fam_binary(r: random.Random, tid: str) -> Case:
    variant = r.random()
    if variant < 0.6:
        data = r.randbytes(r.randint(1, 2000))
    elif variant < 0.8:
        data = b"task: start vm\n" + r.randbytes(r.randint(1, 500))
    else:
        # Mostly text-like junk that is valid UTF-8 (reaches the YAML parser).
        data = bytes(
            r.choice(b"\n\t []{}:,-#&*!|>'\"%@`?abcxyz019") for _ in range(r.randint(1, 300))
        )
    return _case(
        "binary",
        data,
        None,
        "none",
        outcome="reject",
        code="invalid-message",
        note=f"{len(data)} bytes",
    )


BAD_UTF8 = [
    b"\xff", b"\xfe", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80",
    b"\xe2\x82", b"\xf0\x9f\x98", b"\xe9", b"\xc1\xbf", b"\xf8\x88\x80\x80\x80",
]  # fmt: skip


def fam_bad_utf8(r: random.Random, tid: str) -> Case:
    msg = valid_message(r, tid)
    data = msg.text().encode()
    bad = r.choice(BAD_UTF8)
    pos = r.randrange(0, len(data) + 1)
    return _case(
        "bad-utf8",
        data[:pos] + bad + data[pos:],
        tid,
        "none",
        outcome="reject",
        code="invalid-message",
        note=f"{bad!r} at {pos}",
    )


NOT_TASKS = [
    "", " ", "\n", "---", "---\n", "...", "...\n", "---\n...\n", "# only a comment", "~", "null",
    "[]", "{}", "- a\n- b", "42", "'str'", '"task: start vm"', "task", "true", "[task, start vm]",
    "- task: start vm\n  id: x", "!!binary aGVsbG8=", "|\n  task: status", "? [a]\n: b",
    "{task: }", "task:", "task: ~", "task: []", "task: {}", "task: [status]",
]  # fmt: skip


def fam_not_a_task(r: random.Random, tid: str) -> Case:
    variant = r.random()
    if variant < 0.3:
        # A map with an id but no task: rejected, with the id.
        text = f"id: {tid}\nvm-name: {r.choice(VMS)}\nlist: [{{vm-name: a}}]\n"
        return _case(
            "not-a-task",
            text,
            tid,
            "exact",
            outcome="reject",
            code="invalid-message",
            note="no task key",
        )
    base = r.choice(NOT_TASKS)
    pad = r.choice(["", "\n", "\n\n", " ", "  \n", "\n# c\n", f"\n# {r.randint(0, 10**6)}\n"])
    return _case(
        "not-a-task",
        base + pad,
        None,
        "none",
        outcome="reject",
        code="invalid-message",
        note=repr(base)[:40],
    )


BAD_IDS: list[tuple[Node, Outcome]] = [
    (["a", "b"], "reject"),
    ({"k": "v"}, "reject"),
    ([], "reject"),
    ({}, "reject"),
    ("~", "reject"),
    ("null", "reject"),
    ("NULL", "reject"),
    ("", "reject"),
    ("''", "accept"),  # an empty id counts as no id
    ('""', "accept"),
]


def fam_bad_id(r: random.Random, tid: str) -> Case:
    msg = valid_message(r, tid)
    value, outcome = r.choice(BAD_IDS)
    msg.tree["id"] = value
    return _case(
        "bad-id",
        msg.text(),
        None,
        "none",
        outcome=outcome,
        code="invalid-message" if outcome == "reject" else None,
        result=RESULT_NAMES[msg.kind] if outcome == "accept" else None,
        note=f"id: {flow(value) if value != '' else ''}",
    )


WEIRD_SUFFIXES = [
    " with spaces", ": colon", " #hash", "'quote", '"dq', "\\back", "\ttab", "\nnewline",
    "\u2028ls", "\u2029ps", "\x85nel", "\ufeffbom", "\x00nul", "\x01ctl", "\x7fdel",
    "\ud800", "\udfff", "\U0001f600", "\u202eevil", "é", "日本", "---", "...", " ", "0012",
    "yes", "~", "&a", "*a", "!tag", "%", "@", "`", "{x}", "[y]", ",", "?", "|", ">",
    "\uffff", "\ufffe", "x" * 10_000, "\x1b[2J\x1b[Hsuccess", "\x1b]52;c;cHduZWQ=\x07",
    "\x9b31m", "\r\x1b[Kdone", "\u2066iso",
]  # fmt: skip


#: What an id may not be (docs/protocol.md §3.1): longer than 256 characters, or holding C0/C1
#: controls, DEL, line/paragraph separators or bidirectional controls.
MAX_ID = 256
UNSAFE_IN_ID = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def fam_weird_id(r: random.Random, tid: str) -> Case:
    """Ids the agent must echo exactly (rendered double-quoted with escapes)."""
    weird = tid + r.choice(WEIRD_SUFFIXES)
    if r.random() < 0.2:
        weird = r.choice(WEIRD_SUFFIXES).lstrip() + tid
    msg = valid_message(r, tid)
    msg.tree["id"] = dq(weird)
    if len(weird) > MAX_ID or UNSAFE_IN_ID.search(weird):
        # Ids are bounded and hold no control or bidirectional characters (issue 13): the
        # message is refused, and the id is not echoed.
        return _case(
            "weird-id",
            msg.text(),
            weird,
            "none",
            outcome="reject",
            code="invalid-message",
            note=repr(weird)[:40],
        )
    if any("\ud800" <= ch <= "\udfff" for ch in weird):
        # A lone surrogate is not a character: the whole message is refused, and the id
        # (which holds it) cannot be echoed.
        return _case(
            "weird-id",
            msg.text(),
            weird,
            "none",
            outcome="reject",
            code="invalid-message",
            note=repr(weird)[:40],
        )
    return _case(
        "weird-id",
        msg.text(),
        weird,
        "exact",
        outcome="accept",
        result=RESULT_NAMES[msg.kind],
        note=repr(weird)[:40],
    )


HOSTILE_REGEXES = [
    "'['", "'('", "'a**'", "'\\'", "'(?P<a>x)(?P<a>y)'", "'(?<=a+)b'", "'\\p{L}'",
    "'a{4294967296}'", "'a{1000000}'", "'(a+)+$'", "'(.*a){20}'", "'((((((((((x))))))))))'",
    "'" + "(" * 300 + "x" + ")" * 300 + "'",
    "'" + "(" * 1000 + "x" + ")" * 1000 + "'", "'" + "(a|" * 200 + "b" + ")" * 200 + "'",
    "'x{0,65535}'", "'.*'", "''", "'\\d+'", "'(?i)WEB-.*'", "'[^\\x00-\\x7f]+'",
    "'" + "a" * 20_000 + "'",
    # issue 13: froze the agent for 135 s under Python's re; RE2 refuses what it cannot do
    "'" + "(.*)" * 15 + "X'", "'" + "(.*)" * 64 + "X'", "'(vm)\\1'", "'(?=vm)vm1'",
]  # fmt: skip

#: Tasks that ask for what belongs to the host (issue 13): each is accepted as a message and
#: refused per VM (``not-supported``) by the default policy.
HOST_GRABS = [
    ("start vm", "vm-configurations:\n  - vm-name: g1\n    devs: [{pci-addr: '0000:00:1f.2'}]\n"),
    ("start vm", "vm-configurations:\n  - vm-name: g1\n"
                 "    pci-ids: [{vendor: 0x8086, device: 0x2922}]\n"),
    ("start vm", "vm-configurations:\n  - xml: \"<domain><name>g1</name><devices><disk type='file'>"
                 "<source file='/etc/shadow'/><target dev='vda'/></disk></devices></domain>\"\n"),
    ("start vm", "vm-configurations:\n  - xml: \"<domain xmlns:qemu='http://libvirt.org/schemas/"
                 "domain/qemu/1.0'><name>g1</name><qemu:commandline><qemu:arg value='-S'/>"
                 "</qemu:commandline></domain>\"\n"),
    # the regexes that read names from domain XML backtracked for seconds on these shapes
    ("start vm", "vm-configurations:\n  - xml: '" + "<name>" * 8000 + "'\n"),
    ("start vm", "vm-configurations:\n  - vm-name: g1\n    xml: '<domain><name>" + " " * 3000
                 + "<a/></name><memory>" + " " * 3000 + "</domain>'\n"),
    ("stop vm", "list:\n  - vm-name: g1\n    driver: lxc\n"),
    ("migrate vm", "vm-name: g1\ndestination: b\nparameter:\n  transport: tcp\n"),
]  # fmt: skip


def fam_host_grab(r: random.Random, tid: str) -> Case:
    task, body = r.choice(HOST_GRABS)
    text = f"id: {tid}\ntask: {task}\n{body}"
    result = {"start vm": "vm started", "stop vm": "vm stopped", "migrate vm": "vm migrated"}
    return _case(
        "host-grab", text, tid, "exact", outcome="accept", result=result[task], note=body[:40]
    )


def fam_regex(r: random.Random, tid: str) -> Case:
    regex = r.choice(HOSTILE_REGEXES)
    text = f"id: {tid}\ntask: stop vm\nlist:\n  - regex: {regex}\n    force: true\n"
    return _case(
        "regex", text, tid, "exact", outcome="accept", result="vm stopped", note=regex[:40]
    )


def fam_unicode(r: random.Random, tid: str) -> Case:
    variant = r.randrange(9)
    msg = valid_message(r, tid, style="block")
    text = msg.text()
    if variant == 0:
        name = r.choice(["wéb-1", "日本-vm", "vm-\U0001f600", "\u202evm", "vm\u00a0x", "Ω"])
        text = text.replace("task:", f"note: {name}\ntask:", 1)
        return _case(
            "unicode",
            text,
            tid,
            "exact",
            outcome="accept",
            result=RESULT_NAMES[msg.kind],
            note=name,
        )
    if variant == 1:
        return _case("unicode", "\ufeff" + text, tid, "maybe", outcome="any", note="BOM")
    if variant == 2:
        return _case(
            "unicode",
            text.replace("\n", "\r\n"),
            tid,
            "exact",
            outcome="accept",
            result=RESULT_NAMES[msg.kind],
            note="CRLF",
        )
    if variant == 3:
        pos = r.randrange(len(text) + 1)
        ch = r.choice(["\x00", "\x01", "\x1b", "\x7f", "\x85", "\u2028", "\ufffe", "\x08"])
        return _case(
            "unicode",
            text[:pos] + ch + text[pos:],
            tid,
            "maybe",
            outcome="any",
            note=f"{ch!r} at {pos}",
        )
    if variant == 4:
        return _case(
            "unicode",
            text.replace("  ", "\t"),
            tid,
            "maybe",
            outcome="any",
            note="tabs for indentation",
        )
    if variant == 5:
        return _case(
            "unicode", text.replace("\n", "\r"), tid, "maybe", outcome="any", note="CR line ends"
        )
    if variant == 6:
        return _case(
            "unicode",
            text.replace("\n", "\u2028"),
            tid,
            "maybe",
            outcome="any",
            note="U+2028 line ends",
        )
    if variant == 7:
        return _case(
            "unicode",
            text + "#" + "é" * r.randint(1, 3000) + "\n",
            tid,
            "exact",
            outcome="accept",
            result=RESULT_NAMES[msg.kind],
            note="long comment",
        )
    ch = r.choice(["\ud800", "\x00", "\u2028", "\\", '"', "\U0001f600", "\n"])
    vm = dq("vm-" + ch)
    text = f"id: {tid}\ntask: suspend vm\nlist:\n  - vm-name: {vm}\n"
    if ch == "\ud800":  # not a character: refused, and no id is read back
        return _case(
            "unicode", text, tid, "maybe", outcome="reject", code="invalid-message",
            note=f"vm-name {vm}",
        )  # fmt: skip
    if ch in "\x00\u2028\n":  # a VM name must not hold control characters or line ends
        return _case(
            "unicode", text, tid, "exact", outcome="reject", code="invalid-message",
            note=f"vm-name {vm}",
        )  # fmt: skip
    return _case(
        "unicode", text, tid, "exact", outcome="accept", result="vm suspended", note=f"vm-name {vm}"
    )


TAGGED = [
    "!!int", "!!str", "!!bool", "!!float", "!!null", "!custom", "!<tag:yaml.org,2002:str>",
    "!!python/object:os.system", "!!binary", "!e!x",
]  # fmt: skip


def fam_tags(r: random.Random, tid: str) -> Case:
    variant = r.randrange(3)
    if variant == 0:
        tag = r.choice(TAGGED)
        text = f"id: {tid}\ntask: repin vm\nvm-name: {tag} web-1\nvcpu-map: [[{tag} 1]]\n"
        return _case("tags", text, tid, "maybe", outcome="any", note=tag)
    if variant == 1:
        directive = r.choice(
            [
                "%YAML 1.1",
                "%YAML 1.2",
                "%YAML 2.0",
                "%TAG !e! tag:x,2000:",
                "%FOO bar",
                "%YAML 1.1\n%YAML 1.1",
            ]
        )
        text = f"{directive}\n---\nid: {tid}\ntask: status\n"
        return _case("tags", text, tid, "maybe", outcome="any", note=directive)
    text = (
        f"id: {tid}\ntask: migrate vm\nvm-name: !!str web-1\ndestination: !!str host-b\n"
        "parameter: !!map\n  max-downtime: !!int 300\n"
    )
    return _case(
        "tags", text, tid, "exact", outcome="accept", result="vm migrated", note="standard tags"
    )


#: family -> (share of the corpus, generator). Shares are weights; heavy families get few.
_FAMILIES: dict[str, tuple[float, Family]] = {
    "valid": (20.0, fam_valid),
    "flip": (14.0, fam_flip),
    "null": (6.0, fam_null),
    "truncate": (10.0, fam_truncate),
    "mutate": (10.0, fam_mutate),
    "dupkey": (4.0, fam_dupkey),
    "unknown-task": (4.0, fam_unknown_task),
    "multidoc": (4.0, fam_multidoc),
    "anchors": (2.0, fam_anchors),
    "alias-bomb": (1.0, fam_alias_bomb),
    "deep": (1.0, fam_deep),
    "binary": (5.0, fam_binary),
    "bad-utf8": (5.0, fam_bad_utf8),
    "not-a-task": (3.0, fam_not_a_task),
    "bad-id": (2.0, fam_bad_id),
    "weird-id": (2.5, fam_weird_id),
    "regex": (1.0, fam_regex),
    "host-grab": (1.0, fam_host_grab),
    "unicode": (2.5, fam_unicode),
    "tags": (1.5, fam_tags),
}

#: Families that must occur at least this often, whatever the count (small corpora too).
_MINIMUM = 2


def generate(seed: int = DEFAULT_SEED, count: int = DEFAULT_COUNT) -> list[Case]:
    """``count`` distinct cases in a shuffled order; the same list for the same ``seed``.

    Every special case (``_special_cases``) is included once; the rest is drawn from the
    families in proportion to their shares, each family at least twice.
    """
    r = random.Random(seed)
    specials = _special_cases()
    names = list(_FAMILIES)
    room = count - len(specials)
    total = sum(_FAMILIES[n][0] for n in names)
    quota = {n: max(_MINIMUM, round(room * _FAMILIES[n][0] / total)) for n in names}
    quota["valid"] += room - sum(quota.values())  # rounding
    if quota["valid"] < _MINIMUM:
        raise ValueError(f"count={count} is too small for every family")
    plan: list[Family] = [_FAMILIES[n][1] for n in names for _ in range(quota[n])]
    plan += specials
    r.shuffle(plan)
    seen: set[bytes] = set()
    cases: list[Case] = []
    for index, make in enumerate(plan):
        tid = make_id(index)
        for _ in range(100):
            case = make(r, tid)
            if case.payload not in seen:
                break
        else:  # pragma: no cover - the families have far more than 100 variants
            raise RuntimeError(f"{case.family}: cannot make a distinct payload")
        seen.add(case.payload)
        cases.append(replace(case, index=index))
    return cases


def summary(cases: list[Case]) -> str:
    by_family = Counter(c.family for c in cases)
    size = sum(len(c.payload) for c in cases)
    lines = [f"{len(cases)} cases, {size / 1e6:.1f} MB"]
    lines += [f"  {family:13} {n:6}" for family, n in sorted(by_family.items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT)
    parser.add_argument("--out", type=Path, help="write one file per case here")
    args = parser.parse_args()
    cases = generate(args.seed, args.count)
    print(summary(cases))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for case in cases:
            (args.out / f"{case.index:05d}-{case.family}.bin").write_bytes(case.payload)


if __name__ == "__main__":
    main()
