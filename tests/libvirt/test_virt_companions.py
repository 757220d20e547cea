"""Migration companions of the ``libvirt`` back-end on the test driver: the view of another
host (``on_host``), and the device scan around a migration. libvirt 9.0's test driver cannot
attach or detach devices (``virDomainAttachDeviceFlags``/``DetachDeviceFlags`` are not
supported), so unplugging itself is tested against the ``fake`` back-end
(tests/broker/test_migrate_companions.py); here only what the test driver can show."""

from __future__ import annotations

from typing import Any

import pytest
from virt_support import Ctx, host_uri

from asyncmigfra.model import PciAddress

pytestmark = pytest.mark.libvirt

DOMAIN = """<domain type='kvm'><name>g</name><devices>
  <hostdev mode='subsystem' type='pci' managed='yes'>
    <source><address domain='0x0000' bus='0x82' slot='0x00' function='0x1'/></source>
    <alias name='hostdev0'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x07' function='0x0'/>
  </hostdev>
  <hostdev mode='subsystem' type='usb'><source><vendor id='0x1'/></source></hostdev>
  <shmem name='ivs'><model type='ivshmem-plain'/><size unit='M'>4</size>
    <alias name='shmem0'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x08' function='0x0'/>
  </shmem>
</devices></domain>"""


def test_migration_devices_finds_pci_hostdevs_and_shmem_and_drops_aliases() -> None:
    from asyncmigfra.hypervisor.virt import migration_devices  # noqa: PLC0415

    shmems, hostdevs = migration_devices(DOMAIN)
    (shmem,) = shmems
    (hostdev,) = hostdevs  # the USB one stays: QEMU migrates USB passthrough
    assert shmem.alias == "shmem0"
    assert "alias" not in shmem.reattach_xml
    assert 'slot="0x08"' in shmem.reattach_xml  # the guest-side address is kept
    assert hostdev.alias == "hostdev0"
    assert hostdev.host_address == PciAddress(0, 0x82, 0, 1)
    assert "hostdev0" in hostdev.xml


async def test_on_host_acts_on_the_other_host_and_shares_the_connections(hv: Any) -> None:
    view = hv.on_host("hostB")
    assert view.uri == host_uri("hostB")
    assert view.hostname == "hostB"
    assert hv.on_host("hostA") is hv
    names = {d.name for d in await view.list_domains()}
    assert "b-vm" in names
    await view.aclose()  # a view closes nothing
    assert {d.name for d in await hv.list_domains()} >= {"vm1"}


async def test_a_guest_without_devices_detaches_nothing(hv: Any, ctx: Ctx) -> None:
    assert await hv.detach_ivshmem("vm1", ctx, unplug_timeout=1.0) is None
    assert await hv.detach_hostdevs("vm1", ctx, unplug_timeout=1.0) == {}
