"""The libvirt migration job against a scripted libvirt domain.

The test driver cannot migrate (no jobs at all), so these tests replace the source connection
with :class:`ScriptedConn`: its domain behaves like QEMU's as measured on the rig (README
section 4): ``jobStats()`` shows an unbounded MIGRATION_OUT job while the migrate call blocks,
``abortJob()`` makes the call fail with code 78, and the domain is gone from the source after a
successful migration with UNDEFINE_SOURCE. Events are posted the way libvirt's thread does.
Real migrations between two libvirtds are the rig's job (tests/real).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest

if os.environ.get("CI"):
    import libvirt  # CI must run these: a missing binding fails the run
else:
    libvirt = pytest.importorskip("libvirt")

from virt_support import Ctx, host_uri

from asyncmigfra.errors import (
    Busy,
    HypervisorError,
    MigrationFailed,
    TaskCancelled,
)
from asyncmigfra.hypervisor.base import MigrationRequest
from asyncmigfra.hypervisor.virt import DomainEvent, LibvirtHypervisor

pytestmark = pytest.mark.libvirt

RUNNING_JOB: dict[str, Any] = {
    "type": 2,
    "operation": 5,
    "time_elapsed": 800,
    "memory_total": 128 << 20,
    "memory_processed": 32 << 20,
    "memory_remaining": 96 << 20,
    "memory_iteration": 1,
    "memory_dirty_rate": 256,
    "memory_bps": 8 << 20,
    "downtime": 300,
}


def libvirt_error(code: int, message: str) -> Any:
    exc = libvirt.libvirtError(message)
    exc.err = (code, 10, message, 2, None, None, None, -1, -1)
    return exc


class ScriptedDomain:
    """A running domain whose migrate call blocks until the test (or abortJob) ends it."""

    def __init__(self, name: str = "vm1") -> None:
        self._name = name
        self.state_ = (libvirt.VIR_DOMAIN_RUNNING, 1)
        self.active = True
        self.gone = False
        self.stats: dict[str, Any] = {"type": 0}
        self.calls: list[tuple[Any, ...]] = []
        self.downtimes: list[int] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.outcome: str = "success"  # or "aborted", "fail", "fail-gone"

    # the parts of virDomain the back-end uses
    def name(self) -> str:
        return self._name

    def isActive(self) -> bool:
        return self.active

    def isPersistent(self) -> bool:
        return True

    def state(self) -> list[int]:
        return list(self.state_)

    def jobStats(self, flags: int = 0) -> dict[str, Any]:
        return dict(self.stats)

    def XMLDesc(self, flags: int = 0) -> str:
        return f"<domain type='kvm'><name>{self._name}</name><devices/></domain>"

    def info(self) -> list[int]:
        return [int(self.state_[0]), 131072, 131072, 1, 0]

    def memoryStats(self) -> dict[str, int]:
        return {"rss": 65536}

    def migrateSetMaxDowntime(self, ms: int, flags: int) -> int:
        self.downtimes.append(ms)
        return 0

    def migrateStartPostCopy(self, flags: int) -> int:
        self.calls.append(("post-copy",))
        return 0

    def migrateSetMaxSpeed(self, bandwidth: int, flags: int = 0) -> int:
        self.calls.append(("max-speed", bandwidth, flags))
        return 0

    def suspend(self) -> int:
        self.state_ = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER)
        return 0

    def resume(self) -> int:
        self.state_ = (libvirt.VIR_DOMAIN_RUNNING, 1)
        return 0

    def abortJob(self) -> int:
        if self.stats.get("type", 0) == 0:
            raise libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID, "no job is active")
        self.outcome = "aborted"
        self.release.set()
        return 0

    def _run(self) -> None:
        self.stats = dict(RUNNING_JOB)
        self.started.set()
        if not self.release.wait(10):
            raise AssertionError("the test never released the migration")
        self.stats = {"type": 0}
        if self.outcome == "aborted":
            raise libvirt_error(
                libvirt.VIR_ERR_OPERATION_ABORTED,
                "operation aborted: job 'migration out' canceled by client",
            )
        if self.outcome in ("success", "fail-gone"):
            self.gone = True
        if self.outcome.startswith("fail"):
            raise libvirt_error(libvirt.VIR_ERR_OPERATION_FAILED, "operation failed: boom")

    def migrateToURI3(self, uri: str, params: dict[str, Any], flags: int) -> int:
        self.calls.append(("p2p", uri, params, flags))
        self._run()
        return 0

    def migrate3(self, dest: Any, params: dict[str, Any], flags: int) -> Any:
        self.calls.append(("direct", dest, params, flags))
        self._run()
        return DestDomain()


class DestDomain:
    def jobStats(self, flags: int = 0) -> dict[str, Any]:
        assert flags == libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
        return {"type": 3, "downtime": 7, "memory_iteration": 4, "memory_processed": 99}


class ScriptedConn:
    def __init__(self, dom: ScriptedDomain) -> None:
        self.dom = dom

    def lookupByName(self, name: str) -> ScriptedDomain:
        if self.dom.gone or name != self.dom.name():
            raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, f"Domain not found: '{name}'")
        return self.dom

    def isAlive(self) -> int:
        return 1

    def close(self) -> int:
        return 0


@pytest.fixture
def dom(hv: LibvirtHypervisor) -> ScriptedDomain:
    """Replace hostA's connection (shared and private) by the scripted one."""
    scripted = ScriptedDomain()
    conn = ScriptedConn(scripted)
    connection = hv._pool[hv.uri]
    connection.get = lambda: conn  # type: ignore[method-assign]
    connection.open_private = lambda: conn  # type: ignore[method-assign]
    return scripted


