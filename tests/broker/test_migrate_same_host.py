"""A migration whose destination is the agent's own host is refused by the pre-checks with
``incompatible-destination``, before any device is touched (libvirt would refuse it only later,
"Attempt to migrate guest to the same host", after the devices were detached)."""

from __future__ import annotations

from typing import Any

import pytest
from test_migrate_companions import A1, A2, IB, SHMEM
from test_migrate_fake import GIB, _dom, two_hosts

from asyncmigfra.hypervisor.base import DomainState
from harness import agent_and_scheduler

pytestmark = pytest.mark.broker

_TAGS_OF_DEVICES = {"detach-pci-devs", "detach-ivshmem-devs", "reattach-pci-devs"}


def _devices(cluster: Any, host: str, vm: str) -> Any:
    h = cluster.hosts[host]
    h.pci_devices.update({A1: IB, A2: IB})
    dom = cluster.domain(host, vm)
    dom.hostdevs[:] = [(IB, A1), (IB, A2)]
    dom.shmems[:] = [SHMEM]
    return dom


def _refused_in_pre_checks(r: dict[str, Any], phases: list[str]) -> None:
    assert (r["status"], r["code"]) == ("error", "incompatible-destination"), r
    assert "pre-checks" in r["time-measurement"]
    assert not _TAGS_OF_DEVICES & set(r["time-measurement"])
    assert phases == ["pre-checks"]


async def test_destination_named_as_the_agent_itself_is_refused_before_devices(mosquitto):
    async with two_hosts(mosquitto.port, [_dom("self1")]) as (_, sched, shared):
        src, _ = shared["names"]
        cluster: Any = shared["fake-cluster"]
        dom = _devices(cluster, src, "self1")
        r = await sched.call(
            f"task: migrate vm\nvm-name: self1\ndestination: {src}\ntime-measurement: true\n"
            "parameter:\n  migration-type: live\n"
        )
        _refused_in_pre_checks(r, [e["phase"] for e in sched.events_for(r["id"], "phase")])
        assert "own host" in r["details"]
        assert cluster.domain(src, "self1") is dom
        assert dom.state is DomainState.RUNNING
        assert sorted((addr for _, addr in dom.hostdevs), key=str) == [A1, A2]
        assert dom.shmems == [SHMEM]


async def test_destination_that_reaches_this_host_under_another_name_is_refused(mosquitto):
    """The agent's name differs from its host's name in the (fake) hypervisor: the name
    check cannot see it, the back-end's pre-check does (libvirt: the same host UUID)."""
    alias = "alias-of-this-host"
    options = {"host": alias, "cpus": 16, "memory": 64 * GIB, "domains": [_dom("self2")]}
    async with agent_and_scheduler(
        mosquitto.port, shared={}, hv_type="fake", hv_options=options
    ) as (agent, sched):
        assert agent.settings.hostname != alias
        cluster: Any = agent.hypervisor.cluster  # type: ignore[attr-defined]
        dom = _devices(cluster, alias, "self2")
        r = await sched.call(
            f"task: migrate vm\nvm-name: self2\ndestination: {alias}\ntime-measurement: true\n"
            "parameter:\n  migration-type: live\n"
        )
        _refused_in_pre_checks(r, [e["phase"] for e in sched.events_for(r["id"], "phase")])
        assert "is this host" in r["details"]
        assert sorted((addr for _, addr in dom.hostdevs), key=str) == [A1, A2]
        assert dom.state is DomainState.RUNNING
