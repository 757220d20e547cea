"""Lifecycle operations of the ``libvirt`` back-end against the test driver (hostA.xml).

hostA: ``vm1`` running (2 vCPUs, 512 MiB), ``off1`` shut off (1 of 2 vCPUs, 256 MiB),
``paused1`` paused, ``stubborn`` ignores a graceful shutdown (the test driver restarts it at
once: ``on_poweroff=restart``), ``frozen`` is paused and ignores it too, ``slow`` (used by
the long-call test), and a 15b3:1004 PCI device. Test-driver quirks this relies on, measured
with libvirt 9.0: shutdown is instant; pinning works only live with flags 0; attachDevice,
jobs and migration are unsupported.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

if os.environ.get("CI"):
    import libvirt  # CI must run these: a missing binding fails the run
else:
    libvirt = pytest.importorskip("libvirt")

from virt_support import Ctx, hv_options, libvirt_threads

from asyncmigfra.errors import (
    HypervisorError,
    InvalidTask,
    NotSupported,
    TaskTimeout,
    VmNotFound,
    WrongState,
)
from asyncmigfra.hypervisor.base import DomainInfo, DomainState, HostInfo
from asyncmigfra.hypervisor.virt import LibvirtHypervisor, create
from asyncmigfra.model import Ivshmem, PciAddress, PciId, StartSpec

pytestmark = pytest.mark.libvirt

DOM_XML = """<domain type='test'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>{vcpus}</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
</domain>"""


def quick(hv: LibvirtHypervisor) -> LibvirtHypervisor:
    """Shorten the start/stop timeouts to 0.3 s for the tests that wait them out."""
    hv.config = dataclasses.replace(hv.config, start_timeout=0.3, stop_timeout=0.3)
    return hv


def spec(name: str = "", **kw: Any) -> StartSpec:
    kw.setdefault("probe_with_ssh", False)
    return StartSpec(vm_name=name, **kw)


async def domains(hv: LibvirtHypervisor) -> dict[str, DomainInfo]:
    return {d.name: d for d in await hv.list_domains()}


async def pinning(hv: LibvirtHypervisor, name: str) -> list[tuple[int, ...]]:
    """The live pinning of ``name``: for each vCPU, the host CPUs it may use."""
    info = await hv._call(hv.uri, lambda c: c.lookupByName(name).vcpuPinInfo(0))
    return [tuple(i for i, ok in enumerate(row) if ok) for row in info]


# --------------------------------------------------------------------------------------------
# inventory


async def test_list_domains_and_host_info(hv: LibvirtHypervisor) -> None:
    listed = await domains(hv)
    assert set(listed) == {"vm1", "off1", "paused1", "stubborn", "frozen", "slow"}
    assert listed["vm1"] == DomainInfo(
        name="vm1", state=DomainState.RUNNING, vcpus=2, memory=512 * 1024, persistent=True
    )
    assert listed["off1"].state is DomainState.SHUTOFF
    assert listed["off1"].vcpus == 1
    assert listed["paused1"].state is DomainState.PAUSED
    active = [d.name for d in await hv.list_domains(active_only=True)]
    assert active == ["frozen", "paused1", "slow", "stubborn", "vm1"]
    info = await hv.host_info()
    # the test driver reports free memory 0 for a node file
    assert info == HostInfo(hostname="hostA", cpus=4, memory=8 * 1024 * 1024, free_memory=0)


async def test_domain_named_reads_one_domain_as_listed(
    hv: LibvirtHypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncmigfra.hypervisor.base import domain_named  # noqa: PLC0415
    from asyncmigfra.migration.plan import memory_of  # noqa: PLC0415

    listed = await domains(hv)  # what memory_of found in the list before

    def no_listing(*_a: Any) -> Any:
        raise AssertionError("listed every domain to find one")

    monkeypatch.setattr(libvirt.virConnect, "listAllDomains", no_listing)
    for name, dom in listed.items():
        assert await domain_named(hv, name) == dom
        assert await memory_of(hv, name) == dom.memory
    assert await domain_named(hv, "ghost") is None
    assert await memory_of(hv, "ghost") == 0


# --------------------------------------------------------------------------------------------
# start


async def test_start_by_name(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    await hv.start(spec("off1"), ctx)
    assert (await domains(hv))["off1"].state is DomainState.RUNNING
    assert ctx.phases == ["starting"]


async def test_start_running_or_missing_domain(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    with pytest.raises(WrongState, match=r"^Wrong domain state: 1$"):
        await hv.start(spec("vm1"), ctx)
    with pytest.raises(WrongState, match=r"^Wrong domain state: 3$"):
        await hv.start(spec("paused1"), ctx)
    with pytest.raises(VmNotFound, match=r"^Domain not found"):
        await hv.start(spec("ghost"), ctx)
    with pytest.raises(InvalidTask, match=r"^vm-name is not valid\.$"):
        await hv.start(spec(""), ctx)
    with pytest.raises(InvalidTask, match="XML description is missing"):
        await hv.start(spec("off1", transient=True), ctx)


async def test_start_from_xml_with_memory_and_vcpus(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    xml = DOM_XML.format(name="fresh", vcpus=1)
    await hv.start(spec("fresh", xml=xml, memory=512 * 1024, vcpus=3), ctx)
    fresh = (await domains(hv))["fresh"]
    assert fresh == DomainInfo(
        name="fresh", state=DomainState.RUNNING, vcpus=3, memory=512 * 1024, persistent=True
    )
    maximum = await hv._call(hv.uri, lambda c: c.lookupByName("fresh").maxMemory())
    assert maximum == 512 * 1024


async def test_start_by_name_with_memory_and_vcpus(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    await hv.start(spec("off1", memory=1024 * 1024, vcpus=2), ctx)
    off1 = (await domains(hv))["off1"]
    assert (off1.state, off1.vcpus, off1.memory) == (DomainState.RUNNING, 2, 1024 * 1024)


async def test_start_transient(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    xml = DOM_XML.format(name="tmp", vcpus=2)
    await hv.start(spec("tmp", xml=xml, transient=True, vcpu_map=((1,), (2, 3))), ctx)
    tmp = (await domains(hv))["tmp"]
    assert tmp.state is DomainState.RUNNING
    assert not tmp.persistent
    assert await pinning(hv, "tmp") == [(1,), (2, 3)]
    # transient domains have no persistent config: refused before anything is created
    with pytest.raises(HypervisorError, match="transient"):
        await hv.start(
            spec("t2", xml=DOM_XML.format(name="t2", vcpus=1), transient=True, vcpus=2), ctx
        )
    assert "t2" not in await domains(hv)


async def test_start_with_vcpu_map(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    await hv.start(spec("off1", vcpus=2, vcpu_map=((3,), (0, 1))), ctx)
    assert await pinning(hv, "off1") == [(3,), (0, 1)]


async def test_start_with_bad_vcpu_map_changes_nothing(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    with pytest.raises(HypervisorError, match=r"CPU 99 does not exist on hostA"):
        await hv.start(spec("off1", vcpu_map=((99,),)), ctx)
    with pytest.raises(HypervisorError, match="Empty cpu list"):
        await hv.start(spec("off1", vcpu_map=((),)), ctx)
    assert (await domains(hv))["off1"].state is DomainState.SHUTOFF


async def test_start_from_xml_of_a_running_domain(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    with pytest.raises(WrongState, match=r"^Wrong domain state: 1$"):
        await hv.start(spec("vm1", xml=DOM_XML.format(name="vm1", vcpus=4)), ctx)
    assert (await domains(hv))["vm1"].vcpus == 2  # not redefined


async def test_start_with_invalid_xml(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    bad = "<domain type='test'><name>bad</name><memory>1024</memory></domain>"
    with pytest.raises(HypervisorError, match=r"^Error defining domain: XML error"):
        await hv.start(spec("bad", xml=bad), ctx)
    assert "bad" not in await domains(hv)


# --------------------------------------------------------------------------------------------
# rollback


async def test_rollback_undefines_what_the_task_defined(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    xml = DOM_XML.format(name="shm", vcpus=1)
    with pytest.raises(NotSupported) as info:
        await hv.start(spec("shm", xml=xml, ivshmem=Ivshmem(id="ivs0", size="64")), ctx)
    text = str(info.value)
    assert text.startswith("Could not attach ivshmem device. this function is not supported")
    assert text.endswith("(rolled back: domain 'shm' destroyed and undefined)")
    assert "shm" not in await domains(hv)


async def test_rollback_restores_a_changed_definition(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    devs = (PciAddress(0, 0x82, 0, 1),)
    with pytest.raises(NotSupported, match=r"^Could not attach PCI device 0000:82:00\.1: ") as info:
        await hv.start(spec("off1", memory=1024 * 1024, devs=devs), ctx)
    assert str(info.value).endswith(
        "(rolled back: domain 'off1' destroyed and previous definition restored)"
    )
    off1 = (await domains(hv))["off1"]
    assert (off1.state, off1.memory) == (DomainState.SHUTOFF, 256 * 1024)


async def test_pci_ids_pick_a_device_by_vendor_and_product(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    # The device exists in hostA.xml; the test driver cannot attach it: error + rollback.
    with pytest.raises(NotSupported, match=r"^No pci device could be attached: this function"):
        await hv.start(spec("off1", pci_ids=(PciId(0x15B3, 0x1004),)), ctx)
    assert (await domains(hv))["off1"].state is DomainState.SHUTOFF
    with pytest.raises(HypervisorError, match=r'^No devices of type "8086:10ed" found on "test:'):
        await hv.start(spec("off1", pci_ids=(PciId(0x8086, 0x10ED),)), ctx)
    assert (await domains(hv))["off1"].state is DomainState.SHUTOFF


async def test_nodes_check_refuses_a_domain_running_elsewhere(ctx: Ctx) -> None:
    hv = create(hv_options(nodes=["hostA", "hostB"]), hostname="hostA", shared={})
    await hv.open()
    try:
        with pytest.raises(WrongState, match=r"^Domain already running on hostB$"):
            await hv.start(spec("off1"), ctx)  # hostB.xml runs an off1 too
        await hv.start(spec("new", xml=DOM_XML.format(name="new", vcpus=1)), ctx)  # not there
        assert (await domains(hv))["new"].state is DomainState.RUNNING
    finally:
        await hv.aclose()


# --------------------------------------------------------------------------------------------
# SSH probe


@pytest.fixture
async def ssh_server() -> AsyncIterator[int]:
    """A local "SSH server" that sends an identification line and reads the client's."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
        await writer.drain()
        seen.append(await reader.readline())
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield port
        server.close()
        await server.wait_closed()
    assert seen
    assert seen[0].startswith(b"SSH-2.0-")


