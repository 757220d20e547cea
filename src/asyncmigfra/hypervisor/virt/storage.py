"""The destination side of a storage copy (``copy-storage``): what it must offer before
anything is touched, the images the migration creates there, and their removal when the
migration fails. The source's disks are :mod:`~asyncmigfra.hypervisor.virt.disks`.

Every function blocks (libvirt calls) and runs in the back-end's worker threads.

**The destination** must have, for each disk to copy: an active storage pool whose target
directory is the image's directory, no image at that path yet (copying over it would destroy
it), room in the pool, and for ``inc`` the backing image (same size and format). A directory
both hosts share is found with a probe, as Nova does with a file: a tiny volume created
through the destination's pool and looked for through the source's (then removed).

**Created images.** The agent creates every destination image itself through the pool
(libvirt would pre-create one for ``all`` but silently writes into a file that exists, and
cannot for ``inc``), so an image it removes later is one it created. Before creating them it
records them in the source domain's live metadata (:func:`mark`); a migration that ends
with the guest still on the source removes them (:func:`release`), also after an agent
restart, since the record lives with the domain in libvirtd. Removal keeps any image a
domain on the destination uses, and acts only on a record this host made for that
destination (domain XML from a task may not carry the agent's namespace at all).
"""

from __future__ import annotations

import contextlib
import os.path
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import libvirt
from asyncmigfra.domxml import AGENT_XML_NAMESPACE
from asyncmigfra.errors import IncompatibleDestination
from asyncmigfra.hypervisor.base import DiskCopy, MigrationRequest
from asyncmigfra.hypervisor.virt.disks import (
    DIRECTORY_POOL_TYPES,
    GuestDisk,
    choose_disks,
    copy_size,
    guest_disks,
    local_disk_refusal,
    room_needed,
)
from asyncmigfra.hypervisor.virt.errors import _code

__all__ = [
    "METADATA_URI",
    "CopyRecord",
    "StoragePlan",
    "create_images",
    "mark",
    "marked",
    "plan_storage",
    "pool_by_directory",
    "pool_room",
    "release",
    "release_paths",
    "unmark",
]

#: The namespace of the agent's element in a domain's ``<metadata>``.
METADATA_URI = f"{AGENT_XML_NAMESPACE}storage-copy/1"
_METADATA_KEY = "asyncmigfra"
_PROBE_PREFIX = ".asyncmigfra-probe-"


@dataclass(frozen=True, slots=True, kw_only=True)
class StoragePlan:
    """The disks a migration copies, as the pre-check found them."""

    mode: str
    copies: tuple[DiskCopy, ...]
    #: The same disks as :class:`GuestDisk` (sizes, formats, backing images).
    disks: tuple[GuestDisk, ...]


# ---- pools ---------------------------------------------------------------------------------


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


def pool_room(conn: Any) -> dict[str, int]:
    """Free bytes of each active storage pool with a directory, by that directory."""
    room: dict[str, int] = {}
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        with contextlib.suppress(libvirt.libvirtError):
            target = _pool_target(pool)
            if target is not None:
                room[target] = int(pool.info()[3])
    return room


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
    try:
        refresh(pool)  # see the images created since the pool was last scanned
    except libvirt.libvirtError as exc:
        raise IncompatibleDestination(
            f"storage pool '{pool.name()}' on {host} cannot be scanned: {exc.get_error_message()}"
        ) from None
    return pool


#: s a pool refresh waits for the pool's volume builds (another copy creating its image).
_REFRESH_WAIT = 10.0


def refresh(pool: Any) -> None:
    """``pool.refresh``, waiting (bounded, in this worker thread) while libvirt refuses it
    because the pool builds a volume ("has asynchronous jobs running"): another migration
    creating its image in the same pool at the same moment."""
    deadline = time.monotonic() + _REFRESH_WAIT
    while True:
        try:
            pool.refresh(0)
        except libvirt.libvirtError as exc:
            busy = "asynchronous jobs" in (exc.get_error_message() or "")
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
        else:
            return


