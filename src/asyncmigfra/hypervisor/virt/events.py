"""libvirt's event loop thread and the hub that hands domain events to asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import structlog

import libvirt

# The package's logger name, as before the split into modules.
log = structlog.stdlib.get_logger("asyncmigfra.hypervisor.virt")


EventKind = Literal[
    "lifecycle", "migration-iteration", "job-completed", "device-removed", "closed", "reconnected"
]


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainEvent:
    """One libvirt event, as delivered on the event loop.

    ``closed``/``reconnected`` concern the connection ``uri`` and have no ``vm_name``.
    """

    uri: str
    kind: EventKind
    vm_name: str = ""
    #: ``lifecycle``: virDomainEventType (2 started, 3 suspended, 4 resumed, 5 stopped ...).
    event: int = 0
    #: ``lifecycle``: the event's detail; ``closed``: the close reason.
    detail: int = 0
    #: ``migration-iteration``: the memory pass that began.
    iteration: int = 0
    #: ``job-completed``: the job's final statistics (libvirt's typed parameters).
    stats: Mapping[str, object] | None = None
    #: ``device-removed``: the alias of the device the guest released.
    device: str = ""
    #: ``time.monotonic()`` when libvirt's event thread delivered it.
    at: float = 0.0


EventCallback = Callable[[DomainEvent], None]


class _EventThread:
    """libvirt's default event loop, run in one daemon thread per process (ref counted)."""

    _lock = threading.Lock()
    _registered = False
    _users = 0
    _thread: threading.Thread | None = None
    _stop: threading.Event | None = None

    @classmethod
    def acquire(cls) -> None:
        """Register the default impl (once) and make sure the loop thread runs. Blocking."""
        with cls._lock:
            if not cls._registered:
                # Errors are reported through exceptions; libvirt's default handler would
                # also print each of them to stderr.
                libvirt.registerErrorHandler(_silence, None)
                libvirt.virEventRegisterDefaultImpl()
                cls._registered = True
            cls._users += 1
            if cls._thread is None:
                stop = threading.Event()
                thread = threading.Thread(
                    target=cls._run, args=(stop,), name="libvirt-events", daemon=True
                )
                cls._stop, cls._thread = stop, thread
                thread.start()

    @classmethod
    def release(cls) -> None:
        """Drop one user; the last one stops and joins the thread. Blocking (briefly)."""
        with cls._lock:
            cls._users = max(0, cls._users - 1)
            if cls._users or cls._thread is None or cls._stop is None:
                return
            thread, stop = cls._thread, cls._stop
            cls._thread = cls._stop = None
            stop.set()
            # A zero-delay timer wakes virEventRunDefaultImpl so the loop sees the flag.
            libvirt.virEventAddTimeout(0, _remove_timer, None)
            thread.join(timeout=5.0)
            if thread.is_alive():  # pragma: no cover - libvirt hung in its poll
                log.warning("libvirt.event_thread_not_stopped")

    @classmethod
    def running(cls) -> bool:
        return cls._thread is not None and cls._thread.is_alive()

    @staticmethod
    def _run(stop: threading.Event) -> None:
        while not stop.is_set():
            if libvirt.virEventRunDefaultImpl() < 0:  # pragma: no cover - defensive
                time.sleep(0.1)


def _silence(_ctx: object, _err: object) -> None:
    """libvirt's error handler: errors reach us as exceptions, so print nothing."""


def _remove_timer(timer: int, _opaque: object) -> None:
    libvirt.virEventRemoveTimeout(timer)


class _EventHub:
    """Hands events from libvirt's thread to the loop, to listeners and per-domain watchers."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._open = True
        self._listeners: list[EventCallback] = []
        self._watchers: dict[tuple[str, str], list[EventCallback]] = {}

    def post(self, event: DomainEvent) -> None:
        """Any thread: queue ``event`` for delivery on the loop (never blocks, never raises)."""
        if not self._open:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: DomainEvent) -> None:
        targets = list(self._listeners)
        if event.vm_name:
            targets += self._watchers.get((event.uri, event.vm_name), ())
        else:
            for (uri, _), callbacks in self._watchers.items():
                if uri == event.uri:
                    targets += callbacks
        for callback in targets:
            try:
                callback(event)
            except Exception:
                log.exception("libvirt.event_callback_failed", kind=event.kind)

    def listen(self, callback: EventCallback) -> Callable[[], None]:
        self._listeners.append(callback)
        return lambda: _discard(self._listeners, callback)

    def watch(self, uri: str, vm_name: str, callback: EventCallback) -> Callable[[], None]:
        callbacks = self._watchers.setdefault((uri, vm_name), [])
        callbacks.append(callback)

        def remove() -> None:
            _discard(callbacks, callback)
            if not callbacks and self._watchers.get((uri, vm_name)) is callbacks:
                del self._watchers[(uri, vm_name)]

        return remove

    @contextlib.contextmanager
    def watching(self, uri: str, vm_name: str, callback: EventCallback) -> Iterator[None]:
        remove = self.watch(uri, vm_name, callback)
        try:
            yield
        finally:
            remove()

    def close(self) -> None:
        self._open = False
        self._listeners.clear()
        self._watchers.clear()


def _discard(items: list[EventCallback], item: EventCallback) -> None:
    with contextlib.suppress(ValueError):
        items.remove(item)


class _Changes:
    """A watcher that only remembers that something happened (for state waits)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def __call__(self, _event: DomainEvent) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event.clear()
