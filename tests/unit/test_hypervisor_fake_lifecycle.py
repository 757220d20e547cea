"""The ``fake`` back-end: libvirt's state rules for start, stop, suspend, resume and repin.

Every test is ``async`` (see test_hypervisor_fake.py for why).
"""

from __future__ import annotations

import asyncio

import pytest
from fake_hypervisor_support import Ctx, GiB_KIB, make, state

from asyncmigfra.errors import HypervisorError, InvalidTask, TaskTimeout, VmNotFound, WrongState
from asyncmigfra.hypervisor.base import DomainState
from asyncmigfra.hypervisor.fake import FakeHypervisor
from asyncmigfra.model import StartSpec

# --------------------------------------------------------------------------------------------
# start


async def test_start_by_name_boots_a_shut_off_domain(a: FakeHypervisor) -> None:
    ctx = Ctx()
    await a.start(StartSpec(vm_name="off"), ctx)
    assert state(a, "off") is DomainState.RUNNING
    assert ctx.phases == ["starting"]
    assert a.host.domains["off"].counter < 1000  # a fresh boot starts from zero


@pytest.mark.parametrize(("vm", "number"), [("idle", 1), ("frozen", 3)])
async def test_start_needs_shutoff(a: FakeHypervisor, vm: str, number: int) -> None:
    with pytest.raises(WrongState) as err:
        await a.start(StartSpec(vm_name=vm), Ctx())
    assert str(err.value) == f"Wrong domain state: {number}"


async def test_start_errors_of_the_original(a: FakeHypervisor) -> None:
    with pytest.raises(VmNotFound) as not_found:
        await a.start(StartSpec(vm_name="ghost"), Ctx())
    assert str(not_found.value) == "Domain not found: no domain with matching name 'ghost'"
    with pytest.raises(InvalidTask, match=r"^vm-name is not valid\.$"):
        await a.start(StartSpec(vm_name=""), Ctx())
    with pytest.raises(InvalidTask, match=r"^Could not find vm-name in xml\.$"):
        await a.start(
            StartSpec(vm_name="<x/>", xml="<x/>", name_error="Could not find vm-name in xml."),
            Ctx(),
        )
    with pytest.raises(InvalidTask) as transient:
        await a.start(StartSpec(vm_name="t", transient=True), Ctx())
    assert str(transient.value) == (
        "XML description is missing which is required to create a transient domain."
    )


async def test_start_sets_memory_and_vcpus(a: FakeHypervisor) -> None:
    await a.start(StartSpec(vm_name="off", memory=2 * GiB_KIB, vcpus=3), Ctx())
    info = a.host.domains["off"].info()
    assert (info.memory, info.vcpus, info.state) == (2 * GiB_KIB, 3, DomainState.RUNNING)


@pytest.mark.parametrize(
    ("memory_xml", "kib"),
    [
        ("<memory unit='MiB'>512</memory>", 512 * 1024),
        ('<memory unit="GiB">2</memory>', 2 * GiB_KIB),
        ("<memory>4096</memory>", 4096),
        ("<memory unit='KiB'>8192</memory><currentMemory unit='KiB'>4096</currentMemory>", 4096),
        ("<memory unit='M'>1</memory>", 1024),
    ],
)
async def test_start_from_xml_defines_a_persistent_domain(
    a: FakeHypervisor, memory_xml: str, kib: int
) -> None:
    xml = (
        f"<domain type='kvm'><name>new</name>{memory_xml}<vcpu placement='static'>2</vcpu></domain>"
    )
    await a.start(StartSpec(vm_name="new", xml=xml), Ctx())
    dom = a.host.domains["new"]
    assert (dom.state, dom.persistent, dom.memory, dom.vcpus) == (
        DomainState.RUNNING,
        True,
        kib,
        2,
    )
    assert dom.xml == xml


async def test_start_from_xml_uses_current_vcpus(a: FakeHypervisor) -> None:
    xml = "<domain><name>cv</name><memory>1024</memory><vcpu current='2'>8</vcpu></domain>"
    await a.start(StartSpec(vm_name="cv", xml=xml), Ctx())
    assert a.host.domains["cv"].vcpus == 2


async def test_transient_domain_vanishes_when_stopped(a: FakeHypervisor) -> None:
    xml = "<domain><name>t1</name><memory unit='MiB'>64</memory></domain>"
    await a.start(StartSpec(vm_name="t1", xml=xml, transient=True), Ctx())
    assert a.host.domains["t1"].persistent is False
    await a.stop("t1", Ctx())
    assert "t1" not in a.host.domains


