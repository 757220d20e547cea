"""Disks of a storage migration (``copy-storage``): which disks are copied, what the
destination must offer before anything is touched, and the images the migration creates
there (removed again when it fails).

Every function blocks (libvirt calls) and runs in the back-end's worker threads.

**Which disks.** A guest's disks fall in three groups, decided from libvirt's own view of
the host (``storageVolLookupByPath`` and the pool's type) and, when the agent shares the
host's mounts (a local libvirt URI), the filesystem type in ``/proc/self/mountinfo``:

* *skipped*, never copied and never blocking: cdrom and floppy drives, empty drives,
  ``<readonly/>`` and ``<shareable/>`` disks (libvirt skips the same ones);
* *shared*: network disks (rbd, iscsi, nbd, gluster, ...), disks in a pool of a shared type
  (netfs, gluster, rbd, iscsi, mpath, ...) and files on a shared filesystem (nfs, ceph,
  gfs2, ocfs2, cifs, ...): left alone, since the destination sees the same data and copying
  would write over the image the source is running on;
* *local*: files in a local pool (dir, fs, logical, disk, zfs) or on a local filesystem;
  *unknown* when neither tells (a disk outside every pool seen through a remote URI): copied
  when copying, and left to libvirt's own safety check otherwise.

**The destination** must have, for each disk to copy: an active storage pool whose target
directory is the image's directory (libvirt creates the image through it for ``all``, the
agent creates the overlay for ``inc``, which libvirt cannot), no image at that path yet
(copying over it would destroy it; on shared storage the destination would see the very
file the guest runs on), room in the pool, and for ``inc`` the backing image.

**Created images** are recorded in the source domain's live metadata before the job starts
(:func:`mark`); a migration that ends with the VM still on the source removes them
(:func:`release`), also after an agent restart, since the metadata lives with the domain in
libvirtd rather than in the agent.
"""

from __future__ import annotations

import contextlib
import os.path
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import quoteattr

import structlog

import libvirt
from asyncmigfra.errors import IncompatibleDestination
from asyncmigfra.hypervisor.base import DiskCopy, MigrationRequest
from asyncmigfra.hypervisor.virt.errors import _code

__all__ = [
    "CopyRecord",
    "GuestDisk",
    "StoragePlan",
    "create_overlays",
    "guest_disks",
    "local_disk_refusal",
    "mark",
    "copy_size",
    "plan_storage",
    "pool_by_directory",
    "pool_room",
    "release",
    "release_paths",
    "room_needed",
    "source_copies",
    "unmark",
]

log = structlog.stdlib.get_logger("asyncmigfra.hypervisor.virt")

#: Pool types whose volumes every host of the cluster sees (libvirt's pool type names).
SHARED_POOL_TYPES = frozenset(
    {"netfs", "gluster", "rbd", "iscsi", "iscsi-direct", "scsi", "mpath", "sheepdog", "vstorage"}
)
#: Filesystem types (``/proc/self/mountinfo``) that libvirt itself treats as shared.
SHARED_FS_TYPES = frozenset(
    {
        "nfs", "nfs4", "ceph", "fuse.ceph", "glusterfs", "fuse.glusterfs", "gfs2", "ocfs2",
        "cifs", "smb3", "beegfs", "gpfs", "lustre", "fuse.quobyte", "afs", "9p", "virtiofs",
    }
)  # fmt: skip

#: The namespace of the agent's element in a domain's ``<metadata>``.
METADATA_URI = "https://asyncmigfra.org/xmlns/storage-copy/1"
_METADATA_KEY = "asyncmigfra"

Sharing = Literal["skipped", "shared", "local", "unknown"]


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestDisk:
    """One disk of the guest on the source host."""

    target: str
    #: ``file``, ``block``, ``network``, ``volume``, ...
    kind: str
    path: str | None
    format: str | None
    sharing: Sharing
    #: Why it counts as shared or skipped (for messages); empty for local disks.
    why: str = ""
    #: Virtual size and host allocation (bytes), from ``blockInfo``.
    capacity: int = 0
    allocation: int = 0
    #: The backing image of a layered disk (``inc`` copies only the top layer).
    backing: str | None = None
    backing_format: str | None = None
    #: ``detect_zeroes='unmap'``: zero blocks stay unallocated on the destination.
    sparse: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class StoragePlan:
    """The disks a migration copies, as the pre-check found them."""

    copies: tuple[DiskCopy, ...]
    #: The same disks as :class:`GuestDisk` (for :func:`create_overlays`).
    disks: tuple[GuestDisk, ...]


