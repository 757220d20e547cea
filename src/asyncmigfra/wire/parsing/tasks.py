"""The task builders, :func:`parse_task` (bytes in, a ``TaskMessage`` out) and :func:`load_yaml`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, cast
from xml.sax.saxutils import unescape as _xml_unescape

from asyncmigfra.domxml import first_element_text
from asyncmigfra.errors import TaskRejected
from asyncmigfra.model import (
    CancelSpec,
    CopyStorage,
    EvacuateMode,
    EvacuateSpec,
    EvacuationSchedule,
    Ivshmem,
    MigrateSpec,
    MigrationParams,
    MigrationType,
    PciId,
    QuitSpec,
    RepinSpec,
    ResumeSpec,
    StartSpec,
    StatusSpec,
    StopSpec,
    Subtask,
    SuspendSpec,
    SwapWith,
    TaskKind,
    TaskMessage,
    TimeoutAction,
    VcpuMap,
)
from asyncmigfra.wire.parsing.fastpath import _compose
from asyncmigfra.wire.parsing.fields import (
    _XML_ENTITIES,
    UINT32_MAX,
    UINT64_MAX,
    _convert_host,
    _convert_pci_addr,
    _convert_transport,
    _convert_uint,
    _Ctx,
    _Fields,
    _scalar_text,
)
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

_MIGRATION_TYPES: Final = ("live", "warm", "offline", "post-copy")
_TIMEOUT_ACTIONS: Final = ("abort", "post-copy", "suspend")
_EVACUATE_MODES: Final = ("auto", "compact", "scatter")
_EVACUATION_SCHEDULES: Final = ("placement", "predicted")
_COPY_STORAGE: Final = ("none", "all", "inc")
_ONLY_WITH_COPY: Final = "expected only with copy-storage all or inc (copy-storage is none)"


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


def _migration_params(f: _Fields | None, *, migrate: bool) -> MigrationParams:
    """``parameter:`` of migrate (``migrate=True``) or evacuate (no swap-with, no vcpu-map)."""
    if f is None:
        return MigrationParams()
    # None: the agent's configured default (migration.migration-type, itself "warm").
    migration_type = cast("MigrationType | None", f.choice("migration-type", _MIGRATION_TYPES))
    retry_old = f.uint("retry_counter")
    retry_new = f.uint("retry-counter")
    swap_with: SwapWith | None = None
    vcpu_map: VcpuMap | None = None
    if migrate:
        vcpu_map = f.vcpu_map("vcpu-map")
        swap = f.sub_map("swap-with")
        if swap is not None:
            swap_with = SwapWith(
                vm_name=swap.req_vm_name(),
                pscom_hook_procs=swap.pscom("pscom-hook-procs"),
                vcpu_map=swap.vcpu_map("vcpu-map"),
            )
    copy_storage, migrate_disks, synchronous_writes = _storage_params(f)
    return MigrationParams(
        migration_type=migration_type,
        rdma_migration=f.boolean("rdma-migration", False),
        pscom_hook_procs=f.pscom("pscom-hook-procs"),
        transport=f._opt("transport", _convert_transport),
        vcpu_map=vcpu_map,
        retry_counter=retry_new if retry_new is not None else retry_old,
        swap_with=swap_with,
        max_downtime=f.uint("max-downtime", UINT64_MAX),
        bandwidth=f.uint("bandwidth", UINT64_MAX),
        auto_converge=f.opt_boolean("auto-converge"),
        compressed=f.opt_boolean("compressed"),
        parallel_connections=f.uint("parallel-connections", UINT32_MAX, 1),
        completion_timeout=f.seconds("completion-timeout"),
        timeout_action=cast("TimeoutAction | None", f.choice("timeout-action", _TIMEOUT_ACTIONS)),
        persist=f.opt_boolean("persist"),
        tls=f.opt_boolean("tls"),
        copy_storage=copy_storage,
        migrate_disks=migrate_disks,
        synchronous_writes=synchronous_writes,
    )


def _storage_params(f: _Fields) -> tuple[CopyStorage | None, tuple[str, ...] | None, bool | None]:
    """``copy-storage``, ``migrate-disks``, ``copy-storage-synchronous-writes``.

    A list of disks to copy, or synchronous writes, with ``copy-storage: none`` is a mistake
    and rejects the message. Without ``copy-storage`` the agent's ``migration.copy-storage``
    applies, which only the agent knows: the migration checks that combination itself.
    """
    copy_storage = cast("CopyStorage | None", f.choice("copy-storage", _COPY_STORAGE))
    migrate_disks = f.disk_targets("migrate-disks")
    synchronous_writes = f.opt_boolean("copy-storage-synchronous-writes")
    if copy_storage == "none":
        if migrate_disks:
            f.ctx.bad(f.prefix + "migrate-disks", _ONLY_WITH_COPY, f.node.items["migrate-disks"])
        if synchronous_writes:
            key = "copy-storage-synchronous-writes"
            f.ctx.bad(f.prefix + key, _ONLY_WITH_COPY, f.node.items[key])
    return copy_storage, migrate_disks, synchronous_writes


def _migrate(f: _Fields) -> MigrateSpec:
    return MigrateSpec(
        vm_name=f.req_vm_name(),
        destination=f.req_host("destination"),
        parameter=_migration_params(f.sub_map("parameter"), migrate=True),
        **f.subtask(),
    )


def _evacuate(f: _Fields) -> EvacuateSpec:
    destinations: list[str] = []
    for i, item in enumerate(f.sequence("destinations", required=True) or ()):
        destinations.append(_convert_host(f.ctx, item, f"destinations[{i}]"))
    param = f.sub_map("parameter")
    mode: str | None = None
    overbooking = True
    max_parallel: int | None = None
    schedule: str | None = None
    if param is not None:
        mode = param.choice("mode", _EVACUATE_MODES)
        overbooking = param.boolean("overbooking", True)
        max_parallel = param.uint("max-parallel", UINT32_MAX, 1)
        schedule = param.choice("schedule", _EVACUATION_SCHEDULES)
    return EvacuateSpec(
        destinations=tuple(destinations),
        mode=cast("EvacuateMode", mode or "auto"),
        overbooking=overbooking,
        parameter=_migration_params(param, migrate=False),
        max_parallel=max_parallel,
        schedule=cast("EvacuationSchedule", schedule or "placement"),
        **f.subtask(),
    )


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
