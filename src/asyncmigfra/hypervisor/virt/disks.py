"""A guest's disks as a storage copy (``copy-storage``) sees them on the source host: which
are copied, which are left alone and why, and how much each copy moves.

Every function blocks (libvirt calls) and runs in the back-end's worker threads.

Disks fall in four groups, decided from libvirt's own view of the host
(``storageVolLookupByPath`` and the pool's type) and, when the agent shares the host's mounts
(a local libvirt URI), the filesystem type in ``/proc/self/mountinfo``:

* *skipped*, never copied and never blocking: cdrom and floppy drives, empty drives,
  ``<readonly/>`` and ``<shareable/>`` disks (libvirt skips the same ones);
* *shared*: network disks (rbd, iscsi, nbd, gluster, ...), disks in a pool of a shared type
  (netfs, gluster, rbd, iscsi, mpath, ...) and files on a shared filesystem (nfs, ceph, gfs2,
  ocfs2, cifs, ...), a ``dir`` pool over an NFS mount included: left alone, since the
  destination sees the same data and copying would write over the image the guest runs on;
* *local*: files in a local pool (dir, fs, logical, disk, zfs) or on a local filesystem;
* *unknown*: a file outside every pool, or in a ``dir``/``fs`` pool, whose filesystem the
  agent cannot see (a remote URI): copied when copying; without a copy, the destination
  probe of :mod:`~asyncmigfra.hypervisor.virt.storage` or else libvirt's own check decides.

The destination's side (and a probe that finds a directory both hosts share even where the
mounts are not visible) is :mod:`asyncmigfra.hypervisor.virt.storage`.
"""

from __future__ import annotations

import contextlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import libvirt
from asyncmigfra.errors import IncompatibleDestination
from asyncmigfra.hypervisor.base import DiskCopy, MigrationRequest

__all__ = [
    "DIRECTORY_POOL_TYPES",
    "MAX_COPIED_DISKS",
    "SHARED_FS_TYPES",
    "SHARED_POOL_TYPES",
    "GuestDisk",
    "choose_disks",
    "copy_size",
    "guest_disks",
    "local_disk_refusal",
    "pool_type",
    "room_needed",
    "source_copies",
]

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
#: Pool types backed by a directory on some filesystem (which may itself be shared).
DIRECTORY_POOL_TYPES = frozenset({"dir", "fs"})
#: libvirt takes at most 64 migration parameters over its RPC; each copied disk is one.
MAX_COPIED_DISKS = 48

