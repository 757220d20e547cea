"""Lanes: one FIFO queue per VM, so work on the same VM never overlaps (protocol §7.2)."""

from __future__ import annotations

import asyncio
from collections import deque


class _Ticket:
    __slots__ = ("granted", "key", "lanes")

    def __init__(self, lanes: _Lanes, key: str) -> None:
        self.lanes = lanes
        self.key = key
        self.granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def acquire(self) -> None:
        await asyncio.shield(self.granted)

    def release(self) -> None:
        self.lanes.release(self)


class _Lanes:
    """One FIFO queue of tickets per VM; the ticket at the front holds the VM."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[_Ticket]] = {}

    def reserve(self, key: str) -> _Ticket:
        ticket = _Ticket(self, key)
        queue = self._queues.setdefault(key, deque())
        queue.append(ticket)
        if len(queue) == 1:
            ticket.granted.set_result(None)
        return ticket

    def release(self, ticket: _Ticket) -> None:
        queue = self._queues.get(ticket.key)
        if queue is None or ticket not in queue:
            return
        was_front = queue[0] is ticket
        queue.remove(ticket)
        if not queue:
            del self._queues[ticket.key]
        elif was_front and not queue[0].granted.done():
            queue[0].granted.set_result(None)

    def busy(self, key: str) -> bool:
        return key in self._queues