# ---- the source side ---------------------------------------------------------------------


def _mounts() -> list[tuple[str, str]]:
    """``(mount point, fs type)`` of the agent's mount namespace, longest first."""
    found: list[tuple[str, str]] = []
    try:
        text = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return found
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right:
            continue
        point = fields[4].replace("\\040", " ")
        found.append((point, right.split()[0]))
    found.sort(key=lambda item: len(item[0]), reverse=True)
    return found


def _fs_type(path: str, mounts: Sequence[tuple[str, str]]) -> str | None:
    for point, fstype in mounts:
        if path == point or path.startswith(point.rstrip("/") + "/"):
            return fstype
    return None


def _pool_type(pool: Any) -> str:
    root = ET.fromstring(pool.XMLDesc(0))  # noqa: S314 - libvirt's own XML
    return root.get("type", "")


def _sharing_of_file(
    conn: Any, path: str, mounts: Sequence[tuple[str, str]] | None
) -> tuple[Sharing, str]:
    try:
        pool = conn.storageVolLookupByPath(path).storagePoolLookupByVolume()
    except libvirt.libvirtError:
        pool = None
    if pool is not None:
        kind = _pool_type(pool)
        where = f"pool '{pool.name()}' ({kind})"
        return ("shared" if kind in SHARED_POOL_TYPES else "local"), where
    if mounts is not None:
        fstype = _fs_type(path, mounts)
        if fstype is not None:
            where = f"{fstype} filesystem"
            return ("shared" if fstype in SHARED_FS_TYPES else "local"), where
    return "unknown", "outside every storage pool"


def _disk_sharing(
    conn: Any,
    disk: ET.Element,
    kind: str,
    path: str | None,
    mounts: Sequence[tuple[str, str]] | None,
) -> tuple[Sharing, str]:
    if disk.get("device", "disk") in ("cdrom", "floppy"):
        return "skipped", f"a {disk.get('device')} drive"
    if disk.find("readonly") is not None:
        return "skipped", "read-only"
    if disk.find("shareable") is not None:
        return "skipped", "shareable"
    if kind == "network":
        protocol = disk.find("source")
        name = protocol.get("protocol", "network") if protocol is not None else "network"
        return "shared", f"a {name} disk"
    if kind == "volume":
        source = disk.find("source")
        pool_name = source.get("pool") if source is not None else None
        try:
            kind_of_pool = _pool_type(conn.storagePoolLookupByName(pool_name))
        except libvirt.libvirtError:
            return "unknown", f"a volume of pool '{pool_name}'"
        where = f"pool '{pool_name}' ({kind_of_pool})"
        return ("shared" if kind_of_pool in SHARED_POOL_TYPES else "local"), where
    if path is None:
        return "skipped", "empty"
    return _sharing_of_file(conn, path, mounts)


def _sees_host_mounts(conn: Any) -> bool:
    """Whether the agent shares the host's filesystem view: a local URI (no host part)."""
    try:
        uri = str(conn.getURI())
    except libvirt.libvirtError:
        return False
    rest = uri.partition("://")[2]
    return not rest.split("/", 1)[0] and "socket=" not in uri


def guest_disks(conn: Any, name: str) -> list[GuestDisk]:
    """The disks of domain ``name`` with what the copy needs to know about each."""
    dom = conn.lookupByName(name)
    root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 - libvirt's own XML
    mounts = _mounts() if _sees_host_mounts(conn) else None
    disks: list[GuestDisk] = []
    for disk in root.iterfind("devices/disk"):
        target_el = disk.find("target")
        target = target_el.get("dev", "") if target_el is not None else ""
        kind = disk.get("type", "file")
        source = disk.find("source")
        path = None
        if source is not None:
            path = source.get("file") or source.get("dev")
        driver = disk.find("driver")
        fmt = driver.get("type") if driver is not None else None
        sharing, why = _disk_sharing(conn, disk, kind, path, mounts)
        capacity = allocation = 0
        if sharing in ("local", "unknown") and target:
            with contextlib.suppress(libvirt.libvirtError):
                capacity, allocation, _physical = (int(v) for v in dom.blockInfo(target))
        backing, backing_format = _backing(disk)
        disks.append(
            GuestDisk(
                target=target,
                kind=kind,
                path=path,
                format=fmt,
                sharing=sharing,
                why=why,
                capacity=capacity,
                allocation=allocation,
                backing=backing,
                backing_format=backing_format,
                sparse=driver is not None and driver.get("detect_zeroes") == "unmap",
            )
        )
    return disks


