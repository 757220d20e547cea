"""The builders of the migration tasks: ``migrate vm`` and ``evacuate node`` (their
``parameter:`` map) and ``tune migration``.

What a task says about its migration stream by itself (compression, multifd, zero-copy, TLS,
auto-converge tuning) is checked here against :mod:`asyncmigfra.streamoptions`; what only the
agent's ``migration:`` defaults complete is checked when the migration is planned.
"""

from __future__ import annotations

from typing import Final, cast

from asyncmigfra.model import (
    CopyStorage,
    EvacuateMode,
    EvacuateSpec,
    EvacuationSchedule,
    MigrateSpec,
    MigrationParams,
    MigrationType,
    SwapWith,
    TimeoutAction,
    TuneSpec,
    VcpuMap,
)
from asyncmigfra.streamoptions import (
    AUTO_CONVERGE_PERCENT,
    COMPRESSION_METHODS,
    LEVELS,
    MAX_XBZRLE_CACHE_MIB,
    CompressionMethod,
    StreamOptions,
    conflicts,
)
from asyncmigfra.wire.parsing.fields import (
    _SECONDS,
    UINT32_MAX,
    UINT64_MAX,
    _convert_bool,
    _convert_choice,
    _convert_host,
    _convert_transport,
    _Ctx,
    _Fields,
    _scalar_text,
)
from asyncmigfra.wire.parsing.names import _TASK_ID_EXPECTED, valid_task_id
from asyncmigfra.wire.parsing.nodes import _Node, _Scalar, _Seq

_MIGRATION_TYPES: Final = ("live", "warm", "offline", "post-copy", "auto")
_TIMEOUT_ACTIONS: Final = ("abort", "post-copy", "suspend")
_EVACUATE_MODES: Final = ("auto", "compact", "scatter")
_EVACUATION_SCHEDULES: Final = ("placement", "predicted")
_COPY_STORAGE: Final = ("none", "all", "inc")
_ONLY_WITH_COPY: Final = "expected only with copy-storage all or inc (copy-storage is none)"
_TUNE_KEYS: Final = ("bandwidth", "max-downtime", "post-copy", "force-complete")


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
    params = MigrationParams(
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
        progress_timeout=f._opt("progress-timeout", _convert_seconds_or_off),
        compression=f._opt("compression", _convert_compression),
        compression_level=f.uint("compression-level", max(LEVELS.values())),
        xbzrle_cache=f.uint("xbzrle-cache", MAX_XBZRLE_CACHE_MIB, 1),
        zerocopy=f.opt_boolean("zerocopy"),
        postcopy_bandwidth=f.uint("postcopy-bandwidth", UINT64_MAX),
        auto_converge_initial=f.uint("auto-converge-initial", *_PERCENT),
        auto_converge_increment=f.uint("auto-converge-increment", *_PERCENT),
        tls_destination=f.host("tls-destination"),
    )
    _check_stream(f, params)
    return params


#: (maximum, minimum) of the auto-converge percentages, as ``_Fields.uint`` takes them.
_PERCENT: Final = (AUTO_CONVERGE_PERCENT[1], AUTO_CONVERGE_PERCENT[0])


def _check_stream(f: _Fields, p: MigrationParams) -> None:
    """Refuse what the task's own stream options break (:mod:`asyncmigfra.streamoptions`);
    keys the task leaves out are unknown here (the agent's defaults fill them later)."""
    found = conflicts(
        StreamOptions(
            parallel_connections=p.parallel_connections,
            compression=p.compression,
            compression_level=p.compression_level,
            xbzrle_cache=p.xbzrle_cache,
            zerocopy=p.zerocopy,
            tls=p.tls,
            tls_destination=p.tls_destination,
            compressed=p.compressed,
            auto_converge=p.auto_converge,
            auto_converge_initial=p.auto_converge_initial,
            auto_converge_increment=p.auto_converge_increment,
        )
    )
    if found:
        first = found[0]
        f.ctx.bad(f.prefix + first.key, first.reason, f.node.items.get(first.key))


_SECONDS_OR_OFF: Final = "expected a number of seconds (0: off)"


def _convert_seconds_or_off(ctx: _Ctx, node: _Node, path: str) -> float:
    """Seconds >= 0 (``progress-timeout``; 0 turns it off)."""
    text = _scalar_text(ctx, node, path, _SECONDS_OR_OFF)
    if _SECONDS.fullmatch(text) is None:
        ctx.bad(path, _SECONDS_OR_OFF, node)
    value = float(text)
    if value == float("inf"):  # (no exponent is allowed, but 400 digits are)
        ctx.bad(path, _SECONDS_OR_OFF, node)
    return value


def _convert_compression(ctx: _Ctx, node: _Node, path: str) -> tuple[CompressionMethod, ...]:
    """``compression``: a sequence of distinct methods (empty: no compression)."""
    expected = "expected a sequence of " + ", ".join(COMPRESSION_METHODS)
    if isinstance(node, _Scalar) and not node.null and node.text in COMPRESSION_METHODS:
        expected += f" (a list: [{node.text}])"
    if not isinstance(node, _Seq):
        ctx.bad(path, expected, node)
    methods: list[CompressionMethod] = []
    for i, item in enumerate(node.items):
        text = _convert_choice(ctx, item, f"{path}[{i}]", COMPRESSION_METHODS)
        method = cast("CompressionMethod", text)
        if method in methods:
            ctx.bad(f"{path}[{i}]", "expected each method once", item)
        methods.append(method)
    return tuple(methods)


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


def _convert_task_id(ctx: _Ctx, node: _Node, path: str) -> str:
    text = _scalar_text(ctx, node, path, "expected a task id")
    if not valid_task_id(text):
        ctx.bad(path, _TASK_ID_EXPECTED, node)
    return text


def _convert_true(ctx: _Ctx, node: _Node, path: str) -> bool:
    """``post-copy``/``force-complete`` of a tune: only ``true`` asks for something."""
    if not _convert_bool(ctx, node, path):
        ctx.bad(path, "expected true (leave the key out to ask for nothing)", node)
    return True


def _tune(f: _Fields) -> TuneSpec:
    """``tune migration``: at least one change; ``post-copy`` and ``force-complete`` exclude
    each other (the guest either moves to the destination now or pauses on the source)."""
    target = f.required("target", _convert_task_id, "expected a task id")
    spec = TuneSpec(
        target=target,
        vm_name=f.vm_name(),
        bandwidth=f.uint("bandwidth", UINT64_MAX),
        max_downtime=f.uint("max-downtime", UINT64_MAX),
        post_copy=bool(f._opt("post-copy", _convert_true)),
        force_complete=bool(f._opt("force-complete", _convert_true)),
        **f.subtask(),
    )
    if (
        spec.bandwidth is None
        and spec.max_downtime is None
        and not (spec.post_copy or spec.force_complete)
    ):
        f.ctx.bad(" or ".join(_TUNE_KEYS), "expected at least one of them", None)
    if spec.post_copy and spec.force_complete:
        f.ctx.bad(
            "force-complete",
            "expected only one of post-copy and force-complete: post-copy moves the guest to"
            " the destination now, force-complete pauses it on the source",
            f.node.items.get("force-complete"),
        )
    return spec
