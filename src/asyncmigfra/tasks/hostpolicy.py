"""What a task may ask of the host: host devices, domain XML, drivers and transports.

Anyone who can publish on an agent's task topic can send it a task, so a task must not be able
to take what belongs to the host (a hostile review reproduced each of these):

* ``start vm`` with ``pci-ids``/``devs`` went on to attach the devices with ``managed='yes'``,
  which detaches them from the host: the host's own disk controller or NIC;
* domain XML with a disk on ``/etc/shadow``, a managed ``<hostdev>`` or ``qemu:commandline``
  (arbitrary QEMU arguments) was defined and started unchanged;
* a task's ``driver`` made an agent configured for one libvirt driver open another's local
  URI, and its ``transport`` made it connect out another way.

The rules (docs/security.md, config ``agent.*``), checked here, in the core, before any
back-end sees the task, so they hold for every back-end:

* ``agent.host-devices`` lists the only host devices a task may attach (empty by default, as
  Nova's ``device_spec``): ``pci-ids`` need a ``{vendor, device}`` entry, ``devs`` an
  ``{address}`` entry, a PCI ``<hostdev>`` in XML either (by its source address or its
  vendor and product).
* ``agent.xml-policy: strict`` (the default) refuses domain XML with a DOCTYPE, any element of
  libvirt's ``qemu:`` namespace (``commandline``, ``capabilities``, ``override``), host devices
  not listed, non-PCI host devices, network disks, and host files or devices outside
  ``agent.xml-allowed-paths`` (default: ``/var/lib/libvirt/images`` and the directories of the
  host's storage pools), including the emulator binary, kernels and firmware, disk and backing
  images, file systems, sockets, serial logs and interface scripts. ``trusted`` takes any XML
  (today's behaviour before this module; for operators who write the XML themselves).
* ``driver`` must be in ``agent.allowed-drivers`` (default: the configured driver) and a
  migration's ``transport`` in ``agent.allowed-transports`` (default: the configured one).

A refusal is a per-VM ``not-supported`` that names the element and the setting.
"""

from __future__ import annotations

import os.path
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from asyncmigfra.domxml import AGENT_XML_NAMESPACE
from asyncmigfra.errors import InvalidTask, NotSupported
from asyncmigfra.model import MigrateSpec, PciAddress, PciId, StartSpec, Subtask
from asyncmigfra.settings import AgentSettings, HostDevice, Settings

__all__ = ["DEFAULT_XML_PATHS", "HostPolicy"]