def _backing(disk: ET.Element) -> tuple[str | None, str | None]:
    store = disk.find("backingStore")
    if store is None:
        return None, None
    source = store.find("source")
    path = None
    if source is not None:
        path = source.get("file") or source.get("dev")
    fmt_el = store.find("format")
    return path, fmt_el.get("type") if fmt_el is not None else None


def local_disk_refusal(disks: Iterable[GuestDisk], host: str) -> str | None:
    """The refusal of a migration without ``copy-storage`` whose guest has local disks (the
    VM would arrive without its data), or ``None``."""
    local = [d for d in disks if d.sharing == "local"]
    if not local:
        return None
    named = ", ".join(f"{d.target} ({d.path}, {d.why})" for d in local)
    return (
        f"the VM has local disks that {host} cannot see: {named}; migrate with copy-storage"
        " all (or inc) to copy them"
    )


def _choose(disks: Sequence[GuestDisk], request: MigrationRequest) -> list[GuestDisk]:
    """The disks to copy: those named by ``migrate-disks``, else every local one."""
    by_target = {d.target: d for d in disks}
    if not request.migrate_disks:
        return [d for d in disks if d.sharing in ("local", "unknown")]
    chosen: list[GuestDisk] = []
    for target in request.migrate_disks:
        disk = by_target.get(target)
        if disk is None:
            known = ", ".join(sorted(by_target)) or "none"
            raise IncompatibleDestination(
                f"migrate-disks names {target}, which the VM does not have (its disks: {known})"
            )
        if disk.sharing in ("skipped", "shared"):
            raise IncompatibleDestination(
                f"migrate-disks names {target}, which is not copied: {disk.why}"
            )
        chosen.append(disk)
    return chosen


def _check_kinds(disks: Iterable[GuestDisk]) -> None:
    for disk in disks:
        if disk.kind != "file" or not disk.path:
            raise IncompatibleDestination(
                f"copy-storage copies file disks (qcow2, raw); {disk.target} is a {disk.kind} disk"
            )


def copy_size(disk: GuestDisk, mode: str) -> int:
    """Bytes the copy of ``disk`` moves: ``inc`` the top layer's allocation, ``all`` the
    whole virtual disk (what libvirt reports as ``disk_total``)."""
    return disk.allocation if mode == "inc" else disk.capacity


def room_needed(disk: GuestDisk, mode: str) -> int:
    """Bytes the copy allocates on the destination: the whole disk (QEMU 7.2 writes the
    zero blocks too) unless the disk has ``detect_zeroes='unmap'``."""
    return disk.allocation if disk.sparse else copy_size(disk, mode)


def source_copies(conn: Any, request: MigrationRequest) -> tuple[DiskCopy, ...]:
    """The disks ``request`` would copy, seen from the source alone (no destination)."""
    if request.copy_storage == "none":
        return ()
    chosen = _choose(guest_disks(conn, request.vm_name), request)
    return tuple(
        DiskCopy(
            target=d.target,
            path=d.path or "",
            size=copy_size(d, request.copy_storage),
            room=room_needed(d, request.copy_storage),
        )
        for d in chosen
    )


def pool_room(conn: Any) -> dict[str, int]:
    """Free bytes of each active storage pool with a directory, by that directory."""
    room: dict[str, int] = {}
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        with contextlib.suppress(libvirt.libvirtError):
            target = _pool_target(pool)
            if target is not None:
                room[target] = int(pool.info()[3])
    return room


# ---- the destination side ----------------------------------------------------------------


def _pool_target(pool: Any) -> str | None:
    try:
        text = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")  # noqa: S314
    except ET.ParseError:
        return None
    return os.path.normpath(text) if text and text.startswith("/") else None


