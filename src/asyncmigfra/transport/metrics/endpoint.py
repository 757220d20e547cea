"""``/metrics``: prometheus_client's WSGI application, served by a bounded WSGI server in
daemon threads of its own.

The server thread renders the exposition from the registry; the loop only sets values
(:mod:`.feed`). Rendering a scrape never runs on the loop, so a slow or hostile scraper cannot
stall tasks: the loop shares only the GIL with it (a scrape of a few hundred series takes a
few milliseconds of it, handed back every switch interval). An asyncio server would have to
render on the loop or hand the rendering to a thread anyway.

prometheus_client's own ``start_wsgi_server`` starts a thread per connection and waits for a
request without a timeout: anyone who reaches the port could hold a thread and a file
descriptor per idle connection until the agent runs out of them (its libvirt and MQTT
connections and its journal need descriptors too). So the server here serves at most
:data:`MAX_CONNECTIONS` connections at once (one more is closed at once: Prometheus counts a
failed scrape and tries again at its next interval), and a connection that sends no request
or reads no answer for :data:`CONNECTION_TIMEOUT` s is closed.
"""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
from collections.abc import Callable
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app

from asyncmigfra.errors import StartupError
from asyncmigfra.transport.metrics.feed import MetricsFeed, MetricsSink, Route, Vitals
from asyncmigfra.transport.metrics.series import Series
from asyncmigfra.wire.events import EventSink

__all__ = ["CONNECTION_TIMEOUT", "MAX_CONNECTIONS", "Metrics"]

#: Connections served at once; one more is closed at once.
MAX_CONNECTIONS: Final = 8
#: s a connection may take to send its request, and each write of the answer may wait for
#: the scraper to read (Prometheus' own scrape timeout is 10 s by default).
CONNECTION_TIMEOUT = 10.0


class _Handler(WSGIRequestHandler):
    """A request, with a socket timeout, not logged (every scrape would be a line)."""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(CONNECTION_TIMEOUT)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per connection, :data:`MAX_CONNECTIONS` at most."""

    daemon_threads = True
    #: Connections the kernel queues until they are accepted (and served or closed).
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # all slots taken: closed at once
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A scraper that timed out or hung up: nothing to report (the default prints a
        traceback to stderr)."""


def _serve(host: str, port: int, app: Any) -> tuple[WSGIServer, threading.Thread]:
    """Bind ``host:port`` (IPv4 or IPv6, as the name resolves) and serve ``app`` from a
    daemon thread."""
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server = _Server((str(sockaddr[0]), port), family)
    server.set_app(app)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return server, thread


class Metrics:
    """The series, their feed and their endpoint, as the agent uses them."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        route: Route,
        name: str,
        version: str,
        hypervisor: str,
    ) -> None:
        self.address = address
        self.series = Series()
        self.feed = MetricsFeed(
            self.series, route=route, name=name, version=version, hypervisor=hypervisor
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def tee(self, sink: EventSink) -> EventSink:
        """``sink`` with the feed behind it: every event published is observed."""
        return MetricsSink(sink, self.feed)

    @property
    def port(self) -> int:
        """The port served (``0`` before :meth:`start`)."""
        return int(self._server.server_port) if self._server is not None else 0

    async def start(self) -> None:
        """Listen (name resolution and bind in a worker thread); a failure is a
        :class:`StartupError` naming ``metrics.listen``."""
        host, port = self.address
        try:
            self._server, self._thread = await asyncio.to_thread(
                _serve, host, port, make_wsgi_app(self.series.registry)
            )
        except OSError as exc:
            raise StartupError(f"metrics.listen {host}:{port}: cannot listen: {exc}") from None

    async def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        await asyncio.to_thread(_shut, server, thread)

    async def run(self, vitals: Callable[[], Vitals]) -> None:
        """The sampler (:meth:`MetricsFeed.run`), for the agent's TaskGroup."""
        await self.feed.run(vitals)


def _shut(server: WSGIServer, thread: threading.Thread) -> None:
    server.shutdown()  # returns once serve_forever noticed (its poll interval: 0.5 s)
    server.server_close()
    thread.join(timeout=5)
