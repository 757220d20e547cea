"""The task builders, :func:`parse_task` (bytes in, a ``TaskMessage`` out) and :func:`load_yaml`.

The migration tasks' builders (``migrate vm``, ``evacuate node``, ``tune migration``) are in
:mod:`~asyncmigfra.wire.parsing.migration`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, cast
from xml.sax.saxutils import unescape as _xml_unescape

from asyncmigfra.domxml import first_element_text
from asyncmigfra.errors import TaskRejected
from asyncmigfra.model import (
    HISTORY_LIMIT_DEFAULT,
    HISTORY_LIMIT_MAX,
    CancelSpec,
    HistorySpec,
    Ivshmem,
    PciId,
    PlanEvacuationSpec,
    PlanMigrationSpec,
    QuitSpec,
    RepinSpec,
    ResumeSpec,
    StartSpec,
    StatusSpec,
    StopSpec,
    Subtask,
    SuspendSpec,
    TaskKind,
    TaskMessage,
)
from asyncmigfra.wire.parsing.fastpath import _compose
from asyncmigfra.wire.parsing.fields import (
    _XML_ENTITIES,
    UINT64_MAX,
    _convert_pci_addr,
    _convert_uint,
    _Ctx,
    _Fields,
    _scalar_text,
)
from asyncmigfra.wire.parsing.migration import _evacuate, _migrate, _tune
from asyncmigfra.wire.parsing.names import _TASK_ID_EXPECTED, valid_task_id, valid_vm_name
from asyncmigfra.wire.parsing.nodes import (
    _EMPTY_CONTAINER,
    _INVALID,
    _NOT_A_CONTAINER,
    _PARSE_PREFIX,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_NODES,
    DEFAULT_MAX_SIZE,
    _first_document,
    _Map,
    _Node,
    _ruamel,
    _Scalar,
)

# --------------------------------------------------------------------------------------------
# Tasks


def _resolve_start_name(vm_name: str | None, xml: str | None) -> tuple[str, str | None]:
    """Protocol §3.2, §9.3: the first ``<name>`` matched non-greedily, stripped and unescaped."""
    if vm_name is not None:
        return vm_name, None
    if xml is None:
        return "", "vm-name is not valid."
    text = first_element_text(xml, "name")
    name = _xml_unescape(text, _XML_ENTITIES).strip() if text is not None else ""
    if not name:
        return "", "Could not find vm-name in xml."
    if not valid_vm_name(name):
        return "", "The <name> in the xml is not a valid VM name."
    return name, None


def _start(f: _Fields) -> StartSpec:
    vm_name = f.vm_name()
    xml = f.string("xml")
    name, name_error = _resolve_start_name(vm_name, xml)
    pci_ids = tuple(
        PciId(
            item.required("vendor", _convert_pci_id, _PCI_ID_EXPECTED),
            item.required("device", _convert_pci_id, _PCI_ID_EXPECTED),
        )
        for item in f.item_maps("pci-ids")
    )
    devs = tuple(
        item.required("pci-addr", _convert_pci_addr, "expected a PCI address [DDDD:]BB:SS.F")
        for item in f.item_maps("devs")
    )
    ivshmem: Ivshmem | None = None
    shm = f.sub_map("ivshmem")
    if shm is not None:
        ivshmem = Ivshmem(shm.req_string("id"), shm.req_string("size"), shm.string("path"))
    return StartSpec(
        vm_name=name,
        name_error=name_error,
        xml=xml,
        vcpus=f.uint("vcpus"),
        memory=f.uint("memory", UINT64_MAX),
        transient=f.boolean("transient", False),
        pci_ids=pci_ids,
        devs=devs,
        ivshmem=ivshmem,
        probe_with_ssh=f.boolean("probe-with-ssh", True),
        probe_hostname=f.host("probe-hostname"),
        vcpu_map=f.vcpu_map("vcpu-map"),
        memnode_map=f.vcpu_map("memnode-map"),
        **f.subtask(),
    )


_PCI_ID_EXPECTED: Final = "expected an integer from 0 to 0xffff"


def _convert_pci_id(ctx: _Ctx, node: _Node, path: str) -> int:
    return _convert_uint(ctx, node, path, 0xFFFF, expected=_PCI_ID_EXPECTED)


def _stop(f: _Fields) -> StopSpec:
    return StopSpec(
        vm_name=f.vm_name(),
        regex=f.string("regex"),
        force=f.boolean("force", False),
        undefine=f.boolean("undefine", False),
        force_after_timeout=f.boolean("force-after-timeout", False),
        **f.subtask(),
    )


def _suspend(f: _Fields) -> SuspendSpec:
    return SuspendSpec(vm_name=f.req_vm_name(), **f.subtask())


def _resume(f: _Fields) -> ResumeSpec:
    return ResumeSpec(vm_name=f.req_vm_name(), **f.subtask())


def _plan_migration(f: _Fields) -> PlanMigrationSpec:
    """``plan migration``: exactly the keys of ``migrate vm``."""
    return PlanMigrationSpec(migration=_migrate(f), **f.subtask())


def _plan_evacuation(f: _Fields) -> PlanEvacuationSpec:
    """``plan evacuation``: exactly the keys of ``evacuate node``."""
    return PlanEvacuationSpec(evacuation=_evacuate(f), **f.subtask())


def _repin(f: _Fields) -> RepinSpec:
    return RepinSpec(
        vm_name=f.req_vm_name(),
        vcpu_map=f.req_vcpu_map("vcpu-map"),
        **f.subtask(),
    )


def _quit(f: _Fields) -> QuitSpec:
    return QuitSpec(**f.subtask())


def _status(f: _Fields) -> StatusSpec:
    return StatusSpec(**f.subtask())


def _cancel(f: _Fields) -> CancelSpec:
    return CancelSpec(target=f.req_string("target"), **f.subtask())


def _history(f: _Fields) -> HistorySpec:
    """``history``: an optional VM, an ISO 8601 ``since`` and a ``limit`` of 1 to
    ``HISTORY_LIMIT_MAX`` (more is refused, not cut: a script asking for 10000 would
    otherwise not learn that it got fewer than it may have)."""
    limit = f.uint("limit", HISTORY_LIMIT_MAX, 1)
    return HistorySpec(
        vm_name=f.vm_name(),
        since=f.instant("since"),
        limit=HISTORY_LIMIT_DEFAULT if limit is None else limit,
        **f.subtask(),
    )


#: List tasks: the key holding the items and how to read one item.
_LIST_TASKS: Final[dict[TaskKind, tuple[str, Callable[[_Fields], Subtask]]]] = {
    TaskKind.START: ("vm-configurations", _start),
    TaskKind.STOP: ("list", _stop),
    TaskKind.SUSPEND: ("list", _suspend),
    TaskKind.RESUME: ("list", _resume),
}

#: Tasks whose subtask map is the top-level map itself (docs/protocol.md §3.1).
_SINGLE_TASKS: Final[dict[TaskKind, Callable[[_Fields], Subtask]]] = {
    TaskKind.MIGRATE: _migrate,
    TaskKind.REPIN: _repin,
    TaskKind.EVACUATE: _evacuate,
    TaskKind.QUIT: _quit,
    TaskKind.STATUS: _status,
    TaskKind.CANCEL: _cancel,
    TaskKind.HISTORY: _history,
    TaskKind.TUNE: _tune,
    TaskKind.PLAN_MIGRATION: _plan_migration,
    TaskKind.PLAN_EVACUATION: _plan_evacuation,
}

_KINDS: Final[dict[str, TaskKind]] = {kind.value: kind for kind in TaskKind}


def parse_task(
    payload: bytes,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    max_nodes: int = DEFAULT_MAX_NODES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> TaskMessage:
    """Parse one MQTT task payload.

    Raises :class:`TaskRejected` (and nothing else, for any bytes) when the payload cannot
    become a task; ``task_id`` is set whenever the ``id`` could be read. Checks, in order:

    1. size over ``max_size`` (before any parsing), not UTF-8, malformed YAML, more than
       ``max_nodes`` nodes with aliases expanded or deeper than ``max_depth``:
       ``invalid-message``;
    2. not a map, no ``task`` key, empty document: ``Parsed message not being a
       Task_container.``;
    3. a bad ``id``, a non-string ``task``: bad conversion; an unknown ``task``:
       ``unknown-task``;
    4. the list key of start/stop/suspend/resume missing: ``Exception: Error loading
       YAML-node: Node is not valid. (missing '<key>')``;
    5. any field of a wrong type, null, or a required one missing: ``... bad conversion
       (<path>: <expected>, <found>)``, reported at the failing list item's mark (list tasks)
       or the top-level map's mark; one bad field rejects the whole message;
    6. an empty list: ``Empty task container executed.``

    Per-VM problems that are not parse errors (a start item without a usable name) are not
    rejections: they are carried in :attr:`StartSpec.name_error` for the runner to report.
    """
    if len(payload) > max_size:
        raise TaskRejected(
            _INVALID, f"Message of {len(payload)} bytes exceeds the limit of {max_size} bytes."
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskRejected(
            _INVALID,
            f"{_PARSE_PREFIX}the message is not valid UTF-8 "
            f"(byte 0x{payload[exc.start]:02x} at offset {exc.start}).",
        ) from exc
    root = _compose(text, max_nodes, max_depth)
    if _SURROGATE_ESCAPE.search(text) is not None and _has_surrogate(root):
        raise TaskRejected(
            _INVALID,
            f"{_PARSE_PREFIX}a string contains a lone UTF-16 surrogate escape (\\uD800-\\uDFFF), "
            "which is not a character",
        )
    return _build(root)


#: ``\uD800``-``\uDFFF`` (or the ``\U0000D800`` form) in a double-quoted scalar: the only
#: way a surrogate gets into a string (UTF-8 input cannot carry one). Such a string cannot be
#: encoded again (SQLite, logs, libyaml reject it), so the message is refused.
_SURROGATE_ESCAPE: Final = re.compile(r"\\(?:u|U0000)[dD][89a-fA-F][0-9a-fA-F]{2}")


def _has_surrogate(root: _Node | None) -> bool:
    stack: list[_Node] = [] if root is None else [root]
    while stack:
        node = stack.pop()
        if isinstance(node, _Scalar):
            if any("\ud800" <= ch <= "\udfff" for ch in node.text):
                return True
        elif isinstance(node, _Map):
            if any(any("\ud800" <= ch <= "\udfff" for ch in key) for key in node.items):
                return True
            stack.extend(node.items.values())
        else:
            stack.extend(node.items)
    return False


def _build(root: _Node | None) -> TaskMessage:
    if not isinstance(root, _Map):
        raise TaskRejected(_INVALID, _NOT_A_CONTAINER)
    ctx = _Ctx(None, root.line, root.col)
    id_node = root.items.get("id")
    if isinstance(id_node, _Scalar) and not id_node.null:
        if not valid_task_id(id_node.text):
            # Not echoed: it is the id itself that cannot be shown or remembered.
            ctx.bad("id", _TASK_ID_EXPECTED, id_node)
        ctx.task_id = id_node.text
    task_node = root.items.get("task")
    if task_node is None:
        raise TaskRejected(_INVALID, _NOT_A_CONTAINER, task_id=ctx.task_id)
    if id_node is not None and ctx.task_id is None:
        ctx.bad("id", "expected a string", id_node)
    task = _scalar_text(ctx, task_node, "task", "expected a string")
    kind = _KINDS.get(task)
    if kind is None:
        shown = task if len(task) <= 100 else task[:100] + "..."
        raise TaskRejected(
            "unknown-task",
            f"Exception: Unknown type of Task while loading. (task: '{shown}')",
            task_id=ctx.task_id,
        )
    top = _Fields(ctx, root, "")
    container_concurrent = top.boolean("concurrent-execution", True)
    single = _SINGLE_TASKS.get(kind)
    if single is not None:
        return TaskMessage(
            kind=kind,
            id=ctx.task_id,
            concurrent_execution=container_concurrent,
            subtasks=(single(top),),
        )
    list_key, load_item = _LIST_TASKS[kind]
    if list_key not in root.items:
        raise TaskRejected(
            _INVALID,
            f"Exception: Error loading YAML-node: Node is not valid. (missing '{list_key}')",
            task_id=ctx.task_id,
        )
    items = top.sequence(list_key, required=True) or []
    subtasks: list[Subtask] = []
    for i, item in enumerate(items):
        ctx.line, ctx.col = item.line, item.col
        if not isinstance(item, _Map):
            ctx.bad(f"{list_key}[{i}]", "expected a map", item)
        subtasks.append(load_item(_Fields(ctx, item, f"{list_key}[{i}].")))
    if not subtasks:
        raise TaskRejected(_INVALID, _EMPTY_CONTAINER, task_id=ctx.task_id)
    return TaskMessage(
        kind=kind,
        id=ctx.task_id,
        concurrent_execution=container_concurrent,
        subtasks=tuple(subtasks),
    )


def load_yaml(data: bytes | str) -> object:
    """The first YAML document of ``data`` as plain Python values, or ``None`` if unreadable.

    A tooling helper for reading what agents publish (results, events, status), e.g. in the
    demo client: YAML 1.2 core types (``"0012"`` quoted stays a string, ``0.020156`` is a
    float). It never raises for bad input (not UTF-8, malformed YAML, duplicate keys): it
    returns ``None``, which callers treat like any other non-map. Tasks go through
    :func:`parse_task`, never through this.
    """
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    yaml = _ruamel("loader")
    try:
        return cast("object", yaml.load(_first_document(data)))
    except Exception:  # noqa: BLE001 - documented: unreadable input gives None
        return None
    finally:
        yaml.doc_infos.clear()
        yaml.version = None
