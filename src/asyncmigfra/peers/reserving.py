"""The asking side of the inbound-NIC reservations (:mod:`asyncmigfra.peers.inbound`, protocol
§3.7, *Several sources*): one predicted evacuation's reservations of its destinations'
inbound NICs, asked of each destination's agent, renewed while it runs, released when it
ends; what an answer may say, and what of it is believed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import uuid
from collections.abc import Collection, Mapping

import structlog

from asyncmigfra.peers import exchange
from asyncmigfra.peers.bus import JunkLog, MessageBus, PeerRefusal, json_map, safe_text, shown
from asyncmigfra.peers.inbound import (
    ANSWER_WITHIN,
    INBOUND_QOS,
    LEASE,
    MAX_RATE,
    MAX_REQUEST_BYTES,
    inbound_topics,
    parse_number,
)

__all__ = ["InboundReservations"]

log = structlog.stdlib.get_logger(__name__)

MAX_DETAILS_CHARS = 300
#: Bytes/s a reservation may differ from what is wanted before it is asked again (1 MiB/s).
_STEP = 1024.0 * 1024.0
STATUSES = frozenset({"reserved", "released", "error"})

_ANSWER_JUNK = JunkLog()


def _read_answer(
    topic: str, raw: bytes, answers: str, request_id: str
) -> tuple[str, float, str] | None:
    """``(status, rate, details)`` of a well-formed answer to ``request_id`` on ``answers``;
    ``None`` otherwise (other answers: skipped; junk: logged once)."""
    if topic != answers:
        return None
    document = json_map(raw, MAX_REQUEST_BYTES)
    if document is None or document.get("request-id") != request_id:
        return None
    status, details = document.get("status"), document.get("details", "")
    rate: float = 0.0
    try:
        if status == "reserved":
            rate = parse_number(document.get("rate"), "rate", request_id, low=0.0, high=MAX_RATE)
    except PeerRefusal as refusal:
        _ANSWER_JUNK("inbound.answer_ignored", reason=refusal.reason, topic=topic)
        return None
    if status not in STATUSES or not isinstance(details, str):
        _ANSWER_JUNK("inbound.answer_ignored", reason=f"bad status {shown(status)}", topic=topic)
        return None
    assert isinstance(status, str)
    return status, rate, safe_text(details, MAX_DETAILS_CHARS)


class InboundReservations:
    """One evacuation's reservations of its destinations' inbound NICs (see the module):
    an async context manager; on the way out every reservation is released (bounded) and
    the renewals stop. ``task_id``: the evacuation's task id, which names its reservation
    (the same after a restart of this agent; none: a fresh name)."""

    def __init__(
        self,
        bus: MessageBus | None,
        *,
        task_topic: str,
        hostname: str,
        lease: float = LEASE,
        answer_within: float = ANSWER_WITHIN,
        task_id: str | None = None,
    ) -> None:
        self._bus = bus
        self._topics = inbound_topics(task_topic, hostname)
        self._hostname = hostname
        self._lease = lease
        self._within = answer_within
        # One reservation per evacuation task: after a restart of this agent, the task's
        # evacuation (run again or reconciled) renews the reservation it held, instead of
        # holding a second one beside it until the first one's lease ends.
        self._id = (
            hashlib.sha256(f"{hostname}\0{task_id}".encode()).hexdigest()[:32]
            if task_id
            else uuid.uuid4().hex
        )
        #: destination -> bytes/s granted now
        self.held: dict[str, float] = {}
        #: destination -> (bytes/s asked, the capacity told) of the reservations held
        self._asked: dict[str, tuple[float, float | None]] = {}
        #: destinations that do not coordinate (no answer, an error), and why
        self.uncoordinated: dict[str, str] = {}
        #: destinations whose agent answered
        self._answered: set[str] = set()
        self._queues: dict[str, asyncio.Queue[tuple[str, bytes]]] = {}
        self._stack = contextlib.AsyncExitStack()
        self._renewing: asyncio.Task[None] | None = None

    async def __aenter__(self) -> InboundReservations:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            await asyncio.wait({self._renewing})
        try:
            await asyncio.gather(*(self._release(d) for d in list(self.held)))
        finally:
            await self._stack.aclose()

    def coordinated(self, destination: str) -> bool:
        return destination not in self.uncoordinated

    @property
    def short(self) -> bool:
        """Some destination granted less than was asked (worth asking again soon: others
        give shares back as their migrations end)."""
        return any(rate > self.held.get(d, 0.0) + _STEP for d, (rate, _) in self._asked.items())

    async def reserve(self, wanted: Mapping[str, float], capacities: Mapping[str, float]) -> None:
        """Ask each destination of ``wanted`` (bytes/s) whose reservation differs from it
        (``capacities``: what this side takes each inbound NIC to be), all at once; the
        grants go to :attr:`held` (0 wanted: released)."""
        asks = [
            d
            for d, rate in wanted.items()
            if self.coordinated(d)
            and (d in self.held or rate > 0)
            and abs(self.held.get(d, -1.0) - rate) > _STEP
        ]
        await asyncio.gather(
            *(
                self._release(d)
                if wanted[d] <= 0
                else self._reserve(d, wanted[d], capacities.get(d))
                for d in asks
            )
        )
        if self._renewing is None and self.held:
            self._renewing = asyncio.create_task(self._renew(), name="asyncmigfra.inbound-renew")

    async def probe(self, destinations: Collection[str]) -> None:
        """Find out at once which destinations have an agent that answers (a ``release`` of
        nothing), so that none makes a move wait for its answer later."""
        await asyncio.gather(*(self._ask(d, {"op": "release"}) for d in set(destinations)))

    async def _reserve(self, dest: str, rate: float, capacity: float | None) -> None:
        self._asked[dest] = (rate, capacity)
        request = {"op": "reserve", "rate": f"{rate:.0f}", "lease": f"{self._lease:g}"}
        if capacity is not None and math.isfinite(capacity):
            request["capacity"] = f"{capacity:.0f}"
        answer = await self._ask(dest, request)
        if answer is None:
            return
        status, granted, details = answer
        if status == "reserved":
            self.held[dest] = min(granted, rate)  # more than asked is no more use
        else:
            self.give_up(dest, details or status)

    async def _release(self, dest: str) -> None:
        self._asked.pop(dest, None)
        if self.held.pop(dest, None) is not None:
            await self._ask(dest, {"op": "release"})

    async def _ask(self, dest: str, request: dict[str, str]) -> tuple[str, float, str] | None:
        """One request to ``dest``'s agent; ``None`` without a well-formed answer in time:
        then the destination is given up, unless its agent answered before (it restarts, or
        the broker does: what it granted stands, and the next renewal asks again)."""
        topics, bus = self._topics, self._bus
        target = topics.request_to(dest) if topics is not None else None
        answers = topics.answers_from(dest) if topics is not None else None
        if bus is None or target is None or answers is None:
            self.give_up(dest, "no MQTT connection or peer topic")
            return None
        try:
            queue = self._queues.get(dest)
            if queue is None:
                queue = await self._stack.enter_async_context(
                    bus.subscription(answers, INBOUND_QOS)
                )
                self._queues[dest] = queue
            body = {
                **request,
                "request-id": uuid.uuid4().hex,
                "reservation-id": self._id,
                "source": self._hostname,
            }
            answer = await exchange.request(
                bus,
                body,
                to=target,
                answers=answers,
                qos=INBOUND_QOS,
                limit=self._within,
                read=lambda where, raw, rid: _read_answer(where, raw, answers, rid),
                queue=queue,
            )
        except TimeoutError:
            self._unanswered(dest, f"no answer within {self._within:g} s")
        except Exception as exc:  # noqa: BLE001 - e.g. TransportError: uncoordinated
            self._unanswered(dest, f"MQTT: {exc}")
        else:
            self._answered.add(dest)
            return answer
        return None

    def _unanswered(self, dest: str, why: str) -> None:
        if dest in self._answered:
            _ANSWER_JUNK("inbound.unanswered", reason=why, topic=dest)
        else:
            self.give_up(dest, why)

    def give_up(self, dest: str, why: str) -> None:
        """Take ``dest`` as uncoordinated from now on (its reservation is left to its
        lease)."""
        self.held.pop(dest, None)
        self._asked.pop(dest, None)
        if dest not in self.uncoordinated:
            self.uncoordinated[dest] = why
            log.warning("inbound.uncoordinated", peer=dest, error=why)

    async def _renew(self) -> None:
        """Renew every reservation every third of the lease while the evacuation runs."""
        while True:
            await asyncio.sleep(self._lease / 3)
            await asyncio.gather(
                *(self._reserve(d, rate, cap) for d, (rate, cap) in list(self._asked.items()))
            )