async def test_probe_succeeds_on_ssh_banner(
    hv: LibvirtHypervisor, ctx: Ctx, ssh_server: int
) -> None:
    hv.probe_port = ssh_server
    await hv.start(spec("off1", probe_with_ssh=True, probe_hostname="127.0.0.1"), ctx)
    assert ctx.phases == ["starting", "probing"]
    assert ctx.measured == ["boot"]


async def test_probe_times_out_and_keeps_the_guest(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    quick(hv)
    with socket_bound() as port:  # bound, not listening: connection refused
        hv.probe_port = port
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TaskTimeout, match=r"^Timeout while trying to reach domain with SSH\.$"):
            await hv.start(spec("off1", probe_with_ssh=True, probe_hostname="127.0.0.1"), ctx)
        assert 0.29 <= loop.time() - started < 2.0
    # documented: the probe does not roll back, the guest keeps running
    assert (await domains(hv))["off1"].state is DomainState.RUNNING


class socket_bound:
    """A TCP port on 127.0.0.1 that refuses connections while the block runs."""

    def __enter__(self) -> int:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        return int(self._sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


# --------------------------------------------------------------------------------------------
# stop


async def test_stop_graceful(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    await hv.stop("vm1", ctx)
    vm1 = (await domains(hv))["vm1"]
    assert vm1.state is DomainState.SHUTOFF
    assert vm1.persistent
    assert ctx.phases == ["shutting-down"]
    assert ctx.measured == ["shutdown"]
    with pytest.raises(WrongState, match=r"^Wrong domain state: 5$"):
        await hv.stop("vm1", ctx)
    with pytest.raises(WrongState, match=r"^Wrong domain state: 5$"):
        await hv.stop("vm1", ctx, force=True)
    with pytest.raises(VmNotFound):
        await hv.stop("ghost", ctx)


async def test_stop_force_and_undefine(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    await hv.stop("vm1", ctx, force=True, undefine=True)
    assert "vm1" not in await domains(hv)
    assert ctx.phases == ["destroying"]
    assert ctx.measured == ["destroy", "undefine"]


async def test_stop_graceful_and_undefine(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    await hv.stop("vm1", ctx, undefine=True)
    assert "vm1" not in await domains(hv)


async def test_stop_paused_resumes_then_shuts_down(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    await hv.stop("paused1", ctx)
    assert (await domains(hv))["paused1"].state is DomainState.SHUTOFF


async def test_stop_paused_guest_that_ignores_shutdown_is_paused_again(
    hv: LibvirtHypervisor, ctx: Ctx
) -> None:
    quick(hv)
    with pytest.raises(TaskTimeout):
        await hv.stop("frozen", ctx)
    assert (await domains(hv))["frozen"].state is DomainState.PAUSED
    await hv.stop("frozen", ctx, force_after_timeout=True)
    assert (await domains(hv))["frozen"].state is DomainState.SHUTOFF


async def test_stop_transient_that_vanishes(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    xml = DOM_XML.format(name="tmp", vcpus=1)
    await hv.start(spec("tmp", xml=xml, transient=True), ctx)
    await hv.stop("tmp", ctx, undefine=True)
    assert "tmp" not in await domains(hv)


async def test_stop_timeout_when_the_guest_ignores_shutdown(
    hv: LibvirtHypervisor, ctx: Ctx
) -> None:
    quick(hv)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TaskTimeout, match=r"^Timeout while waiting for correct vm state\.$"):
        await hv.stop("stubborn", ctx)
    assert 0.29 <= loop.time() - started < 2.0
    assert (await domains(hv))["stubborn"].state is DomainState.RUNNING


async def test_stop_destroys_after_timeout(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    quick(hv)
    await hv.stop("stubborn", ctx, force_after_timeout=True)
    assert (await domains(hv))["stubborn"].state is DomainState.SHUTOFF
    assert ctx.phases == ["shutting-down", "destroying"]
    assert ctx.measured == ["shutdown", "destroy"]


async def test_stop_returns_on_the_event_not_at_the_timeout(ctx: Ctx) -> None:
    hv = create(hv_options(**{"stop-timeout": 30}), hostname="hostA", shared={})
    await hv.open()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await hv.stop("vm1", ctx)
        assert loop.time() - started < 1.0
    finally:
        await hv.aclose()
    assert libvirt_threads() == []


# --------------------------------------------------------------------------------------------
# suspend, resume, repin


async def test_suspend_and_resume(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    await hv.suspend("vm1", ctx)
    assert (await domains(hv))["vm1"].state is DomainState.PAUSED
    with pytest.raises(WrongState, match=r"^Wrong domain state: 3$"):
        await hv.suspend("vm1", ctx)
    await hv.resume("vm1", ctx)
    assert (await domains(hv))["vm1"].state is DomainState.RUNNING
    with pytest.raises(WrongState, match=r"^Wrong domain state: 1$"):
        await hv.resume("vm1", ctx)
    with pytest.raises(WrongState, match=r"^Wrong domain state: 5$"):
        await hv.suspend("off1", ctx)
    with pytest.raises(VmNotFound):
        await hv.resume("ghost", ctx)


async def test_repin(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    await hv.repin("vm1", ((2,), (0, 3)), ctx)
    assert await pinning(hv, "vm1") == [(2,), (0, 3)]
    await hv.repin("vm1", ((1,),), ctx)  # only the listed vCPUs change
    assert await pinning(hv, "vm1") == [(1,), (0, 3)]
    with pytest.raises(HypervisorError, match=r"^Error pinning vcpu: invalid argument: CPU 8"):
        await hv.repin("vm1", ((8,),), ctx)


async def test_set_memory_live_balloon_target(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    # libvirt's test driver implements setMemoryFlags(AFFECT_LIVE); real QEMU needs a balloon
    # driver in the guest (tests/real: the rig's `balloon` guest).
    before = {d.name: d.memory for d in await hv.list_domains()}["vm1"]
    assert await hv.current_memory("vm1") == before
    await hv.set_memory("vm1", before // 2, ctx)
    assert {d.name: d.memory for d in await hv.list_domains()}["vm1"] == before // 2
    assert await hv.current_memory("vm1") == before // 2
    await hv.set_memory("vm1", before, ctx)
    assert {d.name: d.memory for d in await hv.list_domains()}["vm1"] == before
    with pytest.raises(VmNotFound):
        await hv.set_memory("ghost", 1024, ctx)
    with pytest.raises(VmNotFound):
        await hv.current_memory("ghost")


async def test_repin_shut_off_domain(hv: LibvirtHypervisor, ctx: Ctx) -> None:
    # CONFIG pinning of an inactive domain: the test driver pins only live domains.
    with pytest.raises(WrongState, match=r"^Error pinning vcpu: Requested operation is not valid"):
        await hv.repin("off1", ((1,),), ctx)
