"""aiomqtt plumbing: cancellation that aiomqtt swallows, error mapping, leaked sockets, and
packets written at once."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import aiomqtt
import structlog

from asyncmigfra.transport.mqtt.messages import TransportError

_T = TypeVar("_T")

log = structlog.stdlib.get_logger("asyncmigfra.mqtt")


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


def write_directly(client: aiomqtt.Client) -> bool:
    """Let ``client`` write what is queued on the event loop's thread in the next loop
    iteration, without asking the loop to watch its socket first.

    aiomqtt has a packet written through the loop: paho says it wants to write, aiomqtt
    schedules ``add_writer`` with ``call_soon_threadsafe`` (a write to the loop's wake-up
    pipe, since paho may ask from the thread that connects), the next iteration registers
    the socket, and the one after finds it writable and writes. Asked on the loop's own
    thread, this schedules paho's ``loop_write`` with ``call_soon`` instead: everything
    queued until then goes out together (one burst per iteration, as before), two loop
    iterations, a pipe write and two ``epoll_ctl`` sooner. The socket is non-blocking: what
    does not fit goes through aiomqtt's writer as before, and so does every request from
    another thread. Call it on the loop's thread. ``False``: this aiomqtt has no paho
    client to reach (nothing done).
    """
    paho_client: Any = getattr(client, "_client", None)
    register = getattr(paho_client, "on_socket_register_write", None)
    if paho_client is None or register is None:
        return False
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()

    def flush(pclient: Any, userdata: Any, sock: Any) -> None:
        if pclient.socket() is not sock:
            return  # closed meanwhile: the next connection starts afresh
        try:
            pclient.loop_write()
        except Exception as exc:  # noqa: BLE001 - paho reports a lost connection itself
            log.warning("mqtt.write_failed", error=str(exc))
        # paho asks again only once it stopped wanting to write: what did not fit (a full
        # socket) goes out through aiomqtt's writer.
        if pclient.want_write() and pclient.socket() is sock:
            register(pclient, userdata, sock)

    def register_write(pclient: Any, userdata: Any, sock: Any) -> None:
        if threading.get_ident() == loop_thread:
            loop.call_soon(flush, pclient, userdata, sock)
        else:
            register(pclient, userdata, sock)

    paho_client.on_socket_register_write = register_write
    return True