async def test_start_xml_errors(a: FakeHypervisor) -> None:
    mem = "<memory>1024</memory>"
    with pytest.raises(HypervisorError, match="cannot change persistent config"):
        await a.start(
            StartSpec(
                vm_name="t", xml=f"<domain><name>t</name>{mem}</domain>", transient=True, vcpus=2
            ),
            Ctx(),
        )
    with pytest.raises(HypervisorError, match="missing domain name"):
        await a.start(StartSpec(vm_name="t", xml=f"<domain>{mem}</domain>"), Ctx())
    with pytest.raises(HypervisorError, match="Memory size must be specified"):
        await a.start(StartSpec(vm_name="t", xml="<domain><name>t</name></domain>"), Ctx())
    with pytest.raises(HypervisorError, match="cannot parse memory"):
        await a.start(
            StartSpec(
                vm_name="t", xml="<domain><name>t</name><memory unit='XB'>1</memory></domain>"
            ),
            Ctx(),
        )
    with pytest.raises(WrongState, match=r"^Wrong domain state: 1$"):
        await a.start(
            StartSpec(vm_name="idle", xml=f"<domain><name>idle</name>{mem}</domain>"), Ctx()
        )
    assert "t" not in a.host.domains  # a failed start leaves nothing behind


async def test_start_needs_free_memory(shared: dict[str, object]) -> None:
    hv = make(
        shared, memory=GiB_KIB, domains=[{"name": "big", "state": "shutoff", "memory": 2 * GiB_KIB}]
    )
    with pytest.raises(
        HypervisorError, match=r"cannot allocate 2097152 KiB on a \(1048576 KiB free\)"
    ):
        await hv.start(StartSpec(vm_name="big"), Ctx())
    assert state(hv, "big") is DomainState.SHUTOFF


async def test_start_delay_probes_and_times_out_without_rollback(shared: dict[str, object]) -> None:
    hv = make(
        shared,
        domains=[{"name": "v", "state": "shutoff"}, {"name": "w", "state": "shutoff"}],
        **{"start-delay": 0.02, "start-timeout": 0.005},
    )
    ctx = Ctx()
    with pytest.raises(TaskTimeout) as err:
        await hv.start(StartSpec(vm_name="v"), ctx)
    assert str(err.value) == "Timeout while trying to reach domain with SSH."
    assert ctx.phases == ["starting", "probing"]
    assert ctx.measured == ["boot"]
    assert state(hv, "v") is DomainState.RUNNING  # like the original: no rollback
    quiet = Ctx()
    await hv.start(StartSpec(vm_name="w", probe_with_ssh=False), quiet)
    assert quiet.phases == ["starting"]
    assert state(hv, "w") is DomainState.RUNNING


# --------------------------------------------------------------------------------------------
# stop


async def test_graceful_stop(a: FakeHypervisor) -> None:
    ctx = Ctx()
    await a.stop("idle", ctx)
    assert state(a, "idle") is DomainState.SHUTOFF
    assert ctx.phases == ["shutting-down"]
    assert ctx.measured == ["shutdown"]


async def test_stop_of_a_paused_domain_is_allowed(a: FakeHypervisor) -> None:
    await a.stop("frozen", Ctx())
    assert state(a, "frozen") is DomainState.SHUTOFF


async def test_stop_needs_an_active_domain(a: FakeHypervisor) -> None:
    for force in (False, True):
        with pytest.raises(WrongState, match=r"^Wrong domain state: 5$"):
            await a.stop("off", Ctx(), force=force)
    with pytest.raises(VmNotFound, match="no domain with matching name 'ghost'"):
        await a.stop("ghost", Ctx())


async def test_force_destroys_and_undefine_removes(a: FakeHypervisor) -> None:
    ctx = Ctx()
    await a.stop("idle", ctx, force=True, undefine=True)
    assert "idle" not in a.host.domains
    assert ctx.phases == ["destroying"]
    assert ctx.measured == ["destroy", "undefine"]
    await a.stop("temp", Ctx(), force=True)
    assert "temp" not in a.host.domains  # transient: gone with its guest


async def test_graceful_stop_takes_stop_delay(shared: dict[str, object]) -> None:
    hv = make(shared, domains=[{"name": "v"}], **{"stop-delay": 0.02})
    task = asyncio.create_task(hv.stop("v", Ctx()))
    await asyncio.sleep(0)  # the stop runs up to its wait
    assert state(hv, "v") is DomainState.SHUTDOWN
    assert hv.host.domains["v"].info().state == "shutting-down"
    with pytest.raises(WrongState, match=r"^Wrong domain state: 4$"):
        await hv.suspend("v", Ctx())
    await task
    assert state(hv, "v") is DomainState.SHUTOFF


