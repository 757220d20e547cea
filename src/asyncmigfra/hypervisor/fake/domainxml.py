"""The ``fake`` back-end's domain XML reader: just enough of it (name, memory, vCPUs)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from asyncmigfra.domxml import first_element, first_name_text
from asyncmigfra.errors import HypervisorError
from asyncmigfra.hypervisor.fake.cluster import _KIB

_MEMORY_UNITS: dict[str, int] = {
    "b": 1,
    "bytes": 1,
    "kb": 1000,
    "k": 1024,
    "kib": 1024,
    "mb": 1000**2,
    "m": 1024**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "g": 1024**3,
    "gib": 1024**3,
    "tb": 1000**4,
    "t": 1024**4,
    "tib": 1024**4,
}
_UNIT_RE = re.compile(r"""\bunit\s*=\s*["']([^"']*)["']""")
_CURRENT_RE = re.compile(r"""\bcurrent\s*=\s*["'](\d+)["']""")


@dataclass(frozen=True, slots=True)
class _XmlDomain:
    name: str
    #: KiB
    memory: int
    vcpus: int


def _parse_domain_xml(xml: str) -> _XmlDomain:
    """Read name, memory and vCPUs the way ``virDomainDefineXML`` would need them.

    A regex reader rather than an XML parser: the fake must not depend on untrusted XML
    parsing, and these three elements are all it simulates.
    """
    name = first_name_text(xml)
    if name is None:
        raise HypervisorError("Error defining domain: XML error: missing domain name information")
    memory_el = first_element(xml, "currentMemory") or first_element(xml, "memory")
    if memory_el is None:
        raise HypervisorError(
            "Error defining domain: XML error: Memory size must be specified via <memory>"
        )
    attrs, text = memory_el
    unit_match = _UNIT_RE.search(attrs)
    unit = unit_match.group(1).lower() if unit_match else "kib"
    if unit not in _MEMORY_UNITS or not text.isdigit():
        raise HypervisorError(
            f"Error defining domain: invalid argument: cannot parse memory {text!r} {unit!r}"
        )
    memory = int(text) * _MEMORY_UNITS[unit] // _KIB
    vcpus = 1
    vcpu_el = first_element(xml, "vcpu")
    if vcpu_el is not None:
        current = _CURRENT_RE.search(vcpu_el[0])
        count = current.group(1) if current else vcpu_el[1]
        if not count.isdigit() or int(count) < 1:
            raise HypervisorError(f"Error defining domain: XML error: invalid vcpu count {count!r}")
        vcpus = int(count)
    return _XmlDomain(name=name, memory=memory, vcpus=vcpus)
