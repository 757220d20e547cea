"""The ``fake`` back-end: an in-memory cluster with libvirt's state rules and simulated migration.

Why it exists: the demo, the unit tests and the 200-host fleet simulation need hypervisors
that behave like libvirt (a paused VM cannot be started, a migration that dirties memory
faster than the link does not converge, an aborted migration leaves the guest on the source)
without QEMU. Everything here is plain Python state mutated on the event loop, so it is
deterministic, needs no threads, and costs nothing while idle.

Shape:

* :class:`FakeCluster` (hosts by name) lives in ``shared["fake-cluster"]``: several agents in
  one process each get a :class:`FakeHypervisor` for *their* :class:`FakeHost`, and a domain
  migrated by one agent shows up in the other's ``list_domains``.
* :class:`FakeDomain` carries a ``counter`` that advances while the guest runs (like the rig
  guest's pass counter) so tests can see the live state continue after a migration.
* :class:`FakeMigrationJob` simulates libvirt/QEMU pre-copy, post-copy, warm and offline
  migration. Its progress is *computed* from the loop clock (scaled by ``time-scale``) rather
  than stepped by a task: the only thing scheduled is one ``loop.call_at`` timer for the next
  event (end of setup, end of a memory pass, end of switchover), which wakes
  ``wait_iteration``/``wait``. Thousands of concurrent jobs therefore cost one timer each.

Options (``hypervisor:`` map, all optional):

``host``
    this agent's host in the cluster (default: the agent's hostname).
``cpus`` / ``memory``
    of this host (default 16 CPUs, 64 GiB; memory in KiB).
``domains``
    list of ``{name, vcpus, memory (KiB), state: running|shutoff|paused, persistent,
    dirty-rate (MiB/s), stop-delay (s)}`` defined on this host if absent.
``peers``
    map host name -> ``{cpus, memory, domains}``: other hosts created if absent.
``bandwidth``
    MiB/s of the simulated migration link (default 1000).
``latency``
    s every operation waits first (default 0).
``start-delay`` / ``stop-delay``
    s a boot (the SSH probe's wait) / a graceful shutdown takes (default 0).
``start-timeout`` / ``stop-timeout``
    s, as in the original's config (default 60): a ``start-delay`` longer than
    ``start-timeout`` fails start like an unreachable guest; a ``stop-delay`` longer than
    ``stop-timeout`` makes a graceful stop time out (or destroy with ``force_after_timeout``).
``time-scale``
    simulated migration time runs this many times faster than real time (default 1).
``fail``
    failure injection, map op -> count or ``always`` (ops: :data:`FAULT_OPS`).

``driver``, ``transport`` and ``nodes`` are accepted and ignored (see
:data:`~asyncmigfra.hypervisor.registry.GENERIC_LIBVIRT_KEYS`).
"""

from __future__ import annotations

import asyncio
import copy
import enum
import re
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Literal

from asyncmigfra.domxml import first_element, first_name_text
from asyncmigfra.errors import (
    Busy,
    ConfigError,
    ConnectionFailed,
    HypervisorError,
    IncompatibleDestination,
    InvalidTask,
    MigrationFailed,
    TaskCancelled,
    TaskError,
    TaskTimeout,
    VmNotFound,
    WrongState,
)
from asyncmigfra.hypervisor.base import (
    DomainInfo,
    DomainState,
    HostInfo,
    HostLoad,
    JobStats,
    MigrationJob,
    MigrationRequest,
    MigrationResult,
    OpContext,
)
from asyncmigfra.hypervisor.registry import (
    check_keys,
    opt_bool,
    opt_float,
    opt_int,
    opt_list,
    opt_map,
    opt_str,
)
from asyncmigfra.model import PciAddress, PciId, StartSpec, VcpuMap

__all__ = [
    "FAULT_OPS",
    "SHARED_KEY",
    "FakeCluster",
    "FakeDomain",
    "FakeHost",
    "FakeHypervisor",
    "FakeMigrationJob",
    "create",
]

#: Where the cluster lives in the per-process ``shared`` dict.
SHARED_KEY = "fake-cluster"

