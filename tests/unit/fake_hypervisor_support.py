"""Helpers shared by the ``test_hypervisor_fake*.py`` modules: the guests of host "a", a
hypervisor factory, and short ways to start and watch a migration.

Migrations run with a large ``time-scale`` (``SCALE``) so the simulated seconds pass in
milliseconds."""

from __future__ import annotations

from typing import Any

from asyncmigfra.hypervisor.base import DomainState, JobStats, MigrationJob, MigrationRequest
from asyncmigfra.hypervisor.fake import FakeHypervisor, FakeMigrationJob, create
from harness import RecordingOpContext as Ctx

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


def make(shared: dict[str, object], hostname: str = "a", /, **options: Any) -> FakeHypervisor:
    return create({"time-scale": SCALE, **options}, hostname=hostname, shared=shared)


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