#: Where libvirt keeps images by default; always allowed unless the paths are configured.
DEFAULT_XML_PATHS: tuple[str, ...] = ("/var/lib/libvirt/images",)
#: Host files every guest may use (``<rng>`` backends, ``/dev/null`` serials).
_ALWAYS_ALLOWED_FILES = frozenset({"/dev/urandom", "/dev/random", "/dev/hwrng", "/dev/null"})
#: The QEMU binaries a ``<emulator>`` may name.
_EMULATOR = re.compile(r"/usr/(?:local/)?(?:bin|libexec)/qemu(?:-system-[a-z0-9_]+|-kvm)")
_QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"
#: Attributes that name a host path, on any element but ``<target>`` (the guest's side).
_PATH_ATTRIBUTES = ("file", "dir", "path", "socket", "template", "evdev")
#: Elements whose text is a host path (``<backend>`` only inside ``<rng>``).
_PATH_TEXT = frozenset({"kernel", "initrd", "dtb", "loader", "nvram", "backend"})
#: Device classes whose ``<source dev=...>`` is a host device node.
_DEV_PARENTS = frozenset({"disk", "serial", "console", "parallel", "channel", "input"})
_IVSHMEM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """The agent's rules for what tasks may ask of the host (see the module docstring)."""

    devices: tuple[HostDevice, ...]
    strict: bool
    #: ``None``: the defaults plus the storage pools' directories (asked per XML start).
    allowed_paths: tuple[str, ...] | None
    drivers: frozenset[str]
    transports: frozenset[str]

    @classmethod
    def from_settings(cls, settings: Settings) -> HostPolicy:
        agent: AgentSettings = settings.agent
        options = settings.hypervisor.options
        driver = str(options.get("driver", "qemu"))
        transport = str(options.get("transport", "ssh"))
        return cls(
            devices=agent.host_devices,
            strict=agent.xml_policy == "strict",
            allowed_paths=agent.xml_allowed_paths,
            drivers=frozenset(agent.allowed_drivers or (driver,)),
            transports=frozenset(agent.allowed_transports or (transport,)),
        )

    # ---------------------------------------------------------------- checks

    def check_subtask(self, spec: Subtask) -> None:
        """``driver`` and (migrations) ``transport`` are the configured ones."""
        if spec.driver is not None and spec.driver not in self.drivers:
            raise NotSupported(
                f"driver {spec.driver!r} is not allowed on this agent "
                f"(agent.allowed-drivers: {', '.join(sorted(self.drivers))})"
            )
        if isinstance(spec, MigrateSpec):
            transport = spec.parameter.transport
            if transport is not None and transport not in self.transports:
                raise NotSupported(
                    f"transport {transport!r} is not allowed on this agent "
                    f"(agent.allowed-transports: {', '.join(sorted(self.transports))})"
                )

    def needs_pool_paths(self, spec: StartSpec) -> bool:
        """Whether checking ``spec`` needs the host's storage pool directories."""
        return self.strict and spec.xml is not None and self.allowed_paths is None

    def check_start(self, spec: StartSpec, pool_paths: Sequence[str] = ()) -> None:
        """Devices of a ``start vm`` and its XML (``pool_paths``: the host's storage pool
        directories, used when ``agent.xml-allowed-paths`` is not set)."""
        for pci_id in spec.pci_ids:
            if not self._id_allowed(pci_id.vendor, pci_id.device):
                raise NotSupported(
                    f"pci-ids {_show_id(pci_id)}: not in agent.host-devices "
                    "(only listed host devices may be attached)"
                )
        for address in spec.devs:
            if not self._address_allowed(address):
                raise NotSupported(
                    f"devs {address}: not in agent.host-devices "
                    "(only listed host devices may be attached)"
                )
        if spec.ivshmem is not None and not _IVSHMEM_ID.fullmatch(spec.ivshmem.id):
            raise InvalidTask(
                f"ivshmem id {spec.ivshmem.id!r}: use up to 64 letters, digits, '.', '-', '_' "
                "(it names a file in /dev/shm)"
            )
        if spec.xml is not None:
            _check_agent_namespace(spec.xml)
        if spec.xml is not None and self.strict:
            allowed = self.allowed_paths
            if allowed is None:
                allowed = (*DEFAULT_XML_PATHS, *pool_paths)
            self._check_xml(spec.xml, allowed)

    # ---------------------------------------------------------------- XML

    def _check_xml(self, xml: str, allowed: Sequence[str]) -> None:
        if re.search(r"<!(?:DOCTYPE|ENTITY)", xml, re.IGNORECASE):
            raise _refused("a DOCTYPE or entity declaration")
        try:
            root = ET.fromstring(xml)  # noqa: S314 - no DOCTYPE, so no entities
        except ET.ParseError as exc:
            raise InvalidTask(f"the domain XML is not well-formed: {exc}") from None
        if root.tag != "domain":
            raise InvalidTask(f"the domain XML's root is <{root.tag}>, not <domain>")
        directories = [os.path.normpath(d) for d in allowed]
        for parent, element in _walk(root):
            tag = element.tag
            if tag.startswith(_QEMU_NS):
                raise _refused(f"<qemu:{tag[len(_QEMU_NS) :]}> (raw QEMU arguments)")
            if tag == "hostdev" or (tag == "interface" and element.get("type") == "hostdev"):
                self._check_hostdev(element)
            if tag == "disk" and element.get("type") == "network":
                raise _refused("a network disk (<disk type='network'>)")
            if tag == "emulator":
                path = (element.text or "").strip()
                if not _EMULATOR.fullmatch(path):
                    raise _refused(f"<emulator>{path}</emulator> (only QEMU binaries)")
                continue
            for path, what in _host_paths(parent, element):
                if not _path_allowed(path, directories):
                    raise _refused(
                        f"{what} {path!r} outside agent.xml-allowed-paths "
                        f"({', '.join(directories) or 'none'})"
                    )

    def _check_hostdev(self, element: ET.Element) -> None:
        kind = element.get("type")
        if element.tag == "hostdev" and (element.get("mode") or "subsystem") != "subsystem":
            raise _refused(f"<hostdev mode='{element.get('mode')}'> (host block or char devices)")
        if element.tag == "hostdev" and kind != "pci":
            raise _refused(f"<hostdev type='{kind}'> (only listed PCI devices)")
        source = element.find("source")
        address = source.find("address") if source is not None else None
        vendor = source.find("vendor") if source is not None else None
        product = source.find("product") if source is not None else None
        if address is not None:
            try:
                pci = PciAddress(
                    int(address.get("domain", "0"), 0),
                    int(address.get("bus", ""), 0),
                    int(address.get("slot", ""), 0),
                    int(address.get("function", ""), 0),
                )
            except ValueError:
                raise InvalidTask("a <hostdev> source address is not a PCI address") from None
            if self._address_allowed(pci):
                return
            raise _refused(f"<hostdev> {pci} not in agent.host-devices")
        if vendor is not None and product is not None:
            try:
                ids = int(vendor.get("id", ""), 0), int(product.get("id", ""), 0)
            except ValueError:
                raise InvalidTask("a <hostdev> vendor or product id is not a number") from None
            if self._id_allowed(*ids):
                return
            raise _refused(f"<hostdev> {ids[0]:04x}:{ids[1]:04x} not in agent.host-devices")
        raise _refused("a <hostdev> without a source address")

    # ---------------------------------------------------------------- lists

    def _id_allowed(self, vendor: int, device: int) -> bool:
        return any(d.vendor == vendor and d.device == device for d in self.devices)

    def _address_allowed(self, address: PciAddress) -> bool:
        return any(d.address == str(address) for d in self.devices)