#: Operations that ``fail``/:meth:`FakeHypervisor.inject` can make fail. ``migrate`` fails
#: ``begin_migration`` itself; ``migrate-midway`` lets the job start and fails it half-way
#: through the first memory pass with ``MigrationFailed`` (the guest stays on the source).
FAULT_OPS: tuple[str, ...] = (
    "start",
    "stop",
    "suspend",
    "resume",
    "repin",
    "set-memory",
    "migrate",
    "migrate-midway",
    "detach-device",
    "attach-device",
    "list-domains",
    "host-info",
)

INJECTED = "injected failure"

_KIB = 1024
_MIB = 1024 * 1024
_DEFAULT_CPUS = 16
_DEFAULT_HOST_MEMORY = 64 * _MIB  # KiB
_DEFAULT_DOMAIN_MEMORY = _MIB  # KiB = 1 GiB

#: Guest passes per real second; the counter only needs to move visibly, not to be QEMU.
_COUNTER_RATE = 1000.0
#: Simulated s before memory moves (the destination QEMU starting; the rig measured 0.3-0.5 s).
_SETUP_TIME = 0.3
#: Shortest memory pass (simulated s). QEMU syncs the dirty bitmap at most about every
#: 100 ms, and without a floor a slowly dirtying guest would iterate ever shorter passes.
_MIN_PASS = 0.1
#: ms added to every pre-copy switchover (device state, CPU stop/start).
_SWITCHOVER_OVERHEAD_MS = 10.0
#: ms a post-copy switchover takes (the rig measured 5 ms).
_POSTCOPY_DOWNTIME_MS = 5.0
#: QEMU's default downtime limit, ms.
_DEFAULT_MAX_DOWNTIME_MS = 300.0
_THROTTLE_STEP = 0.2
_THROTTLE_MAX = 0.99

_ACTIVE_STATES = frozenset(
    {
        DomainState.RUNNING,
        DomainState.BLOCKED,
        DomainState.PAUSED,
        DomainState.SHUTDOWN,
        DomainState.PMSUSPENDED,
    }
)


def _wrong_state(state: DomainState) -> WrongState:
    return WrongState(f"Wrong domain state: {state.number}")


def _not_found(name: str) -> VmNotFound:
    return VmNotFound(f"Domain not found: no domain with matching name '{name}'")


# --------------------------------------------------------------------------------------------
# Cluster state


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
        #: The migration job that currently moves this domain, if any.
        self.job: FakeMigrationJob | None = None
        #: PCI passthrough devices (type, host address); QEMU cannot migrate with these.
        self.hostdevs: list[tuple[PciId, PciAddress]] = []
        #: ivshmem devices, as device XML; QEMU cannot migrate with these either.
        self.shmems: list[str] = []
        #: KiB the balloon was last set to (``set_memory``); ``None``: never set.
        self.balloon: int | None = None
        #: s the guest takes to release a hot-unplugged device (``inf``: never answers).
        self.unplug_delay = 0.0
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
        )

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
        self, name: str, *, cpus: int = _DEFAULT_CPUS, memory: int = _DEFAULT_HOST_MEMORY
    ) -> None:
        self.name = name
        self.cpus = cpus
        #: KiB
        self.memory = memory
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
        self, name: str, *, cpus: int = _DEFAULT_CPUS, memory: int = _DEFAULT_HOST_MEMORY
    ) -> FakeHost:
        """Create host ``name`` unless it exists; return it either way."""
        host = self.hosts.get(name)
        if host is None:
            host = self.hosts[name] = FakeHost(name, cpus=cpus, memory=memory)
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


# --------------------------------------------------------------------------------------------
# Domain XML (just enough of it: name, memory, vCPUs)

_MEMORY_UNITS: dict[str, int] = {
    "b": 1,
    "bytes": 1,
    "kb": 1000,
    "k": 1024,
    "kib": 1024,
    "mb": 1000**2,
    "m": 1024**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "g": 1024**3,
    "gib": 1024**3,
    "tb": 1000**4,
    "t": 1024**4,
    "tib": 1024**4,
}
_UNIT_RE = re.compile(r"""\bunit\s*=\s*["']([^"']*)["']""")
_CURRENT_RE = re.compile(r"""\bcurrent\s*=\s*["'](\d+)["']""")


@dataclass(frozen=True, slots=True)
class _XmlDomain:
    name: str
    #: KiB
    memory: int
    vcpus: int


