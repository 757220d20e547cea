"""Migration companions through MQTT on two ``fake`` hosts: repin on the destination (spec 1.7),
devices around the migration (spec 1.11), swap-with, hooks."""

from __future__ import annotations

from typing import Any

import pytest
from test_migrate_fake import _dom, two_hosts

from asyncmigfra.hypervisor.base import DomainState
from asyncmigfra.model import PciAddress, PciId

pytestmark = pytest.mark.broker


def _fake(shared: dict[str, object]) -> Any:
    return shared["fake-cluster"]


async def test_spec_1_7_vcpu_map_repins_on_the_destination_and_resumes(mosquitto):
    async with two_hosts(mosquitto.port, [{**_dom("p"), "vcpus": 2}]) as (_, sched, shared):
        _, dest = shared["names"]
        r = await sched.call(
            f"task: migrate vm\nvm-name: p\ndestination: {dest}\ntime-measurement: true\n"
            "parameter:\n  migration-type: live\n  vcpu-map: [[3], [5, 6]]\n",
            timeout=20,
        )
        assert (r["status"], r["destination"]) == ("success", dest), r
        assert {"overall", "migrate", "repin"} <= set(r["time-measurement"])
        dom = _fake(shared).domain(dest, "p")
        assert dom.state is DomainState.RUNNING
        assert dom.vcpu_pinning == ((3,), (5, 6))
        phases = [e["phase"] for e in sched.events_for(r["id"], "phase")]
        assert phases.index("migrating") < phases.index("repin")


async def test_repin_failure_on_the_destination_is_hook_failed_and_says_where(mosquitto):
    async with two_hosts(mosquitto.port, [_dom("q")]) as (_, sched, shared):
        _, dest = shared["names"]
        r = await sched.call(
            f"task: migrate vm\nvm-name: q\ndestination: {dest}\n"
            "parameter:\n  migration-type: live\n  vcpu-map: [[999]]\n",
            timeout=20,
        )
        assert (r["status"], r["code"]) == ("error", "hook-failed"), r
        assert r["destination"] == dest
        assert r["state"] == "running"
        assert dest in r["details"]
        dom = _fake(shared).domain(dest, "q")
        assert dom.state is DomainState.RUNNING  # resumed although the pinning failed


IB = PciId(0x15B3, 0x1018)
A1, A2, B1, B2 = (PciAddress(0, 0x82, 0, f) for f in range(4))
SHMEM = "<shmem name='ivs'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>"


def _with_devices(shared: dict[str, object], vm: str) -> tuple[Any, Any, Any]:
    """Give ``vm`` two IB VFs and an ivshmem device on A; B has two free VFs."""
    cluster = _fake(shared)
    src, dest = shared["names"]
    a, b = cluster.hosts[src], cluster.hosts[dest]
    a.pci_devices.update({A1: IB, A2: IB})
    b.pci_devices.update({B1: IB, B2: IB})
    dom = cluster.domain(src, vm)
    dom.hostdevs[:] = [(IB, A1), (IB, A2)]
    dom.shmems[:] = [SHMEM]
    return dom, a, b


async def test_spec_1_11_devices_leave_before_and_come_back_on_the_destination(mosquitto):
    async with two_hosts(mosquitto.port, [_dom("d")]) as (_, sched, shared):
        dom, _, _ = _with_devices(shared, "d")
        _, dest = shared["names"]
        r = await sched.call(
            f"task: migrate vm\nvm-name: d\ndestination: {dest}\ntime-measurement: true\n"
            "parameter:\n  migration-type: live\n",
            timeout=20,
        )
        assert r["status"] == "success", r
        tags = set(r["time-measurement"])
        assert {
            "detach-ivshmem-devs",
            "detach-pci-devs",
            "reattach-pci-devs",
            "reattach-ivshmem-devs",
        } <= tags
        assert _fake(shared).domain(dest, "d") is dom
        assert sorted((addr for _, addr in dom.hostdevs), key=str) == [B1, B2]  # free ones on B
        assert dom.shmems == [SHMEM]
        phases = [e["phase"] for e in sched.events_for(r["id"], "phase")]
        assert phases.index("detach-devices") < phases.index("migrating")
        assert phases.index("migrating") < phases.index("reattach-devices")


async def test_failed_migration_gives_the_devices_back_on_the_source(mosquitto):
    async with two_hosts(mosquitto.port, [_dom("f")]) as (agent, sched, shared):
        dom, _, _ = _with_devices(shared, "f")
        src, dest = shared["names"]
        agent.hypervisor.inject("migrate")  # type: ignore[attr-defined]
        r = await sched.call(
            f"task: migrate vm\nvm-name: f\ndestination: {dest}\nparameter:\n"
            "  migration-type: live\n",
            timeout=20,
        )
        assert r["status"] == "error", r
        assert _fake(shared).domain(src, "f") is dom
        assert sorted((addr for _, addr in dom.hostdevs), key=str) == [A1, A2]
        assert dom.shmems == [SHMEM]


async def test_no_free_device_on_the_destination_is_hook_failed_with_destination(mosquitto):
    async with two_hosts(mosquitto.port, [_dom("n")]) as (_, sched, shared):
        dom, _, b = _with_devices(shared, "n")
        _, dest = shared["names"]
        del b.pci_devices[B2]
        r = await sched.call(
            f"task: migrate vm\nvm-name: n\ndestination: {dest}\nparameter:\n"
            "  migration-type: live\n",
            timeout=20,
        )
        assert (r["status"], r["code"], r["destination"]) == ("error", "hook-failed", dest), r
        assert "1 free" in r["details"]
        assert dom.shmems == [SHMEM]  # ivshmem is still reattached after the PCI failure


async def test_two_ivshmem_devices_refuse_before_anything_moves(mosquitto):
    async with two_hosts(mosquitto.port, [_dom("two")]) as (_, sched, shared):
        dom, _, _ = _with_devices(shared, "two")
        src, dest = shared["names"]
        dom.shmems.append(SHMEM.replace("ivs", "ivs2"))
        r = await sched.call(f"task: migrate vm\nvm-name: two\ndestination: {dest}\n", timeout=20)
        assert (r["status"], r["code"]) == ("error", "hook-failed"), r
        assert "more than one ivshmem" in r["details"]
        assert _fake(shared).locate("two") == [src]
        assert len(dom.hostdevs) == 2


async def test_a_guest_that_never_releases_a_device_times_out_and_keeps_it(mosquitto):
    async with two_hosts(mosquitto.port, [_dom("stuck")], migration={"device_timeout": 0.2}) as (
        _,
        sched,
        shared,
    ):
        dom, _, _ = _with_devices(shared, "stuck")
        src, dest = shared["names"]
        dom.unplug_delay = float("inf")
        r = await sched.call(f"task: migrate vm\nvm-name: stuck\ndestination: {dest}\n", timeout=20)
        assert (r["status"], r["code"]) == ("error", "hook-failed"), r
        assert "within 0.2 s" in r["details"]
        assert _fake(shared).locate("stuck") == [src]
        assert dom.shmems == [SHMEM]
