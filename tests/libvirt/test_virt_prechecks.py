"""The migration pre-checks on libvirt's test driver: what does not change between
migrations (the destination's capabilities, the CPU comparison per guest CPU definition) is
read once per connection and again after a reconnect; the checks refuse what they refused."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

if os.environ.get("CI"):
    import libvirt  # CI must run these: a missing binding fails the run
else:
    libvirt = pytest.importorskip("libvirt")

from virt_support import host_uri

from asyncmigfra.errors import IncompatibleDestination, VmNotFound
from asyncmigfra.hypervisor.base import MigrationRequest
from asyncmigfra.hypervisor.virt import domains

pytestmark = pytest.mark.libvirt

REQUEST = MigrationRequest(vm_name="vm1", destination="hostB")


async def test_capabilities_are_read_once_per_connection_and_again_after_a_reconnect(
    hv: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    original = domains._capabilities

    def counted(conn: Any) -> Any:
        reads.append(str(conn.getURI()))
        return original(conn)

    monkeypatch.setattr(domains, "_capabilities", counted)
    for _ in range(3):
        # The test host has no free memory: the check still refuses, every time.
        with pytest.raises(IncompatibleDestination, match="not enough free memory on hostB"):
            await hv.check_migration(REQUEST)
    assert reads == [host_uri("hostB")]
    # The connection to hostB dies underneath (libvirtd restarted): the next check reconnects
    # and reads the capabilities of what it now talks to.
    connection = hv._pool[host_uri("hostB")]
    await asyncio.to_thread(lambda: connection.get().close())
    with pytest.raises(IncompatibleDestination, match="not enough free memory on hostB"):
        await hv.check_migration(REQUEST)
    assert reads == [host_uri("hostB")] * 2
    assert connection.opens == 2


async def test_a_missing_guest_is_reported_before_anything_about_the_destination(hv: Any) -> None:
    with pytest.raises(VmNotFound):
        await hv.check_migration(MigrationRequest(vm_name="nowhere", destination="hostB"))


async def test_a_domain_of_the_same_name_active_on_the_destination_is_refused(hv: Any) -> None:
    dest = hv._pool[host_uri("hostB")]
    xml = (
        "<domain type='test'><name>vm1</name><memory>1024</memory>"
        "<os><type>hvm</type></os></domain>"
    )
    await asyncio.to_thread(lambda: dest.get().createXML(xml, 0))
    with pytest.raises(IncompatibleDestination, match="a domain named 'vm1' is already active"):
        await hv.check_migration(REQUEST)


class _Comparing:
    """A connection that answers ``compareHypervisorCPU`` and counts the questions."""

    def __init__(self, verdict: int) -> None:
        self.verdict = verdict
        self.asked = 0

    def compareHypervisorCPU(self, *_args: object) -> int:
        self.asked += 1
        return self.verdict


def _guest(cpu_xml: str | None, machine: str = "pc-q35-7.2") -> Any:
    return domains._GuestFacts(
        name="g",
        virttype="kvm",
        arch="x86_64",
        machine=machine,
        cpu_xml=cpu_xml,
        memory_kib=1024,
    )


def test_the_cpu_comparison_is_asked_once_per_cpu_definition_and_connection() -> None:
    conn = _Comparing(libvirt.VIR_CPU_COMPARE_INCOMPATIBLE)
    memo: dict[object, object] = {}
    haswell = "<cpu mode='custom'><model>Haswell</model></cpu>"
    skylake = "<cpu mode='custom'><model>Skylake-Server</model></cpu>"
    for _ in range(3):
        assert domains._cpu_compare(conn, _guest(haswell), memo) == conn.verdict
    assert conn.asked == 1
    assert domains._cpu_compare(conn, _guest(skylake), memo) == conn.verdict
    assert domains._cpu_compare(conn, _guest(haswell, machine="pc-i440fx-7.2"), memo) is not None
    assert conn.asked == 3
    assert domains._cpu_compare(conn, _guest(None), memo) is None  # host-model: nothing to ask
    assert conn.asked == 3
    # A new connection (a reconnect) starts with an empty memo: asked again.
    assert domains._cpu_compare(conn, _guest(haswell), {}) == conn.verdict
    assert conn.asked == 4