def request(**kw: Any) -> MigrationRequest:
    kw.setdefault("destination", "hostB")
    kw.setdefault("mode", "live")
    return MigrationRequest(vm_name="vm1", **kw)


def post(hv: LibvirtHypervisor, **kw: Any) -> None:
    """An event as libvirt's thread would hand it over."""
    threading.Thread(
        target=hv._post, args=(DomainEvent(uri=hv.uri, vm_name="vm1", at=time.monotonic(), **kw),)
    ).start()


async def test_p2p_migration_end_to_end(hv: LibvirtHypervisor, dom: ScriptedDomain) -> None:
    job = await hv.begin_migration(request(initial_downtime=50, bandwidth=8), Ctx())
    kind, uri, params, flags = dom.calls[0]
    assert kind == "p2p"
    assert uri == host_uri("hostB")  # the hosts map's p2p-uri
    assert params == {libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 8}
    assert flags & libvirt.VIR_MIGRATE_PEER2PEER
    assert flags & libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    assert dom.downtimes == [50]  # set once the job was visible

    stats = await job.stats()
    assert stats is not None
    assert (stats.phase, stats.iteration, stats.memory_remaining) == ("migrating", 1, 96 << 20)
    assert stats.dirty_rate == 256 * 4096

    waiter = asyncio.ensure_future(job.wait_iteration(1))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    post(hv, kind="migration-iteration", iteration=2)
    async with asyncio.timeout(2):
        assert await waiter == 2

    await job.set_max_downtime(400)
    await job.start_post_copy()
    assert dom.downtimes == [50, 400]
    assert (await job.stats()).phase == "post-copy"  # type: ignore[union-attr]

    post(hv, kind="job-completed", stats={"downtime": 12, "memory_iteration": 3})
    await asyncio.sleep(0.05)
    dom.release.set()
    result = await job.wait()
    assert result.downtime == 12.0
    assert result.iterations == 3
    assert result.post_copy
    assert await job.wait() == result  # idempotent
    assert hv._jobs == set()


async def test_direct_migration_reads_downtime_on_the_destination(
    hv: LibvirtHypervisor, dom: ScriptedDomain
) -> None:
    job = await hv.begin_migration(request(p2p=False, paused=True), Ctx())
    kind, _dest, _params, flags = dom.calls[0]
    assert kind == "direct"
    assert not flags & libvirt.VIR_MIGRATE_PEER2PEER
    assert flags & libvirt.VIR_MIGRATE_PAUSED
    dom.release.set()
    result = await job.wait()
    assert (result.downtime, result.iterations, result.transferred) == (7.0, 4, 99)


async def test_abort_leaves_the_vm_on_the_source(
    hv: LibvirtHypervisor, dom: ScriptedDomain
) -> None:
    job = await hv.begin_migration(request(), Ctx())
    await job.suspend_source()
    await job.abort()
    with pytest.raises(TaskCancelled, match=r"^Migration failed: operation aborted"):
        await job.wait()
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING  # our suspend_source was undone
    await job.abort()  # over: a no-op


async def test_failure_with_the_vm_still_on_the_source_is_retryable(
    hv: LibvirtHypervisor, dom: ScriptedDomain
) -> None:
    dom.outcome = "fail"
    job = await hv.begin_migration(request(), Ctx())
    dom.release.set()
    with pytest.raises(MigrationFailed, match=r"^Migration failed: operation failed: boom$"):
        await job.wait()
    assert MigrationFailed.retryable


