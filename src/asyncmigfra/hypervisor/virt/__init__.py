"""The ``libvirt`` back-end: the original's ``Libvirt_hypervisor``, rebuilt on asyncio.

This is the only package that imports libvirt-python. Everything libvirt returns is untyped
(``Any``); it is converted to the project's value types before it leaves this package.

Modules: :mod:`.errors` (error table), :mod:`.options`, :mod:`.events` (event thread and hub),
:mod:`.connections` (connection pool), :mod:`.domains` (device/XML helpers, guest and
destination facts), :mod:`.migrationparams` (a request's flags and typed parameters, job
statistics), :mod:`.migration` (:class:`LibvirtMigrationJob`), :mod:`.guestlook` (a
migration's reads of its guest in one round trip), :mod:`.prechecks` (the checks before a
migration and before its job), :mod:`.backend` (:class:`LibvirtHypervisor`, ``create``).

Design
======

**Connections.** One long-lived ``virConnect`` per URI (:class:`_Connection`), opened on first
use and kept: the local host (``uri``), every destination of a direct migration, every
``nodes`` entry. Each connection gets libvirt keepalive (``keepalive-interval`` /
``keepalive-count``; local drivers without keepalive are fine), a close callback, and the
domain event callbacks below. Before every operation the connection is checked with
``isAlive()`` (a local check, no round trip); a dead one (libvirtd restarted, keepalive
timed out, closed underneath) is dropped and reopened, so the next operation after a daemon
restart succeeds. An operation that fails *because* its connection died meanwhile is run
once more on a fresh connection; the migrate call itself never is. The migrate call is the
one exception to connection sharing: it runs on a private connection for its duration,
because with keepalive on, libvirt 9.0's client delayed other threads' calls on a connection
whose RPC another thread held in a long call by up to a keepalive interval (measured: 0.8-5 s
per ``jobStats()``, 1-9 ms once the migrate call had its own connection).

**Executor.** Every libvirt call is blocking C code and runs in this back-end's own
``ThreadPoolExecutor`` (``max-threads``, default 16) through
:func:`~asyncmigfra.hypervisor._threads.run_blocking`, never on the event loop and never on
the default executor. An operation is a small function ``fn(conn)`` run in one thread
(:meth:`LibvirtHypervisor._call`); it looks the domain up by name each time, so no
``virDomain`` handle outlives a reconnect. A migration reads its guest once for its
pre-checks and its devices (:mod:`.guestlook`: one lookup and the calls after it in one
round trip, the first change to the guest ending it), instead of a lookup and a round trip
per step: on a loaded host each cost 0.1-0.3 ms (issue 20). Its job's start reads the
guest's state and any running job afresh (others may have changed them since).

**Event thread.** libvirt's default event loop (``virEventRegisterDefaultImpl()``, once per
process, before the first open) runs ``virEventRunDefaultImpl()`` in one daemon thread,
``libvirt-events`` (:class:`_EventThread`). Why not libvirtaio: its handle and timer updates
call asyncio from whatever thread libvirt runs in, without ``call_soon_threadsafe``; with a
worker thread inside a long libvirt call, events reached the loop 1.3 s late (rig README).
The callbacks only build a :class:`DomainEvent` and hand it to the loop with
``loop.call_soon_threadsafe`` (:class:`_EventHub`). The thread is reference counted: the
first :meth:`LibvirtHypervisor.open` starts it, the last :meth:`LibvirtHypervisor.aclose`
stops it (a zero-delay timer wakes the loop so it sees the stop flag) and joins it. It is a
daemon thread so a process that never calls ``aclose`` still exits.

Waits for a state (SHUTOFF after a shutdown) are event driven: subscribe, act, then re-read
the state whenever an event for the domain (or a reconnect of its connection) arrives, up to
a bounded timeout, with one final state check at the deadline so a lost event cannot turn a
stopped domain into a timeout.

**Errors.** libvirt errors are mapped once, by ``get_error_code()``, through the table
:data:`ERROR_TABLE` in :func:`map_libvirt_errors`/:func:`translate_error`: libvirt's own
message is kept, prefixed with the original's context text where the original had one
(``Error suspending domain: ...``). ``VIR_ERR_SYSTEM_ERROR`` is a connection failure only when
it comes from the RPC/remote/SSH layers; the same code from a driver (a file it cannot open)
is a ``HypervisorError``. ``Domain not found`` stays bare, as the original's lookups did.

**Migration.** :meth:`LibvirtHypervisor.begin_migration` checks the domain (state; ``Busy``
when a job not started by this call already runs), resolves the destination (the ``hosts:``
map, else the ``destination-uri`` template), and starts the migrate call (``migrateToURI3``
with ``PEER2PEER``, or ``migrate3`` to a destination connection) in a worker thread owned by
a :class:`LibvirtMigrationJob`. It returns once ``jobStats()`` shows the job (then the
initial max downtime is set with ``migrateSetMaxDowntime``: the binding has no migrate
parameter for it) or the call has ended; a call that failed before any job was seen raises
from ``begin_migration`` itself, and a ``begin_migration`` cancelled meanwhile aborts the job
it started. The job's progress comes from ``jobStats()`` and from ``MIGRATION_ITERATION``
events; ``JOB_COMPLETED`` (or ``jobStats(COMPLETED)`` on the destination) gives the
downtime. ``wait()`` maps the end: aborted -> ``TaskCancelled``; any other failure ->
``MigrationFailed`` (retryable) when the domain still runs on the source, else the table's
class with the domain's whereabouts in the text. A peer-to-peer job outlives the agent that
started it: :meth:`LibvirtHypervisor.find_running_migrations` lists such jobs and
:meth:`LibvirtHypervisor.adopt_migration` returns a handle that follows one to its end.
``aclose()`` aborts jobs that are still running (the engine normally ended them already).

Options (``hypervisor:`` map; all optional)
===========================================

``uri``
    local connection (default ``<driver>:///system``; ``lxctools:///`` for lxctools). Tests
    pass ``test:///abs/path/host.xml``; the rig passes ``qemu+unix:///system?socket=...``.
``driver`` / ``transport``
    defaults for tasks that name none (``qemu`` / ``ssh``), as in the original.
``destination-uri``
    template of a destination's URI with ``{driver}``, ``{transport}``, ``{host}`` (default
    ``{driver}+{transport}://{host}/system``; ``.../`` without ``system`` for lxctools).
``hosts``
    per-host addresses: ``{name: {uri, p2p-uri, migrate-uri}}``. ``uri``: how this agent
    reaches the host (direct migration, ``nodes`` check); ``p2p-uri``: how this host's
    libvirtd reaches it (default: ``uri``, else the template); ``migrate-uri``: where the
    migration data goes (``VIR_MIGRATE_PARAM_URI``; ``rdma-migration`` overrides it with
    ``rdma://<host>-ib``).
``nodes``
    hosts checked before a start: a domain of the same name that is not shut off there fails
    the start with ``Domain already running on <node>``. "Not there" is recognised by error
    code (``VIR_ERR_NO_DOMAIN``), not by the original's fragile string compare.
``start-timeout`` / ``stop-timeout``
    s for the SSH boot probe / the graceful shutdown (default 60 each).
``keepalive-interval`` / ``keepalive-count``
    libvirt keepalive (default 5 s / 3; interval 0 disables it).
``max-threads``
    size of the libvirt thread pool (default 16, at least 2: a migration holds one thread
    for its whole duration).

Behaviour notes (differences from the original are deliberate)
===============================================================

* **start** rolls back a step that fails after the domain was defined or started: what this
  task started is destroyed, what it defined is undefined, a definition it changed is
  restored; the error text ends with ``(rolled back: ...)``. The SSH probe is the exception:
  a guest that does not answer in ``start-timeout`` keeps running (as in the original and
  the ``fake`` back-end) and the result is ``Timeout while trying to reach domain with SSH.``
* ``vcpu-map`` at start is pinned in the persistent config before the start (drivers that
  cannot pin an inactive config, such as the test driver, get it live right after the
  start); a transient domain is created paused, pinned live, then resumed.
* ``memory``/``vcpus`` with ``transient`` fail before anything is created (a transient
  domain has no persistent config to change).
* **stop** of a paused domain resumes it, then shuts it down gracefully (a paused guest cannot
  handle the ACPI request; if it ignores the request it is paused again before the timeout
  error); ``force`` destroys it directly. A transient domain that vanished while stopping
  counts as stopped. ``undefine`` also removes managed-save images, snapshot
  and checkpoint metadata and NVRAM, falling back to fewer flags when the driver does not
  know them.
* **pci-ids** attach the first *free* device of that vendor:device (devices already given
  to an active domain are skipped; choosing and attaching is serialised per agent, and the
  candidates are shuffled as the original did). The original's inverted success check is
  not copied. ``devs`` use the PCI domain given in the address (the original always used 0).
* A task's ``driver`` other than the configured one opens that driver's local URI.
* ``host_info`` takes the host name from the agent's configuration, not from libvirt (the
  test driver reports the real machine's name for every fake host).
"""

