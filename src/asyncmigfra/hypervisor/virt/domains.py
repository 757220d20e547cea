"""Domain, device and host helpers that run in worker threads.

Domain state, device XML, PCI devices, guest and destination facts.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from xml.sax.saxutils import escape, quoteattr

import structlog

import libvirt
from asyncmigfra.domxml import first_name_text
from asyncmigfra.hypervisor.base import (
    DomainInfo,
    DomainState,
)
from asyncmigfra.hypervisor.virt.errors import _FLAG_FALLBACK_CODES, _code, _message
from asyncmigfra.model import Ivshmem, PciAddress, PciId, VcpuMap

# The package's logger name, as before the split into modules.
log = structlog.stdlib.get_logger("asyncmigfra.hypervisor.virt")

T = TypeVar("T")


_STATES: Final = list(DomainState)
_JOB_NONE: Final[int] = libvirt.VIR_DOMAIN_JOB_NONE
_MIGRATION_OUT: Final[int] = libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT
_SHUTOFF: Final = libvirt.VIR_DOMAIN_SHUTOFF
_RUNNING: Final = libvirt.VIR_DOMAIN_RUNNING
_PAUSED: Final = libvirt.VIR_DOMAIN_PAUSED
_XML_FLAGS: Final = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
_UNDEFINE_FLAGS: Final = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM,
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA,
    0,
)


def _domain_state(number: int) -> DomainState:
    return _STATES[number] if 0 <= number < len(_STATES) else DomainState.NOSTATE


def _with_flags(call: Callable[[int], T], flag_choices: Sequence[int]) -> T:
    """``call(flags)`` with the first flags the driver accepts (the rest are fallbacks)."""
    for flags in flag_choices[:-1]:
        try:
            return call(flags)
        except libvirt.libvirtError as exc:
            if _code(exc) not in _FLAG_FALLBACK_CODES:
                raise
    return call(flag_choices[-1])


def _state_or_none(conn: Any, name: str) -> int | None:
    """The domain's state number, ``None`` when it does not exist (any more)."""
    try:
        return int(conn.lookupByName(name).state()[0])
    except libvirt.libvirtError as exc:
        if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


@dataclass(frozen=True, slots=True)
class _Existing:
    state: int
    persistent: bool
    #: Inactive, secure XML of a persistent domain (to restore on rollback).
    xml: str | None


def _existing(conn: Any, name: str, *, want_xml: bool) -> _Existing | None:
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise
    persistent = bool(dom.isPersistent())
    xml = str(dom.XMLDesc(_XML_FLAGS)) if want_xml and persistent else None
    return _Existing(state=int(dom.state()[0]), persistent=persistent, xml=xml)


def _host_cpus(conn: Any) -> int:
    """Length of the host's CPU map (what pinning bitmaps are sized by)."""
    return int(conn.getCPUMap(0)[0])


def _pin_all(dom: Any, vcpu_map: VcpuMap, cpus: int, flags: int) -> None:
    """Pin vCPU i to ``vcpu_map[i]`` for each listed vCPU, falling back to AFFECT_CURRENT
    when the driver does not know ``flags``."""
    for vcpu, allowed in enumerate(vcpu_map):
        cpumap = tuple(cpu in allowed for cpu in range(cpus))

        def pin(flags: int, vcpu: int = vcpu, cpumap: tuple[bool, ...] = cpumap) -> None:
            dom.pinVcpuFlags(vcpu, cpumap, flags)

        _with_flags(pin, (flags, libvirt.VIR_DOMAIN_AFFECT_CURRENT))


