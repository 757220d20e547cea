"""Outgoing messages: one queue, handed to the MQTT session in order, nothing terminal dropped.

Results and events are queued here without blocking the code that produced them. The
publisher hands them to the MQTT client's session in queue order; the session keeps every
QoS 1 message until the broker acknowledged it and sends it again after a reconnect, so no
per-message task or wait is needed (see ``MqttTransport.publish_nowait``). While connected and
nothing waits in the queue, a message is handed over at once by :meth:`Publisher.put_nowait`
itself (in order: nothing is ahead of it), without waking the publisher's task. Before the
first connection, and behind anything queued, messages wait in the queue. Progress events
(the only droppable kind) are dropped when the backlog is large: a newer one follows, and
the last one carries ``percent``.

A message larger than the transport's ``max_payload`` (``limits.max-message-size``) is never
handed over: a broker limiting messages drops it, or at MQTT 5 disconnects the agent for it,
and the session sent it again after every reconnect, ahead of everything queued behind it.
It is dropped here with one ``publish.too_large`` log line: events are not promised, and
results reach this point bounded already (``render_bounded_result`` in ``app``), so one
refused here is a result of an earlier run whose journal owed it under a larger limit.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from asyncmigfra.transport.mqtt import (
    Delivery,
    MqttTransport,
    Outgoing,
    TransportError,
)
from asyncmigfra.wire.rendering import render_event

__all__ = ["EventPublisher", "Publisher"]

log = structlog.stdlib.get_logger(__name__)


@dataclass(slots=True)
class _Item:
    msg: Outgoing
    #: Called once the broker acknowledged the message (the journal marks results delivered).
    on_delivered: Callable[[], None] | None = None


class Publisher:
    """Owns the outgoing queue; :meth:`run` is its one long-lived task."""

    def __init__(self, transport: MqttTransport, *, max_backlog: int = 10_000) -> None:
        self._transport = transport
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._unacked: deque[tuple[Delivery, Callable[[], None] | None]] = deque()
        self._max_backlog = max_backlog
        #: Reports acknowledgements of messages handed over directly while the queue is idle.
        self._prune_timer: asyncio.TimerHandle | None = None
        #: The task holds a message it took from the queue and has not handed over yet
        #: (it waits for the connection): later messages queue up behind it.
        self._holding = False
        self.published = 0
        #: Progress events dropped under a large backlog.
        self.dropped = 0
        #: Messages refused for their size (never handed to the session).
        self.too_large = 0

    def put_nowait(
        self,
        msg: Outgoing,
        *,
        droppable: bool = False,
        on_delivered: Callable[[], None] | None = None,
    ) -> None:
        if droppable and self._queue.qsize() >= self._max_backlog:
            self.dropped += 1
            return
        if self._refused(msg):
            return
        if self._queue.empty() and not self._holding and self._transport.is_connected:
            try:
                delivery = self._transport.publish_nowait(msg)
            except TransportError:
                pass  # the publisher's task falls back to a waiting publish
            else:
                self._handed_over(delivery, on_delivered)
                return
        self._queue.put_nowait(_Item(msg, on_delivered))

    def _refused(self, msg: Outgoing) -> bool:
        """Whether ``msg`` is over the transport's size limit: then logged and dropped."""
        limit = self._transport.max_payload
        if limit is None or len(msg.payload) <= limit:
            return False
        self.too_large += 1
        log.error(
            "publish.too_large",
            topic=msg.topic,
            size=len(msg.payload),
            limit=limit,
            hint="dropped: larger than limits.max-message-size (the broker's message_size_limit)",
        )
        return True

    def _handed_over(self, delivery: Delivery, on_delivered: Callable[[], None] | None) -> None:
        self.published += 1
        self._unacked.append((delivery, on_delivered))
        if len(self._unacked) > 256:
            self._prune()
        if self._prune_timer is None:
            # Acknowledgements are reported in passing while messages flow; this reports
            # them when the flow stops (the task may sleep in ``queue.get()`` meanwhile).
            self._prune_timer = asyncio.get_running_loop().call_later(0.25, self._prune_later)

    def _prune_later(self) -> None:
        self._prune_timer = None
        self._prune()
        if self._unacked:
            self._prune_timer = asyncio.get_running_loop().call_later(0.25, self._prune_later)

    async def run(self) -> None:
        """Hand queued messages to the MQTT session in order, as fast as they come.

        Once the transport has connected once, messages go straight into the client's
        session (``publish_nowait``): the session itself resends them after reconnects, so
        nothing is awaited per message. Before the first connection they wait here.
        """
        queue = self._queue
        while True:
            if not queue.empty():
                item = queue.get_nowait()  # the common case under load: no waiting at all
            elif self._unacked:
                self._prune()
                try:
                    # Wake up now and then to report acknowledgements while idle.
                    async with asyncio.timeout(0.25):
                        item = await queue.get()
                except TimeoutError:
                    continue
            else:
                item = await queue.get()
            self._holding = True
            try:
                await self._hand_over(item)
            finally:
                self._holding = False

    async def _hand_over(self, item: _Item) -> None:
        if not self._transport.is_connected:
            await self._transport.wait_connected()
        try:
            delivery = self._transport.publish_nowait(item.msg)
        except TransportError as exc:
            log.warning("mqtt.publish_fallback", error=str(exc))
            await self._transport.publish(item.msg)
            self.published += 1
            if item.on_delivered is not None:
                item.on_delivered()
            return
        self._handed_over(delivery, item.on_delivered)

    def _prune(self) -> None:
        while self._unacked and self._unacked[0][0].done:
            _, on_delivered = self._unacked.popleft()
            if on_delivered is not None:
                on_delivered()

    @property
    def backlog(self) -> int:
        self._prune()
        return self._queue.qsize() + len(self._unacked)

    async def wait_idle(self) -> None:
        """Return when everything queued so far has been acknowledged by the broker."""
        while True:
            self._prune()
            if self._queue.empty() and not self._unacked:
                return
            await asyncio.sleep(0.01)


class EventPublisher:
    """The :class:`~asyncmigfra.wire.events.EventSink` that renders events onto the event topic."""

    def __init__(self, publisher: Publisher, *, topic: str) -> None:
        self._publisher = publisher
        self._topic = topic

    def emit(self, event: Mapping[str, object], *, terminal: bool = False, qos: int = 1) -> None:
        self._publisher.put_nowait(
            Outgoing(self._topic, render_event(event), qos=qos),
            droppable=not terminal and event.get("event") == "progress",
        )