def _volume(pool_or_conn: Any, name_or_path: str, *, by_path: bool = False) -> Any | None:
    try:
        if by_path:
            return pool_or_conn.storageVolLookupByPath(name_or_path)
        return pool_or_conn.storageVolLookupByName(name_or_path)
    except libvirt.libvirtError as exc:
        if _code(exc) != libvirt.VIR_ERR_NO_STORAGE_VOL:
            raise
        return None


def _volume_format(volume: Any) -> str | None:
    root = ET.fromstring(volume.XMLDesc(0))  # noqa: S314 - libvirt's own XML
    fmt = root.find("target/format")
    return fmt.get("type") if fmt is not None else None


# ---- is a directory shared? ------------------------------------------------------------------


def shares_directory(conn: Any, dconn: Any, directory: str) -> bool | None:
    """Whether the source (``conn``) sees a file created in ``directory`` through the
    destination's pool (``dconn``): the directory is then storage both hosts share.
    ``None`` when it cannot be told (no pool over it on either side)."""
    here, there = pool_by_directory(conn, directory), pool_by_directory(dconn, directory)
    if here is None or there is None or not here.isActive() or not there.isActive():
        return None
    name = f"{_PROBE_PREFIX}{uuid.uuid4().hex}"
    probe = there.createXML(
        f"<volume><name>{name}</name><capacity>0</capacity>"
        "<target><format type='raw'/></target></volume>",
        0,
    )
    seen = False
    try:
        refresh(here)
        seen = _volume(here, name) is not None
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            probe.delete(0)
        if seen:  # the source's pool listed it: forget it there too
            with contextlib.suppress(libvirt.libvirtError):
                here.refresh(0)
    return seen


def _settle_sharing(conn: Any, dconn: Any, disks: Sequence[GuestDisk]) -> list[GuestDisk]:
    """Disks in ``dir``/``fs`` pools (local, or unknown for want of the host's mounts) whose
    directory the destination shares become shared; unknown ones it does not share become
    local. One probe per directory."""
    verdicts: dict[str, bool | None] = {}

    def settled(disk: GuestDisk) -> GuestDisk:
        if (
            disk.sharing not in ("local", "unknown")
            or disk.pool_type not in DIRECTORY_POOL_TYPES
            or not disk.path
        ):
            return disk
        directory = os.path.dirname(disk.path)
        if directory not in verdicts:
            verdicts[directory] = shares_directory(conn, dconn, directory)
        verdict = verdicts[directory]
        if verdict is True:
            return replace(disk, sharing="shared", why=f"{disk.why}, shared with the destination")
        if verdict is False:
            return replace(disk, sharing="local")
        return disk

    return [settled(d) for d in disks]


# ---- the pre-check -------------------------------------------------------------------------


def plan_storage(
    conn: Any, dconn: Any, request: MigrationRequest, *, host: str, xml: str | None = None
) -> StoragePlan:
    """Check the source's disks and the destination ``host`` (``dconn``) for ``request``
    (``xml``: the guest's live definition as read a moment ago, else read now).

    ``copy-storage: none``: refuses a guest with local disks; else nothing to copy.
    ``all``/``inc``: the disks to copy and what each moves, or ``IncompatibleDestination``
    naming the disk and the reason. Nothing stays changed on either host (the sharing probe
    removes its file).
    """
    disks = _settle_sharing(conn, dconn, guest_disks(conn, request.vm_name, xml))
    mode = request.copy_storage
    if mode == "none":
        refusal = local_disk_refusal(disks, host)
        if refusal is not None:
            raise IncompatibleDestination(refusal)
        return StoragePlan(mode=mode, copies=(), disks=())
    chosen = choose_disks(disks, request)
    need: dict[str, int] = {}
    pools: dict[str, Any] = {}
    copies: list[DiskCopy] = []
    for disk in chosen:
        assert disk.path is not None  # choose_disks
        directory, name = os.path.split(disk.path)
        if directory not in pools:
            pools[directory] = _dest_pool(dconn, directory, host, disk.target)
        if _volume(pools[directory], name) is not None:
            raise IncompatibleDestination(
                f"an image already exists at {disk.path} on {host}: copying {disk.target}"
                " would overwrite it (remove it first, or the disk is on storage both hosts"
                " share and needs no copy)"
            )
        if mode == "inc":
            _check_backing(conn, dconn, disk, host)
        room = room_needed(disk, mode)
        need[directory] = need.get(directory, 0) + room
        copies.append(
            DiskCopy(
                target=disk.target,
                path=disk.path,
                size=copy_size(disk, mode),
                room=room,
                data=disk.allocation,
            )
        )
    for directory, bytes_needed in need.items():
        available = int(pools[directory].info()[3])
        if bytes_needed > available:
            raise IncompatibleDestination(
                f"not enough room in storage pool '{pools[directory].name()}' on {host}"
                f" ({directory}): {bytes_needed} bytes needed, {available} available"
            )
    return StoragePlan(mode=mode, copies=tuple(copies), disks=tuple(chosen))


