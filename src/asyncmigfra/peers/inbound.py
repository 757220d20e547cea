"""Reserving a share of another host's inbound NIC: predicted evacuations of several hosts
onto shared destinations (protocol §3.7, *Several sources*).

An agent that schedules an evacuation by prediction divides its own NIC and each
destination's among its migrations (:mod:`asyncmigfra.tasks.shares`), but it does not see the
migrations other hosts send to the same destination: two sources that each give a hot guest
most of one destination's NIC both get half, and neither guest converges. So before it lets
its migrations into a destination use more, the source asks the destination's agent for that
share of its inbound NIC, the way the lane holds of a swap are asked
(:mod:`asyncmigfra.peers.lanes`):

* **request** (JSON, QoS 1) on ``fast/migfra/<dest>/inbound/<source>``: ``op`` (``reserve``,
  ``release``), ``request-id``, ``reservation-id``, ``source`` (the asking agent, which must
  be the topic's last level), with ``reserve`` also ``rate`` (bytes/s wanted, in all, for the
  source's migrations into the destination now), ``capacity`` (bytes/s the source takes the
  destination's inbound NIC to be; optional) and ``lease`` (s);
* **answer** on ``fast/migfra/<source>/inbound-response/<dest>``: ``request-id``, ``status``
  (``reserved``, ``released``, ``error``), with ``reserved`` the ``rate`` granted (bytes/s,
  decimal text), and ``details``.

The destination's agent keeps the reservations in memory and grants each what its NIC has
left beside the others': ``min(rate, capacity - the others' reservations)``. ``capacity`` is
what its back-end tells of its NIC (the ``fake``: ``nic-rate``); where it tells nothing
(libvirt), the smallest figure the asking source and the sources holding reservations told
(so no source can make the NIC larger than the others take it to be; one that makes it
smaller shrinks every grant, its own too). First come, first served: a source keeps its
share until it lowers or releases it, or its lease runs out without a renewal; what a
source asked for beyond its grant (at most the NIC) is kept free for it, in the order the
sources began to wait, when others ask for more (so one source's next migrations do not
take a share again and again while another's wait for it). But no source holds more than
its fair share for long while another waits: once another source has waited
:data:`HOLD` s for more, a source holding more than its max-min fair share of the NIC (the
sources' asks divided fairly) is granted no more than that share at its next request (its
renewal), and what it gave up goes to those waiting.
At most :data:`MAX_RESERVATIONS` reservations (:data:`MAX_PER_SOURCE` per source), and
:data:`MAX_REQUESTS` requests per :data:`REQUEST_WINDOW` s from one source (more are
dropped unanswered, logged once); more reservations are answered ``error``. A source that
gets no answer within :data:`ANSWER_WITHIN` s (no agent there, an old one) takes the
destination as uncoordinated for the rest of the evacuation and divides it as if it were
alone, as before this existed. The asking side: :mod:`asyncmigfra.peers.reserving`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal, cast

import structlog

from asyncmigfra.hypervisor.base import Hypervisor, KnowsLinkRate
from asyncmigfra.peers import exchange
from asyncmigfra.peers.bus import (
    JunkLog,
    MessageBus,
    PeerRefusal,
    PeerTopics,
    check_source,
    checked_op_and_id,
    read_request,
    shown,
    wire_number,
)

__all__ = [
    "ANSWER_WITHIN",
    "INBOUND_QOS",
    "LEASE",
    "MAX_RATE",
    "MAX_REQUEST_BYTES",
    "InboundRequest",
    "InboundServer",
    "inbound_topics",
    "parse_number",
    "parse_request",
]

log = structlog.stdlib.get_logger(__name__)

INBOUND_QOS = 1
#: s a reservation lives without a renewal (the source renews every third of it).
LEASE = 30.0
MIN_LEASE = 1.0
MAX_LEASE = 120.0
#: s another source waits before a source's share beyond its fair share is taken back.
HOLD = 60.0
#: Requests answered per source within :data:`REQUEST_WINDOW` s (a source asks a few
#: times per second at most: when its moves start and end, every 0.5 s while one waits).
MAX_REQUESTS = 100
REQUEST_WINDOW = 10.0
#: s a source waits for an answer before it takes the destination as uncoordinated.
ANSWER_WITHIN = 1.0
#: Reservations one agent keeps at once, and per asking agent.
MAX_RESERVATIONS = 256
MAX_PER_SOURCE = 16
#: Bytes/s a rate or capacity may be at most (10 TB/s): a larger one is junk.
MAX_RATE = 1e13
MAX_REQUEST_BYTES = 4096
MAX_KEYS = 16
MAX_VALUE_CHARS = 64
OPS = ("reserve", "release")


def inbound_topics(task_topic: str, hostname: str) -> PeerTopics | None:
    """This agent's inbound-reservation topics (``None``: ``hostname`` is not one level of
    the task topic)."""
    return PeerTopics.of(task_topic, hostname, "inbound")


def parse_number(value: object, what: str, rid: str, *, low: float, high: float) -> float:
    """A JSON number or decimal text, finite, moved into nothing: outside [low, high] it is
    refused."""
    number = wire_number(value)
    if number is None or not low <= number <= high:
        raise PeerRefusal(
            rid, f"{what} must be a number in [{low:g}, {high:g}], got {shown(value)}"
        )
    return number


@dataclass(frozen=True, slots=True)
class InboundRequest:
    """A checked request; its sender is the topic's."""

    op: Literal["reserve", "release"]
    request_id: str
    reservation_id: str
    #: bytes/s wanted (0 with ``release``).
    rate: float = 0.0
    #: bytes/s the source takes this host's inbound NIC to be (``None``: it does not know).
    capacity: float | None = None
    lease: float = LEASE


