"""What a task may ask of the host (asyncmigfra.tasks.hostpolicy): host devices, XML, drivers."""

from __future__ import annotations

import dataclasses

import pytest

from asyncmigfra.errors import InvalidTask, NotSupported
from asyncmigfra.model import (
    Ivshmem,
    MigrateSpec,
    MigrationParams,
    PciAddress,
    PciId,
    StartSpec,
    StopSpec,
)
from asyncmigfra.settings import HostDevice, default_settings
from asyncmigfra.tasks.hostpolicy import HostPolicy

NIC = HostDevice(vendor=0x8086, device=0x10FB)
VF = HostDevice(address="0000:3b:00.1")


def policy(**agent: object) -> HostPolicy:
    return HostPolicy.from_settings(default_settings(hostname="h", agent=agent))


def domain(devices: str = "", os: str = "", top: str = "") -> str:
    return (
        "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
        f"<name>vm1</name><memory>1024</memory>{top}"
        f"<os><type>hvm</type>{os}</os><devices>{devices}</devices></domain>"
    )


def start(xml: str | None = None, **kw: object) -> StartSpec:
    return StartSpec(vm_name="vm1", xml=xml, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- devices


def test_host_devices_are_refused_unless_listed():
    p = policy()
    with pytest.raises(NotSupported, match=r"pci-ids 8086:10fb: not in agent.host-devices"):
        p.check_start(start(pci_ids=(PciId(0x8086, 0x10FB),)))
    with pytest.raises(NotSupported, match=r"devs 0000:00:1f.2: not in agent.host-devices"):
        p.check_start(start(devs=(PciAddress(0, 0, 0x1F, 2),)))
    listed = policy(host_devices=(NIC, VF))
    listed.check_start(start(pci_ids=(PciId(0x8086, 0x10FB),), devs=(PciAddress(0, 0x3B, 0, 1),)))
    with pytest.raises(NotSupported):  # the host's own disk controller is still not allowed
        listed.check_start(start(devs=(PciAddress(0, 0, 0x1F, 2),)))


def test_an_ivshmem_id_cannot_name_a_path():
    with pytest.raises(InvalidTask, match="/dev/shm"):
        policy().check_start(start(ivshmem=Ivshmem("../../etc/x", "16")))
    policy().check_start(start(ivshmem=Ivshmem("ivshmem0", "16")))


# ------------------------------------------------------------------------------- XML


HOSTILE = {
    "shadow-disk": domain(
        "<disk type='file'><source file='/etc/shadow'/><target dev='vda'/></disk>"
    ),
    "host-block": domain("<disk type='block'><source dev='/dev/sda'/><target dev='vda'/></disk>"),
    "dotdot": domain(
        "<disk type='file'><source file='/var/lib/libvirt/images/../../../etc/shadow'/>"
        "<target dev='vda'/></disk>"
    ),
    "relative": domain("<disk type='file'><source file='x.img'/><target dev='vda'/></disk>"),
    "backing": domain(
        "<disk type='file'><source file='/var/lib/libvirt/images/a.qcow2'/><backingStore "
        "type='file'><source file='/root/secret.img'/></backingStore><target dev='vda'/></disk>"
    ),
    "managed-hostdev": domain(
        "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' "
        "bus='0x00' slot='0x1f' function='0x2'/></source></hostdev>"
    ),
    "usb-hostdev": domain(
        "<hostdev mode='subsystem' type='usb'><source><vendor id='0x1'/><product id='0x2'/>"
        "</source></hostdev>"
    ),
    "caps-hostdev": domain(
        "<hostdev mode='capabilities' type='storage'><source><block>/dev/sda</block></source>"
        "</hostdev>"
    ),
    "vf-interface": domain(
        "<interface type='hostdev'><source><address type='pci' domain='0' bus='0x3b' "
        "slot='0' function='2'/></source></interface>"
    ),
    "commandline": domain(top="<qemu:commandline><qemu:arg value='-chardev'/></qemu:commandline>"),
    "kernel": domain(os="<kernel>/etc/shadow</kernel>"),
    "loader": domain(os="<loader>/root/OVMF.fd</loader>"),
    "emulator": domain("<emulator>/bin/sh</emulator>"),
    "serial-file": domain("<serial type='file'><source path='/etc/cron.d/x'/></serial>"),
    "serial-dev": domain("<serial type='dev'><source path='/dev/ttyS0'/></serial>"),
    "filesystem": domain(
        "<filesystem type='mount'><source dir='/'/><target dir='host'/></filesystem>"
    ),
    "script": domain("<interface type='ethernet'><script path='/tmp/evil.sh'/></interface>"),
    "network-disk": domain(
        "<disk type='network'><source protocol='nbd'><host name='127.0.0.1'/></source>"
        "<target dev='vda'/></disk>"
    ),
    "evdev": domain("<input type='passthrough'><source evdev='/dev/input/event0'/></input>"),
    "doctype": "<!DOCTYPE d [<!ENTITY x SYSTEM 'file:///etc/shadow'>]>" + domain(),
}


@pytest.mark.parametrize("xml", list(HOSTILE.values()), ids=list(HOSTILE))
def test_strict_refuses_what_takes_the_host(xml):
    with pytest.raises(NotSupported, match=r"agent.xml-policy: strict|agent.host-devices"):
        policy().check_start(start(xml))


@pytest.mark.parametrize("xml", list(HOSTILE.values()), ids=list(HOSTILE))
def test_trusted_takes_any_xml(xml):
    policy(xml_policy="trusted").check_start(start(xml))


def test_what_a_normal_guest_uses_is_allowed():
    xml = domain(
        "<emulator>/usr/bin/qemu-system-x86_64</emulator>"
        "<disk type='file'><source file='/var/lib/libvirt/images/vm1.qcow2'/>"
        "<target dev='vda'/></disk>"
        "<disk type='volume'><source pool='default' volume='data'/><target dev='vdb'/></disk>"
        "<serial type='pty'><source path='/dev/pts/3'/><target port='0'/></serial>"
        "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"
        "<filesystem type='mount'><source dir='/srv/share/vm1'/><target dir='share'/></filesystem>"
        "<interface type='network'><source network='default'/></interface>",
        os="<kernel>/srv/boot/vmlinuz</kernel>",
        top="<metadata><app:x xmlns:app='urn:x' file='/etc/shadow'/></metadata>",
    )
    with pytest.raises(NotSupported, match="/srv/share/vm1"):
        policy().check_start(start(xml))
    # The storage pools' directories are allowed by default ...
    policy().check_start(start(xml), pool_paths=("/srv/share", "/srv/boot"))
    # ... unless the paths are configured.
    p = policy(xml_allowed_paths=("/srv",))
    assert not p.needs_pool_paths(start(xml))
    with pytest.raises(NotSupported, match=r"vm1.qcow2"):
        p.check_start(start(xml), pool_paths=("/var/lib/libvirt/images",))


def test_a_listed_hostdev_is_allowed_by_address_or_ids():
    by_address = domain(
        "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' "
        "bus='0x3b' slot='0x00' function='0x1'/></source></hostdev>"
    )
    by_ids = domain(
        "<hostdev mode='subsystem' type='pci'><source><vendor id='0x8086'/>"
        "<product id='0x10fb'/></source></hostdev>"
    )
    p = policy(host_devices=(NIC, VF))
    p.check_start(start(by_address))
    p.check_start(start(by_ids))
    with pytest.raises(NotSupported, match=r"0000:3b:00.1 not in agent.host-devices"):
        policy(host_devices=(NIC,)).check_start(start(by_address))


def test_not_a_domain_is_invalid():
    with pytest.raises(InvalidTask, match="not well-formed"):
        policy().check_start(start("<domain>"))
    with pytest.raises(InvalidTask, match="root is <network>"):
        policy().check_start(start("<network/>"))


# ------------------------------------------------------------------------------- drivers


def test_the_configuration_decides_driver_and_transport():
    p = policy()
    p.check_subtask(StopSpec(vm_name="a", driver="qemu"))
    p.check_subtask(StopSpec(vm_name="a"))
    for driver in ("lxc", "remote", "lxctools"):
        with pytest.raises(NotSupported, match=r"driver '\w+' is not allowed.*allowed-drivers"):
            p.check_subtask(StopSpec(vm_name="a", driver=driver))
    migrate = MigrateSpec(vm_name="a", destination="b", parameter=MigrationParams(transport="tcp"))
    with pytest.raises(NotSupported, match=r"transport 'tcp'.*allowed-transports: ssh"):
        p.check_subtask(migrate)
    policy(allowed_transports=("ssh", "tcp")).check_subtask(migrate)
    libvirt = dataclasses.replace(
        default_settings(hostname="h"),
        hypervisor=dataclasses.replace(
            default_settings(hostname="h").hypervisor,
            type="libvirt",
            options={"driver": "lxctools", "transport": "tcp"},
        ),
    )
    p = HostPolicy.from_settings(libvirt)
    p.check_subtask(StopSpec(vm_name="a", driver="lxctools"))
    p.check_subtask(migrate)
    with pytest.raises(NotSupported):
        p.check_subtask(StopSpec(vm_name="a", driver="qemu"))


_RECORD = (
    "<metadata><r:storage-copy xmlns:r='{ns}' source='h' destination='b'>"
    "<r:created path='/var/lib/libvirt/images/victim.qcow2'/></r:storage-copy></metadata>"
)
AGENT_NAMESPACE = {
    "plain": domain(top=_RECORD.format(ns="https://asyncmigfra.org/xmlns/storage-copy/1")),
    "other version": domain(top=_RECORD.format(ns="https://asyncmigfra.org/xmlns/x/9")),
    # a character reference spells the same namespace
    "char refs": domain(top=_RECORD.format(ns="&#104;ttps://asyncmigfra.org/xmlns/storage-copy/1")),
}


@pytest.mark.parametrize("mode", ["strict", "trusted"])
@pytest.mark.parametrize("xml", list(AGENT_NAMESPACE.values()), ids=list(AGENT_NAMESPACE))
def test_no_task_may_write_the_agents_own_metadata(xml, mode):
    # the record of a storage copy's images: a forged one would name images to remove
    with pytest.raises(NotSupported, match="agent's own namespace"):
        policy(xml_policy=mode).check_start(start(xml))
