"""The back-end class :class:`LibvirtHypervisor` and the ``create`` entry point.

Over 600 lines because :class:`LibvirtHypervisor` is one class of about 950 lines: the split
into modules (issue 15) was a pure move, and cutting the class into mixins or free functions
would be a redesign, not a move. The module-level pieces it uses live in the sibling modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
import socket
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

import libvirt
from asyncmigfra.errors import (
    Busy,
    ConnectionFailed,
    HypervisorError,
    InvalidTask,
    TaskError,
    TaskTimeout,
    VmNotFound,
    WrongState,
)
from asyncmigfra.hypervisor._threads import run_blocking
from asyncmigfra.hypervisor.base import (
    DirtyPageSample,
    DiskCopy,
    DomainInfo,
    HostInfo,
    HostLoad,
    MigrationRequest,
    OpContext,
    check_vcpu_map,
)
from asyncmigfra.hypervisor.virt import (
    dirtyrate,
    disks,
    guestlook,
    prechecks,
    storage,
    storagecopy,
)
from asyncmigfra.hypervisor.virt.connections import _is_alive, _Pool
from asyncmigfra.hypervisor.virt.domains import (
    _JOB_NONE,
    _MIGRATION_OUT,
    _PAUSED,
    _RUNNING,
    _SHUTOFF,
    _UNDEFINE_FLAGS,
    PluggedDevice,
    _attach_fn,
    _domain_info_of,
    _domain_named,
    _existing,
    _host_cpus,
    _hostdev_xml,
    _list_domains,
    _node_device_pci,
    _pci_candidates,
    _pin_all,
    _shmem_xml,
    _state_or_none,
    _with_flags,
    _xml_name,
    migration_devices,
    migration_devices_in,
)
from asyncmigfra.hypervisor.virt.errors import (
    _FLAG_FALLBACK_CODES,
    _code,
    _message,
    _wrong_state,
    error_class,
    map_libvirt_errors,
    translate_error,
)
from asyncmigfra.hypervisor.virt.events import (
    DomainEvent,
    EventCallback,
    _Changes,
    _EventHub,
    _EventThread,
)
from asyncmigfra.hypervisor.virt.migration import LibvirtMigrationJob
from asyncmigfra.hypervisor.virt.migrationparams import (
    MigrationTarget,
    _num,
    migration_flags,
    migration_params,
)
from asyncmigfra.hypervisor.virt.options import (
    _DEFAULT_TEMPLATE,
    _LXC_TEMPLATE,
    HostAddress,
    LibvirtConfig,
    default_local_uri,
    parse_options,
)
from asyncmigfra.hypervisor.virt.postcopy import LibvirtPostCopyRecovery, find_broken_post_copy
from asyncmigfra.model import PciId, StartSpec, VcpuMap

# The package's logger name, as before the split into modules.
log = structlog.stdlib.get_logger("asyncmigfra.hypervisor.virt")

T = TypeVar("T")


#: Port and timing of the SSH boot probe.
_SSH_PORT = 22
_PROBE_RETRY = 1.0
_PROBE_ATTEMPT = 5.0
_PROBE_BANNER = b"SSH-2.0-asyncmigfra_probe\r\n"
_PROBE_MAX_LINES = 20
#: s aclose() waits for the executor's threads.
_EXECUTOR_SHUTDOWN_LIMIT = 10.0


@dataclass(slots=True)
class _Rollback:
    """What a start did so far, to undo it when a later step fails."""

    name: str
    started: bool = False
    defined: bool = False
    restore_xml: str | None = None


class LibvirtHypervisor:
    """The ``libvirt`` back-end (see the package docstring).

    Public extras beyond the Protocol: :meth:`find_running_migrations`,
    :meth:`adopt_migration`, :meth:`broken_post_copy`,
    :meth:`add_event_listener`, :meth:`resolve_destination`, ``probe_port`` (the SSH probe's
    port, 22) and ``uri``/``config``.
    """

    kind = "libvirt"

    def __init__(self, config: LibvirtConfig, *, hostname: str) -> None:
        self.config = config
        self.uri = config.uri
        self.hostname = hostname
        #: Port of the SSH boot probe (tests point it at a local fake server).
        self.probe_port = _SSH_PORT
        self._executor: ThreadPoolExecutor | None = None
        self._hub: _EventHub | None = None
        self._holds_event_thread = False
        self._pool = _Pool(
            keepalive=(config.keepalive_interval, config.keepalive_count), post=self._post
        )
        self._pci_lock: asyncio.Lock | None = None
        self._jobs: set[LibvirtMigrationJob] = set()
        #: URI -> the host UUID its capabilities report (``None``: none reported). A host's
        #: UUID does not change, so each is read once (shared with the views).
        self._host_uuids: dict[str, str | None] = {}
        #: ``True`` for a view made by :meth:`on_host` (it owns nothing it could close).
        self._view = False
        #: The agent's own instance (views keep pointing at it).
        self._home: LibvirtHypervisor = self

    def __repr__(self) -> str:
        return f"LibvirtHypervisor(uri={self.uri!r})"

    def on_host(self, host: str) -> LibvirtHypervisor:
        """A view whose operations act on ``host`` over this agent's connection to it
        (``remote_uri(host)``); it shares the pool, the threads and the event hub."""
        if host == self.hostname:
            return self
        if host == self._home.hostname:
            return self._home  # a view's way back (a swap partner migrating here)
        view = copy.copy(self)
        view.uri = self.remote_uri(host)
        view.hostname = host
        view._holds_event_thread = False
        view._view = True
        return view

    # ---- plumbing ------------------------------------------------------------------------

    def _post(self, event: DomainEvent) -> None:
        hub = self._hub
        if hub is not None:
            hub.post(event)

    def _hub_or_raise(self) -> _EventHub:
        if self._hub is None:
            raise ConnectionFailed("the libvirt hypervisor is not open")
        return self._hub

    async def _call(self, uri: str, fn: Callable[[Any], T], *, retry: bool = True) -> T:
        """Run ``fn(conn)`` in the libvirt pool on the connection for ``uri``.

        ``libvirtError`` propagates unmapped (callers map it with their context);
        ``ConnectionFailed`` when the connection cannot be opened.
        """
        executor = self._executor
        if executor is None:
            raise ConnectionFailed("the libvirt hypervisor is not open")
        return await run_blocking(executor, self._invoke, uri, fn, retry)

    def _invoke(self, uri: str, fn: Callable[[Any], T], retry: bool) -> T:
        connection = self._pool[uri]
        conn = connection.get()
        try:
            return fn(conn)
        except libvirt.libvirtError as exc:
            if not retry or _is_alive(conn):
                raise
            log.info("libvirt.retry_after_reconnect", uri=uri, error=_message(exc))
            connection.invalidate(conn)
            return fn(connection.get())

    async def _run(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` in the libvirt pool (it manages its own connection)."""
        executor = self._executor
        if executor is None:
            raise ConnectionFailed("the libvirt hypervisor is not open")
        return await run_blocking(executor, fn)

    async def _mapped(
        self, uri: str, fn: Callable[[Any], T], prefix: str = "", *, retry: bool = True
    ) -> T:
        with map_libvirt_errors(prefix):
            return await self._call(uri, fn, retry=retry)

    def _local_uri(self, driver: str | None) -> str:
        if driver is None or driver == self.config.driver:
            return self.uri
        return default_local_uri(driver)

    def _template(self, driver: str) -> str:
        if self.config.destination_uri is not None:
            return self.config.destination_uri
        return _LXC_TEMPLATE if driver == "lxctools" else _DEFAULT_TEMPLATE

    def remote_uri(
        self, host: str, *, driver: str | None = None, transport: str | None = None
    ) -> str:
        """How this agent reaches ``host``: ``hosts.<host>.uri``, else the template."""
        address = self.config.hosts.get(host)
        if address is not None and address.uri:
            return address.uri
        drv = driver or self.config.driver
        return self._template(drv).format(
            driver=drv, transport=transport or self.config.transport, host=host
        )

    async def resolve_destination(
        self,
        host: str,
        *,
        driver: str | None = None,
        transport: str | None = None,
        rdma: bool = False,
    ) -> MigrationTarget:
        """The URIs of a migration to ``host`` (see ``hosts`` in the package docstring)."""
        drv = driver or self.config.driver
        address = self.config.hosts.get(host, HostAddress())
        uri = self.remote_uri(host, driver=drv, transport=transport)
        migrate_uri = address.migrate_uri
        if rdma:
            migrate_uri = f"rdma://{host}-ib"
        elif migrate_uri is None and drv == "lxctools":
            migrate_uri = await _first_ipv4(host)
        return MigrationTarget(
            host=host, uri=uri, p2p_uri=address.p2p_uri or uri, migrate_uri=migrate_uri
        )

    def add_event_listener(self, callback: EventCallback) -> Callable[[], None]:
        """Call ``callback(event)`` on the loop for every libvirt event; returns the remover."""
        return self._hub_or_raise().listen(callback)

    # ---- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Start the pool and the event thread, then connect (a failure is only logged:
        every operation reconnects, so the agent can start while libvirtd restarts)."""
        if self._executor is not None or self._view:
            return
        self._hub = _EventHub(asyncio.get_running_loop())
        self._pci_lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(
            max_workers=self.config.max_threads, thread_name_prefix="libvirt"
        )
        await run_blocking(self._executor, _EventThread.acquire)
        self._holds_event_thread = True
        try:
            await self._call(self.uri, lambda _c: None)
        except ConnectionFailed as exc:
            log.warning("libvirt.connect_failed", uri=self.uri, error=str(exc))

    async def aclose(self) -> None:
        """Abort our unfinished migrations, deregister callbacks and close connections (in
        the pool), stop the event thread when no other instance uses it, shut the pool down."""
        executor = self._executor
        if executor is None or self._view:
            return
        for job in list(self._jobs):
            await job._settle()
        await run_blocking(executor, self._pool.close_all)
        if self._holds_event_thread:
            self._holds_event_thread = False
            await run_blocking(executor, _EventThread.release)
        self._executor = None
        if self._hub is not None:
            self._hub.close()
            self._hub = None
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(None, executor.shutdown, True)
        try:
            async with asyncio.timeout(_EXECUTOR_SHUTDOWN_LIMIT):
                await done
        except TimeoutError:  # pragma: no cover - a libvirt call hangs
            log.error("libvirt.executor_shutdown_timeout", limit=_EXECUTOR_SHUTDOWN_LIMIT)  # noqa: TRY400

    # ---- start ---------------------------------------------------------------------------

    async def start(self, spec: StartSpec, ctx: OpContext) -> None:
        ctx.phase("starting")
        if spec.name_error:
            raise InvalidTask(spec.name_error)
        if spec.transient and spec.xml is None:
            raise InvalidTask(
                "XML description is missing which is required to create a transient domain."
            )
        if spec.xml is None and not spec.vm_name:
            raise InvalidTask("vm-name is not valid.")
        if spec.transient and (spec.memory is not None or spec.vcpus is not None):
            raise HypervisorError(
                "Requested operation is not valid: "
                "cannot change persistent config of a transient domain"
            )
        uri = self._local_uri(spec.driver)
        name = (_xml_name(spec.xml) if spec.xml is not None else None) or spec.vm_name
        cpus = 0
        if spec.vcpu_map is not None:
            cpus = await self._mapped(uri, _host_cpus, "Error pinning vcpu: ")
            check_vcpu_map(spec.vcpu_map, cpus, self.hostname)
        if self.config.nodes:
            await self._check_nodes(name)
        rollback = _Rollback(name=name)
        try:
            await self._start_steps(spec, uri, rollback, cpus)
        except TaskError as exc:
            note = await self._rollback(uri, rollback)
            raise type(exc)(f"{exc}{note}") from exc
        except asyncio.CancelledError:
            await self._rollback(uri, rollback)
            raise
        if spec.probe_with_ssh:
            ctx.phase("probing")
            with ctx.measure("boot"):
                await self._probe_ssh(spec.probe_hostname or rollback.name)

    async def _start_steps(self, spec: StartSpec, uri: str, rollback: _Rollback, cpus: int) -> None:
        """Define/create, configure, start and attach devices, recording each in ``rollback``."""
        changes_config = (
            spec.memory is not None or spec.vcpus is not None or spec.vcpu_map is not None
        )
        existing = await self._mapped(
            uri, lambda c: _existing(c, rollback.name, want_xml=changes_config or bool(spec.xml))
        )
        if spec.xml is None:
            if existing is None:  # pragma: no cover - a lookup race: it vanished just now
                raise VmNotFound(f"Domain not found: no domain with matching name '{spec.vm_name}'")
            if existing.state != _SHUTOFF:
                raise _wrong_state(existing.state)
            if changes_config:
                rollback.restore_xml = existing.xml
        elif existing is not None and existing.state != _SHUTOFF:
            raise _wrong_state(existing.state)

        paused = False
        xml = spec.xml
        if xml is not None and spec.transient:

            def create_transient(conn: Any) -> tuple[str, bool]:
                try:
                    dom = conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
                    return str(dom.name()), True
                except libvirt.libvirtError as exc:
                    if _code(exc) not in _FLAG_FALLBACK_CODES:
                        raise
                # The driver cannot start paused (test driver): start it running.
                return str(conn.createXML(xml, 0).name()), False

            rollback.name, paused = await self._mapped(
                uri, create_transient, "Error creating domain: ", retry=False
            )
            rollback.started = True
        elif xml is not None:
            rollback.name = await self._mapped(
                uri, lambda c: str(c.defineXML(xml).name()), "Error defining domain: "
            )
            if existing is None:
                rollback.defined = True
            else:
                rollback.restore_xml = existing.xml
        name = rollback.name

        if spec.memory is not None:
            kib = spec.memory

            def set_memory(conn: Any) -> None:
                dom = conn.lookupByName(name)
                config = libvirt.VIR_DOMAIN_AFFECT_CONFIG
                dom.setMemoryFlags(kib, config | libvirt.VIR_DOMAIN_MEM_MAXIMUM)
                dom.setMemoryFlags(kib, config)

            await self._mapped(uri, set_memory, "Error setting memory: ")
        if spec.vcpus is not None:
            count = spec.vcpus

            def set_vcpus(conn: Any) -> None:
                dom = conn.lookupByName(name)
                config = libvirt.VIR_DOMAIN_AFFECT_CONFIG
                dom.setVcpusFlags(count, config | libvirt.VIR_DOMAIN_VCPU_MAXIMUM)
                dom.setVcpusFlags(count, config)

            await self._mapped(uri, set_vcpus, "Error setting vcpus: ")

        vcpu_map = spec.vcpu_map
        pinned = False
        if vcpu_map is not None and not spec.transient:

            def pin_config(conn: Any) -> bool:
                dom = conn.lookupByName(name)
                try:
                    for vcpu, allowed in enumerate(vcpu_map):
                        cpumap = tuple(cpu in allowed for cpu in range(cpus))
                        dom.pinVcpuFlags(vcpu, cpumap, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
                except libvirt.libvirtError as exc:
                    if _code(exc) in _FLAG_FALLBACK_CODES or error_class(exc) is WrongState:
                        return False  # this driver pins only live domains: after the start
                    raise
                return True

            pinned = await self._mapped(uri, pin_config, "Error pinning vcpu: ")

        def pin_live(conn: Any) -> None:
            assert vcpu_map is not None
            _pin_all(conn.lookupByName(name), vcpu_map, cpus, libvirt.VIR_DOMAIN_AFFECT_LIVE)

        if spec.transient:
            if vcpu_map is not None and paused:
                await self._mapped(uri, pin_live, "Error pinning vcpu: ")
                pinned = True
            if paused:
                await self._mapped(
                    uri, lambda c: c.lookupByName(name).resume(), "Error creating domain: "
                )
        else:
            await self._mapped(
                uri, lambda c: c.lookupByName(name).create(), "Error creating domain: ", retry=False
            )
            rollback.started = True
        if vcpu_map is not None and not pinned:
            await self._mapped(uri, pin_live, "Error pinning vcpu: ")

        for addr in spec.devs:
            await self._mapped(
                uri,
                _attach_fn(name, _hostdev_xml(addr)),
                f"Could not attach PCI device {addr}: ",
                retry=False,
            )
        for pci_id in spec.pci_ids:
            await self._attach_by_id(uri, name, pci_id)
        if spec.ivshmem is not None:
            await self._mapped(
                uri,
                _attach_fn(name, _shmem_xml(spec.ivshmem)),
                "Could not attach ivshmem device. ",
                retry=False,
            )

    async def _attach_by_id(self, uri: str, name: str, wanted: PciId) -> None:
        """Attach the first free host device of type ``wanted`` (``managed='yes'``)."""
        kind = f"{wanted.vendor:04x}:{wanted.device:04x}"
        lock = self._pci_lock or asyncio.Lock()
        async with lock:  # two starts of this agent never pick the same device
            free, total = await self._mapped(
                uri, lambda c: _pci_candidates(c, wanted), "Error listing PCI devices: "
            )
            if not total:
                raise HypervisorError(f'No devices of type "{kind}" found on "{uri}".')
            if not free:
                raise HypervisorError(
                    f'No free devices of type "{kind}" on "{uri}" (all {total} in use).'
                )
            random.shuffle(free)  # spreads parallel picks; not cryptography
            last: libvirt.libvirtError | None = None
            for addr in free:
                try:
                    await self._call(uri, _attach_fn(name, _hostdev_xml(addr)), retry=False)
                except libvirt.libvirtError as exc:
                    if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                        raise translate_error(exc) from exc
                    last = exc
                    continue
                return
            assert last is not None
            raise translate_error(last, "No pci device could be attached: ") from last

    # ---- devices around a migration (docs/protocol.md §3.6, §5.4) ---------------------------

    async def _migration_devices(
        self, vm_name: str
    ) -> tuple[list[PluggedDevice], list[PluggedDevice]]:
        """The guest's devices that a migration detaches, read and parsed off the loop."""
        look = await guestlook.guest_look(self, self.uri, vm_name)
        if look is not None and self._executor is not None:
            return await run_blocking(self._executor, migration_devices_in, look.root())
        return await self._mapped(
            self.uri, lambda c: migration_devices(str(c.lookupByName(vm_name).XMLDesc(0)))
        )

    async def _unplug(self, vm_name: str, device: PluggedDevice, what: str, limit: float) -> None:
        """Detach ``device`` and wait for the guest to release it: the device-removed event,
        or (drivers that remove at once, events lost on a reconnect) the device gone from
        the live XML, polled every half second. ``TaskTimeout`` after ``limit`` s."""
        uri, alias = self.uri, device.alias
        guestlook.spend(uri, vm_name)  # the definition changes: later reads read it again
        removed = asyncio.Event()

        def on_event(event: DomainEvent) -> None:
            if event.kind == "device-removed" and (alias is None or event.device == alias):
                removed.set()

        def still_there(conn: Any) -> bool:
            current = str(conn.lookupByName(vm_name).XMLDesc(0))
            shmems, hostdevs = migration_devices(current)
            return any(
                d.xml == device.xml or (alias and d.alias == alias) for d in shmems + hostdevs
            )

        with self._hub_or_raise().watching(uri, vm_name, on_event):
            await self._mapped(
                uri,
                lambda c: c.lookupByName(vm_name).detachDeviceFlags(
                    device.xml, libvirt.VIR_DOMAIN_AFFECT_LIVE
                ),
                f"Could not detach {what}: ",
                retry=False,
            )
            try:
                async with asyncio.timeout(limit):
                    while await self._mapped(uri, still_there):
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(0.5):
                                await removed.wait()
            except TimeoutError:
                raise TaskTimeout(
                    f"the guest did not release {what} within {limit:g} s (device-removed event)"
                ) from None

    async def detach_ivshmem(
        self, vm_name: str, ctx: OpContext, *, unplug_timeout: float
    ) -> str | None:
        shmems, _ = await self._migration_devices(vm_name)
        if len(shmems) > 1:
            raise HypervisorError(
                "Found more than one ivshmem device. Only migration of one is supported."
            )
        if not shmems:
            return None
        await self._unplug(vm_name, shmems[0], "the ivshmem device", unplug_timeout)
        return shmems[0].reattach_xml

    async def attach_ivshmem(self, vm_name: str, device_xml: str, ctx: OpContext) -> None:
        await self._mapped(
            self.uri,
            _attach_fn(vm_name, device_xml),
            "Could not attach ivshmem device. ",
            retry=False,
        )

    async def detach_hostdevs(
        self, vm_name: str, ctx: OpContext, *, unplug_timeout: float
    ) -> dict[PciId, int]:
        _, hostdevs = await self._migration_devices(vm_name)
        if not hostdevs:
            return {}

        def kinds(conn: Any) -> list[PciId]:
            out = []
            for dev in hostdevs:
                a = dev.host_address
                assert a is not None
                name = f"pci_{a.domain:04x}_{a.bus:02x}_{a.slot:02x}_{a.function:x}"
                parsed = _node_device_pci(str(conn.nodeDeviceLookupByName(name).XMLDesc(0)))
                if parsed is None:
                    raise HypervisorError(f"host device {a} has no PCI vendor/product")
                out.append(parsed[0])
            return out

        types = await self._mapped(self.uri, kinds, "Error looking up PCI devices: ")
        counts: dict[PciId, int] = {}
        for dev, kind in zip(hostdevs, types, strict=True):
            await self._unplug(vm_name, dev, f"PCI device {dev.host_address}", unplug_timeout)
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    async def attach_hostdevs(
        self, vm_name: str, counts: Mapping[PciId, int], ctx: OpContext
    ) -> None:
        for kind, count in counts.items():
            for _ in range(count):
                await self._attach_by_id(self.uri, vm_name, kind)

    async def _rollback(self, uri: str, rollback: _Rollback) -> str:
        """Undo what a failed start did; returns the note the error text gets."""
        name = rollback.name
        done: list[str] = []
        try:
            if rollback.started:

                def destroy(conn: Any) -> None:
                    with contextlib.suppress(libvirt.libvirtError):
                        dom = conn.lookupByName(name)
                        if dom.isActive():
                            dom.destroy()

                await self._mapped(uri, destroy, "Error destroying domain: ")
                done.append("destroyed")
            if rollback.defined:
                await self._undefine(uri, name)
                done.append("undefined")
            elif rollback.restore_xml is not None:
                xml = rollback.restore_xml
                await self._mapped(uri, lambda c: c.defineXML(xml), "Error defining domain: ")
                done.append("previous definition restored")
        except TaskError as exc:
            log.error("libvirt.rollback_failed", vm=name, error=str(exc))  # noqa: TRY400
            steps = ", ".join(done) or "nothing undone"
            return f" (rollback failed after: {steps}; {exc})"
        if not done:
            return ""
        log.info("libvirt.rolled_back", vm=name, steps=done)
        return f" (rolled back: domain '{name}' {' and '.join(done)})"

    async def _check_nodes(self, name: str) -> None:
        """The original's remote-duplicate check over ``nodes`` (by error code)."""

        async def check(node: str) -> None:
            uri = self.remote_uri(node)
            state = await self._mapped(
                uri, lambda c: _state_or_none(c, name), f"Error checking domain on {node}: "
            )
            if state is not None and state != _SHUTOFF:
                raise WrongState(f"Domain already running on {node}")

        nodes = [n for n in self.config.nodes if n != self.hostname]
        results = await asyncio.gather(*(check(n) for n in nodes), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _probe_ssh(self, host: str) -> None:
        """TCP connect to port 22 and swap SSH identification strings, retried each second
        until ``start-timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.start_timeout
        attempts = 0
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.info("libvirt.ssh_probe_timeout", host=host, attempts=attempts)
                raise TaskTimeout("Timeout while trying to reach domain with SSH.")
            attempts += 1
            try:
                async with asyncio.timeout(min(remaining, _PROBE_ATTEMPT)):
                    if await _ssh_handshake(host, self.probe_port):
                        return
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                pass
            await asyncio.sleep(max(0.0, min(_PROBE_RETRY, deadline - loop.time())))

    # ---- stop ----------------------------------------------------------------------------

    async def stop(
        self,
        vm_name: str,
        ctx: OpContext,
        *,
        force: bool = False,
        undefine: bool = False,
        force_after_timeout: bool = False,
    ) -> None:
        uri = self.uri
        changes = _Changes()
        with self._hub_or_raise().watching(uri, vm_name, changes):

            def look(conn: Any) -> tuple[int, bool]:
                dom = conn.lookupByName(vm_name)
                return int(dom.state()[0]), bool(dom.isPersistent())

            state, persistent = await self._mapped(uri, look)
            if self.config.driver == "lxctools":
                persistent = True  # as the original: lxctools reports no persistence
            if force:
                if state == _SHUTOFF:
                    raise _wrong_state(state)
                ctx.phase("destroying")
                with ctx.measure("destroy"):
                    await self._destroy(uri, vm_name)
            else:
                if state not in (
                    libvirt.VIR_DOMAIN_RUNNING,
                    libvirt.VIR_DOMAIN_BLOCKED,
                    libvirt.VIR_DOMAIN_PAUSED,
                    libvirt.VIR_DOMAIN_SHUTDOWN,
                ):
                    raise _wrong_state(state)
                stopped = await self._graceful_stop(uri, vm_name, state, changes, ctx)
                if not stopped:
                    if not force_after_timeout:
                        if state == _PAUSED:
                            await self._pause_again(uri, vm_name)
                        raise TaskTimeout("Timeout while waiting for correct vm state.")
                    log.info("libvirt.destroy_after_timeout", vm=vm_name)
                    ctx.phase("destroying")
                    with ctx.measure("destroy"):
                        await self._destroy(uri, vm_name)
            if undefine and persistent:
                with ctx.measure("undefine"):
                    await self._undefine(uri, vm_name)

    async def _graceful_stop(
        self, uri: str, vm_name: str, state: int, changes: _Changes, ctx: OpContext
    ) -> bool:
        """Resume a paused guest, request the shutdown, wait for SHUTOFF (True) up to
        ``stop-timeout``."""
        if state == _PAUSED:
            await self._mapped(
                uri, lambda c: c.lookupByName(vm_name).resume(), "Error resuming domain: "
            )
        ctx.phase("shutting-down")
        with ctx.measure("shutdown"):
            if state != libvirt.VIR_DOMAIN_SHUTDOWN:
                try:
                    await self._mapped(
                        uri,
                        lambda c: c.lookupByName(vm_name).shutdown(),
                        "Error shutting domain down: ",
                    )
                except (WrongState, VmNotFound):
                    current = await self._mapped(uri, lambda c: _state_or_none(c, vm_name))
                    if current is not None and current != _SHUTOFF:
                        raise
                    return True  # it stopped on its own meanwhile
            return await self._wait_shutoff(uri, vm_name, changes)

    async def _pause_again(self, uri: str, vm_name: str) -> None:
        """A paused guest that ignored the shutdown is left as it was found: paused."""

        def pause(conn: Any) -> None:
            dom = conn.lookupByName(vm_name)
            if int(dom.state()[0]) == _RUNNING:
                dom.suspend()

        try:
            await self._call(uri, pause)
        except (libvirt.libvirtError, TaskError) as exc:
            log.warning("libvirt.repause_failed", vm=vm_name, error=str(exc))

    async def _wait_shutoff(self, uri: str, vm_name: str, changes: _Changes) -> bool:
        """Event-driven wait for SHUTOFF (or the domain vanishing); re-reads the state on each
        event for the domain and once more at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.stop_timeout
        while True:
            state = await self._mapped(uri, lambda c: _state_or_none(c, vm_name))
            if state is None or state == _SHUTOFF:
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changes.wait()

    async def _destroy(self, uri: str, vm_name: str) -> None:
        try:
            await self._mapped(
                uri, lambda c: c.lookupByName(vm_name).destroy(), "Error destroying domain: "
            )
        except (WrongState, VmNotFound):
            current = await self._mapped(uri, lambda c: _state_or_none(c, vm_name))
            if current is not None and current != _SHUTOFF:
                raise

    async def _undefine(self, uri: str, vm_name: str) -> None:
        def undefine(conn: Any) -> None:
            try:
                dom = conn.lookupByName(vm_name)
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                    return  # already gone
                raise
            _with_flags(dom.undefineFlags, _UNDEFINE_FLAGS)

        await self._mapped(uri, undefine, "Error undefining domain: ")

    # ---- suspend, resume, repin ----------------------------------------------------------

    async def _expect_state(
        self, vm_name: str, expected: int, action: Callable[[Any], object], prefix: str
    ) -> None:
        def op(conn: Any) -> None:
            dom = conn.lookupByName(vm_name)
            state = int(dom.state()[0])
            if state != expected:
                raise _wrong_state(state)
            action(dom)

        await self._mapped(self.uri, op, prefix)

    async def suspend(self, vm_name: str, ctx: OpContext) -> None:
        await self._expect_state(
            vm_name, _RUNNING, lambda d: d.suspend(), "Error suspending domain: "
        )

    async def resume(self, vm_name: str, ctx: OpContext) -> None:
        await self._expect_state(vm_name, _PAUSED, lambda d: d.resume(), "Error resuming domain: ")

    async def set_memory(self, vm_name: str, kib: int, ctx: OpContext) -> None:
        """``virDomainSetMemoryFlags(kib, AFFECT_LIVE)``: the balloon target of the running
        guest (needs a balloon driver in the guest to take effect)."""

        guestlook.spend(self.uri, vm_name)  # reduce-memory within a migration's read

        def op(conn: Any) -> None:
            conn.lookupByName(vm_name).setMemoryFlags(kib, libvirt.VIR_DOMAIN_AFFECT_LIVE)

        await self._mapped(self.uri, op, "Error setting memory: ")

    async def current_memory(self, vm_name: str) -> int:
        """``memoryStats()['actual']`` (QEMU's live balloon value), else ``info()`` (drivers
        without memory statistics, a guest without a balloon device)."""

        def op(conn: Any) -> int:
            dom = conn.lookupByName(vm_name)
            try:
                actual = dom.memoryStats().get("actual")
            except libvirt.libvirtError:
                actual = None
            return int(actual) if actual else int(dom.info()[2])

        return await self._mapped(self.uri, op)

    async def resident_memory(self, vm_name: str) -> int | None:
        """``KnowsResidentMemory``: ``memoryStats()['rss']`` (libvirtd reads QEMU's RSS)."""

        look = await guestlook.guest_look(self, self.uri, vm_name)
        if look is not None and look.rss_read:
            return look.rss

        def op(conn: Any) -> int | None:
            rss = conn.lookupByName(vm_name).memoryStats().get("rss")
            return int(rss) if isinstance(rss, int) and rss > 0 else None

        return await self._mapped(self.uri, op)

    async def repin(self, vm_name: str, vcpu_map: VcpuMap, ctx: OpContext) -> None:
        """Pin live and in the config for a running persistent domain, live for a transient
        one, in the config for a shut-off one."""
        host = self.hostname

        def op(conn: Any) -> None:
            dom = conn.lookupByName(vm_name)
            cpus = _host_cpus(conn)
            check_vcpu_map(vcpu_map, cpus, host)
            state = int(dom.state()[0])
            if state == _SHUTOFF:
                flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
            elif dom.isPersistent():
                flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
            else:
                flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
            _pin_all(dom, vcpu_map, cpus, flags)

        await self._mapped(self.uri, op, "Error pinning vcpu: ")

    # ---- migration -----------------------------------------------------------------------

    async def check_migration(
        self, request: MigrationRequest, *, memory: bool = True
    ) -> tuple[DiskCopy, ...]:
        """Pre-checks against the destination, before the VM is touched
        (:func:`.prechecks.check_migration`): reachable, no active domain of that name, the
        guest's machine type and CPU model accepted, enough free memory (unless ``memory``
        is false: a swap decides that for both VMs together), and the guest's disks
        (:func:`~asyncmigfra.hypervisor.virt.storagecopy.check`)."""
        return await prechecks.check_migration(self, request, memory=memory)

    def reading_once(self, vm_name: str) -> AbstractContextManager[None]:
        """``ReadsGuestOnce``: within the block, the migration's reads of ``vm_name`` share
        one round trip (:mod:`.guestlook`)."""
        return guestlook.reading_once(vm_name)

    async def begin_migration(
        self, request: MigrationRequest, ctx: OpContext
    ) -> LibvirtMigrationJob:
        uri = self._local_uri(request.driver)
        name = request.vm_name

        state, persistent, job_operation = await prechecks.start_facts(self, uri, name)
        if job_operation is not None:
            # Someone else's job (an adopted migration, a backup): refuse rather than watch
            # and steer a job that is not ours.
            raise Busy(f"domain '{name}' has a job running (operation {job_operation})")
        if request.mode == "offline":
            if state != _SHUTOFF:
                raise _wrong_state(state)
        elif state not in (_RUNNING, _PAUSED):
            raise _wrong_state(state)
        target = await self.resolve_destination(
            request.destination,
            driver=request.driver,
            transport=request.transport,
            rdma=request.rdma,
        )
        if not request.p2p:
            await self._call(target.uri, lambda _c: None)  # connect now: ConnectionFailed
        request = await storagecopy.prepare(self, uri, target, request)
        job = LibvirtMigrationJob(
            self,
            uri=uri,
            request=request,
            target=target,
            flags=migration_flags(request, persistent=persistent),
            params=migration_params(request, target),
        )
        log.info(
            "migration.starting",
            vm=name,
            destination=target.host,
            uri=target.p2p_uri if request.p2p else target.uri,
            migrate_uri=target.migrate_uri,
            flags=job.flags,
        )
        await job._start()
        return job

    async def measure_dirty_rate(self, vm_name: str, *, seconds: int = 1) -> float:
        """``MeasuresDirtyRate``: QEMU's page sampling (:func:`dirtyrate.measure`)."""

        async def call(fn: Callable[[Any], T]) -> T:
            return await self._call(self.uri, fn, retry=False)

        return await dirtyrate.measure(call, vm_name, seconds)

    async def sample_dirty_pages(self, vm_name: str, *, seconds: int = 1) -> DirtyPageSample:
        """``SamplesDirtyPages``: the probe as the pages behind it (:func:`dirtyrate.sample`)."""

        async def call(fn: Callable[[Any], T]) -> T:
            return await self._call(self.uri, fn, retry=False)

        return await dirtyrate.sample(call, vm_name, seconds)

    async def disks_to_copy(self, request: MigrationRequest) -> tuple[DiskCopy, ...]:
        """The disks ``request`` would copy (:func:`disks.source_copies`)."""
        uri = self._local_uri(request.driver)
        return await self._mapped(
            uri, lambda conn: disks.source_copies(conn, request), "Error reading the disks: "
        )

    async def adopt_migration(
        self, vm_name: str, *, destination: str | None = None
    ) -> LibvirtMigrationJob | None:
        """A job handle for ``vm_name``'s outgoing migration if one is running (started by a
        previous agent run: peer-to-peer jobs belong to libvirtd), else ``None``.
        ``destination``: where the adopting task sent it (a storage copy's images there
        are removed if the job fails)."""

        def outgoing(conn: Any) -> bool:
            try:
                raw = conn.lookupByName(vm_name).jobStats()
            except libvirt.libvirtError:
                return False
            return _num(raw, "type") != _JOB_NONE and _num(raw, "operation") == _MIGRATION_OUT

        if not await self._mapped(self.uri, outgoing):
            return None
        target = await self.resolve_destination(destination) if destination else None
        job = LibvirtMigrationJob.adopted(self, uri=self.uri, vm_name=vm_name, target=target)
        await job._adopt()
        log.info("migration.adopted", vm=vm_name)
        return job

    async def broken_post_copy(self, request: MigrationRequest) -> LibvirtPostCopyRecovery | None:
        """A handle that resumes ``request``'s post-copy migration when its guest is paused
        here in the post-copy-failed state (:mod:`.postcopy`), else ``None``."""
        return await find_broken_post_copy(self, request)

    async def find_running_migrations(self) -> list[str]:
        """Names of local domains with an outgoing migration job (to adopt or abort after
        an agent restart: a peer-to-peer job outlives its client)."""

        def op(conn: Any) -> list[str]:
            names: list[str] = []
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                try:
                    raw = dom.jobStats()
                except libvirt.libvirtError:
                    continue  # no job support (test driver) or vanished
                if _num(raw, "type") != _JOB_NONE and _num(raw, "operation") == _MIGRATION_OUT:
                    names.append(str(dom.name()))
            return sorted(names)

        return await self._mapped(self.uri, op, "Error listing migration jobs: ")

    # ---- inventory -----------------------------------------------------------------------

    async def list_domains(self, *, active_only: bool = False) -> list[DomainInfo]:
        return await self._mapped(
            self.uri, lambda c: _list_domains(c, active_only), "Error listing domains: "
        )

    async def domain_named(self, vm_name: str) -> DomainInfo | None:
        """``FindsDomainByName``: a lookup and the domain's info, not the whole list."""
        look = await guestlook.guest_look(self, self.uri, vm_name)
        if look is not None:
            return _domain_info_of(look.name, look.info, look.persistent)
        return await self._mapped(
            self.uri, lambda c: _domain_named(c, vm_name), "Error listing domains: "
        )

    async def host_load(self, host: str) -> HostLoad:
        """A destination's CPUs, memory and active domains, over this agent's connection to
        it (``hosts.<host>.uri`` or the ``destination-uri`` template)."""
        uri = self.remote_uri(host)

        def op(conn: Any) -> HostLoad:
            info = conn.getInfo()
            try:
                mem = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0)
                total = int(mem["total"])
                free = int(mem["free"]) + int(mem.get("cached", 0)) + int(mem.get("buffers", 0))
            except (libvirt.libvirtError, KeyError):
                total, free = int(info[1]) * 1024, int(conn.getFreeMemory()) // 1024
            active = _list_domains(conn, active_only=True)
            try:
                room = storage.pool_room(conn)
            except libvirt.libvirtError:
                room = {}  # no storage driver there
            return HostLoad(
                host=host,
                cpus=int(info[2]),
                memory=total,
                free_memory=free,
                vcpus_used=sum(d.vcpus for d in active),
                domains=len(active),
                storage_free=room,
            )

        try:
            return await self._call(uri, op)
        except libvirt.libvirtError as exc:
            raise ConnectionFailed(f"cannot read the load of {host}: {_message(exc)}") from exc

    async def storage_paths(self) -> tuple[str, ...]:
        """The target paths of the host's active storage pools (``dir`` pools' directories,
        ``logical`` pools' ``/dev/<vg>``, ...)."""

        def op(conn: Any) -> tuple[str, ...]:
            paths: list[str] = []
            for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
                target = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")  # noqa: S314
                if target and target.startswith("/"):
                    paths.append(target)
            return tuple(paths)

        return await self._mapped(self.uri, op, "Error listing storage pools: ")

    async def host_info(self) -> HostInfo:
        """``hostname``: the agent's configured name (libvirt's ``getHostname()`` when
        empty); CPUs; memory and free memory (KiB) from the node's memory statistics over
        all cells. ``getInfo()``/``getFreeMemory()`` sum the NUMA nodes instead, which on
        the rig's VM reported 4.6 of 24 GiB; they are the fallback (the test driver)."""
        configured = self.hostname

        def op(conn: Any) -> HostInfo:
            info = conn.getInfo()
            try:
                mem = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0)
                total, free = int(mem["total"]), int(mem["free"])
            except (libvirt.libvirtError, KeyError):
                total, free = int(info[1]) * 1024, int(conn.getFreeMemory()) // 1024
            return HostInfo(
                hostname=configured or str(conn.getHostname()),
                cpus=int(info[2]),
                memory=total,
                free_memory=free,
            )

        return await self._mapped(self.uri, op, "Error getting host info: ")


async def _first_ipv4(host: str) -> str:
    """The original's lxctools migrate URI: the destination's first IPv4 address."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConnectionFailed(f"Could not resolve {host}: {exc}") from exc
    if not infos:
        raise ConnectionFailed(f"Could not resolve {host}: no IPv4 address")
    return str(infos[0][4][0])


async def _ssh_handshake(host: str, port: int) -> bool:
    """Connect, read the server's identification line (``SSH-...``), send ours."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for _ in range(_PROBE_MAX_LINES):  # RFC 4253 4.2: other lines may come first
            line = await reader.readline()
            if not line:
                return False
            if line.startswith(b"SSH-"):
                writer.write(_PROBE_BANNER)
                await writer.drain()
                return True
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def create(
    options: Mapping[str, object], *, hostname: str, shared: MutableMapping[str, object]
) -> LibvirtHypervisor:
    """The ``libvirt`` entry point: validate ``options`` (see the package docstring)."""
    return LibvirtHypervisor(parse_options(options), hostname=hostname)
