"""The simulated cluster of the ``fake`` back-end: domains, hosts and the cluster itself.

Plain state on the event loop; the migration job (:mod:`.migration`) moves domains
between hosts.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

from asyncmigfra.errors import ConfigError, HypervisorError
from asyncmigfra.hypervisor.base import DomainInfo, DomainState, HostInfo, MigrationRequest
from asyncmigfra.hypervisor.fake.links import FakeLinks
from asyncmigfra.model import PciAddress, PciId, VcpuMap

if TYPE_CHECKING:
    from asyncmigfra.hypervisor.fake.migration import FakeMigrationJob
    from asyncmigfra.hypervisor.fake.postcopy import BrokenPostCopy

#: Where the cluster lives in the per-process ``shared`` dict.
SHARED_KEY = "fake-cluster"

_KIB = 1024
_MIB = 1024 * 1024
_DEFAULT_CPUS = 16
_DEFAULT_HOST_MEMORY = 64 * _MIB  # KiB
_DEFAULT_DOMAIN_MEMORY = _MIB  # KiB = 1 GiB
#: A domain's disks unless its ``domains:`` entry lists ``disks``: one ``vda`` of 1 GiB.
_DEFAULT_DISKS: dict[str, int] = {"vda": 1024 * _MIB}  # bytes

#: Guest passes per real second; the counter only needs to move visibly, not to be QEMU.
_COUNTER_RATE = 1000.0

_ACTIVE_STATES = frozenset(
    {
        DomainState.RUNNING,
        DomainState.BLOCKED,
        DomainState.PAUSED,
        DomainState.SHUTDOWN,
        DomainState.PMSUSPENDED,
    }
)


class FakeDomain:
    """One simulated guest: its definition, run state and guest-visible progress.

    ``state`` and ``dirty_rate`` are properties because a migration job computes how much
    memory was dirtied from them: changing either while a job runs first lets the job account
    for the time under the old value.
    """

    def __init__(
        self,
        name: str,
        *,
        vcpus: int = 1,
        memory: int = _DEFAULT_DOMAIN_MEMORY,
        state: DomainState = DomainState.SHUTOFF,
        persistent: bool = True,
        dirty_rate: int = 0,
        xml: str | None = None,
        stop_delay: float | None = None,
        disks: dict[str, int] | None = None,
        setup_time: float | None = None,
    ) -> None:
        self.name = name
        self.vcpus = vcpus
        #: KiB (current = maximum).
        self.memory = memory
        self.persistent = persistent
        self.xml = xml
        #: Per-vCPU allowed host CPUs; ``None``: unpinned (all CPUs).
        self.vcpu_pinning: VcpuMap | None = None
        #: Overrides the host's ``stop-delay`` (a guest that ignores ACPI: a large value).
        self.stop_delay = stop_delay
        #: Simulated s before a migration of this domain moves data; ``None``: the default
        #: (a loaded host's slow setup, which the prediction does not know: a larger value).
        self.setup_time = setup_time
        #: The migration job that currently moves this domain, if any.
        self.job: FakeMigrationJob | None = None
        #: Set while a post-copy migration of this domain is broken (``postcopy-break``).
        self.broken: BrokenPostCopy | None = None
        #: PCI passthrough devices (type, host address); QEMU cannot migrate with these.
        self.hostdevs: list[tuple[PciId, PciAddress]] = []
        #: ivshmem devices, as device XML; QEMU cannot migrate with these either.
        self.shmems: list[str] = []
        #: KiB the balloon was last set to (``set_memory``); ``None``: never set.
        self.balloon: int | None = None
        #: s the guest takes to release a hot-unplugged device (``inf``: never answers).
        self.unplug_delay = 0.0
        #: Local disks: target dev -> bytes a storage copy moves (the fake has no backing
        #: chains: ``copy-storage: inc`` moves as much as ``all``).
        self.disks: dict[str, int] = dict(_DEFAULT_DISKS if disks is None else disks)
        self._state = state
        self._dirty_rate = dirty_rate
        self._counter_base = 0.0
        self._running_since: float | None = (
            time.monotonic() if state is DomainState.RUNNING else None
        )

    def __repr__(self) -> str:
        return f"FakeDomain({self.name!r}, {self._state.value}, persistent={self.persistent})"

    @property
    def state(self) -> DomainState:
        return self._state

    @state.setter
    def state(self, state: DomainState) -> None:
        if self.job is not None:
            self.job._guest_changing()
        self._apply_state(state)

    @property
    def dirty_rate(self) -> int:
        """Bytes/s the guest dirties while it runs."""
        return self._dirty_rate

    @dirty_rate.setter
    def dirty_rate(self, rate: int) -> None:
        if self.job is not None:
            self.job._guest_changing()
        self._dirty_rate = rate

    @property
    def active(self) -> bool:
        return self._state in _ACTIVE_STATES

    @property
    def counter(self) -> int:
        """Guest progress: advances only while RUNNING, kept across pause and migration."""
        value = self._counter_base
        if self._running_since is not None:
            value += (time.monotonic() - self._running_since) * _COUNTER_RATE
        return int(value)

    def boot(self) -> None:
        """A fresh boot: the guest's progress starts again from zero."""
        self._counter_base = 0.0
        self._running_since = None
        self._apply_state(DomainState.RUNNING)

    def info(self) -> DomainInfo:
        return DomainInfo(
            name=self.name,
            state=self._state,
            vcpus=self.vcpus,
            # Like libvirt's current memory: what the balloon left the guest.
            memory=self.memory if self.balloon is None else self.balloon,
            persistent=self.persistent,
        )

    def copy_definition(self) -> FakeDomain:
        """The shut-off persistent definition a source keeps after a non-persist migration."""
        return FakeDomain(
            self.name,
            vcpus=self.vcpus,
            memory=self.memory,
            state=DomainState.SHUTOFF,
            persistent=True,
            dirty_rate=self._dirty_rate,
            xml=self.xml,
            stop_delay=self.stop_delay,
            disks=self.disks,
            setup_time=self.setup_time,
        )

    def disks_to_copy(self, request: MigrationRequest) -> dict[str, int]:
        """The disks (target -> bytes) ``request`` copies: none without ``copy_storage``,
        else those of ``migrate_disks`` or, when it is empty, all of them (the fake's disks
        are all writable and local). A target the domain does not have: ``HypervisorError``
        with libvirt's words."""
        if request.copy_storage == "none":
            return {}
        for target in request.migrate_disks:
            if target not in self.disks:
                raise HypervisorError(f"invalid argument: disk target {target} not found")
        wanted = request.migrate_disks or tuple(self.disks)
        return {target: self.disks[target] for target in wanted}

    def _apply_state(self, state: DomainState) -> None:
        """Change state without notifying the job (the job itself uses this)."""
        now = time.monotonic()
        if self._running_since is not None and state is not DomainState.RUNNING:
            self._counter_base += (now - self._running_since) * _COUNTER_RATE
            self._running_since = None
        elif self._running_since is None and state is DomainState.RUNNING:
            self._running_since = now
        self._state = state


