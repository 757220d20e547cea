"""One request, one answer: how agents ask each other and answer (destination hooks in
:mod:`asyncmigfra.peers.userhooks`, lane holds in :mod:`asyncmigfra.peers.lanes`, inbound
reservations in :mod:`asyncmigfra.peers.inbound`), over a
:class:`~asyncmigfra.peers.bus.MessageBus`.

* :func:`request` publishes one request on ``<prefix>/<dest>/<kind>/<source>`` and waits, with
  a bound, for the answer with its ``request-id`` on ``<prefix>/<source>/<kind>-response/<dest>``;
* :func:`serve` subscribes to ``<prefix>/<host>/<kind>/+``, takes each request's sender from
  the topic and sends the handler's answer back to that sender (:func:`answer_of`), or an
  ``error`` with the reason of the handler's :class:`~asyncmigfra.peers.bus.PeerRefusal`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import structlog

from asyncmigfra.peers.bus import JunkLog, MessageBus, PeerRefusal, PeerTopics, shown

__all__ = ["Handler", "answer_of", "request", "serve"]

log = structlog.stdlib.get_logger(__name__)

A = TypeVar("A")


def answer_of(request_id: str, status: str, details: str, *, hostname: str) -> dict[str, str]:
    """The answer to another agent's request ``request_id``: its ``status`` and, when there
    are any, ``details`` that say which agent (``hostname``) answers."""
    answer = {"request-id": request_id, "status": status}
    if details:
        answer["details"] = f"on {hostname}: {details}"
    return answer


async def request(
    bus: MessageBus,
    message: Mapping[str, str],
    *,
    to: str,
    answers: str,
    qos: int,
    limit: float,
    read: Callable[[str, bytes, str], A | None],
    queue: asyncio.Queue[tuple[str, bytes]] | None = None,
) -> A:
    """Publish ``message`` (which holds its ``request-id``) on ``to`` and return the first
    answer to it that arrives on ``answers`` within ``limit`` s.

    ``read(topic, payload, request_id)`` reads what arrives: the answer, or ``None`` to skip
    it (an answer to another request, junk it logged); whatever it raises is raised.
    ``queue``: an open subscription to ``answers`` (several requests in turn, e.g. a hold and
    its renewals); without one, ``answers`` is subscribed to for this request only, within
    the bound.

    Raises:
        TimeoutError: no answer within ``limit`` s.
        Exception: what the bus raises (a broker problem, e.g. ``TransportError``).
    """
    payload = json.dumps(dict(message)).encode()
    request_id = message["request-id"]
    async with asyncio.timeout(limit):
        if queue is not None:
            await bus.send(to, payload, qos)
            return await _first_answer(queue, request_id, read)
        async with bus.subscription(answers, qos) as own:
            await bus.send(to, payload, qos)
            return await _first_answer(own, request_id, read)


async def _first_answer(
    queue: asyncio.Queue[tuple[str, bytes]],
    request_id: str,
    read: Callable[[str, bytes, str], A | None],
) -> A:
    while True:
        topic, raw = await queue.get()
        answer = read(topic, raw, request_id)
        if answer is not None:
            return answer


#: What :func:`serve` calls for each request: ``handle(sender, payload)`` gives the answer to
#: send back to the sender, or ``None`` for none, or raises :class:`PeerRefusal`.
Handler = Callable[[str, bytes], Awaitable[Mapping[str, str] | None]]


async def serve(
    bus: MessageBus,
    topics: PeerTopics | None,
    handle: Handler,
    *,
    qos: int,
    event: str,
    junk: JunkLog,
    slots: int | None = None,
    answer_within: float | None = None,
    hostname: str | None = None,
) -> None:
    """Answer other agents' requests on ``topics`` until cancelled.

    Takes each request's sender from its topic (a message on any other topic is junk, logged
    once as ``<event>.request_ignored``), calls ``handle(sender, payload)`` and sends its
    answer to the sender. A :class:`PeerRefusal` that ``handle`` raises is logged once as
    ``<event>.request_refused`` and answered ``error`` with its reason (when it has a
    ``request-id``). ``slots``: requests handled at once, each in a task of its own
    (a flood waits for a slot, it does not pile up; the tasks are cancelled on the way out);
    ``None``: one after the other. ``answer_within``: bound on sending an answer. A broker
    problem never ends the loop: it is logged and the subscription made again a second later.
    ``topics`` ``None`` (this agent's ``hostname`` is not one level of its task topic):
    logged as ``<event>.not_serving``, nothing served.
    """
    not_serving, serving, ignored, refused, failed, answer_failed, serve_failed = (
        f"{event}.{what}"
        for what in (
            "not_serving",
            "serving",
            "request_ignored",
            "request_refused",
            "serving_failed",
            "answer_failed",
            "serve_failed",
        )
    )
    if topics is None:
        log.error(
            not_serving,
            hostname=hostname,
            reason="the host name is not exactly one level of the task topic",
        )
        return
    running: set[asyncio.Task[None]] = set()
    free = asyncio.Semaphore(slots) if slots is not None else None

    async def answer(sender: str, raw: bytes) -> None:
        try:
            reply = await handle(sender, raw)
        except PeerRefusal as refusal:
            junk(refused, reason=refusal.reason, sender=sender)
            if refusal.request_id is None:
                return
            reply = answer_of(refusal.request_id, "error", refusal.reason, hostname=topics.hostname)
        if reply is None:
            return
        reply_to = topics.answer_to(sender)
        assert reply_to is not None  # the sender is a peer name
        payload = json.dumps(dict(reply)).encode()
        if answer_within is None:
            await bus.send(reply_to, payload, qos)
            return
        try:
            async with asyncio.timeout(answer_within):  # the peer waits no longer than that
                await bus.send(reply_to, payload, qos)
        except Exception as exc:  # noqa: BLE001 - the peer asks again or gives up
            log.warning(answer_failed, error=str(exc))

    def done(task: asyncio.Task[None]) -> None:
        running.discard(task)
        assert free is not None
        free.release()
        if not task.cancelled() and task.exception() is not None:
            log.error(serve_failed, error=str(task.exception()))

    try:
        while True:
            try:
                async with bus.subscription(topics.requests, qos) as queue:
                    log.info(serving, topic=topics.requests)
                    while True:
                        topic, raw = await queue.get()
                        sender = topics.sender(topic)
                        if sender is None:
                            junk(
                                ignored,
                                reason="not a request topic",
                                topic=shown(topic),
                            )
                            continue
                        if free is None:
                            await answer(sender, raw)
                            continue
                        await free.acquire()
                        task = asyncio.create_task(answer(sender, raw))
                        running.add(task)
                        task.add_done_callback(done)
            except Exception as exc:  # noqa: BLE001 - never take the agent down; retry
                log.error(failed, error=str(exc))  # noqa: TRY400
                await asyncio.sleep(1.0)
    finally:
        for task in list(running):
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