def _refused(what: str) -> NotSupported:
    return NotSupported(
        f"the domain XML uses {what}, which agent.xml-policy: strict refuses (docs/security.md)"
    )


def _show_id(pci_id: PciId) -> str:
    return f"{pci_id.vendor:04x}:{pci_id.device:04x}"


def _check_agent_namespace(xml: str) -> None:
    """Refuse domain XML that carries the agent's own namespace (the record of a storage
    copy's images lives there: a forged one could name images to remove), under any
    ``xml-policy``. XML that does not parse is left to libvirt (``trusted``) or refused by
    the strict checks."""
    if AGENT_XML_NAMESPACE in xml:
        raise _agent_namespace_refused()
    if re.search(r"<!(?:DOCTYPE|ENTITY)", xml, re.IGNORECASE) or "&#" in xml:
        # a character or entity reference could spell the namespace: look at it parsed
        try:
            root = ET.fromstring(xml)  # noqa: S314 - entities are the operator's (trusted)
        except ET.ParseError:
            return
        for element in root.iter():
            names = [element.tag, *element.attrib]
            values = list(element.attrib.values())
            if any(AGENT_XML_NAMESPACE in str(text) for text in (*names, *values)):
                raise _agent_namespace_refused()


def _agent_namespace_refused() -> NotSupported:
    return NotSupported(
        f"the domain XML uses the agent's own namespace ({AGENT_XML_NAMESPACE}...): only the"
        " agent writes it"
    )


def _walk(root: ET.Element) -> Iterator[tuple[ET.Element, ET.Element]]:
    """(parent, element) for every element below ``root``, and (root, root); not into
    ``<metadata>``, which libvirt keeps for applications and never acts on."""
    yield root, root
    stack = [root]
    while stack:
        parent = stack.pop()
        for child in parent:
            yield parent, child
            if child.tag != "metadata":
                stack.append(child)


def _host_paths(parent: ET.Element, element: ET.Element) -> Iterable[tuple[str, str]]:
    """The host paths ``element`` names, each with what it is."""
    tag = element.tag
    where = f"<{parent.tag}><{tag}>" if parent is not element else f"<{tag}>"
    if tag != "target" and not (tag == "source" and parent.get("type") == "pty"):
        # (a pty's source path is libvirt's output, not input)
        for attribute in _PATH_ATTRIBUTES:
            value = element.get(attribute)
            if value is not None:
                yield value, f"{where} {attribute}="
    dev = element.get("dev")
    if tag == "source" and dev is not None and parent.tag in _DEV_PARENTS:
        yield dev, f"{where} dev="
    if tag in _PATH_TEXT and element.text and element.text.strip():
        if tag == "backend" and parent.tag != "rng":
            return
        yield element.text.strip(), where


def _path_allowed(path: str, directories: Sequence[str]) -> bool:
    if "\0" in path or not path.startswith("/"):
        return False  # relative paths resolve against libvirtd's working directory
    normal = os.path.normpath(path)
    if normal in _ALWAYS_ALLOWED_FILES:
        return True
    return any(normal == d or normal.startswith(d.rstrip("/") + "/") for d in directories)
