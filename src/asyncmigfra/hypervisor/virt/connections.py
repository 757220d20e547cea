"""Connections to libvirtd and their pool.

Everything here runs in worker threads, except construction.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import structlog

import libvirt
from asyncmigfra.errors import ConnectionFailed
from asyncmigfra.hypervisor.virt.errors import _code, _message
from asyncmigfra.hypervisor.virt.events import DomainEvent

# The package's logger name, as before the split into modules.
log = structlog.stdlib.get_logger("asyncmigfra.hypervisor.virt")


_EVENT_IDS: Final = (
    libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
    libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION,
    libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
    libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
)


def _is_alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False  # closed underneath: "invalid connection pointer"


def _is_libvirt_error(exc: BaseException) -> bool:
    return isinstance(exc, libvirt.libvirtError)


def _dom_name(dom: Any) -> str:
    try:
        return str(dom.name())
    except libvirt.libvirtError:  # pragma: no cover - a local accessor
        return ""


#: s a dead connection is retried before an operation fails (a libvirtd restart).
RECONNECT_GRACE = 15.0
#: Private connections kept per URI between long calls (migrations at once, usually).
_IDLE_PRIVATE = 4


class _Connection:
    """One long-lived ``virConnect`` for one URI, reopened when it died."""

    def __init__(
        self, uri: str, *, keepalive: tuple[int, int], post: Callable[[DomainEvent], None]
    ) -> None:
        self.uri = uri
        self._keepalive = keepalive
        self._post = post
        self._lock = threading.Lock()
        self._conn: Any = None
        self._callback_ids: list[int] = []
        self._close_callback = False
        #: How often a connection was opened (1 + reconnects).
        self.opens = 0
        #: What callers learned over the current connection that does not change while it
        #: lives (the host's capabilities, CPU comparisons): emptied when it is replaced.
        self._memo: dict[object, object] = {}
        #: Private connections whose long call ended, kept for the next one (bounded).
        self._idle_private: list[Any] = []
        self._closed = False

    def get(self) -> Any:
        """The live connection, (re)opened if needed. Raises ``ConnectionFailed``."""
        with self._lock:
            conn = self._conn
            if conn is not None and _is_alive(conn):
                return conn
            if conn is not None:
                log.info("libvirt.reconnecting", uri=self.uri)
                self._discard()
            self._conn = self._open_with_grace() if self.opens else self._open()
            if self.opens > 1:
                self._post(DomainEvent(uri=self.uri, kind="reconnected", at=time.monotonic()))
            return self._conn

    def memo(self, conn: Any) -> dict[object, object]:
        """The memo of ``conn`` (from :meth:`get`): facts that hold as long as the connection
        does. A reconnect (libvirtd restarted, perhaps upgraded or on changed hardware)
        starts a new, empty one; for a connection already replaced, a throwaway one."""
        with self._lock:
            return self._memo if conn is self._conn and conn is not None else {}

    def open_private(self) -> Any:
        """A connection to this URI of its own (keepalive, no callbacks) for one long call
        (a migration); the caller hands it back with :meth:`release_private`. One kept from
        an earlier call is reused when it is still alive (opening one costs a handshake with
        libvirtd, milliseconds before the job could start). Raises ``ConnectionFailed``."""
        while True:
            with self._lock:
                conn = self._idle_private.pop() if self._idle_private else None
            if conn is None:
                return self._connect()
            if _is_alive(conn):
                return conn
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def release_private(self, conn: Any) -> None:
        """The long call on ``conn`` (from :meth:`open_private`) ended: keep it for the next
        one while it is alive and few are kept, else close it."""
        if _is_alive(conn):
            with self._lock:
                if not self._closed and len(self._idle_private) < _IDLE_PRIVATE:
                    self._idle_private.append(conn)
                    return
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def invalidate(self, conn: Any) -> None:
        """Drop ``conn`` if it is still the current one (it died under an operation)."""
        with self._lock:
            if self._conn is conn:
                self._discard()

    def close(self) -> None:
        with self._lock:
            self._discard()
            self._closed = True
            idle, self._idle_private = self._idle_private, []
        for conn in idle:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def _open_with_grace(self) -> Any:
        """Reopen after the connection died: libvirtd may be restarting (its socket is gone
        for about a second), so keep trying for ``RECONNECT_GRACE`` seconds before the
        operation fails ``connection-failed``. Runs in a worker thread, never on the loop."""
        deadline = time.monotonic() + RECONNECT_GRACE
        while True:
            try:
                return self._open()
            except ConnectionFailed:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def _connect(self) -> Any:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise ConnectionFailed(
                f"Failed to connect to libvirt with uri: {self.uri}: {_message(exc)}"
            ) from exc
        interval, count = self._keepalive
        if interval > 0:
            try:
                conn.setKeepAlive(interval, count)
            except libvirt.libvirtError as exc:
                if _code(exc) != libvirt.VIR_ERR_NO_SUPPORT:  # local drivers have none
                    log.warning("libvirt.keepalive_failed", uri=self.uri, error=_message(exc))
        return conn

    def _open(self) -> Any:
        conn = self._connect()
        self.opens += 1
        try:
            conn.registerCloseCallback(self._on_close, None)
            self._close_callback = True
        except libvirt.libvirtError as exc:  # pragma: no cover - every driver has it
            log.warning("libvirt.close_callback_failed", uri=self.uri, error=_message(exc))
        callbacks: dict[int, Callable[..., None]] = {
            libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE: self._on_lifecycle,
            libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION: self._on_iteration,
            libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED: self._on_job_completed,
            libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED: self._on_device_removed,
        }
        for event_id in _EVENT_IDS:
            try:
                self._callback_ids.append(
                    int(conn.domainEventRegisterAny(None, event_id, callbacks[event_id], None))
                )
            except libvirt.libvirtError as exc:  # pragma: no cover - old daemons
                log.warning(
                    "libvirt.event_register_failed",
                    uri=self.uri,
                    event_id=event_id,
                    error=_message(exc),
                )
        log.debug("libvirt.connected", uri=self.uri, opens=self.opens)
        return conn

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        self._memo = {}
        ids, self._callback_ids = self._callback_ids, []
        if conn is None:
            return
        for callback_id in ids:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)
        if self._close_callback:
            self._close_callback = False
            with contextlib.suppress(libvirt.libvirtError):
                conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    # ---- libvirt callbacks: event thread, enqueue only ----------------------------------

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        self._post(
            DomainEvent(
                uri=self.uri,
                kind="lifecycle",
                vm_name=_dom_name(dom),
                event=int(event),
                detail=int(detail),
                at=time.monotonic(),
            )
        )

    def _on_iteration(self, _conn: Any, dom: Any, iteration: int, _opaque: Any) -> None:
        self._post(
            DomainEvent(
                uri=self.uri,
                kind="migration-iteration",
                vm_name=_dom_name(dom),
                iteration=int(iteration),
                at=time.monotonic(),
            )
        )

    def _on_job_completed(self, _conn: Any, dom: Any, params: Any, _opaque: Any) -> None:
        self._post(
            DomainEvent(
                uri=self.uri,
                kind="job-completed",
                vm_name=_dom_name(dom),
                stats=dict(params or {}),
                at=time.monotonic(),
            )
        )

    def _on_device_removed(self, _conn: Any, dom: Any, alias: str, _opaque: Any) -> None:
        self._post(
            DomainEvent(
                uri=self.uri,
                kind="device-removed",
                vm_name=_dom_name(dom),
                device=str(alias),
                at=time.monotonic(),
            )
        )

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        self._post(
            DomainEvent(uri=self.uri, kind="closed", detail=int(reason), at=time.monotonic())
        )


class _Pool:
    """One :class:`_Connection` per URI."""

    def __init__(self, *, keepalive: tuple[int, int], post: Callable[[DomainEvent], None]):
        self._keepalive = keepalive
        self._post = post
        self._lock = threading.Lock()
        self._connections: dict[str, _Connection] = {}

    def __getitem__(self, uri: str) -> _Connection:
        with self._lock:
            connection = self._connections.get(uri)
            if connection is None:
                connection = self._connections[uri] = _Connection(
                    uri, keepalive=self._keepalive, post=self._post
                )
            return connection

    def uris(self) -> list[str]:
        with self._lock:
            return sorted(self._connections)

    def close_all(self) -> None:
        with self._lock:
            connections = list(self._connections.values())
            self._connections.clear()
        for connection in connections:
            connection.close()