def _attach_fn(name: str, device_xml: str) -> Callable[[Any], None]:
    """``fn(conn)`` attaching ``device_xml`` to the running domain ``name`` (live only)."""

    def attach(conn: Any) -> None:
        conn.lookupByName(name).attachDeviceFlags(device_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    return attach


def _xml_name(xml: str) -> str | None:
    return first_name_text(xml)


def _hostdev_xml(addr: PciAddress) -> str:
    return (
        "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
        f"<address domain='0x{addr.domain:04x}' bus='0x{addr.bus:02x}' "
        f"slot='0x{addr.slot:02x}' function='0x{addr.function:x}'/>"
        "</source></hostdev>"
    )


def _shmem_xml(ivshmem: Ivshmem) -> str:
    """The original's device XML (the size unit is always M; ``path`` is not used)."""
    return (
        f"<shmem name={quoteattr(ivshmem.id)}><model type='ivshmem-plain'/>"
        f"<size unit='M'>{escape(ivshmem.size)}</size>"
        f"<alias name={quoteattr(ivshmem.id)}/></shmem>"
    )


def _int_text(element: ET.Element | None) -> int | None:
    if element is None or element.text is None:
        return None
    try:
        return int(element.text.strip(), 0)
    except ValueError:
        return None


def _node_device_pci(xml: str) -> tuple[PciId, PciAddress] | None:
    """(vendor:device, address) of a node device's PCI capability (XML from libvirtd)."""
    root = ET.fromstring(xml)  # noqa: S314 - produced by libvirtd, not by a task
    cap = root.find("capability[@type='pci']")
    if cap is None:
        return None
    vendor, product = cap.find("vendor"), cap.find("product")
    if vendor is None or product is None:
        return None
    numbers = [_int_text(cap.find(tag)) for tag in ("domain", "bus", "slot", "function")]
    try:
        ids = PciId(int(vendor.get("id", ""), 16), int(product.get("id", ""), 16))
    except ValueError:
        return None
    if any(n is None for n in numbers):
        return None
    domain, bus, slot, function = (n or 0 for n in numbers)
    return ids, PciAddress(domain, bus, slot, function)


def _hostdev_addresses(xml: str) -> set[PciAddress]:
    """PCI addresses of a domain's ``<hostdev type='pci'>`` sources (XML from libvirtd)."""
    root = ET.fromstring(xml)  # noqa: S314 - produced by libvirtd, not by a task
    found: set[PciAddress] = set()
    for address in root.findall("./devices/hostdev[@type='pci']/source/address"):
        try:
            found.add(
                PciAddress(
                    int(address.get("domain", "0"), 0),
                    int(address.get("bus", "0"), 0),
                    int(address.get("slot", "0"), 0),
                    int(address.get("function", "0"), 0),
                )
            )
        except ValueError:
            continue
    return found


@dataclass(frozen=True, slots=True)
class PluggedDevice:
    """A device of a running domain that must be unplugged for a migration."""

    #: The device XML to detach with (as libvirtd wrote it).
    xml: str
    #: The XML to plug it back in with: the same without ``<alias>`` (libvirt only accepts
    #: ``ua-`` aliases from users); the guest-side PCI ``<address>`` is kept.
    reattach_xml: str
    #: libvirt's alias, which the device-removed event names.
    alias: str | None
    #: The host device's address (``<hostdev>`` only).
    host_address: PciAddress | None = None


def migration_devices(xml: str) -> tuple[list[PluggedDevice], list[PluggedDevice]]:
    """(``<shmem>`` devices, PCI ``<hostdev>`` devices) of a live domain XML."""
    return migration_devices_in(ET.fromstring(xml))  # noqa: S314 - produced by libvirtd


def migration_devices_in(root: ET.Element) -> tuple[list[PluggedDevice], list[PluggedDevice]]:
    """:func:`migration_devices` of a parsed definition (read only)."""

    def plugged(element: ET.Element, host_address: PciAddress | None = None) -> PluggedDevice:
        alias = element.find("alias")
        text = ET.tostring(element, encoding="unicode").strip()
        bare = ET.fromstring(text)  # noqa: S314 - our own serialisation of libvirtd's XML
        for child in bare.findall("alias"):
            bare.remove(child)
        return PluggedDevice(
            xml=text,
            reattach_xml=ET.tostring(bare, encoding="unicode").strip(),
            alias=alias.get("name") if alias is not None else None,
            host_address=host_address,
        )

    shmems = [plugged(e) for e in root.findall("./devices/shmem")]
    hostdevs: list[PluggedDevice] = []
    for element in root.findall("./devices/hostdev[@type='pci']"):
        address = element.find("source/address")
        if address is None:
            continue
        try:
            host = PciAddress(
                int(address.get("domain", "0"), 0),
                int(address.get("bus", "0"), 0),
                int(address.get("slot", "0"), 0),
                int(address.get("function", "0"), 0),
            )
        except ValueError:
            continue
        hostdevs.append(plugged(element, host))
    return shmems, hostdevs


def _pci_candidates(conn: Any, wanted: PciId) -> tuple[list[PciAddress], int]:
    """(free devices of type ``wanted``, how many of that type exist) on this host."""
    matching: list[PciAddress] = []
    for device in conn.listAllDevices(libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_PCI_DEV):
        parsed = _node_device_pci(str(device.XMLDesc(0)))
        if parsed is not None and parsed[0] == wanted:
            matching.append(parsed[1])
    used: set[PciAddress] = set()
    if matching:
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            with contextlib.suppress(libvirt.libvirtError):
                used |= _hostdev_addresses(str(dom.XMLDesc(0)))
    return [addr for addr in matching if addr not in used], len(matching)


@dataclass(frozen=True, slots=True)
class _GuestFacts:
    name: str
    virttype: str
    arch: str | None
    machine: str | None
    #: The guest's ``<cpu>`` XML when it names a model (custom mode); ``None`` otherwise.
    cpu_xml: str | None
    memory_kib: int


@dataclass(frozen=True, slots=True)
class _DestinationFacts:
    name_active: bool
    free_kib: int | None
    capabilities: _HostCapabilities

    @property
    def host_uuid(self) -> str | None:
        """The destination host's UUID (capabilities ``host/uuid``); ``None``: not reported."""
        return self.capabilities.host_uuid


def _guest_facts(conn: Any, name: str) -> _GuestFacts:
    dom = conn.lookupByName(name)
    root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 - libvirt's own XML
    return _guest_facts_of(name, root, int(dom.info()[1]))


def _guest_facts_of(name: str, root: ET.Element, memory_kib: int) -> _GuestFacts:
    """The facts of guest ``name`` from its definition ``root`` and ``info()``'s maximum
    memory (KiB)."""
    ostype = root.find("os/type")
    cpu = root.find("cpu")
    cpu_xml = None
    if cpu is not None and cpu.get("mode", "custom") == "custom" and cpu.find("model") is not None:
        cpu_xml = ET.tostring(cpu, encoding="unicode")
    return _GuestFacts(
        name=name,
        virttype=root.get("type", "qemu"),
        arch=ostype.get("arch") if ostype is not None else None,
        machine=ostype.get("machine") if ostype is not None else None,
        cpu_xml=cpu_xml,
        memory_kib=memory_kib,
    )


def _host_uuid(conn: Any) -> str | None:
    """The host's UUID from its capabilities: what libvirt compares to refuse a migration to
    the same host ("Attempt to migrate guest to the same host"); ``None`` when the driver
    reports none (the test driver)."""
    try:
        caps = ET.fromstring(conn.getCapabilities())  # noqa: S314 - libvirt's own XML
    except (libvirt.libvirtError, ET.ParseError):
        return None
    return _caps_uuid(caps)


def _caps_uuid(caps: ET.Element) -> str | None:
    text = (caps.findtext("host/uuid") or "").strip().lower()
    return text or None


@dataclass(frozen=True, slots=True)
class _HostCapabilities:
    """What a host's capabilities say that the pre-checks use: its UUID and the machine
    types per guest architecture. It does not change while a connection lives, so it is
    read once per connection (:meth:`_Connection.memo`)."""

    host_uuid: str | None
    machines: Mapping[str, frozenset[str]]


def _capabilities(conn: Any) -> _HostCapabilities:
    machines: dict[str, set[str]] = {}
    host_uuid: str | None = None
    with contextlib.suppress(libvirt.libvirtError, ET.ParseError):
        caps = ET.fromstring(conn.getCapabilities())  # noqa: S314 - libvirt's own XML
        host_uuid = _caps_uuid(caps)
        for arch in caps.iterfind("guest/arch"):
            names = machines.setdefault(arch.get("name") or "", set())
            for machine in arch.iter("machine"):
                if machine.text:
                    names.add(machine.text.strip())
                if machine.get("canonical"):
                    names.add(str(machine.get("canonical")))
    return _HostCapabilities(
        host_uuid=host_uuid, machines={k: frozenset(v) for k, v in machines.items()}
    )


def _destination_facts(conn: Any, name: str, memo: dict[object, object]) -> _DestinationFacts:
    """What the pre-checks read on the destination that does not depend on the guest's
    definition (so it runs beside :func:`_guest_facts`): whether ``name`` is active there,
    its capabilities (``memo``: once per connection) and its free memory. The CPU
    comparison follows in :func:`_cpu_compare`; ``machines`` holds every architecture's."""
    try:
        name_active = bool(conn.lookupByName(name).isActive())
    except libvirt.libvirtError as exc:
        if _code(exc) != libvirt.VIR_ERR_NO_DOMAIN:
            raise
        name_active = False
    caps = memo.get("capabilities")
    if not isinstance(caps, _HostCapabilities):
        caps = memo["capabilities"] = _capabilities(conn)
    free_kib: int | None = None
    try:
        mem = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0)
        free_kib = int(mem["free"]) + int(mem.get("cached", 0)) + int(mem.get("buffers", 0))
    except (libvirt.libvirtError, KeyError):
        with contextlib.suppress(libvirt.libvirtError):
            free_kib = int(conn.getFreeMemory()) // 1024
    return _DestinationFacts(name_active=name_active, free_kib=free_kib, capabilities=caps)


