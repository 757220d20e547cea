"""The ``fake`` back-end class: this agent's view of the simulated cluster."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from typing import Literal

from asyncmigfra.errors import (
    Busy,
    ConnectionFailed,
    HypervisorError,
    IncompatibleDestination,
    InvalidTask,
    TaskTimeout,
    VmNotFound,
    WrongState,
)
from asyncmigfra.hypervisor.base import (
    DiskCopy,
    DomainInfo,
    DomainState,
    HostInfo,
    HostLoad,
    MigrationJob,
    MigrationRequest,
    MigrationResult,
    OpContext,
    check_vcpu_map,
)
from asyncmigfra.hypervisor.fake.cluster import (
    _DEFAULT_DOMAIN_MEMORY,
    FakeCluster,
    FakeDomain,
    FakeHost,
)
from asyncmigfra.hypervisor.fake.domainxml import _parse_domain_xml, _XmlDomain
from asyncmigfra.hypervisor.fake.faults import FAULT_OPS, INJECTED
from asyncmigfra.hypervisor.fake.migration import FakeMigrationJob
from asyncmigfra.hypervisor.fake.postcopy import FakePostCopyRecovery, find_broken
from asyncmigfra.hypervisor.fake.probes import _RateProbes
from asyncmigfra.model import PciId, StartSpec, VcpuMap


def _wrong_state(state: DomainState) -> WrongState:
    return WrongState(f"Wrong domain state: {state.number}")


def _not_found(name: str) -> VmNotFound:
    return VmNotFound(f"Domain not found: no domain with matching name '{name}'")


class FakeHypervisor(_RateProbes):
    """This agent's view of the fake cluster: operations act on ``host``. It also tells its
    guests' dirty rates and its links' rates (:mod:`.probes`).

    Test hooks: ``cluster`` (the shared :class:`FakeCluster`), ``host`` (this agent's
    :class:`FakeHost`), :meth:`inject` (failure injection), and the timing attributes
    (``latency``, ``start_delay``, ``stop_delay``, ``time_scale``, ...) which may be changed
    at any time.
    """

    kind = "fake"

    def __init__(
        self,
        *,
        cluster: FakeCluster,
        host: FakeHost,
        bandwidth: float = 1000.0,
        latency: float = 0.0,
        start_delay: float = 0.0,
        stop_delay: float = 0.0,
        start_timeout: float = 60.0,
        stop_timeout: float = 60.0,
        time_scale: float = 1.0,
        postcopy_break_for: float = 2.0,
        faults: Mapping[str, int | None] | None = None,
    ) -> None:
        self.cluster = cluster
        self.host = host
        #: MiB/s of the link that outgoing migrations use.
        self.bandwidth = bandwidth
        self.latency = latency
        self.start_delay = start_delay
        self.stop_delay = stop_delay
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.time_scale = time_scale
        #: Simulated s a ``postcopy-break`` keeps the destination unreachable.
        self.postcopy_break_for = postcopy_break_for
        #: op -> remaining count, ``None`` = always.
        self._faults: dict[str, int | None] = {}
        for op, count in (faults or {}).items():
            self.inject(op, "always" if count is None else count)
        self._closed = False

    def __repr__(self) -> str:
        return f"FakeHypervisor(host={self.host.name!r})"

    async def _unplug(self, dom: FakeDomain, what: str, limit: float) -> None:
        """Wait for the guest to release a device, like the device-removed event."""
        if self._take_fault("detach-device"):
            raise HypervisorError(f"{INJECTED}: detaching {what}")
        if dom.unplug_delay > limit:
            await asyncio.sleep(limit)
            raise TaskTimeout(
                f"the guest did not release {what} within {limit:g} s (device-removed event)"
            )
        if dom.unplug_delay > 0:
            await asyncio.sleep(dom.unplug_delay)

    async def detach_ivshmem(
        self, vm_name: str, ctx: OpContext, *, unplug_timeout: float
    ) -> str | None:
        await self._enter("list-domains")
        dom = self._domain(vm_name)
        if len(dom.shmems) > 1:
            raise HypervisorError(
                "Found more than one ivshmem device. Only migration of one is supported."
            )
        if not dom.shmems:
            return None
        xml = dom.shmems[0]
        await self._unplug(dom, "the ivshmem device", unplug_timeout)
        dom.shmems.remove(xml)
        return xml

    async def attach_ivshmem(self, vm_name: str, device_xml: str, ctx: OpContext) -> None:
        await self._enter("attach-device")
        dom = self._domain(vm_name)
        if not dom.active:
            raise _wrong_state(dom.state)
        dom.shmems.append(device_xml)

    async def detach_hostdevs(
        self, vm_name: str, ctx: OpContext, *, unplug_timeout: float
    ) -> dict[PciId, int]:
        await self._enter("list-domains")
        dom = self._domain(vm_name)
        counts: dict[PciId, int] = {}
        for kind, addr in list(dom.hostdevs):
            await self._unplug(dom, f"host device {addr}", unplug_timeout)
            dom.hostdevs.remove((kind, addr))
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    async def attach_hostdevs(
        self, vm_name: str, counts: Mapping[PciId, int], ctx: OpContext
    ) -> None:
        await self._enter("attach-device")
        dom = self._domain(vm_name)
        if not dom.active:
            raise _wrong_state(dom.state)
        for kind, count in counts.items():
            label = f"{kind.vendor:04x}:{kind.device:04x}"
            free = self.host.free_pci(kind)
            if len(free) < count:
                raise HypervisorError(
                    f'No free devices of type "{label}" on "{self.host.name}" '
                    f"({count} needed, {len(free)} free)."
                )
            dom.hostdevs.extend((kind, addr) for addr in free[:count])

    def on_host(self, host: str) -> FakeHypervisor:
        """A view acting on the cluster host ``host``. It shares this agent's injected faults
        (a test injects ``repin`` here to fail the repin on the destination) and timing."""
        if host == self.host.name:
            return self
        target = self.cluster.hosts.get(host)
        if target is None:
            raise ConnectionFailed(f"unable to connect to server at '{host}': No route to host")
        view = copy.copy(self)
        view.host = target
        return view

    # ---- test hooks ---------------------------------------------------------------------

    def inject(self, op: str, count: int | Literal["always"] = 1) -> None:
        """Make the next ``count`` calls of ``op`` fail (``"always"``: until reset; 0: reset)."""
        if op not in FAULT_OPS:
            raise ValueError(f"unknown operation {op!r} (known: {', '.join(FAULT_OPS)})")
        if count == "always":
            self._faults[op] = None
        elif count > 0:
            self._faults[op] = count
        else:
            self._faults.pop(op, None)

    def _take_fault(self, op: str) -> bool:
        if op not in self._faults:
            return False
        count = self._faults[op]
        if count is not None:
            if count <= 1:
                del self._faults[op]
            else:
                self._faults[op] = count - 1
        return True

    # ---- helpers ------------------------------------------------------------------------

    async def _enter(self, op: str) -> None:
        """What every operation does first: latency, closed check, injected failure."""
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        if self._closed:
            raise ConnectionFailed("Failed to connect to the fake hypervisor: connection closed")
        if self._take_fault(op):
            raise HypervisorError(INJECTED)

    def _domain(self, name: str) -> FakeDomain:
        dom = self.host.domains.get(name)
        if dom is not None and dom.job is not None:
            dom.job._sync()  # a migration due to have finished must not be seen running here
            dom = self.host.domains.get(name)
        if dom is None:
            raise _not_found(name)
        return dom

    @staticmethod
    def _not_migrating(dom: FakeDomain) -> None:
        if dom.job is not None or dom.broken is not None:
            raise Busy(f"domain '{dom.name}' has a migration job running")

    def _power_off(self, dom: FakeDomain) -> None:
        dom.state = DomainState.SHUTOFF
        if not dom.persistent and self.host.domains.get(dom.name) is dom:
            del self.host.domains[dom.name]  # a transient domain ends with its guest

    # ---- Hypervisor ---------------------------------------------------------------------

    async def open(self) -> None:
        """Nothing to connect to; reopening after ``aclose`` is allowed."""
        self._closed = False

    async def aclose(self) -> None:
        """Close: end the migrations this agent started (the fake has no daemon to keep them)."""
        self._closed = True
        for job in list(self.cluster.jobs):
            if job._owner is self:
                job._shutdown()

    async def start(self, spec: StartSpec, ctx: OpContext) -> None:
        await self._enter("start")
        ctx.phase("starting")
        if spec.name_error:
            raise InvalidTask(spec.name_error)
        if spec.transient and spec.xml is None:
            raise InvalidTask(
                "XML description is missing which is required to create a transient domain."
            )
        host = self.host
        parsed: _XmlDomain | None = None
        if spec.xml is not None:
            parsed = _parse_domain_xml(spec.xml)
            if spec.transient and (spec.memory is not None or spec.vcpus is not None):
                raise HypervisorError(
                    "Requested operation is not valid: "
                    "cannot change persistent config of a transient domain"
                )
            name = parsed.name
            existing = host.domains.get(name)
            if existing is not None and existing.job is not None:
                existing.job._sync()
                existing = host.domains.get(name)
        else:
            if not spec.vm_name:
                raise InvalidTask("vm-name is not valid.")
            name = spec.vm_name
            existing = self._domain(name)
        if existing is not None:
            self._not_migrating(existing)
            if existing.state is not DomainState.SHUTOFF:
                raise _wrong_state(existing.state)
        if name in host.incoming:
            raise Busy(f"domain '{name}' is being migrated to {host.name}")
        memory = spec.memory or (parsed.memory if parsed else None)
        memory = memory or (existing.memory if existing else _DEFAULT_DOMAIN_MEMORY)
        vcpus = spec.vcpus or (parsed.vcpus if parsed else None)
        vcpus = vcpus or (existing.vcpus if existing else 1)
        free = host.free_memory()
        if memory > free:
            raise HypervisorError(
                f"Error creating domain: cannot allocate {memory} KiB on {host.name} "
                f"({free} KiB free)"
            )
        # Every check passed: now change state (nothing above has touched the cluster).
        if existing is None:
            dom = FakeDomain(name, persistent=not spec.transient)
            host.domains[name] = dom
        else:
            dom = existing
        if vcpus != dom.vcpus:
            dom.vcpu_pinning = None
        dom.vcpus, dom.memory = vcpus, memory
        if spec.xml is not None:
            dom.xml = spec.xml
        dom.boot()
        delay = self.start_delay
        if delay > 0:
            if spec.probe_with_ssh:
                ctx.phase("probing")
            with ctx.measure("boot"):
                if spec.probe_with_ssh and delay > self.start_timeout:
                    await asyncio.sleep(self.start_timeout)
                    raise TaskTimeout("Timeout while trying to reach domain with SSH.")
                await asyncio.sleep(delay)

    async def stop(
        self,
        vm_name: str,
        ctx: OpContext,
        *,
        force: bool = False,
        undefine: bool = False,
        force_after_timeout: bool = False,
    ) -> None:
        await self._enter("stop")
        dom = self._domain(vm_name)
        self._not_migrating(dom)
        if force:
            # Destroy also ends a guest that hangs in its shutdown.
            if not dom.active:
                raise _wrong_state(dom.state)
            ctx.phase("destroying")
            with ctx.measure("destroy"):
                self._power_off(dom)
        else:
            if dom.state not in (DomainState.RUNNING, DomainState.PAUSED):
                raise _wrong_state(dom.state)
            await self._graceful_shutdown(dom, ctx, force_after_timeout=force_after_timeout)
        if undefine and dom.persistent and self.host.domains.get(vm_name) is dom:
            with ctx.measure("undefine"):
                dom.persistent = False
                del self.host.domains[vm_name]

    async def _graceful_shutdown(
        self, dom: FakeDomain, ctx: OpContext, *, force_after_timeout: bool
    ) -> None:
        """A graceful shutdown taking ``stop-delay`` (or the domain's own ``stop_delay``)."""
        ctx.phase("shutting-down")
        previous = dom.state
        dom.state = DomainState.SHUTDOWN
        delay = self.stop_delay if dom.stop_delay is None else dom.stop_delay

        def still_shutting_down() -> bool:
            return self.host.domains.get(dom.name) is dom and dom.state is DomainState.SHUTDOWN

        try:
            with ctx.measure("shutdown"):
                if delay > self.stop_timeout:
                    await asyncio.sleep(self.stop_timeout)
                    if not force_after_timeout:
                        if still_shutting_down():
                            dom.state = previous  # the guest ignored the request
                        raise TaskTimeout("Timeout while waiting for correct vm state.")
                    ctx.phase("destroying")
                elif delay > 0:
                    await asyncio.sleep(delay)
        except asyncio.CancelledError:
            if still_shutting_down():
                dom.state = previous
            raise
        if still_shutting_down():
            self._power_off(dom)
        # else a concurrent destroy finished it already: that is success too.

    async def suspend(self, vm_name: str, ctx: OpContext) -> None:
        await self._enter("suspend")
        dom = self._domain(vm_name)
        if dom.state is not DomainState.RUNNING:
            raise _wrong_state(dom.state)
        dom.state = DomainState.PAUSED

    async def resume(self, vm_name: str, ctx: OpContext) -> None:
        await self._enter("resume")
        dom = self._domain(vm_name)
        if dom.state is not DomainState.PAUSED:
            raise _wrong_state(dom.state)
        dom.state = DomainState.RUNNING

    async def set_memory(self, vm_name: str, kib: int, ctx: OpContext) -> None:
        """Set the balloon target (``FakeDomain.balloon``): the guest reports it as its current
        memory at once, and a migration copies only that much; the size stays ``memory``."""
        await self._enter("set-memory")
        dom = self._domain(vm_name)
        if dom.state not in (DomainState.RUNNING, DomainState.PAUSED):
            raise _wrong_state(dom.state)
        if not 0 < kib <= dom.memory:
            raise HypervisorError(
                f"Error setting memory: invalid argument: {kib} KiB is outside 1..{dom.memory}"
            )
        dom.balloon = kib

    async def current_memory(self, vm_name: str) -> int:
        """What the balloon left the guest (``memory`` when it was never set)."""
        await self._enter("current-memory")
        dom = self._domain(vm_name)
        return dom.memory if dom.balloon is None else dom.balloon

    async def repin(self, vm_name: str, vcpu_map: VcpuMap, ctx: OpContext) -> None:
        await self._enter("repin")
        dom = self._domain(vm_name)
        if dom.state not in (DomainState.RUNNING, DomainState.PAUSED):
            raise _wrong_state(dom.state)
        cpus = self.host.cpus
        if len(vcpu_map) > dom.vcpus:
            raise HypervisorError(
                f"Error pinning vcpu: invalid argument: vcpu {dom.vcpus} is out of range "
                f"of live cpu count {dom.vcpus}"
            )
        check_vcpu_map(vcpu_map, cpus, self.host.name)
        everything = tuple(range(cpus))
        current = dom.vcpu_pinning or ()
        dom.vcpu_pinning = tuple(
            tuple(sorted(set(vcpu_map[i])))
            if i < len(vcpu_map)
            else (current[i] if i < len(current) else everything)
            for i in range(dom.vcpus)
        )

    async def check_migration(
        self, request: MigrationRequest, *, memory: bool = True
    ) -> tuple[DiskCopy, ...]:
        """The pre-checks a real destination allows: reachable, no active domain of that
        name, enough free memory (CPU and machine type always match in the simulation)."""
        dom = self._domain(request.vm_name)
        dest = self.cluster.hosts.get(request.destination)
        if dest is None:
            raise ConnectionFailed(
                f"unable to connect to server at '{request.destination}': No route to host"
            )
        if dest is self.host:  # (begin_migration reports it with libvirt's text)
            raise IncompatibleDestination(
                f"destination {request.destination} is this host ({self.host.name}): a VM"
                " cannot migrate to the host it runs on"
            )
        there = dest.domains.get(dom.name)
        if (there is not None and there.active) or dom.name in dest.incoming:
            raise IncompatibleDestination(
                f"a domain named '{dom.name}' is already active on {dest.name}"
            )
        free = dest.free_memory()
        if memory and request.mode != "offline" and dom.memory > free:
            raise IncompatibleDestination(
                f"not enough free memory on {dest.name}: {dom.memory} KiB needed, {free} KiB free"
            )
        return _copies(dom.name, dom.disks_to_copy(request))

    async def disks_to_copy(self, request: MigrationRequest) -> tuple[DiskCopy, ...]:
        """The fake has no storage pools: an evacuation places its VMs on CPU and memory."""
        return ()

    async def begin_migration(self, request: MigrationRequest, ctx: OpContext) -> MigrationJob:
        await self._enter("migrate")
        dom = self._domain(request.vm_name)
        self._not_migrating(dom)
        offline = request.mode == "offline"
        if offline:
            if dom.active:
                raise _wrong_state(dom.state)
        elif dom.state not in (DomainState.RUNNING, DomainState.PAUSED):
            raise _wrong_state(dom.state)
        dest = self.cluster.hosts.get(request.destination)
        if dest is None:
            raise ConnectionFailed(
                f"unable to connect to server at '{request.destination}': No route to host"
            )
        if dest is self.host:
            raise HypervisorError("Attempt to migrate guest to the same host")
        if dom.hostdevs or dom.shmems:
            raise HypervisorError(
                "Requested operation is not valid: cannot migrate a domain with "
                + ("<hostdev>" if dom.hostdevs else "<shmem>")
            )
        name = dom.name
        there = dest.domains.get(name)
        if there is not None and there.job is not None:
            there.job._sync()
            there = dest.domains.get(name)
        if (there is not None and there.active) or name in dest.incoming:
            raise IncompatibleDestination(
                f"operation failed: domain '{name}' is already active on {dest.name}"
            )
        if offline:
            if not request.persist:
                raise HypervisorError(
                    "argument unsupported: offline migration requires the persist flag"
                )
            if request.copy_storage != "none":
                raise HypervisorError(
                    "Requested operation is not valid: offline migration cannot handle "
                    "non-shared storage"
                )
            return self._offline(dom, dest, request)
        free = dest.free_memory()
        if dom.memory > free:
            raise IncompatibleDestination(
                f"not enough free memory on {dest.name}: {dom.memory} KiB needed, {free} KiB free"
            )
        disks = dom.disks_to_copy(request)
        job = FakeMigrationJob(
            owner=self,
            domain=dom,
            source=self.host,
            destination=dest,
            request=request,
            fail_midway=self._take_fault("migrate-midway"),
            disk_bytes=sum(disks.values()),
            break_post_copy=self._take_fault("postcopy-break"),
            stall_midway=self._take_fault("migrate-stall"),
        )
        job._begin()
        return job

    async def broken_post_copy(self, request: MigrationRequest) -> FakePostCopyRecovery | None:
        """The recovery of ``request``'s post-copy if it broke (fault ``postcopy-break``)."""
        self.cluster.sync()
        return find_broken(self, request)

    def _resumed_job(
        self, dom: FakeDomain, dest: FakeHost, request: MigrationRequest
    ) -> FakeMigrationJob:
        """A job that resumes ``dom``'s broken post-copy (see fake/postcopy.py)."""
        return FakeMigrationJob(
            owner=self,
            domain=dom,
            source=self.host,
            destination=dest,
            request=request,
            fail_midway=False,
        )

    def _offline(
        self, dom: FakeDomain, dest: FakeHost, request: MigrationRequest
    ) -> FakeMigrationJob:
        """Offline migration moves only the (persistent, shut-off) definition, at once."""
        job = FakeMigrationJob(
            owner=self,
            domain=dom,
            source=self.host,
            destination=dest,
            request=request,
            fail_midway=False,
        )
        del self.host.domains[dom.name]
        dest.domains[dom.name] = dom
        job._finish_now(MigrationResult(downtime=None, iterations=0, transferred=0))
        return job

    async def list_domains(self, *, active_only: bool = False) -> list[DomainInfo]:
        await self._enter("list-domains")
        self.cluster.sync()
        return [
            d.info() for _, d in sorted(self.host.domains.items()) if d.active or not active_only
        ]

    async def storage_paths(self) -> tuple[str, ...]:
        """The fake host has no storage pools."""
        return ()

    async def host_info(self) -> HostInfo:
        await self._enter("host-info")
        self.cluster.sync()
        return self.host.info()

    async def host_load(self, host: str) -> HostLoad:
        self.cluster.sync()
        target = self.cluster.hosts.get(host)
        if target is None:
            raise ConnectionFailed(f"unable to connect to server at '{host}': No route to host")
        active = [d for d in target.domains.values() if d.active]
        return HostLoad(
            host=host,
            cpus=target.cpus,
            memory=target.memory,
            free_memory=target.free_memory(),
            vcpus_used=sum(d.vcpus for d in active),
            domains=len(active),
        )


def _copies(vm_name: str, disks: Mapping[str, int]) -> tuple[DiskCopy, ...]:
    """The fake's disks as :class:`DiskCopy` (their images have made-up paths)."""
    return tuple(
        DiskCopy(target=t, path=f"/var/lib/libvirt/images/{vm_name}-{t}.img", size=n, room=n)
        for t, n in disks.items()
    )
