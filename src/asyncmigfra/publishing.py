"""Outgoing messages: one queue, pipelined publishes, nothing terminal ever dropped.

Results and events are queued here without blocking the code that produced them. The
publisher sends them in queue order (paho writes them to the socket in the order
``publish`` is called) while up to ``max_in_flight`` acknowledgements are outstanding, so a
slow broker round trip does not serialise the agent. While the broker is unreachable the
queue simply grows; :meth:`MqttTransport.publish` retries each message after reconnecting.
Progress events (the only droppable kind) are dropped when the backlog is large: a newer
one will follow, and ``percent`` is carried by the last one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from asyncmigfra.mqtt import MqttTransport, Outgoing
from asyncmigfra.rendering import render_event

__all__ = ["EventPublisher", "Publisher"]

log = structlog.stdlib.get_logger(__name__)


@dataclass(slots=True)
class _Item:
    msg: Outgoing
    response_topic: str | None = None


class Publisher:
    """Owns the outgoing queue; :meth:`run` is its one long-lived task."""

    def __init__(
        self, transport: MqttTransport, *, max_in_flight: int = 256, max_backlog: int = 10_000
    ) -> None:
        self._transport = transport
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._max_backlog = max_backlog
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.published = 0
        self.dropped = 0

    def put_nowait(
        self, msg: Outgoing, *, droppable: bool = False, response_topic: str | None = None
    ) -> None:
        if droppable and self._queue.qsize() >= self._max_backlog:
            self.dropped += 1
            return
        self._idle.clear()
        self._queue.put_nowait(_Item(msg, response_topic))

    @property
    def backlog(self) -> int:
        return self._queue.qsize() + self._in_flight

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            while True:
                item = await self._queue.get()
                await self._slots.acquire()
                self._in_flight += 1
                tg.create_task(self._send(item), name="asyncmigfra.publish")

    async def _send(self, item: _Item) -> None:
        try:
            await self._transport.publish(item.msg, response_topic=item.response_topic)
            self.published += 1
        finally:
            self._in_flight -= 1
            self._slots.release()
            if self._in_flight == 0 and self._queue.empty():
                self._idle.set()

    async def wait_idle(self) -> None:
        """Return when everything queued so far has been acknowledged by the broker."""
        await self._idle.wait()


class EventPublisher:
    """The :class:`~asyncmigfra.events.EventSink` that renders events onto the event topic."""

    def __init__(self, publisher: Publisher, *, topic: str) -> None:
        self._publisher = publisher
        self._topic = topic

    def emit(self, event: Mapping[str, object], *, terminal: bool = False, qos: int = 1) -> None:
        self._publisher.put_nowait(
            Outgoing(self._topic, render_event(event), qos=qos),
            droppable=not terminal and event.get("event") == "progress",
        )