def _parse_domain_xml(xml: str) -> _XmlDomain:
    """Read name, memory and vCPUs the way ``virDomainDefineXML`` would need them.

    A regex reader rather than an XML parser: the fake must not depend on untrusted XML
    parsing, and these three elements are all it simulates.
    """
    name = first_name_text(xml)
    if name is None:
        raise HypervisorError("Error defining domain: XML error: missing domain name information")
    memory_el = first_element(xml, "currentMemory") or first_element(xml, "memory")
    if memory_el is None:
        raise HypervisorError(
            "Error defining domain: XML error: Memory size must be specified via <memory>"
        )
    attrs, text = memory_el
    unit_match = _UNIT_RE.search(attrs)
    unit = unit_match.group(1).lower() if unit_match else "kib"
    if unit not in _MEMORY_UNITS or not text.isdigit():
        raise HypervisorError(
            f"Error defining domain: invalid argument: cannot parse memory {text!r} {unit!r}"
        )
    memory = int(text) * _MEMORY_UNITS[unit] // _KIB
    vcpus = 1
    vcpu_el = first_element(xml, "vcpu")
    if vcpu_el is not None:
        current = _CURRENT_RE.search(vcpu_el[0])
        count = current.group(1) if current else vcpu_el[1]
        if not count.isdigit() or int(count) < 1:
            raise HypervisorError(f"Error defining domain: XML error: invalid vcpu count {count!r}")
        vcpus = int(count)
    return _XmlDomain(name=name, memory=memory, vcpus=vcpus)


# --------------------------------------------------------------------------------------------
# Migration


class _Phase(enum.Enum):
    SETUP = "setup"
    PRECOPY = "migrating"
    SWITCHOVER = "switchover"
    POSTCOPY = "post-copy"
    DONE = "done"