def _check_backing(conn: Any, dconn: Any, disk: GuestDisk, host: str) -> None:
    """``inc`` copies only the top layer: the destination must hold the same backing image
    (same path, size and format; its contents are not compared)."""
    if disk.backing_not_a_file:
        raise IncompatibleDestination(
            f"copy-storage inc: {disk.target}'s backing image is not a file; copy it with"
            " copy-storage all"
        )
    if not disk.backing:
        return
    there = _volume(dconn, disk.backing, by_path=True)
    if there is None:
        raise IncompatibleDestination(
            f"copy-storage inc needs {disk.target}'s backing image {disk.backing} on {host}"
            " (in a storage pool there); it copies only the top layer"
        )
    here = _volume(conn, disk.backing, by_path=True)
    if here is None:
        return  # not in a pool here: nothing to compare it with
    size_here, size_there = int(here.info()[1]), int(there.info()[1])
    fmt_here, fmt_there = _volume_format(here), _volume_format(there)
    if (size_here, fmt_here) != (size_there, fmt_there):
        raise IncompatibleDestination(
            f"copy-storage inc: {disk.backing} on {host} is not the image {disk.target}"
            f" is layered on ({size_there} bytes {fmt_there} there, {size_here} bytes"
            f" {fmt_here} here)"
        )


# ---- the images the migration creates --------------------------------------------------------


def create_images(dconn: Any, plan: StoragePlan, *, host: str) -> list[str]:
    """Create each disk's destination image through its pool: ``all`` an empty image of the
    same size and format, ``inc`` the top layer over the backing image. An image that
    appeared meanwhile stops it (``IncompatibleDestination``: creating never overwrites).
    Returns the paths created; on a failure the ones already created are removed first."""
    created: list[str] = []
    try:
        for disk in plan.disks:
            assert disk.path is not None
            assert disk.capacity is not None
            directory, name = os.path.split(disk.path)
            pool = _dest_pool(dconn, directory, host, disk.target)
            fmt = disk.format or "raw"
            backing = ""
            if plan.mode == "inc" and disk.backing:
                fmt = "qcow2" if fmt == "raw" else fmt
                backing = (
                    f"<backingStore><path>{escape(disk.backing)}</path>"
                    f"<format type={quoteattr(disk.backing_format or 'raw')}/></backingStore>"
                )
            xml = (
                f"<volume><name>{escape(name)}</name><capacity>{disk.capacity}</capacity>"
                f"<allocation>0</allocation><target><format type={quoteattr(fmt)}/></target>"
                f"{backing}</volume>"
            )
            try:
                pool.createXML(xml, 0)
            except libvirt.libvirtError as exc:
                if _volume(pool, name) is not None:
                    raise IncompatibleDestination(
                        f"an image appeared at {disk.path} on {host}: not overwritten"
                    ) from None
                raise IncompatibleDestination(
                    f"cannot create {disk.path} on {host}: {exc.get_error_message()}"
                ) from None
            created.append(disk.path)
    except BaseException:
        release_paths(dconn, created)
        raise
    return created


# ---- the record of created images ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CopyRecord:
    """What :func:`mark` recorded."""

    source: str
    destination: str
    paths: tuple[str, ...]