def _machines_for(caps: _HostCapabilities, arch: str | None) -> frozenset[str]:
    """The machine types ``caps`` lists for ``arch`` (every architecture's without one)."""
    if arch:
        return caps.machines.get(arch, frozenset())
    return frozenset().union(*caps.machines.values())


def _cpu_compare(conn: Any, guest: _GuestFacts, memo: dict[object, object]) -> int | None:
    """``compareHypervisorCPU`` of the guest's CPU model on this host, once per CPU
    definition (arch, machine, virt type, ``<cpu>``) and connection (``memo``): the answer
    depends only on those and the host, which a reconnect may have changed."""
    if guest.cpu_xml is None:
        return None
    key = ("cpu", guest.arch, guest.machine, guest.virttype, guest.cpu_xml)
    if key in memo:
        known = memo[key]
        return known if isinstance(known, int) else None
    verdict: int | None = None
    try:
        verdict = int(
            conn.compareHypervisorCPU(
                None, guest.arch, guest.machine, guest.virttype, guest.cpu_xml, 0
            )
        )
    except libvirt.libvirtError as exc:  # old or limited drivers: not a verdict
        log.info("migration.cpu_check_skipped", error=_message(exc))
    memo[key] = verdict
    return verdict


def _domain_info(dom: Any) -> DomainInfo:
    return _domain_info_of(str(dom.name()), dom.info(), bool(dom.isPersistent()))


def _domain_info_of(name: str, info: Sequence[int], persistent: bool) -> DomainInfo:
    """A domain's listing from its ``info()`` and persistence."""
    state, _max_mem, memory, vcpus, _cpu_time = info
    return DomainInfo(
        name=name,
        state=_domain_state(int(state)),
        vcpus=int(vcpus),
        memory=int(memory),
        persistent=persistent,
    )


def _domain_named(conn: Any, name: str) -> DomainInfo | None:
    """Domain ``name`` as :func:`_list_domains` lists it, or ``None`` (none, or it vanished
    while being read)."""
    try:
        return _domain_info(conn.lookupByName(name))
    except libvirt.libvirtError as exc:
        if _code(exc) != libvirt.VIR_ERR_NO_DOMAIN:
            raise
        return None


def _list_domains(conn: Any, active_only: bool) -> list[DomainInfo]:
    flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE if active_only else 0
    infos: list[DomainInfo] = []
    for dom in conn.listAllDomains(flags):
        try:
            infos.append(_domain_info(dom))
        except libvirt.libvirtError as exc:
            if _code(exc) != libvirt.VIR_ERR_NO_DOMAIN:  # vanished while listing: skip it
                raise
    return sorted(infos, key=lambda d: d.name)