def pool_by_directory(conn: Any, directory: str) -> Any | None:
    """The storage pool (active or not) whose target is ``directory``, or ``None``.
    (``virStoragePoolLookupByTargetPath`` does the same, but not on every driver.)"""
    wanted = os.path.normpath(directory)
    for pool in conn.listAllStoragePools(0):
        with contextlib.suppress(libvirt.libvirtError):
            if _pool_target(pool) == wanted:
                return pool
    return None


def _dest_pool(dconn: Any, directory: str, host: str, target: str) -> Any:
    pool = pool_by_directory(dconn, directory)
    if pool is None:
        raise IncompatibleDestination(
            f"no storage pool on {host} covers {directory} (needed to create {target}'s"
            " image there): define a dir pool over it on the destination"
        )
    if not pool.isActive():
        raise IncompatibleDestination(
            f"storage pool '{pool.name()}' on {host} ({directory}) is not active"
        )
    return pool


def _has_volume(pool: Any, name: str) -> bool:
    try:
        pool.storageVolLookupByName(name)
    except libvirt.libvirtError as exc:
        if _code(exc) != libvirt.VIR_ERR_NO_STORAGE_VOL:
            raise
        return False
    return True


def _has_path(dconn: Any, path: str) -> bool:
    try:
        dconn.storageVolLookupByPath(path)
    except libvirt.libvirtError as exc:
        if _code(exc) != libvirt.VIR_ERR_NO_STORAGE_VOL:
            raise
        return False
    return True


def plan_storage(conn: Any, dconn: Any, request: MigrationRequest, *, host: str) -> StoragePlan:
    """Check the source's disks and the destination ``host`` (``dconn``) for ``request``.

    ``copy-storage: none``: refuses a guest with local disks; else nothing to copy.
    ``all``/``inc``: the disks to copy and what each moves, or ``IncompatibleDestination``
    naming the disk and the reason. Nothing is changed on either host.
    """
    disks = guest_disks(conn, request.vm_name)
    if request.copy_storage == "none":
        refusal = local_disk_refusal(disks, host)
        if refusal is not None:
            raise IncompatibleDestination(refusal)
        return StoragePlan(copies=(), disks=())
    chosen = _choose(disks, request)
    _check_kinds(chosen)
    need: dict[str, int] = {}
    pools: dict[str, Any] = {}
    copies: list[DiskCopy] = []
    for disk in chosen:
        assert disk.path is not None  # _check_kinds
        directory, name = os.path.split(disk.path)
        pool = pools.get(directory)
        if pool is None:
            pool = pools[directory] = _dest_pool(dconn, directory, host, disk.target)
            with contextlib.suppress(libvirt.libvirtError):
                pool.refresh(0)  # see images created since the pool was last scanned
        if _has_volume(pool, name):
            raise IncompatibleDestination(
                f"an image already exists at {disk.path} on {host}: copying {disk.target}"
                " would overwrite it (remove it first, or the disk is on storage both hosts"
                " share and needs no copy)"
            )
        size = copy_size(disk, request.copy_storage)
        backing = disk.backing if request.copy_storage == "inc" else None
        if backing and not _has_path(dconn, backing):
            raise IncompatibleDestination(
                f"copy-storage inc needs {disk.target}'s backing image {backing} on {host}"
                " (in a storage pool there); it copies only the top layer"
            )
        room = room_needed(disk, request.copy_storage)
        need[directory] = need.get(directory, 0) + room
        copies.append(DiskCopy(target=disk.target, path=disk.path, size=size, room=room))
    for directory, bytes_needed in need.items():
        available = int(pools[directory].info()[3])
        if bytes_needed > available:
            raise IncompatibleDestination(
                f"not enough room in storage pool '{pools[directory].name()}' on {host}"
                f" ({directory}): {bytes_needed} bytes needed, {available} available"
            )
    return StoragePlan(copies=tuple(copies), disks=tuple(chosen))


