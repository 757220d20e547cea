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
  migration, with or without a storage copy (``copy-storage``: the disks first, as libvirt's
  NBD phase). Its progress is *computed* from the loop clock (scaled by ``time-scale``) rather
  than stepped by a task: the only thing scheduled is one ``loop.call_at`` timer for the next
  event (end of setup, of the disk copy, of a memory pass, of switchover), which wakes
  ``wait_iteration``/``wait``. Thousands of concurrent jobs therefore cost one timer each.

Options (``hypervisor:`` map, all optional):

``host``
    this agent's host in the cluster (default: the agent's hostname).
``cpus`` / ``memory``
    of this host (default 16 CPUs, 64 GiB; memory in KiB).
``domains``
    list of ``{name, vcpus, memory (KiB), state: running|shutoff|paused, persistent,
    dirty-rate (MiB/s), stop-delay (s), disks (target -> MiB; default {vda: 1024})}``
    defined on this host if absent. ``disks`` are what a migration with ``copy-storage``
    copies, before memory; domains started by a task get the default.
``peers``
    map host name -> ``{cpus, memory, domains, nic-rate}``: other hosts created if absent.
``bandwidth``
    MiB/s of the simulated migration link (default 1000): what one migration this agent
    starts moves at most (less with the request's ``bandwidth`` cap).
``nic-rate``
    MiB/s of this host's NIC (default: none, unlimited), full duplex: all migrations out of
    the host share it, and so do all migrations into it. A migration then moves at the
    smallest of its bandwidth and its max-min fair shares of its source's and its
    destination's NIC, recomputed whenever a migration starts or stops moving data
    (:mod:`.links`). Between two hosts without ``nic-rate`` nothing is shared: every
    migration gets its bandwidth, as without this option.
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

Modules (a package only for size; import from here, as before):

* :mod:`.faults`: the operations failure injection knows, and its message;
* :mod:`.cluster`: :class:`FakeDomain`, :class:`FakeHost`, :class:`FakeCluster`;
* :mod:`.domainxml`: the domain XML reader (name, memory, vCPUs);
* :mod:`.migration`: :class:`FakeMigrationJob` and its progress model;
* :mod:`.sampling`: what a sample of a job shows (its ``JobStats``);
* :mod:`.transfer`: the bytes a job's current phase moves, at a rate that may change;
* :mod:`.postcopy`: a broken post-copy (``postcopy-break``) and its recovery;
* :mod:`.links`: the hosts' NICs shared by the migrations using them;
* :mod:`.backend`: :class:`FakeHypervisor`;
* :mod:`.probes`: its guests' dirty rates and its links' rates, for predictions and
  predicted evacuations;
* :mod:`.options`: the ``hypervisor:`` options and :func:`create`.
"""

from asyncmigfra.hypervisor.fake.backend import FakeHypervisor
from asyncmigfra.hypervisor.fake.cluster import SHARED_KEY, FakeCluster, FakeDomain, FakeHost
from asyncmigfra.hypervisor.fake.faults import FAULT_OPS
from asyncmigfra.hypervisor.fake.migration import FakeMigrationJob
from asyncmigfra.hypervisor.fake.options import create

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