async def test_destroy_ends_a_hanging_shutdown(shared: dict[str, object]) -> None:
    hv = make(shared, domains=[{"name": "v", "stop-delay": 0.02}])
    task = asyncio.create_task(hv.stop("v", Ctx()))
    await asyncio.sleep(0)  # the stop runs up to its wait
    await hv.stop("v", Ctx(), force=True)
    assert state(hv, "v") is DomainState.SHUTOFF
    await task  # the graceful stop sees the guest off: success


async def test_stop_timeout_leaves_the_guest_running(shared: dict[str, object]) -> None:
    hv = make(shared, domains=[{"name": "v", "stop-delay": 10}], **{"stop-timeout": 0.01})
    with pytest.raises(TaskTimeout) as err:
        await hv.stop("v", Ctx())
    assert str(err.value) == "Timeout while waiting for correct vm state."
    assert state(hv, "v") is DomainState.RUNNING
    ctx = Ctx()
    await hv.stop("v", ctx, force_after_timeout=True)
    assert state(hv, "v") is DomainState.SHUTOFF
    assert ctx.phases == ["shutting-down", "destroying"]


async def test_cancelled_stop_restores_the_state(shared: dict[str, object]) -> None:
    hv = make(shared, domains=[{"name": "v", "state": "paused"}], **{"stop-delay": 10})
    task = asyncio.create_task(hv.stop("v", Ctx()))
    await asyncio.sleep(0)  # the stop runs up to its wait
    assert state(hv, "v") is DomainState.SHUTDOWN
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert state(hv, "v") is DomainState.PAUSED


# --------------------------------------------------------------------------------------------
# suspend, resume, repin


async def test_suspend_and_resume(a: FakeHypervisor) -> None:
    dom = a.host.domains["idle"]
    await a.suspend("idle", Ctx())
    assert state(a, "idle") is DomainState.PAUSED
    frozen_at = dom.counter
    await asyncio.sleep(0.005)
    assert dom.counter == frozen_at  # a paused guest makes no progress
    with pytest.raises(WrongState, match=r"^Wrong domain state: 3$"):
        await a.suspend("idle", Ctx())
    await a.resume("idle", Ctx())
    assert state(a, "idle") is DomainState.RUNNING
    await asyncio.sleep(0.005)
    assert dom.counter > frozen_at
    with pytest.raises(WrongState, match=r"^Wrong domain state: 1$"):
        await a.resume("idle", Ctx())
    for op in (a.suspend, a.resume):
        with pytest.raises(WrongState, match=r"^Wrong domain state: 5$"):
            await op("off", Ctx())
        with pytest.raises(VmNotFound):
            await op("ghost", Ctx())


async def test_repin(a: FakeHypervisor) -> None:
    def pinning() -> object:
        return a.host.domains["idle"].vcpu_pinning  # 2 vCPUs on a 16-CPU host

    await a.repin("idle", ((3, 1, 3), (4,)), Ctx())
    assert pinning() == ((1, 3), (4,))
    await a.repin("idle", ((7,),), Ctx())  # a shorter map keeps the other vCPUs' pinning
    assert pinning() == ((7,), (4,))
    await a.repin("frozen", ((0,),), Ctx())  # paused is fine
    assert a.host.domains["frozen"].vcpu_pinning == ((0,),)


async def test_repin_errors(a: FakeHypervisor) -> None:
    with pytest.raises(HypervisorError, match="vcpu 2 is out of range of live cpu count 2"):
        await a.repin("idle", ((0,), (1,), (2,)), Ctx())
    with pytest.raises(HypervisorError, match="CPU 16 does not exist on a"):
        await a.repin("idle", ((16,),), Ctx())
    with pytest.raises(HypervisorError, match="CPU -1 does not exist"):
        await a.repin("idle", ((-1,),), Ctx())
    with pytest.raises(HypervisorError, match="Empty cpu list"):
        await a.repin("idle", ((),), Ctx())
    with pytest.raises(WrongState, match=r"^Wrong domain state: 5$"):
        await a.repin("off", ((0,),), Ctx())
    with pytest.raises(VmNotFound):
        await a.repin("ghost", ((0,),), Ctx())
    assert a.host.domains["idle"].vcpu_pinning is None  # nothing half-applied