def create_overlays(dconn: Any, plan: StoragePlan, *, host: str) -> list[str]:
    """``inc``: create each disk's top image on the destination (over its backing image,
    which libvirt cannot do for an incremental copy); return the paths created. On a
    failure the ones already created are removed before it raises."""
    created: list[str] = []
    try:
        for disk in plan.disks:
            assert disk.path is not None
            directory, name = os.path.split(disk.path)
            pool = _dest_pool(dconn, directory, host, disk.target)
            fmt = disk.format or "raw"
            backing = ""
            if disk.backing:
                fmt = "qcow2" if fmt == "raw" else fmt
                backing = (
                    f"<backingStore><path>{_text(disk.backing)}</path>"
                    f"<format type={quoteattr(disk.backing_format or 'raw')}/></backingStore>"
                )
            pool.createXML(
                f"<volume><name>{_text(name)}</name><capacity>{disk.capacity}</capacity>"
                f"<target><format type={quoteattr(fmt)}/></target>{backing}</volume>",
                0,
            )
            created.append(disk.path)
    except BaseException:
        _removed, problems = release_paths(dconn, created)
        if problems:
            log.error("storage.overlay_cleanup_failed", problems=problems)  # noqa: TRY400
        raise
    return created


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ---- created images: recorded with the domain, removed on failure ------------------------


def mark(dom: Any, *, source: str, destination: str, paths: Sequence[str]) -> None:
    """Record on the (running) source domain which images on ``destination`` the migration
    creates, before it starts (live metadata: it stays with the domain in libvirtd). The
    record travels with a migrated guest; ``source`` tells whose record it is."""
    body = "".join(f"<created path={quoteattr(p)}/>" for p in paths)
    dom.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        f"<storage-copy source={quoteattr(source)} destination={quoteattr(destination)}>"
        f"{body}</storage-copy>",
        _METADATA_KEY,
        METADATA_URI,
        libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )


@dataclass(frozen=True, slots=True)
class CopyRecord:
    """What :func:`mark` recorded."""

    source: str
    destination: str
    paths: tuple[str, ...]


def marked(dom: Any) -> CopyRecord | None:
    """The record :func:`mark` left on ``dom``, or ``None``."""
    try:
        text = dom.metadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_URI, libvirt.VIR_DOMAIN_AFFECT_LIVE
        )
    except libvirt.libvirtError as exc:
        if _code(exc) in (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_OPERATION_INVALID):
            return None
        raise
    root = ET.fromstring(text)  # noqa: S314 - written by mark(), read back from libvirt
    paths = tuple(str(el.get("path")) for el in root.iterfind("created") if el.get("path"))
    return CopyRecord(root.get("source", ""), root.get("destination", ""), paths)


def unmark(dom: Any) -> None:
    """Remove the record of :func:`mark` (after the images were removed, or kept)."""
    with contextlib.suppress(libvirt.libvirtError):
        dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            None,
            None,
            METADATA_URI,
            libvirt.VIR_DOMAIN_AFFECT_LIVE,
        )


def release_paths(dconn: Any, paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """Delete the images at ``paths`` on the destination: ``(removed, problems)``."""
    removed: list[str] = []
    problems: list[str] = []
    refreshed: set[str] = set()
    for path in paths:
        directory = os.path.dirname(path)
        try:
            if directory not in refreshed:
                refreshed.add(directory)
                pool = pool_by_directory(dconn, directory)
                if pool is not None:
                    with contextlib.suppress(libvirt.libvirtError):
                        pool.refresh(0)
            dconn.storageVolLookupByPath(path).delete(0)
        except libvirt.libvirtError as exc:
            if _code(exc) != libvirt.VIR_ERR_NO_STORAGE_VOL:
                problems.append(f"{path}: {exc.get_error_message()}")
            # else never created (the job failed before) or already gone
        else:
            removed.append(path)
    return removed, problems


def release(
    dom: Any, dconn: Any, vm_name: str, *, source: str, destination: str | None
) -> tuple[list[str], list[str]]:
    """After a migration that left the VM on ``source``: remove the images it created on
    the destination (``dconn``), as :func:`mark` recorded them. Only a record this host made
    for that destination counts (a guest that arrived here carries its previous source's
    record), and nothing is removed while a domain of that name is active on the
    destination (the images are in use there). Returns ``(removed, problems)``."""
    record = marked(dom)
    if record is None or record.source != source:
        return [], []
    if destination is not None and record.destination != destination:
        return [], []
    try:
        active_there = bool(dconn.lookupByName(vm_name).isActive())
    except libvirt.libvirtError:
        active_there = False
    if active_there:
        return [], [f"{vm_name} is active on {record.destination}: its images were kept"]
    removed, problems = release_paths(dconn, record.paths)
    if not problems:
        unmark(dom)
    return removed, problems