def mark(dom: Any, *, source: str, destination: str, paths: Sequence[str]) -> None:
    """Record on the (running) source domain which images on ``destination`` the migration
    creates, before creating them (live metadata: it stays with the domain in libvirtd).
    The record travels with a migrated guest; ``source`` tells whose record it is."""
    body = "".join(f"<created path={quoteattr(p)}/>" for p in paths)
    dom.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        f"<storage-copy source={quoteattr(source)} destination={quoteattr(destination)}>"
        f"{body}</storage-copy>",
        _METADATA_KEY,
        METADATA_URI,
        libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )


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
    try:
        root = ET.fromstring(text)  # noqa: S314 - written by mark(), read back from libvirt
    except ET.ParseError:
        return None
    paths = tuple(str(el.get("path")) for el in root.iterfind("created") if el.get("path"))
    return CopyRecord(root.get("source", ""), root.get("destination", ""), paths)


def marked_in(root: ET.Element) -> CopyRecord | None:
    """The record :func:`mark` left, as the running domain's live definition ``root`` shows
    it (what :func:`marked` reads with a call of its own), or ``None``."""
    element = root.find(f"metadata/{{{METADATA_URI}}}storage-copy")
    if element is None:
        return None
    created = f"{{{METADATA_URI}}}created"
    paths = tuple(str(el.get("path")) for el in element.iterfind(created) if el.get("path"))
    return CopyRecord(element.get("source", ""), element.get("destination", ""), paths)


def unmark(dom: Any) -> None:
    """Remove the record of :func:`mark` (after the images were removed, or kept)."""
    with contextlib.suppress(libvirt.libvirtError):
        dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, METADATA_URI,
            libvirt.VIR_DOMAIN_AFFECT_LIVE,
        )  # fmt: skip


def _paths_in_use(dconn: Any) -> dict[str, str]:
    """Every image a domain on the destination names (disks and their backing chains), with
    that domain's name."""
    used: dict[str, str] = {}
    for dom in dconn.listAllDomains(0):
        with contextlib.suppress(libvirt.libvirtError, ET.ParseError):
            root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 - libvirt's own XML
            for source in root.iter("source"):
                for attribute in ("file", "dev"):
                    value = source.get(attribute)
                    if value:
                        used[os.path.normpath(value)] = str(dom.name())
    return used


def release_paths(
    dconn: Any, paths: Iterable[str], *, keep: dict[str, str] | None = None
) -> tuple[list[str], list[str]]:
    """Delete the images at ``paths`` on the destination, except those in ``keep`` (path ->
    the domain using it): ``(removed, problems)``."""
    removed: list[str] = []
    problems: list[str] = []
    refreshed: dict[str, bool] = {}
    for path in paths:
        user = (keep or {}).get(os.path.normpath(path))
        if user is not None:
            problems.append(f"{path}: kept, domain {user} uses it")
            continue
        directory = os.path.dirname(path)
        try:
            if directory not in refreshed:
                pool = pool_by_directory(dconn, directory)
                if pool is not None:
                    refresh(pool)
                refreshed[directory] = True
            volume = _volume(dconn, path, by_path=True)
            if volume is not None:
                volume.delete(0)
                removed.append(path)
            # else never created (the migration failed before) or already gone
        except libvirt.libvirtError as exc:
            problems.append(f"{path}: {exc.get_error_message()}")
    return removed, problems


def release(
    dom: Any, dconn: Any, vm_name: str, *, source: str, destination: str
) -> tuple[list[str], list[str]]:
    """After a migration that left the VM on ``source``: remove the images it created on
    ``destination`` (``dconn``) as :func:`mark` recorded them. Only a record this host made
    for that destination counts (a guest that arrived here carries its previous source's
    record); nothing is removed while a domain of that name may be active there (any answer
    but "no such domain" keeps them), nor an image any domain there uses. Returns
    ``(removed, problems)``; the record goes once nothing is left to remove."""
    record = marked(dom)
    if record is None or record.source != source or record.destination != destination:
        return [], []
    try:
        active_there = bool(dconn.lookupByName(vm_name).isActive())
    except libvirt.libvirtError as exc:
        if _code(exc) != libvirt.VIR_ERR_NO_DOMAIN:
            return [], [f"{destination} cannot tell whether {vm_name} runs there: images kept"]
        active_there = False
    if active_there:
        return [], [f"{vm_name} is active on {destination}: its images were kept"]
    removed, problems = release_paths(dconn, record.paths, keep=_paths_in_use(dconn))
    if not problems:
        unmark(dom)
    return removed, problems
