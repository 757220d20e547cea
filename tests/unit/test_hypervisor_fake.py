"""The ``fake`` back-end: options, listing, host info, injected failures, latency, close.

The other parts: ``test_hypervisor_fake_lifecycle.py`` (libvirt's state rules for start, stop,
suspend, resume, repin) and ``test_hypervisor_fake_migration.py`` (the simulated migration).
Fixtures ``shared``, ``a`` and ``b`` are in ``conftest.py``, helpers in
``fake_hypervisor_support.py``.

Every test is ``async`` even where nothing is awaited: with the looptime plugin installed, a
sync test that runs before the first async test of its module leaks an event loop
(ResourceWarning, an error under ``filterwarnings = error``).
"""

from __future__ import annotations

import asyncio

import pytest
from fake_hypervisor_support import DOMAINS, Ctx, GiB_KIB, MiB, make, state

from asyncmigfra.errors import ConfigError, ConnectionFailed, HypervisorError
from asyncmigfra.hypervisor.base import DomainState, Hypervisor
from asyncmigfra.hypervisor.fake import SHARED_KEY, FakeCluster, FakeHypervisor, create

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
