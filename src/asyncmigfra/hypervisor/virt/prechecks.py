"""What a libvirt migration checks before it touches the guest (:func:`check_migration`)
and right before its job starts (:func:`start_facts`), each in as few round trips as it can:
the guest's side from the migration's :mod:`~.guestlook` when it has one, the destination's
side (its facts, the CPU comparison, the storage plan) in one round trip."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import libvirt
from asyncmigfra.errors import ConnectionFailed, IncompatibleDestination, TaskError
from asyncmigfra.hypervisor.base import DiskCopy, MigrationRequest
from asyncmigfra.hypervisor.virt import storagecopy
from asyncmigfra.hypervisor.virt.domains import (
    _JOB_NONE,
    _SHUTOFF,
    _cpu_compare,
    _destination_facts,
    _DestinationFacts,
    _guest_facts,
    _guest_facts_of,
    _host_uuid,
    _machines_for,
)
from asyncmigfra.hypervisor.virt.errors import _message, translate_error
from asyncmigfra.hypervisor.virt.guestlook import guest_look, spend
from asyncmigfra.hypervisor.virt.migrationparams import _num, check_stream_support
from asyncmigfra.hypervisor.virt.storagecopy import StorageLook

if TYPE_CHECKING:
    from asyncmigfra.hypervisor.virt.backend import LibvirtHypervisor

__all__ = ["check_migration", "start_facts"]

_DISKS_PREFIX = "Error checking the disks: "


async def check_migration(
    hv: LibvirtHypervisor, request: MigrationRequest, *, memory: bool = True
) -> tuple[DiskCopy, ...]:
    """:meth:`LibvirtHypervisor.check_migration`: the guest's facts (:func:`_guest_facts`),
    then the destination's (:func:`_destination_facts`, the CPU comparison) and the storage
    look (:func:`storagecopy.read_look`) in one round trip; failures are reported in the
    order the checks are listed (the storage plan's last)."""
    uri = hv._local_uri(request.driver)
    name = request.vm_name
    if request.compression:
        check_stream_support(request, await hv._mapped(uri, lambda c: c.getLibVersion()))
    if uri not in hv._host_uuids:
        hv._host_uuids[uri] = await hv._mapped(uri, _host_uuid)
    here = hv._host_uuids[uri]
    target = await hv.resolve_destination(
        request.destination, driver=request.driver, transport=request.transport
    )
    look = await guest_look(hv, uri, name)
    if look is not None:
        guest = _guest_facts_of(name, look.root(), look.info[1])
    else:
        guest = await hv._mapped(uri, lambda conn: _guest_facts(conn, name))
    source_pool, dest_pool = hv._pool[uri], hv._pool[target.uri]

    def destination_side(dconn: Any) -> tuple[_DestinationFacts, int | None, StorageLook]:
        memo = dest_pool.memo(dconn)
        dest = _destination_facts(dconn, name, memo)
        cpu = _cpu_compare(dconn, guest, memo) if guest.cpu_xml is not None else None
        try:
            disks = storagecopy.read_look(hv, source_pool.get(), lambda: dconn, request, look)
        except libvirt.libvirtError as exc:
            disks = StorageLook(None, error=translate_error(exc, _DISKS_PREFIX))
        except TaskError as exc:
            disks = StorageLook(None, error=exc)
        return dest, cpu, disks

    try:
        dest, cpu_compare, disks = await hv._call(target.uri, destination_side)
    except libvirt.libvirtError as exc:
        raise ConnectionFailed(
            f"destination {request.destination} cannot be checked: {_message(exc)}"
        ) from exc
    machines = _machines_for(dest.capabilities, guest.arch)
    where = request.destination
    if here is not None and here == dest.host_uuid:
        raise IncompatibleDestination(
            f"destination {where} ({target.uri}) is this host (same host UUID"
            f" {dest.host_uuid}): a VM cannot migrate to the host it runs on"
        )
    if dest.name_active:
        raise IncompatibleDestination(f"a domain named '{guest.name}' is already active on {where}")
    if machines and guest.machine and guest.machine not in machines:
        raise IncompatibleDestination(
            f"machine type {guest.machine} ({guest.arch}) is not supported on {where}"
        )
    if cpu_compare == libvirt.VIR_CPU_COMPARE_INCOMPATIBLE:
        raise IncompatibleDestination(f"the guest CPU model is not usable on {where}")
    if (
        memory
        and request.mode != "offline"
        and dest.free_kib is not None
        and guest.memory_kib > dest.free_kib
    ):
        raise IncompatibleDestination(
            f"not enough free memory on {where}: {guest.memory_kib} KiB needed, "
            f"{dest.free_kib} KiB free"
        )
    plan = await storagecopy.check(hv, uri, target, request, disks)
    return plan.copies


async def start_facts(hv: LibvirtHypervisor, uri: str, name: str) -> tuple[int, bool, int | None]:
    """Right before the job: the guest's state, persistence and the operation of a job
    already running on it (``None``: none). Read now, not taken from the migration's look:
    these guard the job against what others did to the guest since the pre-checks (shut it
    off, started a job of their own). Ends the look: the job changes the guest."""
    spend(uri, name)

    def read(conn: Any) -> tuple[int, bool, int | None]:
        dom = conn.lookupByName(name)
        state = int(dom.state()[0])
        operation: int | None = None  # the operation of a job already running
        if state != _SHUTOFF:
            try:
                raw = dom.jobStats()
            except libvirt.libvirtError:
                pass  # no job statistics here (test driver), or not active: nothing to check
            else:
                if _num(raw, "type") != _JOB_NONE:
                    operation = _num(raw, "operation")
        return state, bool(dom.isPersistent()), operation

    return await hv._mapped(uri, read)