from asyncmigfra.hypervisor.virt.backend import LibvirtHypervisor, create
from asyncmigfra.hypervisor.virt.domains import PluggedDevice, migration_devices
from asyncmigfra.hypervisor.virt.errors import (
    ERROR_TABLE,
    error_class,
    map_libvirt_errors,
    translate_error,
)
from asyncmigfra.hypervisor.virt.events import DomainEvent
from asyncmigfra.hypervisor.virt.migration import LibvirtMigrationJob
from asyncmigfra.hypervisor.virt.migrationparams import (
    MigrationTarget,
    check_stream_support,
    job_stats,
    migration_flags,
    migration_params,
)
from asyncmigfra.hypervisor.virt.options import (
    HostAddress,
    LibvirtConfig,
    default_local_uri,
    parse_options,
)

__all__ = [
    "ERROR_TABLE",
    "DomainEvent",
    "HostAddress",
    "LibvirtConfig",
    "LibvirtHypervisor",
    "LibvirtMigrationJob",
    "MigrationTarget",
    "PluggedDevice",
    "check_stream_support",
    "create",
    "default_local_uri",
    "error_class",
    "job_stats",
    "map_libvirt_errors",
    "migration_flags",
    "migration_devices",
    "migration_params",
    "parse_options",
    "translate_error",
]
