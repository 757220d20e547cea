"""Which options of a migration stream go together: compression, multifd (parallel
connections), zero-copy, TLS and the auto-converge tuning, as libvirt 9 and QEMU 7.2 decide it.

One set of rules for three places: the task parser (what a task says by itself), the
settings loader (the ``migration:`` defaults) and the migration plan (the task merged with
the defaults). Any option may be unknown (``None``): a rule judges only what it knows, so the
parser refuses what the task alone gets wrong and the plan what only the merge shows.

Sources of the rules (libvirt's ``qemu_migration_params.c``, QEMU's ``migrate_caps_check`` and
``migrate_params_check``):

* ``zlib`` and ``zstd`` compress multifd connections only, one method at a time; libvirt
  accepts them from 9.4 on (before, ``Unsupported compression method``);
* ``xbzrle`` is not used on multifd connections (libvirt 9.4 and later refuse it there);
* a compression level, the xbzrle cache and the auto-converge percentages tune a method or a
  mode that must be on ("Turn ... on to tune it");
* the xbzrle cache is a power of two (QEMU);
* zero-copy sends only on plain multifd connections: no compression, no TLS (QEMU 7.2:
  "Zero copy only available for non-compressed non-TLS multifd migration");
* the auto-converge throttle is 1 to 99 percent (QEMU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "AUTO_CONVERGE_PERCENT",
    "COMPRESSION_METHODS",
    "LEVELS",
    "MAX_XBZRLE_CACHE_MIB",
    "CompressionMethod",
    "Conflict",
    "StreamOptions",
    "conflicts",
]

CompressionMethod = Literal["xbzrle", "zlib", "zstd"]

#: The ``compression`` methods, in the order the wire lists them.
COMPRESSION_METHODS: Final[tuple[CompressionMethod, ...]] = ("xbzrle", "zlib", "zstd")
#: The methods that compress multifd connections (``parallel-connections`` >= 2).
MULTIFD_METHODS: Final = frozenset({"zlib", "zstd"})
#: The highest ``compression-level`` of each multifd method (the lowest is 0).
LEVELS: Final[dict[str, int]] = {"zlib": 9, "zstd": 20}
#: ``auto-converge-initial`` and ``-increment``: QEMU's range, percent.
AUTO_CONVERGE_PERCENT: Final = (1, 99)
#: The largest ``xbzrle-cache`` accepted (MiB): 1 TiB, far more than any guest's memory.
MAX_XBZRLE_CACHE_MIB: Final = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamOptions:
    """The options the rules look at; ``None``: not known here."""

    parallel_connections: int | None = None
    compression: tuple[str, ...] | None = None
    compression_level: int | None = None
    #: MiB
    xbzrle_cache: int | None = None
    zerocopy: bool | None = None
    tls: bool | None = None
    tls_destination: str | None = None
    #: The legacy ``compressed: true`` (QEMU's xbzrle).
    compressed: bool | None = None
    auto_converge: bool | None = None
    auto_converge_initial: int | None = None
    auto_converge_increment: int | None = None


@dataclass(frozen=True, slots=True)
class Conflict:
    """One broken rule: the wire ``key`` it is reported on and why."""

    key: str
    reason: str


def _compression_conflicts(o: StreamOptions) -> list[Conflict]:
    out: list[Conflict] = []
    methods = o.compression
    multifd = o.parallel_connections is not None and o.parallel_connections >= 2
    single = o.parallel_connections is not None and o.parallel_connections < 2
    if methods is not None:
        for method in dict.fromkeys(m for m in methods if methods.count(m) > 1):
            out.append(Conflict("compression", f"names {method} twice"))
        chosen = [m for m in dict.fromkeys(methods) if m in MULTIFD_METHODS]
        if len(chosen) > 1:
            out.append(
                Conflict(
                    "compression",
                    "takes one of zlib and zstd: multifd compresses with one method",
                )
            )
        if chosen and single:
            out.append(
                Conflict(
                    "compression",
                    f"{chosen[0]} needs parallel-connections >= 2: QEMU compresses with zlib"
                    f" and zstd only on multifd connections (parallel-connections is"
                    f" {o.parallel_connections})",
                )
            )
        if "xbzrle" in methods and multifd:
            out.append(
                Conflict(
                    "compression",
                    "xbzrle does not work with parallel-connections >= 2: multifd connections"
                    " send pages without it (libvirt 9.4 and later refuse the combination)",
                )
            )
        level = o.compression_level
        if level is not None:
            if not chosen:
                out.append(Conflict("compression-level", "needs compression zlib or zstd"))
            elif len(chosen) == 1 and level > LEVELS[chosen[0]]:
                top = LEVELS[chosen[0]]
                out.append(
                    Conflict(
                        "compression-level",
                        f"{chosen[0]} takes levels 0 to {top} (compression-level is {level})",
                    )
                )
        if o.xbzrle_cache is not None and "xbzrle" not in methods:
            out.append(Conflict("xbzrle-cache", "needs xbzrle in compression"))
    cache = o.xbzrle_cache
    if cache is not None and (cache <= 0 or cache & (cache - 1)):
        out.append(
            Conflict("xbzrle-cache", f"must be a power of two in MiB (QEMU's rule), not {cache}")
        )
    return out


def _zerocopy_conflicts(o: StreamOptions) -> list[Conflict]:
    if not o.zerocopy:
        return []
    out: list[Conflict] = []
    if o.parallel_connections is not None and o.parallel_connections < 2:
        out.append(
            Conflict(
                "zerocopy",
                "needs parallel-connections >= 2: QEMU sends zero-copy only on multifd connections",
            )
        )
    if o.tls:
        out.append(
            Conflict(
                "zerocopy",
                "does not work with tls: QEMU 7.2 sends zero-copy only on plain (non-TLS)"
                " multifd connections",
            )
        )
    if o.compression or o.compressed:
        out.append(
            Conflict(
                "zerocopy",
                "does not work with compression (compression or compressed): zero-copy sends"
                " the guest's pages as they are",
            )
        )
    return out


def conflicts(o: StreamOptions) -> list[Conflict]:
    """Every rule ``o`` breaks, as far as its known options tell (empty: none)."""
    out = _compression_conflicts(o) + _zerocopy_conflicts(o)
    low, high = AUTO_CONVERGE_PERCENT
    for key, value in (
        ("auto-converge-initial", o.auto_converge_initial),
        ("auto-converge-increment", o.auto_converge_increment),
    ):
        if value is None:
            continue
        if not low <= value <= high:
            out.append(Conflict(key, f"must be {low} to {high} percent (QEMU), not {value}"))
        if o.auto_converge is False:
            why = "needs auto-converge: true (libvirt tunes only a throttle that is on)"
            out.append(Conflict(key, why))
    if o.tls_destination is not None and o.tls is False:
        out.append(Conflict("tls-destination", "needs tls: true"))
    return out
