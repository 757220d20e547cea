"""aiomqtt plumbing: cancellation that aiomqtt swallows, error mapping, leaked sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import aiomqtt

from asyncmigfra.transport.mqtt.messages import TransportError

_T = TypeVar("_T")


async def honour_cancel(call: Awaitable[_T]) -> _T:
    """Await one aiomqtt call, re-raising a cancellation that the call swallowed.

    aiomqtt waits for the broker's acknowledgement with ``asyncio.wait_for``, which in
    Python 3.11 returns the result and drops a cancellation that arrives as the
    acknowledgement does (CPython gh-86296, fixed in 3.12). The task then runs on as if never
    cancelled, e.g. an agent's server loop that its shutdown just cancelled waits forever. So
    a cancel request that is still pending after the call (``Task.cancelling()`` grew, and
    nothing uncancelled it) is raised here.
    """
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    result = await call
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError
    return result


@contextmanager
def map_mqtt_errors() -> Iterator[None]:
    try:
        yield
    except aiomqtt.MqttError as exc:
        raise TransportError(str(exc)) from exc


def close_orphaned_sockets(exc: BaseException) -> int:
    """Close the sockets a failed connect left behind; return how many were closed.

    paho-mqtt 2.x does not close its socket when the TLS handshake or the hostname check
    fails: the socket is only referenced by the frames in the exception's traceback and
    stays open until the cycle collector finds it (an agent retrying a bad certificate
    would hold one descriptor per attempt until then). This walks the exception chain
    (aiomqtt re-raises ``from None``, so the original is the ``__context__``) and closes
    every socket still held by those frames. Closing an already closed socket is a no-op.
    """
    closed = 0
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        tb = current.__traceback__
        while tb is not None:
            for value in list(tb.tb_frame.f_locals.values()):
                if isinstance(value, socket.socket) and value.fileno() != -1:
                    value.close()
                    closed += 1
            tb = tb.tb_next
    return closed