class FakeMigrationJob:
    """A simulated QEMU migration, computed lazily from the (scaled) loop clock.

    Model, all times in simulated seconds since the job began:

    * setup (:data:`_SETUP_TIME`): nothing moves, ``stats()`` is ``None``;
    * pass 1 copies all guest memory at ``min(request.bandwidth, link bandwidth)``; each later
      pass copies what the guest dirtied during the previous one (``dirty_rate x duration``,
      at most all memory). ``auto_converge`` throttles the dirty rate from pass 3 on;
    * at the end of each pass the expected downtime (remaining / bandwidth) is compared with
      the max downtime; when it fits, the guest pauses and the rest is copied at the full link
      speed (switchover; QEMU ignores the bandwidth cap there), then the domain moves;
    * ``start_post_copy`` moves the guest at once and pulls what remains at the bandwidth;
    * ``warm`` pauses the guest when setup ends, so a single pass suffices and the downtime
      is the whole copy.

    ``compressed``, ``parallel_connections``, ``rdma``, ``tls``, ``p2p``, ``driver`` and
    ``transport`` are accepted and not simulated. All reported times (``elapsed``, downtime)
    are simulated, so they read like a real host's whatever the ``time-scale``.

    The only scheduled thing is one ``loop.call_at`` timer for the next event; every public
    method first brings the job up to "now", so late timers never show stale state.
    """

    def __init__(
        self,
        *,
        owner: FakeHypervisor,
        domain: FakeDomain,
        source: FakeHost,
        destination: FakeHost,
        request: MigrationRequest,
        fail_midway: bool,
    ) -> None:
        self.request = request
        self.domain = domain
        self.source = source
        self.destination = destination
        self._owner = owner
        self._cluster = owner.cluster
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self._scale = owner.time_scale
        link = owner.bandwidth * _MIB
        self._link_bw = link
        requested = request.bandwidth
        self._bw = min(link, requested * _MIB) if requested else link
        # Pages the balloon took from the guest are not sent (QEMU skips them).
        self._mem = (domain.memory if domain.balloon is None else domain.balloon) * _KIB
        self._max_downtime = (
            float(request.initial_downtime)
            if request.initial_downtime is not None
            else _DEFAULT_MAX_DOWNTIME_MS
        )
        self._fail_midway = fail_midway

        self._phase = _Phase.SETUP
        #: Number of the pass in progress (0 during setup).
        self.iteration = 0
        #: Passes finished before switchover / post-copy.
        self._completed = 0
        self._iter_start = 0.0
        self._iter_amount = 0.0
        self._dirty_acc = 0.0
        self._dirty_mark = 0.0
        self._processed_base = 0.0
        self._expected: float | None = None
        self._throttle = 0.0
        self._switch_start = 0.0
        self._switch_amount = 0.0
        self._switch_duration = 0.0
        self._post_start = 0.0
        self._post_amount = 0.0
        self._paused_by_job = False
        self._pause_time: float | None = None

        self._handle: asyncio.TimerHandle | None = None
        self._handle_at = 0.0
        self._iter_event = asyncio.Event()
        self._finished = asyncio.Event()
        self._outcome: MigrationResult | TaskError | None = None
        self._final_stats: JobStats | None = None

    def __repr__(self) -> str:
        return (
            f"FakeMigrationJob({self.domain.name!r} {self.source.name}->"
            f"{self.destination.name}, {self._phase.value}, iteration={self.iteration})"
        )

    # ---- lifecycle (called by FakeHypervisor) -------------------------------------------

    def _begin(self) -> None:
        self.domain.job = self
        self.destination.incoming[self.domain.name] = self.domain.memory
        self._cluster.jobs.add(self)
        self._reschedule()

    def _finish_now(self, outcome: MigrationResult) -> None:
        """End a job that moved no memory (offline)."""
        self._end(0.0, outcome, None)

    # ---- the simulation -----------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._phase is _Phase.DONE

    @property
    def throttle(self) -> float:
        """The auto-converge CPU throttle (0-0.99) of the current pass."""
        return self._throttle

    @property
    def max_downtime(self) -> float:
        """The downtime limit (ms) the next convergence check uses."""
        return self._max_downtime

    def _now(self) -> float:
        return (self._loop.time() - self._t0) * self._scale

    def _rate(self) -> float:
        """Effective dirty rate (bytes/s) right now."""
        if self._phase is not _Phase.PRECOPY or self.domain.state is not DomainState.RUNNING:
            return 0.0
        return self.domain.dirty_rate * (1.0 - self._throttle)

    def _pass_end(self) -> float:
        return self._iter_start + max(_MIN_PASS, self._iter_amount / self._bw)

    def _midway_at(self) -> float:
        return self._iter_start + self._iter_amount / self._bw / 2

    def _next_event(self) -> float | None:
        phase = self._phase
        if phase is _Phase.SETUP:
            return _SETUP_TIME
        if phase is _Phase.PRECOPY:
            if self._fail_midway and self.iteration == 1:
                return self._midway_at()
            return self._pass_end()
        if phase is _Phase.SWITCHOVER:
            return self._switch_start + self._switch_duration
        if phase is _Phase.POSTCOPY:
            return self._post_start + self._post_amount / self._bw
        return None

    def _advance(self, now: float) -> None:
        """Process every event up to ``now``, each at its own time."""
        while True:
            at = self._next_event()
            if at is None or at > now:
                return
            self._fire(at)

    def _fire(self, at: float) -> None:
        phase = self._phase
        if phase is _Phase.SETUP:
            if self.request.mode == "warm":
                self._pause_guest(at)
            self._start_pass(at, self._mem)
        elif phase is _Phase.PRECOPY:
            if self._fail_midway and self.iteration == 1:
                self._fail(at, MigrationFailed(INJECTED))
                return
            self._end_pass(at)
        elif phase is _Phase.SWITCHOVER:
            self._complete(at, post_copy=False)
        elif phase is _Phase.POSTCOPY:
            self._complete(at, post_copy=True)

    def _start_pass(self, at: float, amount: float) -> None:
        self._phase = _Phase.PRECOPY
        self.iteration += 1
        self._iter_start = at
        self._iter_amount = amount
        self._dirty_acc = 0.0
        self._dirty_mark = at
        if self.request.auto_converge and self.iteration >= 3:
            self._throttle = min(_THROTTLE_MAX, _THROTTLE_STEP * (self.iteration - 2))
        self._wake_iteration_waiters()

    def _accumulate(self, now: float) -> None:
        """Account the memory dirtied since the last mark at the current rate."""
        if self._phase is _Phase.PRECOPY and now > self._dirty_mark:
            self._dirty_acc = min(
                float(self._mem), self._dirty_acc + self._rate() * (now - self._dirty_mark)
            )
            self._dirty_mark = now

    def _end_pass(self, at: float) -> None:
        self._accumulate(at)
        remaining = self._dirty_acc
        self._processed_base += self._iter_amount
        self._completed = self.iteration
        self._expected = remaining / self._bw * 1000.0
        if self._expected <= self._max_downtime:
            self._start_switchover(at, remaining)
        else:
            self._start_pass(at, remaining)

    def _start_switchover(self, at: float, amount: float) -> None:
        self._phase = _Phase.SWITCHOVER
        self._switch_start = at
        self._switch_amount = amount
        self._switch_duration = amount / self._link_bw + _SWITCHOVER_OVERHEAD_MS / 1000.0
        self._pause_guest(at)
        if self._pause_time is None:  # the user had paused it: downtime is the switchover
            self._pause_time = at

    def _pause_guest(self, at: float) -> None:
        if self.domain.state is DomainState.RUNNING:
            self.domain._apply_state(DomainState.PAUSED)
            self._paused_by_job = True
            if self._pause_time is None:
                self._pause_time = at

    def _remaining_at(self, now: float) -> tuple[float, float]:
        """(bytes sent in the current pass, bytes remaining) during pre-copy."""
        sent = min(self._iter_amount, self._bw * (now - self._iter_start))
        dirtied = self._dirty_acc + self._rate() * max(0.0, now - self._dirty_mark)
        return sent, min(float(self._mem), self._iter_amount - sent + dirtied)

    def _snapshot(self, now: float) -> JobStats | None:
        phase = self._phase
        if phase is _Phase.PRECOPY:
            sent, remaining = self._remaining_at(now)
            return self._stats(
                "migrating",
                now,
                processed=self._processed_base + sent,
                remaining=remaining,
                dirty_rate=self._rate(),
                transfer_rate=self._bw,
            )
        if phase is _Phase.SWITCHOVER:
            sent = min(self._switch_amount, self._link_bw * (now - self._switch_start))
            return self._stats(
                "switchover",
                now,
                processed=self._processed_base + sent,
                remaining=self._switch_amount - sent,
                dirty_rate=0.0,
                transfer_rate=self._link_bw,
            )
        if phase is _Phase.POSTCOPY:
            sent = min(self._post_amount, self._bw * (now - self._post_start))
            return self._stats(
                "post-copy",
                now,
                processed=self._processed_base + sent,
                remaining=self._post_amount - sent,
                dirty_rate=0.0,
                transfer_rate=self._bw,
            )
        return None

    def _stats(
        self,
        phase: str,
        now: float,
        *,
        processed: float,
        remaining: float,
        dirty_rate: float,
        transfer_rate: float,
    ) -> JobStats:
        left = max(0, round(remaining))
        expected = self._expected
        if phase == "switchover":
            expected = self._switch_duration * 1000.0
        elif phase == "post-copy":
            expected = _POSTCOPY_DOWNTIME_MS
        return JobStats(
            phase=phase,
            iteration=self.iteration,
            elapsed=round(now, 6),
            memory_total=self._mem,
            memory_processed=int(processed),
            memory_remaining=left,
            data_remaining=left,
            dirty_rate=int(dirty_rate),
            transfer_rate=int(transfer_rate),
            expected_downtime=None if expected is None else round(expected, 3),
        )

    def _complete(self, at: float, *, post_copy: bool) -> None:
        dom, src, dst = self.domain, self.source, self.destination
        name = dom.name
        if src.domains.get(name) is not dom:
            self._fail(at, MigrationFailed("Migration failed: domain vanished from the source"))
            return
        if post_copy:
            transferred = self._processed_base + self._post_amount
            downtime = _POSTCOPY_DOWNTIME_MS
        else:
            transferred = self._processed_base + self._switch_amount
            downtime = (at - (self._pause_time or at)) * 1000.0
        final = self._snapshot(at)
        user_paused = dom.state is DomainState.PAUSED and not self._paused_by_job
        paused = self.request.paused or user_paused
        # Move: like PERSIST_DEST|UNDEFINE_SOURCE with persist, else like plain migrate3.
        del src.domains[name]
        if not self.request.persist and dom.persistent:
            src.domains[name] = dom.copy_definition()
        existing = dst.domains.get(name)
        dom.persistent = self.request.persist or (existing is not None and existing.persistent)
        dst.domains[name] = dom
        dom.job = None
        dom._apply_state(DomainState.PAUSED if paused else DomainState.RUNNING)
        result = MigrationResult(
            downtime=round(downtime, 3),
            iterations=self._completed,
            post_copy=post_copy,
            transferred=int(transferred),
        )
        self._end(at, result, final)

    def _fail(self, at: float, error: TaskError) -> None:
        """End unsuccessfully: the guest stays on the source, running again if we paused it."""
        final = self._snapshot(at)
        if (
            self._paused_by_job
            and self.domain.job is self
            and self.domain.state is DomainState.PAUSED
        ):
            self.domain._apply_state(DomainState.RUNNING)
        self._end(at, error, final)

    def _end(self, at: float, outcome: MigrationResult | TaskError, final: JobStats | None) -> None:
        self._final_stats = final
        self._phase = _Phase.DONE
        self._outcome = outcome
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.domain.job is self:
            self.domain.job = None
        self.destination.incoming.pop(self.domain.name, None)
        self._cluster.jobs.discard(self)
        self._finished.set()
        self._wake_iteration_waiters()

    def _wake_iteration_waiters(self) -> None:
        event, self._iter_event = self._iter_event, asyncio.Event()
        event.set()

    # ---- timer --------------------------------------------------------------------------

    def _reschedule(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        at = self._next_event()
        if at is None:
            return
        self._handle_at = at
        self._handle = self._loop.call_at(self._t0 + at / self._scale, self._on_timer)

    def _on_timer(self) -> None:
        self._handle = None
        if self._phase is _Phase.DONE:
            return
        # The loop may run a timer a hair early; the event it was set for is due regardless.
        self._advance(max(self._now(), self._handle_at))
        self._reschedule()

    def _sync(self) -> None:
        if self._phase is _Phase.DONE:
            return
        self._advance(self._now())
        self._reschedule()

    def _guest_changing(self) -> None:
        """The guest's state or dirty rate is about to change: account for the time so far."""
        if self._phase is _Phase.DONE:
            return
        now = self._now()
        self._advance(now)
        self._accumulate(now)
        self._reschedule()

    def _shutdown(self) -> None:
        """The owning agent closes: finish a post-copy (the guest already runs on the
        destination), abort anything else (the guest stays on the source)."""
        self._sync()
        if self._phase is _Phase.POSTCOPY:
            self._complete(self._post_start + self._post_amount / self._bw, post_copy=True)
        elif self._phase is not _Phase.DONE:
            self._fail(self._now(), TaskCancelled("migration job aborted: hypervisor closed"))

    # ---- MigrationJob -------------------------------------------------------------------

    async def stats(self) -> JobStats | None:
        self._sync()
        if self._phase is _Phase.DONE:
            return self._final_stats
        return self._snapshot(self._now())

    async def wait_iteration(self, after: int) -> int:
        """Return once pass ``after + 1`` has begun, or at once with the final pass number
        when the job has ended (which may not exceed ``after``)."""
        while True:
            self._sync()
            if self.iteration > after or self._phase is _Phase.DONE:
                return self.iteration
            await self._iter_event.wait()

    async def wait(self) -> MigrationResult:
        self._sync()
        await self._finished.wait()
        outcome = self._outcome
        if isinstance(outcome, MigrationResult):
            return outcome
        assert outcome is not None
        # A fresh exception per call: re-raising one instance grows its traceback.
        raise type(outcome)(str(outcome))

    async def set_max_downtime(self, ms: int) -> None:
        """Takes effect at the end of the current pass, when QEMU next compares."""
        if ms < 0:
            raise HypervisorError(f"invalid argument: max downtime must be >= 0, got {ms}")
        self._sync()
        self._max_downtime = float(ms)

    async def start_post_copy(self) -> None:
        if self.request.mode != "post-copy":
            raise HypervisorError(
                "Requested operation is not valid: switching to post-copy requires the "
                "migration to be started in post-copy mode"
            )
        self._sync()
        if self._phase not in (_Phase.SETUP, _Phase.PRECOPY):
            return  # already post-copy, switching over, or over: nothing left to switch
        now = self._now()
        if self._phase is _Phase.PRECOPY:
            sent, remaining = self._remaining_at(now)
            self._processed_base += sent
        else:
            remaining = float(self._mem)
        self._phase = _Phase.POSTCOPY
        self._post_start = now
        self._post_amount = remaining
        self._reschedule()

    async def suspend_source(self) -> None:
        self._sync()
        if self._phase is _Phase.DONE:
            return
        now = self._now()
        self._accumulate(now)
        self._pause_guest(now)

    async def abort(self) -> None:
        """Cancel the job; the guest keeps running on the source.

        Like QEMU, a job already in post-copy cannot be aborted: the guest runs on the
        destination and the source no longer has its memory.
        """
        self._sync()
        if self._phase is _Phase.DONE:
            return
        if self._phase is _Phase.POSTCOPY:
            raise HypervisorError(
                "Requested operation is not valid: cannot abort migration in post-copy mode"
            )
        self._fail(self._now(), TaskCancelled("migration job aborted"))


# --------------------------------------------------------------------------------------------
# The back-end


class FakeHypervisor:
    """This agent's view of the fake cluster: operations act on ``host``.

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
        if dom.job is not None:
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
        for allowed in vcpu_map:
            if not allowed:
                raise HypervisorError(
                    "Error pinning vcpu: invalid argument: Empty cpu list for pinning"
                )
            for cpu in allowed:
                if not 0 <= cpu < cpus:
                    raise HypervisorError(
                        f"Error pinning vcpu: invalid argument: CPU {cpu} does not exist "
                        f"on {self.host.name} ({cpus} CPUs)"
                    )
        everything = tuple(range(cpus))
        current = dom.vcpu_pinning or ()
        dom.vcpu_pinning = tuple(
            tuple(sorted(set(vcpu_map[i])))
            if i < len(vcpu_map)
            else (current[i] if i < len(current) else everything)
            for i in range(dom.vcpus)
        )

    async def check_migration(self, request: MigrationRequest, *, memory: bool = True) -> None:
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
            return self._offline(dom, dest, request)
        free = dest.free_memory()
        if dom.memory > free:
            raise IncompatibleDestination(
                f"not enough free memory on {dest.name}: {dom.memory} KiB needed, {free} KiB free"
            )
        job = FakeMigrationJob(
            owner=self,
            domain=dom,
            source=self.host,
            destination=dest,
            request=request,
            fail_midway=self._take_fault("migrate-midway"),
        )
        job._begin()
        return job

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


# --------------------------------------------------------------------------------------------
# Factory

_ALLOWED = frozenset(
    {
        "host",
        "cpus",
        "memory",
        "domains",
        "peers",
        "bandwidth",
        "latency",
        "start-delay",
        "stop-delay",
        "start-timeout",
        "stop-timeout",
        "time-scale",
        "fail",
    }
)
_IGNORED = frozenset({"driver", "transport", "nodes"})
_DOMAIN_KEYS = frozenset(
    {"name", "vcpus", "memory", "state", "persistent", "dirty-rate", "stop-delay"}
)
_PEER_KEYS = frozenset({"cpus", "memory", "domains"})
_CONFIG_STATES = {
    "running": DomainState.RUNNING,
    "paused": DomainState.PAUSED,
    "shutoff": DomainState.SHUTOFF,
}


@dataclass(frozen=True, slots=True)
class _HostConfig:
    name: str
    cpus: int | None
    memory: int | None
    domains: tuple[FakeDomain, ...]


def _parse_domains(value: object, path: str, host_memory: int | None) -> tuple[FakeDomain, ...]:
    result: list[FakeDomain] = []
    seen: set[str] = set()
    for i, item in enumerate(opt_list(value, path)):
        item_path = f"{path}[{i}]"
        entry = opt_map(item, item_path)
        check_keys(entry, _DOMAIN_KEYS, path=item_path)
        if "name" not in entry:
            raise ConfigError("required key is missing", path=f"{item_path}.name")
        name = opt_str(entry["name"], f"{item_path}.name")
        if name in seen:
            raise ConfigError(f"domain {name!r} is listed twice", path=f"{item_path}.name")
        seen.add(name)
        state_word = str(entry.get("state", "running")).lower()
        if state_word not in _CONFIG_STATES:
            raise ConfigError(
                f"expected running, paused or shutoff, got {entry['state']!r}",
                path=f"{item_path}.state",
            )
        persistent = opt_bool(entry.get("persistent", True), f"{item_path}.persistent")
        state = _CONFIG_STATES[state_word]
        if state is DomainState.SHUTOFF and not persistent:
            raise ConfigError(
                "a transient domain cannot be shut off (it would not exist)",
                path=f"{item_path}.persistent",
            )
        stop_delay = entry.get("stop-delay")
        result.append(
            FakeDomain(
                name,
                vcpus=opt_int(entry.get("vcpus", 1), f"{item_path}.vcpus", minimum=1),
                memory=opt_int(
                    entry.get("memory", _DEFAULT_DOMAIN_MEMORY), f"{item_path}.memory", minimum=1
                ),
                state=state,
                persistent=persistent,
                dirty_rate=round(
                    opt_float(entry.get("dirty-rate", 0), f"{item_path}.dirty-rate") * _MIB
                ),
                stop_delay=None
                if stop_delay is None
                else opt_float(stop_delay, f"{item_path}.stop-delay"),
            )
        )
    if host_memory is not None:
        used = sum(d.memory for d in result if d.active)
        if used > host_memory:
            raise ConfigError(
                f"active domains need {used} KiB but the host has {host_memory} KiB", path=path
            )
    return tuple(result)


def _parse_host(name: str, options: Mapping[str, object], path: str) -> _HostConfig:
    cpus = opt_int(options["cpus"], f"{path}.cpus", minimum=1) if "cpus" in options else None
    memory = (
        opt_int(options["memory"], f"{path}.memory", minimum=1) if "memory" in options else None
    )
    domains: tuple[FakeDomain, ...] = ()
    if "domains" in options:
        domains = _parse_domains(
            options["domains"], f"{path}.domains", memory or _DEFAULT_HOST_MEMORY
        )
    return _HostConfig(name=name, cpus=cpus, memory=memory, domains=domains)


def _parse_faults(value: object) -> dict[str, int | None]:
    faults: dict[str, int | None] = {}
    for op, count in opt_map(value, "hypervisor.fail").items():
        path = f"hypervisor.fail.{op}"
        if op not in FAULT_OPS:
            raise ConfigError(f"unknown operation (known: {', '.join(FAULT_OPS)})", path=path)
        if isinstance(count, str) and count.strip().lower() == "always":
            faults[op] = None
        else:
            faults[op] = opt_int(count, path)
    return faults


def create(
    options: Mapping[str, object], *, hostname: str, shared: MutableMapping[str, object]
) -> FakeHypervisor:
    """The ``fake`` entry point: validate every option, then build or join the cluster.

    All options are checked before the shared cluster is touched, so a bad config leaves
    no half-created hosts behind for the other agents of the process.
    """
    check_keys(options, _ALLOWED, ignored=_IGNORED)
    host_name = opt_str(options.get("host", hostname), "hypervisor.host")
    own = _parse_host(host_name, options, "hypervisor")
    peers: list[_HostConfig] = []
    if "peers" in options:
        for peer, peer_options in opt_map(options["peers"], "hypervisor.peers").items():
            path = f"hypervisor.peers.{peer}"
            if peer == host_name:
                raise ConfigError("is this agent's own host", path=path)
            peer_map = opt_map({} if peer_options is None else peer_options, path)
            check_keys(peer_map, _PEER_KEYS, path=path)
            peers.append(_parse_host(peer, peer_map, path))

    def number(key: str, default: float, *, positive: bool = False) -> float:
        if key not in options:
            return default
        return opt_float(options[key], f"hypervisor.{key}", exclusive=positive)

    hv_kwargs = {
        "bandwidth": number("bandwidth", 1000.0, positive=True),
        "latency": number("latency", 0.0),
        "start_delay": number("start-delay", 0.0),
        "stop_delay": number("stop-delay", 0.0),
        "start_timeout": number("start-timeout", 60.0, positive=True),
        "stop_timeout": number("stop-timeout", 60.0, positive=True),
        "time_scale": number("time-scale", 1.0, positive=True),
    }
    faults = _parse_faults(options["fail"]) if "fail" in options else {}

    cluster = FakeCluster.of(shared)
    host = cluster.add_host(
        host_name, cpus=own.cpus or _DEFAULT_CPUS, memory=own.memory or _DEFAULT_HOST_MEMORY
    )
    if own.cpus is not None:
        host.cpus = own.cpus
    if own.memory is not None:
        host.memory = own.memory
    for dom in own.domains:
        host.domains.setdefault(dom.name, dom)
    for peer_config in peers:
        if peer_config.name not in cluster.hosts:
            peer_host = cluster.add_host(
                peer_config.name,
                cpus=peer_config.cpus or _DEFAULT_CPUS,
                memory=peer_config.memory or _DEFAULT_HOST_MEMORY,
            )
            for dom in peer_config.domains:
                peer_host.domains[dom.name] = dom
    return FakeHypervisor(cluster=cluster, host=host, faults=faults, **hv_kwargs)