class FakeHost:
    """One simulated hypervisor host: capacity and the domains defined on it."""

    def __init__(
        self,
        name: str,
        *,
        cpus: int = _DEFAULT_CPUS,
        memory: int = _DEFAULT_HOST_MEMORY,
        nic_rate: float | None = None,
    ) -> None:
        self.name = name
        self.cpus = cpus
        #: KiB
        self.memory = memory
        #: Bytes/s its NIC sends, and receives, shared by the migrations using it
        #: (:mod:`.links`); ``None``: unlimited (each migration gets its bandwidth).
        self.nic_rate = nic_rate
        self.domains: dict[str, FakeDomain] = {}
        #: vm name -> KiB reserved by a migration coming in (as the destination QEMU would).
        self.incoming: dict[str, int] = {}
        #: PCI devices that can be passed through (address -> vendor:device).
        self.pci_devices: dict[PciAddress, PciId] = {}

    def free_pci(self, wanted: PciId) -> list[PciAddress]:
        """Devices of type ``wanted`` no active domain here uses, in address order."""
        used = {addr for d in self.domains.values() if d.active for _, addr in d.hostdevs}
        return sorted(
            (a for a, t in self.pci_devices.items() if t == wanted and a not in used),
            key=str,
        )

    def __repr__(self) -> str:
        return f"FakeHost({self.name!r}, domains={sorted(self.domains)})"

    def used_memory(self) -> int:
        """KiB held by active domains and incoming migrations."""
        used = sum(d.memory for d in self.domains.values() if d.active)
        return used + sum(self.incoming.values())

    def free_memory(self) -> int:
        return max(0, self.memory - self.used_memory())

    def info(self) -> HostInfo:
        return HostInfo(
            hostname=self.name, cpus=self.cpus, memory=self.memory, free_memory=self.free_memory()
        )


class FakeCluster:
    """All simulated hosts of one process, plus the migration jobs running between them."""

    def __init__(self) -> None:
        self.hosts: dict[str, FakeHost] = {}
        self.jobs: set[FakeMigrationJob] = set()
        #: How the jobs share the hosts' NICs.
        self.links = FakeLinks()

    def __repr__(self) -> str:
        return f"FakeCluster(hosts={sorted(self.hosts)}, jobs={len(self.jobs)})"

    @classmethod
    def of(cls, shared: MutableMapping[str, object]) -> FakeCluster:
        """The cluster kept in ``shared`` (created on first use)."""
        cluster = shared.get(SHARED_KEY)
        if cluster is None:
            cluster = shared[SHARED_KEY] = cls()
        if not isinstance(cluster, FakeCluster):
            raise ConfigError(f"shared[{SHARED_KEY!r}] holds a {type(cluster).__name__}")
        return cluster

    def add_host(
        self,
        name: str,
        *,
        cpus: int = _DEFAULT_CPUS,
        memory: int = _DEFAULT_HOST_MEMORY,
        nic_rate: float | None = None,
    ) -> FakeHost:
        """Create host ``name`` unless it exists; return it either way."""
        host = self.hosts.get(name)
        if host is None:
            host = self.hosts[name] = FakeHost(name, cpus=cpus, memory=memory, nic_rate=nic_rate)
        return host

    def domain(self, host: str, vm: str) -> FakeDomain:
        """Test helper: the domain ``vm`` on ``host`` (KeyError if absent)."""
        return self.hosts[host].domains[vm]

    def locate(self, vm: str, *, active_only: bool = True) -> list[str]:
        """Test helper: the hosts where ``vm`` is defined (active only by default), sorted."""
        return sorted(
            h.name
            for h in self.hosts.values()
            if vm in h.domains and (h.domains[vm].active or not active_only)
        )

    def sync(self) -> None:
        """Bring every running job up to the present before state is read.

        Jobs advance on timers; a reader could otherwise see a migration that should have
        finished a moment ago as still running.
        """
        for job in list(self.jobs):
            job._sync()
