"""``/metrics``: prometheus_client's own HTTP server, in a daemon thread of its own.

The server thread renders the exposition from the registry; the loop only sets values
(:mod:`.feed`). Rendering a scrape never runs on the loop, so a slow or hostile scraper cannot
stall tasks: the loop shares only the GIL with it (a scrape of a few hundred series takes a
few milliseconds of it, handed back every switch interval). An asyncio server would have to
render on the loop or hand the rendering to a thread anyway.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_wsgi_server

from asyncmigfra.errors import StartupError
from asyncmigfra.transport.metrics.feed import MetricsFeed, MetricsSink, Route, Vitals
from asyncmigfra.transport.metrics.series import Series
from asyncmigfra.wire.events import EventSink

__all__ = ["Metrics"]


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
                start_wsgi_server, port, host, self.series.registry
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
