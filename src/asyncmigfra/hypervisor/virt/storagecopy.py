"""The steps of a storage copy (``copy-storage``) around a libvirt migration job, each run on
the back-end's worker threads: the pre-check, the images created right before the job, and
their removal when the job leaves the guest on the source (the blocking parts are
:mod:`~asyncmigfra.hypervisor.virt.disks` and :mod:`~asyncmigfra.hypervisor.virt.storage`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import structlog

import libvirt
from asyncmigfra.errors import IncompatibleDestination, TaskError
from asyncmigfra.hypervisor.base import MigrationRequest
from asyncmigfra.hypervisor.virt import storage
from asyncmigfra.hypervisor.virt.guestlook import GuestLook, spend
from asyncmigfra.hypervisor.virt.storage import CopyRecord, StoragePlan
from asyncmigfra.wire.parsing.names import valid_host

if TYPE_CHECKING:
    from asyncmigfra.hypervisor.virt.backend import LibvirtHypervisor
    from asyncmigfra.hypervisor.virt.migrationparams import MigrationTarget

__all__ = [
    "StorageLook",
    "check",
    "forget_record",
    "look",
    "prepare",
    "read_look",
    "release_created",
]

# The package's logger name, as before the split into modules.
log = structlog.stdlib.get_logger("asyncmigfra.hypervisor.virt")


@dataclass(frozen=True, slots=True)
class StorageLook:
    """What :func:`look` read: the domain's record of images an earlier copy created, and
    the storage plan (or the error planning raised, reported when the caller is ready)."""

    record: CopyRecord | None
    plan: StoragePlan | None = None
    error: BaseException | None = None


async def look(
    hv: LibvirtHypervisor, uri: str, target: MigrationTarget, request: MigrationRequest
) -> StorageLook:
    """The pre-check's reading part (:func:`read_look`) in one round trip to the worker
    threads; a failure is returned for the caller to report when it is ready."""

    def op(conn: Any) -> StorageLook:
        return read_look(hv, conn, hv._pool[target.uri].get, request)

    try:
        return await hv._mapped(uri, op, "Error checking the disks: ")
    except TaskError as exc:
        return StorageLook(None, error=exc)


def read_look(
    hv: LibvirtHypervisor,
    conn: Any,
    destination: Callable[[], Any],
    request: MigrationRequest,
    guest: GuestLook | None = None,
) -> StorageLook:
    """Worker thread: the record an earlier copy left and, when it left none to remove
    first, the plan (:func:`storage.plan_storage`, on the connection ``destination()``
    gives). ``guest``: the guest as a look read it a moment ago (its live definition holds
    the record). Changes nothing (the sharing probe removes its file), so it may run before
    the other pre-checks decided. Raises what planning raises (unmapped)."""
    name = request.vm_name
    if guest is not None:
        record = storage.marked_in(guest.root()) if guest.active else None
    else:
        try:
            record = storage.marked(conn.lookupByName(name))
        except libvirt.libvirtError as exc:
            log.warning("migration.storage_record_unreadable", vm=name, error=str(exc))
            record = None
    if record is not None and record.source == hv.hostname:
        return StorageLook(record)  # left over: removed before planning
    xml = guest.xml if guest is not None else None
    plan = storage.plan_storage(conn, destination(), request, host=request.destination, xml=xml)
    return StorageLook(record, plan)


async def check(
    hv: LibvirtHypervisor,
    uri: str,
    target: MigrationTarget,
    request: MigrationRequest,
    looked: StorageLook | None = None,
) -> StoragePlan:
    """The pre-check (:func:`storage.plan_storage`); first, images an earlier copy of this
    VM left on a destination (its record is still on the domain) are removed. ``looked``:
    what :func:`look` read a moment ago (read now when not given)."""
    if looked is None:
        looked = await look(hv, uri, target, request)
    if looked.error is not None:
        raise looked.error
    if looked.plan is not None:
        return looked.plan
    if looked.record is not None:
        spend(uri, request.vm_name)  # the record changes: later reads read for themselves
        await _release_leftovers(hv, uri, request.vm_name, looked.record)

    def op(conn: Any) -> StoragePlan:
        dconn = hv._pool[target.uri].get()
        return storage.plan_storage(conn, dconn, request, host=request.destination)

    return await hv._mapped(uri, op, "Error checking the disks: ")


async def prepare(
    hv: LibvirtHypervisor, uri: str, target: MigrationTarget, request: MigrationRequest
) -> MigrationRequest:
    """Right before the job: check again (the pre-check may be minutes old), record the
    images the copy creates on the destination, create them, and name the disks to copy
    explicitly (without a list, libvirt would copy every writable disk, shared ones
    included). A request that finds nothing to copy goes on without a copy. Cancelled or
    failed half-way, what was created is removed again before this returns."""
    if request.copy_storage == "none":
        return request
    plan = await check(hv, uri, target, request)
    if not plan.copies:
        log.info("migration.no_disk_to_copy", vm=request.vm_name)
        return replace(request, copy_storage="none", migrate_disks=())
    source = hv.hostname

    def create(conn: Any) -> None:
        dom = conn.lookupByName(request.vm_name)
        dconn = hv._pool[target.uri].get()
        storage.mark(
            dom, source=source, destination=target.host, paths=[c.path for c in plan.copies]
        )
        try:
            storage.create_images(dconn, plan, host=target.host)
        except BaseException:
            storage.unmark(dom)  # create_images removed what it had created
            raise

    try:
        await hv._mapped(uri, create, "Error preparing the disks: ")
    except asyncio.CancelledError:
        # The worker thread finished its work before the cancel surfaced here.
        await asyncio.shield(_release_quietly(hv, uri, request.vm_name, target))
        raise
    return replace(request, migrate_disks=tuple(c.target for c in plan.copies))


async def _release_quietly(
    hv: LibvirtHypervisor, uri: str, vm_name: str, target: MigrationTarget
) -> None:
    note = await release_created(hv, uri, vm_name, target)
    if note is not None:
        log.error("migration.created_images_left", vm=vm_name, note=note)


async def release_created(
    hv: LibvirtHypervisor, uri: str, vm_name: str, target: MigrationTarget | None
) -> str | None:
    """After a failure that left the guest on the source: remove the images the copy
    created on the destination (:func:`storage.release`), as the domain's record lists them,
    and only when the record is this host's for ``target`` (``None``: the destination is not
    known, an adopted job without its task: nothing is removed). A note for the result when
    something could not be removed."""
    record = await _record(hv, uri, vm_name)
    if record is None or record.source != hv.hostname:
        return None
    if target is None or record.destination != target.host:
        log.warning(
            "migration.storage_record_not_ours",
            vm=vm_name,
            destination=record.destination,
            target=target.host if target else None,
        )
        return None
    return await _release(hv, uri, vm_name, record, target)


async def forget_record(hv: LibvirtHypervisor, vm_name: str, target: MigrationTarget) -> None:
    """After success: the record travelled with the guest to ``target``; drop it there (only
    this host's record for that destination)."""
    source = hv.hostname

    def op(conn: Any) -> None:
        dom = conn.lookupByName(vm_name)
        record = storage.marked(dom)
        if record is not None and (record.source, record.destination) == (source, target.host):
            storage.unmark(dom)

    try:
        await hv._call(target.uri, op)
    except (libvirt.libvirtError, TaskError) as exc:
        log.info("migration.storage_record_kept", error=str(exc))


async def _record(hv: LibvirtHypervisor, uri: str, vm_name: str) -> CopyRecord | None:
    try:
        return await hv._call(uri, lambda c: storage.marked(c.lookupByName(vm_name)))
    except (libvirt.libvirtError, TaskError) as exc:
        log.warning("migration.storage_record_unreadable", vm=vm_name, error=str(exc))
        return None


async def _release(
    hv: LibvirtHypervisor, uri: str, vm_name: str, record: CopyRecord, target: MigrationTarget
) -> str | None:
    source = hv.hostname

    def op(conn: Any) -> tuple[list[str], list[str]]:
        dconn = hv._pool[target.uri].get()
        dom = conn.lookupByName(vm_name)
        return storage.release(dom, dconn, vm_name, source=source, destination=record.destination)

    try:
        removed, problems = await hv._call(uri, op)
    except (libvirt.libvirtError, TaskError) as exc:
        removed, problems = [], [str(exc)]
    if removed:
        log.info("migration.created_images_removed", vm=vm_name, images=removed)
    if not problems:
        return None
    log.error("migration.created_images_left", vm=vm_name, problems=problems)
    return "images the migration created on the destination were not all removed: " + (
        "; ".join(problems)
    )


async def _release_leftovers(
    hv: LibvirtHypervisor, uri: str, vm_name: str, record: CopyRecord
) -> None:
    """An earlier copy of this VM failed and its images could not be removed then (the
    destination was unreachable, the agent was down): remove them now, or refuse."""
    if record.source != hv.hostname:
        return
    if not valid_host(record.destination):
        log.warning("migration.storage_record_invalid", vm=vm_name)
        return
    target = await hv.resolve_destination(record.destination)
    note = await _release(hv, uri, vm_name, record, target)
    if note is not None:
        raise IncompatibleDestination(
            f"an earlier storage copy of {vm_name} to {record.destination} left images"
            f" there: {note}"
        )
