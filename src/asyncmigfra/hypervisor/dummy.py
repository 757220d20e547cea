"""The ``dummy`` back-end: the original's ``Dummy_hypervisor`` (docs/protocol.md §3.1, §9.4).

It exists so the whole MQTT path (parse, schedule, answer) can be exercised without any
hypervisor: with ``never-throw: true`` every operation succeeds at once and changes nothing;
with ``never-throw: false`` every operation fails with the original's exact text, which lets
schedulers test their error handling. ``list_domains`` is empty, so ``evacuate node``
answers with an empty list, as the original did.

Options: ``never-throw`` (bool; the original required it, here it defaults to true).
The original's generic libvirt keys (``driver``,
``transport``, ``nodes``, ``start-timeout``, ``stop-timeout``) are accepted and ignored so a
migfra.conf keeps loading when only ``type`` is switched to ``dummy``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

from asyncmigfra.errors import HypervisorError
from asyncmigfra.hypervisor.base import (
    DiskCopy,
    DomainInfo,
    HostInfo,
    HostLoad,
    JobStats,
    MigrationJob,
    MigrationRequest,
    MigrationResult,
    OpContext,
)
from asyncmigfra.hypervisor.registry import GENERIC_LIBVIRT_KEYS, check_keys, opt_bool
from asyncmigfra.model import PciId, StartSpec, VcpuMap

__all__ = ["DUMMY_ERROR", "DummyHypervisor", "DummyMigrationJob", "create"]

#: The original's text, byte for byte: schedulers match on it.
DUMMY_ERROR = "Dummy_hypervisor is set to throw always if called."

#: A plausible host for ``status``/evacuate capacity: 64 GiB in KiB.
_HOST_MEMORY_KIB = 64 * 1024 * 1024


class DummyMigrationJob:
    """A migration that was over before anyone could look at it.

    Nothing moved, so :meth:`stats` is ``None`` and :meth:`wait_iteration` returns at once
    with the final iteration (0), which tells a caller waiting for progress that the job has
    ended. Steering calls are accepted and do nothing, since there is nothing left to steer.
    """

    def __init__(self, request: MigrationRequest) -> None:
        self.request = request

    async def stats(self) -> JobStats | None:
        return None

    async def wait_iteration(self, after: int) -> int:
        return 0

    async def wait(self) -> MigrationResult:
        return MigrationResult(downtime=0.0, iterations=0, post_copy=False, transferred=0)

    async def set_max_downtime(self, ms: int) -> None:
        return None

    async def set_bandwidth(self, mibs: int, *, post_copy: bool = False) -> None:
        return None

    async def start_post_copy(self) -> None:
        return None

    async def suspend_source(self) -> None:
        return None

    async def abort(self) -> None:
        return None


class DummyHypervisor:
    """Does nothing, successfully (``never_throw``) or by failing every operation."""

    kind = "dummy"

    def __init__(self, *, never_throw: bool, hostname: str) -> None:
        self.never_throw = never_throw
        self.hostname = hostname

    def _check(self) -> None:
        if not self.never_throw:
            raise HypervisorError(DUMMY_ERROR)

    async def open(self) -> None:
        """Never fails: the original daemon started fine and failed each task instead."""

    async def aclose(self) -> None:
        """Nothing to release."""

    async def start(self, spec: StartSpec, ctx: OpContext) -> None:
        self._check()

    async def stop(
        self,
        vm_name: str,
        ctx: OpContext,
        *,
        force: bool = False,
        undefine: bool = False,
        force_after_timeout: bool = False,
    ) -> None:
        self._check()

    async def suspend(self, vm_name: str, ctx: OpContext) -> None:
        self._check()

    async def resume(self, vm_name: str, ctx: OpContext) -> None:
        self._check()

    async def repin(self, vm_name: str, vcpu_map: VcpuMap, ctx: OpContext) -> None:
        self._check()

    async def set_memory(self, vm_name: str, kib: int, ctx: OpContext) -> None:
        self._check()

    async def current_memory(self, vm_name: str) -> int:
        self._check()
        return 0

    async def check_migration(
        self, request: MigrationRequest, *, memory: bool = True
    ) -> tuple[DiskCopy, ...]:
        self._check()
        return ()

    async def disks_to_copy(self, request: MigrationRequest) -> tuple[DiskCopy, ...]:
        return ()  # no disks here

    async def begin_migration(self, request: MigrationRequest, ctx: OpContext) -> MigrationJob:
        self._check()
        return DummyMigrationJob(request)

    async def list_domains(self, *, active_only: bool = False) -> list[DomainInfo]:
        self._check()
        return []

    async def storage_paths(self) -> tuple[str, ...]:
        return ()

    async def host_info(self) -> HostInfo:
        self._check()
        return HostInfo(
            hostname=self.hostname,
            cpus=os.cpu_count() or 1,
            memory=_HOST_MEMORY_KIB,
            free_memory=_HOST_MEMORY_KIB,
        )

    # The migration companions are no-ops, even with ``never-throw: false``: a dummy guest has
    # no devices, and the migration itself then fails with the original's dummy text.

    async def detach_ivshmem(
        self, vm_name: str, ctx: OpContext, *, unplug_timeout: float
    ) -> str | None:
        return None

    async def attach_ivshmem(self, vm_name: str, device_xml: str, ctx: OpContext) -> None:
        """Nothing to attach."""

    async def detach_hostdevs(
        self, vm_name: str, ctx: OpContext, *, unplug_timeout: float
    ) -> dict[PciId, int]:
        return {}

    async def attach_hostdevs(
        self, vm_name: str, counts: Mapping[PciId, int], ctx: OpContext
    ) -> None:
        """Nothing to attach."""

    def on_host(self, host: str) -> DummyHypervisor:
        """Every host is the same dummy: operations there do nothing, or fail likewise."""
        return self

    async def host_load(self, host: str) -> HostLoad:
        """Every destination looks empty and large: evacuations place freely."""
        self._check()
        return HostLoad(
            host=host,
            cpus=os.cpu_count() or 1,
            memory=_HOST_MEMORY_KIB,
            free_memory=_HOST_MEMORY_KIB,
            vcpus_used=0,
            domains=0,
        )


def create(
    options: Mapping[str, object], *, hostname: str, shared: MutableMapping[str, object]
) -> DummyHypervisor:
    """The ``dummy`` entry point: validate ``options`` (see the module docstring)."""
    check_keys(options, {"never-throw"}, ignored=GENERIC_LIBVIRT_KEYS)
    # The original required the key; a missing one now means "succeed", so the agent runs
    # with its embedded defaults (no config file) as a harmless protocol endpoint.
    never_throw = opt_bool(options.get("never-throw", True), "hypervisor.never-throw")
    return DummyHypervisor(never_throw=never_throw, hostname=hostname)