async def test_failure_after_the_vm_left_is_not_retryable(
    hv: LibvirtHypervisor, dom: ScriptedDomain
) -> None:
    dom.outcome = "fail-gone"
    job = await hv.begin_migration(request(), Ctx())
    dom.release.set()
    with pytest.raises(HypervisorError, match=r"no longer on the source\)$") as info:
        await job.wait()
    assert not isinstance(info.value, MigrationFailed)


async def test_cancelled_begin_aborts_the_job(hv: LibvirtHypervisor, dom: ScriptedDomain) -> None:
    dom.stats = {"type": 0}
    started = asyncio.ensure_future(hv.begin_migration(request(), Ctx()))
    # begin waits for the job; hold it there by hiding the job from jobStats()
    real_run = dom._run

    def slow_start() -> None:
        dom.started.set()
        time.sleep(0.3)
        real_run()

    dom._run = slow_start  # type: ignore[method-assign]
    await asyncio.sleep(0.1)
    started.cancel()
    with pytest.raises(asyncio.CancelledError):
        await started
    assert dom.outcome == "aborted"
    assert hv._jobs == set()


async def test_a_job_that_is_not_ours_makes_begin_busy(
    hv: LibvirtHypervisor, dom: ScriptedDomain
) -> None:
    dom.stats = dict(RUNNING_JOB)
    with pytest.raises(Busy, match=r"has a job running \(operation 5\)"):
        await hv.begin_migration(request(), Ctx())
    assert dom.calls == []


async def test_a_job_started_by_someone_else_after_the_pre_checks_makes_begin_busy(
    hv: LibvirtHypervisor, dom: ScriptedDomain
) -> None:
    # The migration's pre-checks read the guest (no job then); someone starts a job on it
    # (virsh backup-begin, an operator's virsh migrate) before ours starts: refused as
    # without the read, not watched, steered or aborted as if it were ours.
    with hv.reading_once("vm1"):
        assert await hv.domain_named("vm1") is not None
        dom.stats = dict(RUNNING_JOB)
        with pytest.raises(Busy, match=r"has a job running \(operation 5\)"):
            await hv.begin_migration(request(), Ctx())
    assert dom.calls == []


async def test_adopt_a_running_job(hv: LibvirtHypervisor, dom: ScriptedDomain) -> None:
    assert await hv.adopt_migration("vm1") is None
    dom.stats = dict(RUNNING_JOB)  # a job started by an earlier agent run
    job = await hv.adopt_migration("vm1")
    assert job is not None
    assert (await job.stats()).iteration == 1  # type: ignore[union-attr]
    post(hv, kind="job-completed", stats={"downtime": 20})
    dom.stats = {"type": 0}
    dom.gone = True
    post(hv, kind="lifecycle", event=5, detail=3)  # STOPPED / MIGRATED wakes the follower
    async with asyncio.timeout(2):
        result = await job.wait()
    assert result.downtime == 20.0


async def test_aclose_aborts_a_running_job(dom: ScriptedDomain, hv: LibvirtHypervisor) -> None:
    job = await hv.begin_migration(request(), Ctx())
    await hv.aclose()
    assert dom.outcome == "aborted"
    with pytest.raises(TaskCancelled):
        await job.wait()


async def test_set_bandwidth_caps_pre_copy_and_post_copy(
    hv: LibvirtHypervisor, dom: ScriptedDomain
) -> None:
    """Issue 17: ``virDomainMigrateSetMaxSpeed`` in MiB/s; 0 (unlimited) is libvirt's own
    maximum for pre-copy and 0 itself (QEMU's "no limit") with the POSTCOPY flag."""
    from asyncmigfra.hypervisor.virt.migrationparams import BANDWIDTH_UNLIMITED  # noqa: PLC0415

    job = await hv.begin_migration(request(), Ctx())
    await job.set_bandwidth(64)
    await job.set_bandwidth(0)
    await job.set_bandwidth(10**20)
    await job.set_bandwidth(32, post_copy=True)
    await job.set_bandwidth(0, post_copy=True)
    postcopy = libvirt.VIR_DOMAIN_MIGRATE_MAX_SPEED_POSTCOPY
    assert [c for c in dom.calls if c[0] == "max-speed"] == [
        ("max-speed", 64, 0),
        ("max-speed", BANDWIDTH_UNLIMITED, 0),
        ("max-speed", BANDWIDTH_UNLIMITED, 0),
        ("max-speed", 32, postcopy),
        ("max-speed", 0, postcopy),
    ]
    assert BANDWIDTH_UNLIMITED == 8796093022207
    dom.release.set()
    await job.wait()
