"""What a task may take from the host, through MQTT on the ``fake`` back-end (issue 13): host
devices and domain XML are refused by default and accepted when the agent allows them; the
task cannot pick the driver or transport."""

from __future__ import annotations

from typing import Any

import pytest

from asyncmigfra.model import PciAddress, PciId
from asyncmigfra.settings import HostDevice
from harness import agent_and_scheduler

pytestmark = pytest.mark.broker

IB = PciId(0x15B3, 0x1018)
VF = PciAddress(0, 0x82, 0, 1)
HOST_DISK = PciAddress(0, 0, 0x1F, 2)
DOMAINS = [{"name": "vm1", "vcpus": 1, "memory": 1024, "state": "shutoff"}]


def host_with_devices(agent: Any) -> None:
    agent.hypervisor.host.pci_devices.update({VF: IB, HOST_DISK: PciId(0x8086, 0x2922)})


def xml(devices: str) -> str:
    doc = (
        "<domain type='kvm'><name>x1</name><memory>1024</memory>"
        f"<devices>{devices}</devices></domain>"
    )
    return f'task: start vm\nvm-configurations:\n  - xml: "{doc}"\n    probe-with-ssh: false\n'


async def test_host_devices_are_refused_by_default_and_taken_when_listed(mosquitto):
    async with agent_and_scheduler(
        mosquitto.port, hv_type="fake", hv_options={"domains": DOMAINS}
    ) as (agent, sched):
        host_with_devices(agent)
        for item, what in (
            ("devs: [{pci-addr: '0000:00:1f.2'}]", "devs 0000:00:1f.2"),
            ("pci-ids: [{vendor: 0x15b3, device: 0x1018}]", "pci-ids 15b3:1018"),
        ):
            r = await sched.call(
                f"task: start vm\nvm-configurations:\n  - vm-name: vm1\n    {item}\n"
                "    probe-with-ssh: false\n"
            )
            (entry,) = r["list"]
            assert (entry["status"], entry["code"]) == ("error", "not-supported"), r
            assert f"{what}: not in agent.host-devices" in entry["details"]
        # The VM never started.
        assert [d.state.value for d in await agent.hypervisor.list_domains()] == ["shutoff"]

    async with agent_and_scheduler(
        mosquitto.port,
        hv_type="fake",
        hv_options={"domains": DOMAINS},
        agent={"host_devices": (HostDevice(vendor=0x15B3, device=0x1018),)},
    ) as (agent, sched):
        host_with_devices(agent)
        r = await sched.call(
            "task: start vm\nvm-configurations:\n  - vm-name: vm1\n"
            "    pci-ids: [{vendor: 0x15b3, device: 0x1018}]\n    probe-with-ssh: false\n"
        )
        assert r["list"][0]["status"] == "success", r
        # (The fake does not model devices at start; the rig test shows libvirt never sees a
        # refused one.)


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        (
            "<disk type='file'><source file='/etc/shadow'/><target dev='vda'/></disk>",
            "'/etc/shadow' outside agent.xml-allowed-paths",
        ),
        (
            "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0' "
            "bus='0' slot='0x1f' function='2'/></source></hostdev>",
            "0000:00:1f.2 not in agent.host-devices",
        ),
    ],
    ids=["host-file", "managed-hostdev"],
)
async def test_strict_xml_is_refused_and_trusted_is_taken(mosquitto, devices, expected):
    async with agent_and_scheduler(mosquitto.port, hv_type="fake") as (agent, sched):
        r = await sched.call(xml(devices))
        (entry,) = r["list"]
        assert (entry["status"], entry["code"]) == ("error", "not-supported"), r
        assert expected in entry["details"]
        assert "x1" not in [d.name for d in await agent.hypervisor.list_domains()]
    async with agent_and_scheduler(
        mosquitto.port, hv_type="fake", agent={"xml_policy": "trusted"}
    ) as (_, sched):
        r = await sched.call(xml(""))
        assert r["list"][0]["status"] == "success", r


async def test_the_task_cannot_choose_driver_or_transport(mosquitto):
    domains = [{"name": "vm1", "vcpus": 1, "memory": 1024}]
    async with agent_and_scheduler(
        mosquitto.port, hv_type="fake", hv_options={"domains": domains}
    ) as (_, sched):
        r = await sched.call("task: suspend vm\nlist:\n  - vm-name: vm1\n    driver: lxc\n")
        (entry,) = r["list"]
        assert (entry["status"], entry["code"]) == ("error", "not-supported")
        assert "driver 'lxc' is not allowed on this agent" in entry["details"]
        r = await sched.call(
            "task: migrate vm\nvm-name: vm1\ndestination: elsewhere\nparameter:\n  transport: tcp\n"
        )
        assert (r["status"], r["code"]) == ("error", "not-supported"), r
        assert "transport 'tcp' is not allowed" in r["details"]
        # The configured driver is fine.
        r = await sched.call("task: suspend vm\nlist:\n  - vm-name: vm1\n    driver: qemu\n")
        assert r["list"][0]["status"] == "success", r