def parse_request(
    raw: bytes, sender: str, *, peers: Collection[str] | None = None
) -> InboundRequest:
    """A reservation request of agent ``sender`` (the topic's last level), checked.

    Raises:
        PeerRefusal: junk, or a sender not in ``peers`` (answerable when its ``request-id``
        could be read).
    """
    document, rid = read_request(
        raw, sender, limit=MAX_REQUEST_BYTES, max_keys=MAX_KEYS, peers=peers
    )
    for key, value in document.items():
        if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
            raise PeerRefusal(rid, f"{shown(key)} is longer than {MAX_VALUE_CHARS} characters")
    op, reservation = checked_op_and_id(document, rid, ops=OPS, id_key="reservation-id")
    check_source(document, sender, rid)
    if op == "release":
        return InboundRequest(op="release", request_id=rid, reservation_id=reservation)
    rate = parse_number(document.get("rate"), "rate", rid, low=0.0, high=MAX_RATE)
    capacity = document.get("capacity")
    lease = document.get("lease", LEASE)
    return InboundRequest(
        op=cast(Literal["reserve", "release"], op),
        request_id=rid,
        reservation_id=reservation,
        rate=rate,
        capacity=None
        if capacity is None
        else parse_number(capacity, "capacity", rid, low=1.0, high=MAX_RATE),
        lease=min(max(parse_number(lease, "lease", rid, low=1e-3, high=1e6), MIN_LEASE), MAX_LEASE),
    )


@dataclass(slots=True)
class _Reservation:
    #: bytes/s granted
    rate: float
    expiry: asyncio.TimerHandle | None = None
    #: bytes/s asked for beyond the grant, and since when (monotonic s) it waits for them
    shortfall: float = 0.0
    waiting: float | None = None
    #: bytes/s asked for (at most the NIC), and the NIC as its source takes it to be
    asked: float = 0.0
    capacity: float | None = None


def fair_shares(demands: Mapping[str, float], capacity: float) -> dict[str, float]:
    """``capacity`` divided max-min fairly among ``demands`` (each gets at most its own)."""
    out: dict[str, float] = {}
    left, waiting = capacity, sorted(demands.items(), key=lambda kv: kv[1])
    while waiting:
        even = max(0.0, left) / len(waiting)
        name, demand = waiting.pop(0)
        out[name] = min(demand, even)
        left -= out[name]
    return out