Sharing = Literal["skipped", "shared", "local", "unknown"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestDisk:
    """One disk of the guest on the source host."""

    target: str
    #: ``file``, ``block``, ``network``, ``volume``, ...
    kind: str
    path: str | None
    format: str | None
    sharing: Sharing
    #: Why it counts as what it is (for messages).
    why: str = ""
    #: Type of the storage pool holding it, if any (``dir``, ``netfs``, ...).
    pool_type: str | None = None
    #: Virtual size and host allocation (bytes), from ``blockInfo``; ``None``: unknown.
    capacity: int | None = None
    allocation: int | None = None
    #: The backing image of a layered disk (``inc`` copies only the top layer).
    backing: str | None = None
    backing_format: str | None = None
    #: It has a ``<backingStore>`` whose source is not a file (rbd, http, ...).
    backing_not_a_file: bool = False
    #: ``detect_zeroes='unmap'``: zero blocks stay unallocated on the destination.
    sparse: bool = False


# ---- where a file lives --------------------------------------------------------------------


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
        point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        found.append((point, right.split()[0]))
    found.sort(key=lambda item: len(item[0]), reverse=True)
    return found


def _fs_type(path: str, mounts: Sequence[tuple[str, str]]) -> str | None:
    for point, fstype in mounts:
        if path == point or path.startswith(point.rstrip("/") + "/"):
            return fstype
    return None


def pool_type(pool: Any) -> str:
    """A storage pool's type (``dir``, ``netfs``, ...)."""
    root = ET.fromstring(pool.XMLDesc(0))  # noqa: S314 - libvirt's own XML
    return root.get("type", "")


def _sharing_of_file(
    conn: Any, path: str, mounts: Sequence[tuple[str, str]] | None
) -> tuple[Sharing, str, str | None]:
    try:
        pool = conn.storageVolLookupByPath(path).storagePoolLookupByVolume()
    except libvirt.libvirtError:
        pool = None
    fstype = _fs_type(path, mounts) if mounts is not None else None
    if pool is not None:
        kind = pool_type(pool)
        where = f"pool '{pool.name()}' ({kind})"
        if kind in SHARED_POOL_TYPES:
            return "shared", where, kind
        if kind in DIRECTORY_POOL_TYPES:
            if fstype in SHARED_FS_TYPES:
                return "shared", f"{where} on {fstype}", kind
            if mounts is None:  # a directory on a filesystem the agent cannot see
                return "unknown", where, kind
        return "local", where, kind
    if fstype is not None:
        where = f"{fstype} filesystem"
        return ("shared" if fstype in SHARED_FS_TYPES else "local"), where, None
    return "unknown", "outside every storage pool", None


def _disk_sharing(
    conn: Any,
    disk: ET.Element,
    kind: str,
    path: str | None,
    mounts: Sequence[tuple[str, str]] | None,
) -> tuple[Sharing, str, str | None]:
    if disk.get("device", "disk") in ("cdrom", "floppy"):
        return "skipped", f"a {disk.get('device')} drive", None
    if disk.find("readonly") is not None:
        return "skipped", "read-only", None
    if disk.find("shareable") is not None:
        return "skipped", "shareable", None
    source = disk.find("source")
    if kind == "network":
        name = source.get("protocol", "network") if source is not None else "network"
        return "shared", f"a {name} disk", None
    if kind == "volume":
        pool_name = source.get("pool") if source is not None else None
        try:
            kind_of_pool = pool_type(conn.storagePoolLookupByName(pool_name))
        except libvirt.libvirtError:
            return "unknown", f"a volume of pool '{pool_name}'", None
        where = f"pool '{pool_name}' ({kind_of_pool})"
        sharing: Sharing = "shared" if kind_of_pool in SHARED_POOL_TYPES else "local"
        return sharing, where, kind_of_pool
    if path is None:
        return "skipped", f"no source ({kind} disk)" if kind != "file" else "empty", None
    return _sharing_of_file(conn, path, mounts)


def _sees_host_mounts(conn: Any) -> bool:
    """Whether the agent may read the host's mounts as its own: a local URI on the default
    socket (an agent in a container with a private mount namespace should use a remote URI
    or pools of the right type)."""
    try:
        uri = str(conn.getURI())
    except libvirt.libvirtError:
        return False
    rest = uri.partition("://")[2]
    return not rest.split("/", 1)[0] and "socket=" not in uri


# ---- the disks -------------------------------------------------------------------------------


def guest_disks(conn: Any, name: str, xml: str | None = None) -> list[GuestDisk]:
    """The disks of domain ``name`` with what a copy needs to know about each. ``xml``: its
    live definition as read a moment ago (else read now)."""
    dom: Any = None
    if xml is None:
        dom = conn.lookupByName(name)
        xml = str(dom.XMLDesc(0))
    root = ET.fromstring(xml)  # noqa: S314 - libvirt's own XML
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
        sharing, why, kind_of_pool = _disk_sharing(conn, disk, kind, path, mounts)
        capacity = allocation = None
        if sharing in ("local", "unknown") and target:
            with contextlib.suppress(libvirt.libvirtError):
                dom = dom or conn.lookupByName(name)
                capacity, allocation, _physical = (int(v) for v in dom.blockInfo(target))
        backing, backing_format, not_a_file = _backing(disk)
        disks.append(
            GuestDisk(
                target=target,
                kind=kind,
                path=path,
                format=driver.get("type") if driver is not None else None,
                sharing=sharing,
                why=why,
                pool_type=kind_of_pool,
                capacity=capacity,
                allocation=allocation,
                backing=backing,
                backing_format=backing_format,
                backing_not_a_file=not_a_file,
                sparse=driver is not None and driver.get("detect_zeroes") == "unmap",
            )
        )
    return disks


def _backing(disk: ET.Element) -> tuple[str | None, str | None, bool]:
    """The top layer's backing image: ``(path, format, has a backing that is no file)``."""
    store = disk.find("backingStore")
    if store is None:
        return None, None, False
    source = store.find("source")
    if source is None:  # <backingStore/>: the image has none
        return None, None, False
    path = source.get("file") or source.get("dev")
    fmt_el = store.find("format")
    return path, fmt_el.get("type") if fmt_el is not None else None, path is None


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


def choose_disks(disks: Sequence[GuestDisk], request: MigrationRequest) -> list[GuestDisk]:
    """The disks to copy: those named by ``migrate-disks``, else every local (or unknown)
    one; each checked to be a copyable file of known size. ``IncompatibleDestination``
    names the disk and the reason."""
    by_target = {d.target: d for d in disks}
    if not request.migrate_disks:
        chosen = [d for d in disks if d.sharing in ("local", "unknown")]
    else:
        chosen = []
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
    if len(chosen) > MAX_COPIED_DISKS:
        raise IncompatibleDestination(
            f"{len(chosen)} disks to copy: libvirt takes at most {MAX_COPIED_DISKS} in one"
            " migration; name fewer with migrate-disks"
        )
    for disk in chosen:
        _check_copyable(disk)
    return chosen


def _check_copyable(disk: GuestDisk) -> None:
    if disk.kind != "file" or not disk.path:
        raise IncompatibleDestination(
            f"copy-storage copies file disks (qcow2, raw); {disk.target} is a {disk.kind} disk"
        )
    if _CONTROL.search(disk.path) or not disk.path.startswith("/"):
        raise IncompatibleDestination(
            f"{disk.target}'s image path {disk.path!r} is not an absolute path without"
            " control characters: not copied"
        )
    if disk.capacity is None or disk.allocation is None:
        raise IncompatibleDestination(
            f"the size of {disk.target} ({disk.path}) cannot be read: not copied"
        )


def copy_size(disk: GuestDisk, mode: str) -> int:
    """Bytes the copy of ``disk`` moves: ``inc`` the top layer's allocation, ``all`` the
    whole virtual disk (what libvirt reports as ``disk_total``)."""
    return (disk.allocation if mode == "inc" else disk.capacity) or 0


def room_needed(disk: GuestDisk, mode: str) -> int:
    """Bytes the copy allocates on the destination: the whole disk (QEMU 7.2 writes the
    zero blocks too) unless the disk has ``detect_zeroes='unmap'``."""
    return (disk.allocation or 0) if disk.sparse else copy_size(disk, mode)


def source_copies(conn: Any, request: MigrationRequest) -> tuple[DiskCopy, ...]:
    """The disks ``request`` would copy, seen from the source alone (no destination)."""
    if request.copy_storage == "none":
        return ()
    chosen = choose_disks(guest_disks(conn, request.vm_name), request)
    return tuple(
        DiskCopy(
            target=d.target,
            path=d.path or "",
            size=copy_size(d, request.copy_storage),
            room=room_needed(d, request.copy_storage),
            data=d.allocation,
        )
        for d in chosen
    )
