"""A migration in libvirt's terms: where it goes (:class:`MigrationTarget`), its flags and
typed parameters (:func:`migration_flags`, :func:`migration_params`), what the source's
libvirt can do (:func:`check_stream_support`), and its job statistics read back
(:func:`job_stats`). Pure mappings: no libvirt call is made here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import libvirt
from asyncmigfra.errors import NotSupported
from asyncmigfra.hypervisor.base import JobStats, MigrationRequest


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationTarget:
    """Where a migration goes: URIs resolved from the ``hosts:`` map or the template."""

    host: str
    #: How this agent reaches the destination (direct migration).
    uri: str
    #: How the source libvirtd reaches it (peer-to-peer migration).
    p2p_uri: str
    #: ``VIR_MIGRATE_PARAM_URI``; ``None``: libvirt's default.
    migrate_uri: str | None = None


def migration_flags(request: MigrationRequest, *, persistent: bool) -> int:
    """libvirt flags for ``request`` (``persistent``: the source domain is persistent)."""
    mode_flags = {
        "live": libvirt.VIR_MIGRATE_LIVE,
        "warm": 0,
        "offline": libvirt.VIR_MIGRATE_OFFLINE | libvirt.VIR_MIGRATE_PERSIST_DEST,
        "post-copy": libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_POSTCOPY,
    }
    flags = mode_flags[request.mode]
    if request.persist and persistent:
        flags |= libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    if request.auto_converge:
        flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
    if request.compressed or request.compression:
        flags |= libvirt.VIR_MIGRATE_COMPRESSED
    if request.zerocopy:
        flags |= libvirt.VIR_MIGRATE_ZEROCOPY
    if request.parallel_connections > 1:
        flags |= libvirt.VIR_MIGRATE_PARALLEL
    if request.tls:
        flags |= libvirt.VIR_MIGRATE_TLS
    if request.paused:
        flags |= libvirt.VIR_MIGRATE_PAUSED
    if request.p2p:
        flags |= libvirt.VIR_MIGRATE_PEER2PEER
    if request.copy_storage != "none":
        flags |= _COPY_STORAGE_FLAGS[request.copy_storage]
        if request.synchronous_writes:
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES
    return int(flags)


#: ``copy-storage`` -> libvirt's flag: whole images, or the top layer of each (the
#: destination has the backing chain).
_COPY_STORAGE_FLAGS: Mapping[str, int] = {
    "all": libvirt.VIR_MIGRATE_NON_SHARED_DISK,
    "inc": libvirt.VIR_MIGRATE_NON_SHARED_INC,
}


def migration_params(request: MigrationRequest, target: MigrationTarget) -> dict[str, object]:
    """``virTypedParameter``s for ``migrateToURI3``/``migrate3``."""
    params: dict[str, object] = {}
    if target.migrate_uri:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = target.migrate_uri
    if request.bandwidth:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(request.bandwidth)
    if request.parallel_connections > 1:
        params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = int(request.parallel_connections)
    if request.copy_storage != "none" and request.migrate_disks:
        # A multi-value string parameter: libvirt-python adds one entry per list item.
        params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = list(request.migrate_disks)
    params.update(_stream_params(request))
    return params


#: libvirt 9.4's names of the zlib and zstd levels (a libvirt-python built against older
#: headers lacks the constants; libvirt itself takes the names).
_LEVEL_PARAMS: Mapping[str, str] = {
    "zlib": getattr(libvirt, "VIR_MIGRATE_PARAM_COMPRESSION_ZLIB_LEVEL", "compression.zlib.level"),
    "zstd": getattr(libvirt, "VIR_MIGRATE_PARAM_COMPRESSION_ZSTD_LEVEL", "compression.zstd.level"),
}

#: The first libvirt that takes ``zlib`` and ``zstd`` (multifd compression) as methods.
MULTIFD_COMPRESSION_VERSION = 9_004_000


def _stream_params(request: MigrationRequest) -> dict[str, object]:
    """Compression, post-copy bandwidth, auto-converge throttle and TLS host name."""
    params: dict[str, object] = {}
    if request.compression:
        params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] = list(request.compression)
        if request.compression_level is not None:
            for method in request.compression:
                if method in _LEVEL_PARAMS:
                    params[_LEVEL_PARAMS[method]] = int(request.compression_level)
        if request.xbzrle_cache is not None:
            params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION_XBZRLE_CACHE] = (
                int(request.xbzrle_cache) * _MIB
            )
    if request.postcopy_bandwidth:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY] = int(request.postcopy_bandwidth)
    if request.auto_converge_initial is not None:
        params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] = int(request.auto_converge_initial)
    if request.auto_converge_increment is not None:
        params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] = int(
            request.auto_converge_increment
        )
    if request.tls_destination is not None:
        params[libvirt.VIR_MIGRATE_PARAM_TLS_DESTINATION] = request.tls_destination
    return params


def check_stream_support(request: MigrationRequest, version: int) -> None:
    """Refuse, before anything is touched, what the source's libvirt (``version``, as
    ``getLibVersion`` returns it) cannot do: ``zlib`` and ``zstd`` need libvirt 9.4 (before,
    libvirt knows only ``xbzrle`` and ``mt`` and fails the job with "Unsupported compression
    method")."""
    multifd = [m for m in request.compression if m in _LEVEL_PARAMS]
    if multifd and version < MULTIFD_COMPRESSION_VERSION:
        major, rest = divmod(version, 1_000_000)
        minor, micro = divmod(rest, 1000)
        raise NotSupported(
            f"compression {multifd[0]} needs libvirt 9.4 or later (multifd compression);"
            f" this host runs libvirt {major}.{minor}.{micro}: use xbzrle, or no compression"
        )


_MIB = 1024 * 1024
#: MiB/s: the largest bandwidth libvirt accepts for pre-copy, and its own "unlimited"
#: (``QEMU_DOMAIN_MIG_BANDWIDTH_MAX``: what fits QEMU's bytes/s in an int64).
BANDWIDTH_UNLIMITED = (2**63 - 1) // _MIB


def _num(raw: Mapping[str, Any], key: str, default: int = 0) -> int:
    value = raw.get(key, default)
    return int(value) if isinstance(value, int | float) else default


def job_stats(raw: Mapping[str, Any], *, phase: str = "migrating") -> JobStats | None:
    """Map ``virDomainGetJobStats`` fields to :class:`JobStats`; ``None`` before anything
    moves (libvirt reports zeros while the destination QEMU starts).

    A storage copy (``NON_SHARED_DISK``/``_INC``) mirrors the disks over NBD before QEMU's
    memory migration begins: during that phase ``disk_total``/``disk_processed``/
    ``disk_remaining`` grow while ``memory_total`` is still 0 and ``memory_iteration`` 0, and
    the sample is returned all the same (the engine's convergence policy acts on memory
    iterations only). ``data_remaining`` is libvirt's, which counts the disks too; without
    it, memory plus disk remaining."""
    total = _num(raw, "memory_total")
    disk_total = _num(raw, "disk_total")
    if total <= 0 and disk_total <= 0:
        return None
    remaining = _num(raw, "memory_remaining")
    disk_remaining = _num(raw, "disk_remaining")
    page = _num(raw, "memory_page_size", 4096) or 4096
    downtime = raw.get("downtime")
    return JobStats(
        phase=phase,
        iteration=_num(raw, "memory_iteration"),
        elapsed=_num(raw, "time_elapsed") / 1000.0,
        memory_total=max(0, total),
        memory_processed=_num(raw, "memory_processed"),
        memory_remaining=remaining,
        data_remaining=_num(raw, "data_remaining", remaining + disk_remaining),
        dirty_rate=_num(raw, "memory_dirty_rate") * page,
        transfer_rate=_num(raw, "memory_bps"),
        expected_downtime=float(downtime) if isinstance(downtime, int | float) else None,
        disk_total=max(0, disk_total),
        disk_processed=_num(raw, "disk_processed"),
        disk_remaining=disk_remaining,
    )