class InboundServer:
    """Answers other agents' requests for a share of this host's inbound NIC (see the
    module). ``peers``: the only agents served (``None``: every agent the broker lets
    publish on this agent's inbound topic)."""

    def __init__(
        self,
        *,
        bus: MessageBus,
        hostname: str,
        task_topic: str,
        hypervisor: Hypervisor | None = None,
        peers: Collection[str] | None = None,
    ) -> None:
        self._bus = bus
        self._hostname = hostname
        self._topics = inbound_topics(task_topic, hostname)
        self._hv: object = hypervisor
        self._peers = frozenset(peers) if peers is not None else None
        #: (source, reservation id) -> the reservation
        self._reservations: dict[tuple[str, str], _Reservation] = {}
        self._junk = JunkLog()
        #: source -> (start of its request window, requests in it)
        self._requests: dict[str, tuple[float, int]] = {}

    @property
    def reservations(self) -> dict[tuple[str, str], float]:
        """(source, reservation id) -> bytes/s granted, now."""
        return {key: r.rate for key, r in self._reservations.items()}

    async def serve(self) -> None:
        """Answer requests until cancelled."""
        try:
            await exchange.serve(
                self._bus,
                self._topics,
                self._answer,
                qos=INBOUND_QOS,
                event="inbound",
                junk=self._junk,
                answer_within=ANSWER_WITHIN,
                hostname=self._hostname,
            )
        finally:
            for reservation in self._reservations.values():
                if reservation.expiry is not None:
                    reservation.expiry.cancel()
            self._reservations.clear()

    def _flooding(self, sender: str) -> bool:
        """``sender`` sent more than :data:`MAX_REQUESTS` in this window (counted)."""
        now = time.monotonic()
        start, count = self._requests.get(sender, (now, 0))
        if now - start >= REQUEST_WINDOW:
            start, count = now, 0
        if len(self._requests) >= MAX_RESERVATIONS and sender not in self._requests:
            self._requests = {
                s: w for s, w in self._requests.items() if now - w[0] < REQUEST_WINDOW
            }
        self._requests[sender] = (start, count + 1)
        return count >= MAX_REQUESTS

    async def _answer(self, sender: str, raw: bytes) -> dict[str, str] | None:
        """The answer to ``sender``'s request ``raw`` (``None``: dropped; junk:
        :class:`PeerRefusal`)."""
        if self._flooding(sender):
            self._junk(
                "inbound.request_dropped",
                reason=f"more than {MAX_REQUESTS} requests in {REQUEST_WINDOW:g} s",
                sender=sender,
            )
            return None
        request = parse_request(raw, sender, peers=self._peers)
        answer = {"request-id": request.request_id}
        answer.update(self._decide(sender, request, await self._own_capacity()))
        return answer

    async def _own_capacity(self) -> float | None:
        """Bytes/s this host's NIC receives, if its back-end tells (else ``None``)."""
        hv = self._hv
        if not isinstance(hv, KnowsLinkRate):
            return None
        try:
            link = await hv.link_rate(self._hostname)
        except Exception as exc:  # noqa: BLE001 - unknown then; the asker's figure counts
            log.warning("inbound.capacity_unknown", error=str(exc))
            return None
        if link is None or not math.isfinite(link.incoming):
            return None
        return link.incoming

    def _decide(self, sender: str, request: InboundRequest, own: float | None) -> dict[str, str]:
        key = (sender, request.reservation_id)
        if request.op == "release":
            self._end(key)
            return {"status": "released"}
        if key not in self._reservations:
            if len(self._reservations) >= MAX_RESERVATIONS:
                return {"status": "error", "details": f"{MAX_RESERVATIONS} reservations here"}
            if sum(1 for s, _ in self._reservations if s == sender) >= MAX_PER_SOURCE:
                return {
                    "status": "error",
                    "details": f"{sender} has {MAX_PER_SOURCE} reservations here already",
                }
        reservation = self._reservations.setdefault(key, _Reservation(0.0))
        reservation.capacity = request.capacity
        capacity = self._capacity(own)
        if capacity is None:
            reservation.asked = granted = request.rate  # nothing known to divide
        else:
            reservation.asked = min(request.rate, capacity)
            granted = self._grant(key, reservation, capacity)
        reservation.rate = max(0.0, granted)
        if granted < reservation.asked:  # waits for the rest, in turn
            reservation.shortfall = reservation.asked - granted
            if reservation.waiting is None:
                reservation.waiting = time.monotonic()
        else:
            reservation.shortfall, reservation.waiting = 0.0, None
        if reservation.expiry is not None:
            reservation.expiry.cancel()
        loop = asyncio.get_running_loop()
        reservation.expiry = loop.call_later(request.lease, self._end, key, True)
        return {"status": "reserved", "rate": f"{reservation.rate:.0f}"}

    def _capacity(self, own: float | None) -> float | None:
        """Bytes/s of this host's inbound NIC to divide: the back-end's figure, else the
        smallest the sources holding reservations told (``None``: nobody knows)."""
        if own is not None:
            return own
        told = [r.capacity for r in self._reservations.values() if r.capacity is not None]
        return min(told, default=None)

    def _grant(self, key: tuple[str, str], reservation: _Reservation, capacity: float) -> float:
        """What ``key`` gets of ``capacity`` for its ``asked`` (see the module)."""
        others = {k: r for k, r in self._reservations.items() if k != key}
        if reservation.asked <= reservation.rate:
            granted = reservation.asked  # less, or as much: always (a renewal, a release)
        else:  # more: what is left beside the others, and those that waited longer for more
            ahead = sum(
                r.shortfall
                for r in others.values()
                if r.waiting is not None
                and (reservation.waiting is None or r.waiting < reservation.waiting)
            )
            left = capacity - sum(min(r.rate, capacity) for r in others.values()) - ahead
            granted = max(reservation.rate, min(reservation.asked, left))
        now = time.monotonic()
        starved = any(
            k[0] != key[0] and r.waiting is not None and now - r.waiting >= HOLD
            for k, r in others.items()
        )
        if starved:  # another source waited long enough: no more than the fair share
            demands: dict[str, float] = {}
            for (source, _), r in self._reservations.items():
                demands[source] = demands.get(source, 0.0) + max(r.asked, r.rate)
            share = fair_shares(demands, capacity)[key[0]]
            own_others = sum(r.rate for k, r in others.items() if k[0] == key[0])
            granted = min(granted, max(0.0, share - own_others))
        return min(granted, capacity)

    def _end(self, key: tuple[str, str], expired: bool = False) -> None:
        reservation = self._reservations.pop(key, None)
        if reservation is None:
            return
        if reservation.expiry is not None:
            reservation.expiry.cancel()
        if expired:
            log.warning("inbound.expired", source=key[0], rate=reservation.rate)
