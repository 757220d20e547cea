"""The ``fake`` back-end: options, libvirt's state rules, and the simulated migration.

Migrations run with a large ``time-scale`` so the simulated seconds pass in milliseconds;
assertions use the simulated quantities (iterations, downtime, bytes), never the wall clock.

Every test is ``async`` even where nothing is awaited: with the looptime plugin installed, a
sync test that runs before the first async test of its module leaks an event loop
(ResourceWarning, an error under ``filterwarnings = error``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from asyncmigfra.errors import (
    Busy,
    ConfigError,
    ConnectionFailed,
    HypervisorError,
    IncompatibleDestination,
    InvalidTask,
    MigrationFailed,
    TaskCancelled,
    TaskTimeout,
    VmNotFound,
    WrongState,
)
from asyncmigfra.hypervisor.base import (
    DomainState,
    Hypervisor,
    JobStats,
    MigrationJob,
    MigrationRequest,
)
from asyncmigfra.hypervisor.fake import (
    SHARED_KEY,
    FakeCluster,
    FakeHypervisor,
    FakeMigrationJob,
    create,
)
from asyncmigfra.model import StartSpec

MiB = 1024 * 1024
GiB_KIB = 1024 * 1024  # 1 GiB in KiB
SCALE = 1000.0

#: Guests of host "a": an idle 1 GiB guest, a 256 MiB guest dirtying 200 MiB/s, ...
DOMAINS: list[dict[str, Any]] = [
    {"name": "idle", "memory": GiB_KIB, "vcpus": 2},
    {"name": "busy", "memory": 256 * 1024, "dirty-rate": 200},
    {"name": "slow", "memory": GiB_KIB, "dirty-rate": 50},
    {"name": "off", "state": "shutoff", "vcpus": 4, "memory": 512 * 1024},
    {"name": "frozen", "state": "paused"},
    {"name": "temp", "persistent": False},
]


class Ctx:
    """Records what an operation tells its task."""

    def __init__(self) -> None:
        self.phases: list[str] = []
        self.measured: list[str] = []

    def phase(self, name: str) -> None:
        self.phases.append(name)

    @contextmanager
    def measure(self, tag: str) -> Iterator[None]:
        self.measured.append(tag)
        yield


@pytest.fixture
def shared() -> Iterator[dict[str, object]]:
    """The per-process dict; afterwards no migration job may still be running."""
    data: dict[str, object] = {}
    yield data
    cluster = data.get(SHARED_KEY)
    if isinstance(cluster, FakeCluster):
        assert not cluster.jobs, f"jobs left running: {cluster.jobs}"


def make(shared: dict[str, object], hostname: str = "a", /, **options: Any) -> FakeHypervisor:
    return create({"time-scale": SCALE, **options}, hostname=hostname, shared=shared)


@pytest.fixture
def a(shared: dict[str, object]) -> FakeHypervisor:
    return make(
        shared,
        "a",
        domains=DOMAINS,
        peers={"b": None, "small": {"memory": 128 * 1024, "cpus": 2}},
    )


@pytest.fixture
def b(shared: dict[str, object], a: FakeHypervisor) -> FakeHypervisor:
    return make(shared, "b")


def req(vm: str, **kwargs: Any) -> MigrationRequest:
    kwargs.setdefault("destination", "b")
    kwargs.setdefault("mode", "live")
    return MigrationRequest(vm_name=vm, **kwargs)


def state(hv: FakeHypervisor, vm: str) -> DomainState:
    return hv.host.domains[vm].state


async def begin(hv: FakeHypervisor, vm: str, **kwargs: Any) -> FakeMigrationJob:
    job = await hv.begin_migration(req(vm, **kwargs), Ctx())
    assert isinstance(job, FakeMigrationJob)
    return job


async def running_stats(job: MigrationJob) -> JobStats:
    stats = await job.stats()
    assert stats is not None
    return stats


# --------------------------------------------------------------------------------------------
# Options


async def test_defaults_and_the_shared_cluster(shared: dict[str, object]) -> None:
    hv = create({}, hostname="node1", shared=shared)
    assert isinstance(hv, Hypervisor)
    assert hv.kind == "fake"
    assert shared[SHARED_KEY] is hv.cluster
    assert hv.host.name == "node1"
    assert (hv.host.cpus, hv.host.memory) == (16, 64 * GiB_KIB)
    assert (hv.bandwidth, hv.latency, hv.time_scale) == (1000.0, 0.0, 1.0)
    assert (hv.start_timeout, hv.stop_timeout) == (60.0, 60.0)
    other = create({"host": "node2"}, hostname="ignored", shared=shared)
    assert other.cluster is hv.cluster
    assert sorted(hv.cluster.hosts) == ["node1", "node2"]


async def test_domains_and_peers_from_options(shared: dict[str, object]) -> None:
    hv = make(
        shared,
        cpus="8",
        memory=32 * GiB_KIB,
        domains=[{"name": "x"}, {"name": "y", "dirty-rate": "1.5", "state": "Shutoff"}],
        peers={"p": {"cpus": 4, "domains": [{"name": "z", "memory": 1024}]}},
        driver="qemu",
        transport="tcp",
        nodes=["p"],
    )
    assert (hv.host.cpus, hv.host.memory) == (8, 32 * GiB_KIB)
    x = hv.cluster.domain("a", "x")
    assert (x.state, x.vcpus, x.memory, x.persistent, x.dirty_rate) == (
        DomainState.RUNNING,
        1,
        GiB_KIB,
        True,
        0,
    )
    y = hv.cluster.domain("a", "y")
    assert y.state is DomainState.SHUTOFF
    assert y.dirty_rate == int(1.5 * MiB)
    assert hv.cluster.hosts["p"].cpus == 4
    assert hv.cluster.domain("p", "z").memory == 1024


async def test_existing_hosts_and_domains_are_kept(shared: dict[str, object]) -> None:
    first = make(shared, "a", peers={"b": {"cpus": 4, "domains": [{"name": "vm"}]}})
    # b's own agent: its explicit capacity wins, the domain defined by a's config stays.
    second = make(shared, "b", cpus=8, domains=[{"name": "vm", "state": "shutoff"}])
    assert second.host is first.cluster.hosts["b"]
    assert second.host.cpus == 8
    assert state(second, "vm") is DomainState.RUNNING
    # a third agent declaring b as a peer changes nothing there.
    make(shared, "c", peers={"b": {"cpus": 1}})
    assert second.host.cpus == 8


@pytest.mark.parametrize(
    ("options", "path", "fragment"),
    [
        ({"bogus": 1}, "hypervisor.bogus", "unknown key"),
        ({"never-throw": True}, "hypervisor.never-throw", "unknown key"),
        ({"cpus": 0}, "hypervisor.cpus", ">= 1"),
        ({"memory": "lots"}, "hypervisor.memory", "expected an integer"),
        ({"bandwidth": 0}, "hypervisor.bandwidth", "> 0"),
        ({"time-scale": -1}, "hypervisor.time-scale", "> 0"),
        ({"latency": "x"}, "hypervisor.latency", "expected a number"),
        ({"stop-delay": -1}, "hypervisor.stop-delay", ">= 0"),
        ({"host": ""}, "hypervisor.host", "non-empty"),
        ({"domains": {"name": "x"}}, "hypervisor.domains", "expected a list"),
        ({"domains": [{"vcpus": 1}]}, "hypervisor.domains[0].name", "required"),
        ({"domains": [{"name": "x", "cpu": 1}]}, "hypervisor.domains[0].cpu", "unknown key"),
        ({"domains": [{"name": "x", "state": "on"}]}, "hypervisor.domains[0].state", "running"),
        ({"domains": [{"name": "x"}, {"name": "x"}]}, "hypervisor.domains[1].name", "twice"),
        (
            {"domains": [{"name": "x", "state": "shutoff", "persistent": "no"}]},
            "hypervisor.domains[0].persistent",
            "transient",
        ),
        (
            {"memory": 1024, "domains": [{"name": "x", "memory": 2048}]},
            "hypervisor.domains",
            "need 2048 KiB",
        ),
        ({"peers": ["b"]}, "hypervisor.peers", "expected a map"),
        ({"peers": {"b": {"disk": 1}}}, "hypervisor.peers.b.disk", "unknown key"),
        ({"peers": {"a": {}}}, "hypervisor.peers.a", "own host"),
        ({"fail": {"boot": 1}}, "hypervisor.fail.boot", "unknown operation"),
        ({"fail": {"start": "often"}}, "hypervisor.fail.start", "expected an integer"),
    ],
)
async def test_bad_options_name_their_key(
    shared: dict[str, object], options: dict[str, object], path: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as err:
        create(options, hostname="a", shared=shared)
    assert err.value.path == path
    assert fragment in str(err.value)
    assert not shared or not FakeCluster.of(shared).hosts  # nothing half-created


async def test_shared_slot_of_the_wrong_type_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="holds a str"):
        create({}, hostname="a", shared={SHARED_KEY: "oops"})


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


# --------------------------------------------------------------------------------------------
# listing, host, injection, latency, close


async def test_list_domains_and_host_info(a: FakeHypervisor) -> None:
    names = [d.name for d in await a.list_domains()]
    assert names == sorted(d["name"] for d in DOMAINS)
    active = {d.name: d.state for d in await a.list_domains(active_only=True)}
    assert "off" not in active
    assert active["frozen"] is DomainState.PAUSED
    info = await a.host_info()
    used = GiB_KIB + 256 * 1024 + GiB_KIB + GiB_KIB + GiB_KIB  # idle busy slow frozen temp
    assert (info.hostname, info.cpus, info.memory) == ("a", 16, 64 * GiB_KIB)
    assert info.free_memory == 64 * GiB_KIB - used


async def test_injected_failures(shared: dict[str, object]) -> None:
    hv = make(shared, domains=[{"name": "v"}], fail={"suspend": 2, "host-info": "always"})
    for _ in range(2):
        with pytest.raises(HypervisorError, match=r"^injected failure$"):
            await hv.suspend("v", Ctx())
    assert state(hv, "v") is DomainState.RUNNING
    await hv.suspend("v", Ctx())  # the count is used up
    for _ in range(3):
        with pytest.raises(HypervisorError, match=r"^injected failure$"):
            await hv.host_info()
    hv.inject("host-info", 0)
    assert (await hv.host_info()).hostname == "a"
    hv.inject("list-domains")
    with pytest.raises(HypervisorError):
        await hv.list_domains()
    assert len(await hv.list_domains()) == 1
    with pytest.raises(ValueError, match="unknown operation 'reboot'"):
        hv.inject("reboot")


async def test_latency_delays_every_operation(shared: dict[str, object]) -> None:
    hv = make(shared, latency=0.02, domains=[{"name": "v"}])
    loop = asyncio.get_running_loop()
    started = loop.time()
    await hv.suspend("v", Ctx())
    assert loop.time() - started >= 0.019
    hv.latency = 0.0
    started = loop.time()
    await hv.resume("v", Ctx())
    assert loop.time() - started < 0.019


async def test_closed_hypervisor_refuses_until_reopened(a: FakeHypervisor) -> None:
    await a.aclose()
    await a.aclose()
    with pytest.raises(ConnectionFailed):
        await a.suspend("idle", Ctx())
    await a.open()
    await a.suspend("idle", Ctx())
    assert state(a, "idle") is DomainState.PAUSED


# --------------------------------------------------------------------------------------------
# Migration: checks before anything moves


async def test_migration_refusals(a: FakeHypervisor, b: FakeHypervisor) -> None:
    with pytest.raises(VmNotFound, match="no domain with matching name 'ghost'"):
        await begin(a, "ghost")
    with pytest.raises(WrongState, match=r"^Wrong domain state: 5$"):
        await begin(a, "off")
    with pytest.raises(ConnectionFailed, match="'nowhere'"):
        await begin(a, "idle", destination="nowhere")
    with pytest.raises(HypervisorError) as same:
        await begin(a, "idle", destination="a")
    assert str(same.value) == "Attempt to migrate guest to the same host"
    with pytest.raises(IncompatibleDestination, match="not enough free memory on small"):
        await begin(a, "idle", destination="small")
    b.host.domains["idle"] = a.host.domains["idle"].copy_definition()
    await b.start(StartSpec(vm_name="idle"), Ctx())
    with pytest.raises(IncompatibleDestination, match="domain 'idle' is already active on b"):
        await begin(a, "idle")
    assert not a.cluster.jobs


async def test_incoming_migrations_reserve_memory(shared: dict[str, object]) -> None:
    hv = make(
        shared,
        domains=[{"name": "v1", "memory": GiB_KIB}, {"name": "v2", "memory": GiB_KIB}],
        peers={"c": {"memory": int(1.5 * GiB_KIB)}},
    )
    job = await begin(hv, "v1", destination="c", bandwidth=1)
    assert hv.cluster.hosts["c"].free_memory() == GiB_KIB // 2
    with pytest.raises(IncompatibleDestination, match="not enough free memory on c"):
        await begin(hv, "v2", destination="c")
    with pytest.raises(Busy, match="migration job running"):
        await begin(hv, "v1", destination="c")
    with pytest.raises(Busy):
        await hv.stop("v1", Ctx(), force=True)
    # c's own agent cannot boot a same-named definition while the guest is coming in.
    c = make(shared, "c", domains=[{"name": "v1", "state": "shutoff", "memory": 1024}])
    with pytest.raises(Busy, match="being migrated to c"):
        await c.start(StartSpec(vm_name="v1"), Ctx())
    await job.abort()
    assert hv.cluster.hosts["c"].free_memory() == int(1.5 * GiB_KIB)
    await c.start(StartSpec(vm_name="v1"), Ctx())
    assert state(c, "v1") is DomainState.RUNNING


async def test_injected_migrate_failure_at_begin(a: FakeHypervisor, b: FakeHypervisor) -> None:
    a.inject("migrate")
    with pytest.raises(HypervisorError, match=r"^injected failure$"):
        await begin(a, "idle")
    assert not a.cluster.jobs
    job = await begin(a, "idle")
    assert (await job.wait()).iterations == 1


# --------------------------------------------------------------------------------------------
# Migration: the simulation


async def test_idle_guest_converges_in_one_pass(a: FakeHypervisor, b: FakeHypervisor) -> None:
    a.time_scale = 10.0  # 1 GiB at 1000 MiB/s: ~100 ms real, enough to watch it
    job = await begin(a, "idle")
    assert isinstance(job, MigrationJob)
    assert await job.stats() is None  # setup: the destination QEMU is starting
    samples: list[JobStats] = []
    while not job.done:
        stats = await job.stats()
        if stats is not None:
            samples.append(stats)
        await asyncio.sleep(0.001)
    result = await job.wait()
    processed = [s.memory_processed for s in samples]
    assert processed == sorted(processed)
    assert any(0 < p < GiB_KIB * 1024 for p in processed)  # seen mid-copy
    assert all(s.memory_remaining >= 0 and s.memory_total == GiB_KIB * 1024 for s in samples)
    assert {s.phase for s in samples} <= {"migrating", "switchover"}
    assert all(s.transfer_rate in (1000 * MiB,) for s in samples)
    assert result.iterations == 1
    assert result.post_copy is False
    assert result.downtime == pytest.approx(10.0)  # nothing dirty: only the switchover cost
    assert result.transferred == GiB_KIB * 1024
    final = await job.stats()
    assert final is not None
    assert (final.memory_remaining, final.memory_processed) == (0, GiB_KIB * 1024)
    assert "idle" not in a.host.domains
    assert state(b, "idle") is DomainState.RUNNING
    assert b.host.domains["idle"].persistent is True


async def test_dirtying_guest_needs_a_second_pass(a: FakeHypervisor, b: FakeHypervisor) -> None:
    # 50 MiB/s over a 1.024 s first pass leaves 51.2 MiB (51.2 ms > 10 ms); the second pass
    # (100 ms minimum) leaves 5 MiB: 5 ms, so it switches over: 5 ms + 10 ms overhead.
    job = await begin(a, "slow", initial_downtime=10)
    assert await job.wait_iteration(0) >= 1
    result = await job.wait()
    assert result.iterations == 2
    assert result.downtime == pytest.approx(15.0)
    assert result.transferred == pytest.approx((1024 + 51.2 + 5.0) * MiB, abs=2)
    assert state(b, "slow") is DomainState.RUNNING


async def test_non_convergence_until_max_downtime_is_raised(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    # 256 MiB dirtied at 200 MiB/s over a 100 MiB/s link: every pass leaves all of it.
    job = await begin(a, "busy", bandwidth=100)
    seen: list[JobStats] = []
    iteration = 0
    while iteration < 6:
        iteration = await job.wait_iteration(iteration)
        seen.append(await running_stats(job))
    assert not job.done
    last = seen[-1]
    assert last.expected_downtime == pytest.approx(2560.0)
    assert (last.dirty_rate, last.transfer_rate) == (200 * MiB, 100 * MiB)
    assert last.memory_processed >= 5 * 256 * MiB
    assert job.max_downtime == 300.0  # QEMU's default
    await job.set_max_downtime(2000)  # not enough
    iteration = await job.wait_iteration(iteration + 1)
    assert not job.done
    await job.set_max_downtime(3000)  # enough: switches at the end of this pass
    result = await job.wait()
    assert result.iterations >= 7
    # The switchover copies the 256 MiB at the full link speed (QEMU ignores the cap there).
    assert result.downtime == pytest.approx(256.0 + 10.0)
    assert state(b, "busy") is DomainState.RUNNING


async def test_stats_stay_consistent(a: FakeHypervisor, b: FakeHypervisor) -> None:
    # Sample at checkpoints the job cannot run past (it does not converge until told),
    # then let it finish and add the final sample.
    job = await begin(a, "busy", bandwidth=100)
    samples: list[JobStats] = []
    iteration = 0
    for _ in range(4):
        iteration = await job.wait_iteration(iteration)
        samples.append(await running_stats(job))
        await asyncio.sleep(0.0005)
        samples.append(await running_stats(job))
    await job.set_max_downtime(3000)
    await job.wait()
    samples.append(await running_stats(job))
    assert samples[-1].memory_remaining == 0
    assert samples[-1].phase == "switchover"
    for earlier, later in itertools.pairwise(samples):
        assert later.memory_processed >= earlier.memory_processed
        assert later.elapsed >= earlier.elapsed
        assert later.iteration >= earlier.iteration
    for s in samples:
        assert 0 <= s.memory_remaining <= s.memory_total
        assert s.data_remaining == s.memory_remaining
        assert s.phase in {"migrating", "switchover"}
        assert s.elapsed >= 0.3  # no memory moves during setup


async def test_post_copy_completes_a_non_converging_guest(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    job = await begin(a, "busy", bandwidth=100, mode="post-copy")
    iteration = await job.wait_iteration(1)
    await job.start_post_copy()
    stats = await running_stats(job)
    assert stats.phase == "post-copy"
    with pytest.raises(HypervisorError, match="cannot abort migration in post-copy mode"):
        await job.abort()
    await job.start_post_copy()  # already switched: harmless
    result = await job.wait()
    assert result.post_copy is True
    assert result.downtime == pytest.approx(5.0)
    assert result.iterations == iteration - 1  # the passes finished before the switch
    assert result.transferred > 256 * MiB
    assert state(b, "busy") is DomainState.RUNNING


async def test_post_copy_needs_post_copy_mode(a: FakeHypervisor, b: FakeHypervisor) -> None:
    job = await begin(a, "busy", bandwidth=100)
    with pytest.raises(HypervisorError, match="post-copy mode"):
        await job.start_post_copy()
    await job.abort()
    with pytest.raises(TaskCancelled):
        await job.wait()


async def test_suspend_source_makes_it_converge(a: FakeHypervisor, b: FakeHypervisor) -> None:
    job = await begin(a, "busy", bandwidth=100)
    iteration = await job.wait_iteration(2)
    await job.suspend_source()
    assert state(a, "busy") is DomainState.PAUSED
    assert (await running_stats(job)).dirty_rate == 0
    result = await job.wait()
    # It ends this pass with what was dirtied before the suspend, then one clean pass.
    assert iteration <= result.iterations <= iteration + 1
    assert result.downtime is not None
    assert result.downtime > 10.0  # paused since the suspend, not just the switchover
    assert state(b, "busy") is DomainState.RUNNING  # resumed on the destination


async def test_guest_paused_by_its_user_during_migration(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    job = await begin(a, "busy", bandwidth=100)
    iteration = await job.wait_iteration(1)
    await a.suspend("busy", Ctx())  # a plain suspend task while the job runs
    assert (await running_stats(job)).dirty_rate == 0
    result = await job.wait()
    assert result.iterations <= iteration + 1  # no more dirt: it converges
    assert state(b, "busy") is DomainState.PAUSED  # the user's pause is kept


async def test_auto_converge_throttles_until_it_converges(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    # 150 MiB/s over 100 MiB/s never converges unthrottled (see the test above).
    a.host.domains["busy"].dirty_rate = 150 * MiB
    job = await begin(a, "busy", bandwidth=100, auto_converge=True)
    rates: list[int] = []
    iteration = 0
    while not job.done:
        iteration = await job.wait_iteration(iteration)
        stats = await job.stats()
        if stats is not None and stats.phase == "migrating":
            rates.append(stats.dirty_rate)
    result = await job.wait()
    # Sampling may miss passes on a loaded machine; what it sees must only go down.
    assert rates == sorted(rates, reverse=True)
    assert all(r <= 150 * MiB for r in rates)
    assert result.iterations == 7  # 20 % more throttle per pass from pass 3 on: 99 % in 7
    assert job.throttle == pytest.approx(0.99)
    assert result.downtime is not None
    assert result.downtime < 300.0 + 10.0


async def test_warm_migration_pauses_the_guest_for_the_copy(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    counter = a.host.domains["busy"].counter
    job = await begin(a, "busy", bandwidth=100, mode="warm")
    result = await job.wait()
    assert result.iterations == 1
    assert result.downtime == pytest.approx(2560.0 + 10.0)  # the whole copy
    assert state(b, "busy") is DomainState.RUNNING
    assert b.host.domains["busy"].counter >= counter


async def test_offline_migration_moves_the_definition(a: FakeHypervisor, b: FakeHypervisor) -> None:
    with pytest.raises(WrongState, match=r"^Wrong domain state: 1$"):
        await begin(a, "idle", mode="offline")
    with pytest.raises(HypervisorError, match="persist"):
        await begin(a, "off", mode="offline", persist=False)
    job = await begin(a, "off", mode="offline")
    assert job.done
    result = await job.wait()
    assert (result.iterations, result.transferred, result.downtime) == (0, 0, None)
    assert await job.stats() is None
    assert "off" not in a.host.domains
    moved = b.host.domains["off"]
    assert (moved.state, moved.persistent, moved.vcpus) == (DomainState.SHUTOFF, True, 4)


async def test_abort_leaves_the_guest_running_on_the_source(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    job = await begin(a, "busy", bandwidth=100)
    assert a.cluster.hosts["b"].incoming == {"busy": 256 * 1024}
    await job.wait_iteration(1)
    await job.abort()
    with pytest.raises(TaskCancelled) as err:
        await job.wait()
    assert str(err.value) == "migration job aborted"
    with pytest.raises(TaskCancelled):  # and again: the outcome is kept
        await job.wait()
    assert state(a, "busy") is DomainState.RUNNING
    assert "busy" not in b.host.domains
    assert b.host.incoming == {}
    assert await job.wait_iteration(99) == job.iteration  # over: returns at once
    final = await job.stats()
    assert final is not None
    assert final.phase == "migrating"
    await job.abort()  # over already: nothing happens
    # The guest can be migrated again afterwards.
    again = await begin(a, "idle")
    assert (await again.wait()).iterations == 1


async def test_abort_during_setup_and_warm_copy_resumes_the_guest(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    a.time_scale = 1.0  # setup lasts 0.3 s: the abort surely comes first
    job = await begin(a, "idle")
    await job.abort()
    assert await job.stats() is None
    assert state(a, "idle") is DomainState.RUNNING
    a.time_scale = SCALE
    # 1 MiB/s: the warm copy would take 256 ms real; it is looked at and aborted at once.
    warm = await begin(a, "busy", bandwidth=1, mode="warm")
    assert await warm.wait_iteration(0) == 1
    assert state(a, "busy") is DomainState.PAUSED  # warm: paused for the copy
    assert (await running_stats(warm)).dirty_rate == 0
    await warm.abort()
    assert state(a, "busy") is DomainState.RUNNING


async def test_injected_midway_failure(a: FakeHypervisor, b: FakeHypervisor) -> None:
    a.inject("migrate-midway")
    job = await begin(a, "busy", bandwidth=100)
    with pytest.raises(MigrationFailed, match=r"^injected failure$"):
        await job.wait()
    assert state(a, "busy") is DomainState.RUNNING
    assert "busy" not in b.host.domains
    final = await job.stats()
    assert final is not None
    assert final.iteration == 1
    assert final.memory_processed == pytest.approx(128 * MiB, abs=2)  # half the first pass
    assert (await (await begin(a, "idle")).wait()).iterations == 1  # used up


async def test_paused_flag_and_user_paused_guests_stay_paused(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    await (await begin(a, "idle", paused=True)).wait()
    assert state(b, "idle") is DomainState.PAUSED
    await (await begin(a, "frozen")).wait()
    assert state(b, "frozen") is DomainState.PAUSED


async def test_without_persist_like_plain_migrate3(a: FakeHypervisor, b: FakeHypervisor) -> None:
    await (await begin(a, "idle", persist=False)).wait()
    source_copy = a.host.domains["idle"]
    assert (source_copy.state, source_copy.persistent) == (DomainState.SHUTOFF, True)
    assert b.host.domains["idle"].persistent is False  # transient on the destination
    # Back to a, which still has the inactive definition: the guest is persistent again.
    back = await b.begin_migration(req("idle", destination="a", persist=False), Ctx())
    await back.wait()
    assert a.host.domains["idle"].persistent is True
    assert state(a, "idle") is DomainState.RUNNING
    assert "idle" not in b.host.domains  # transient there: nothing left


async def test_two_agents_share_the_cluster_and_the_guest_state(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    before = a.host.domains["idle"].counter
    job = await a.begin_migration(req("idle"), Ctx())
    await job.wait()
    listed = {d.name: d for d in await b.list_domains()}
    assert listed["idle"].state is DomainState.RUNNING
    assert listed["idle"].vcpus == 2
    assert "idle" not in {d.name for d in await a.list_domains()}
    dom = b.host.domains["idle"]
    arrived = dom.counter
    assert arrived >= before  # continued, not rebooted
    await asyncio.sleep(0.005)
    assert dom.counter > arrived
    # Now b's agent owns it; a's does not see it.
    await b.suspend("idle", Ctx())
    with pytest.raises(VmNotFound):
        await a.suspend("idle", Ctx())
    assert a.cluster.locate("idle") == ["b"]


async def test_job_waiters_are_event_driven(a: FakeHypervisor, b: FakeHypervisor) -> None:
    job = await begin(a, "busy", bandwidth=100)
    waiters = [asyncio.create_task(job.wait_iteration(n)) for n in (0, 1, 2)]
    done_waiter = asyncio.create_task(job.wait())
    got = await asyncio.gather(*waiters)
    assert [g > n for g, n in zip(got, (0, 1, 2), strict=True)] == [True] * 3
    assert got == sorted(got)
    assert not done_waiter.done()
    await job.abort()
    with pytest.raises(TaskCancelled):
        await done_waiter


async def test_cancelling_a_waiter_does_not_cancel_the_job(
    a: FakeHypervisor, b: FakeHypervisor
) -> None:
    job = await begin(a, "busy", bandwidth=100)
    waiter = asyncio.create_task(job.wait())
    await asyncio.sleep(0.001)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not job.done
    await job.set_max_downtime(5000)
    assert (await job.wait()).iterations >= 1


async def test_aclose_ends_the_jobs_of_its_agent(a: FakeHypervisor, b: FakeHypervisor) -> None:
    pre = await begin(a, "busy", bandwidth=100)
    a.host.domains["slow"].dirty_rate = 200 * MiB  # never converges on its own
    post = await begin(a, "slow", bandwidth=100, mode="post-copy")
    await post.wait_iteration(1)
    await post.start_post_copy()
    await a.aclose()
    with pytest.raises(TaskCancelled, match="hypervisor closed"):
        await pre.wait()
    assert state(a, "busy") is DomainState.RUNNING
    assert (await post.wait()).post_copy is True  # the guest already ran on b
    assert state(b, "slow") is DomainState.RUNNING
    assert pre._handle is None
    assert post._handle is None
    assert not a.cluster.jobs


async def test_bad_max_downtime(a: FakeHypervisor, b: FakeHypervisor) -> None:
    job = await begin(a, "idle")
    with pytest.raises(HypervisorError, match="max downtime"):
        await job.set_max_downtime(-1)
    await job.wait()


async def test_set_memory_records_the_balloon_target(a: FakeHypervisor) -> None:
    assert await a.current_memory("idle") == GiB_KIB
    await a.set_memory("idle", 512 * 1024, Ctx())
    assert a.host.domains["idle"].balloon == 512 * 1024
    assert a.host.domains["idle"].memory == GiB_KIB  # the size does not change
    assert await a.current_memory("idle") == 512 * 1024
    with pytest.raises(HypervisorError, match="outside"):
        await a.set_memory("idle", 2 * GiB_KIB, Ctx())
    with pytest.raises(WrongState):
        await a.set_memory("off", 1024, Ctx())
