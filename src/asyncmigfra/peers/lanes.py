"""Holding a VM's lane on another agent: a swap's coordination with the destination's agent.

Per-VM lanes (docs/protocol.md §7.2) order the work on a VM within one agent. A swap moves a
second VM that belongs to the *destination's* agent, so without more that agent could stop or
migrate VM 2 in the middle of the swap. Here the swapping agent asks the destination's agent
to hold VM 2's lane for it, the way Nova refuses a second operation on an instance whose
``task_state`` is set:

* **request** (JSON, QoS 1) on the destination's lane topic *with the asking agent's name as
  the last level* (``fast/migfra/<dest>/lane/<source>``,
  :class:`asyncmigfra.peers.bus.PeerTopics`):
  ``op`` (``hold``, ``renew``, ``release``), ``request-id``, ``hold-id``, ``vm-name``,
  ``source`` (the asking agent's name, which must be the topic's) and, with ``hold`` and
  ``renew``, ``lease`` (s);
* **answer** on ``fast/migfra/<source>/lane-response/<dest>``: ``request-id``, ``status``
  (``held``, ``busy``, ``renewed``, ``released``, ``error``) and ``details``.

The broker's ACL lets only agent S publish a topic whose last level is S
(``config/mosquitto.acl.example``), so the serving agent knows who asks from the topic alone,
and the asking agent hears answers only from the agent it asked. A hold belongs to the agent
that took it: only that agent renews or releases it. Every field is checked
(:func:`parse_request`); junk is logged once and answered ``error`` when it has a readable
``request-id``, else ignored.

The destination's agent grants a hold only when VM 2's lane is empty (no task of its own runs
or waits on VM 2), it is not shutting down, the asking agent has fewer than
:data:`MAX_HOLDS_PER_SOURCE` holds there and all agents together fewer than :data:`MAX_HOLDS`;
otherwise it answers ``busy`` and the swap is refused before anything moves. A granted hold
sits at the front of VM 2's lane: a task that arrives for VM 2 meanwhile queues behind it and
runs after the swap. The hold ends with a ``release``, or when its lease runs out without a
``renew`` (the swapping agent died), or when the holding agent stops. Holds live in memory
only: after a restart of the destination's agent a ``renew`` answers ``error`` and the swap
goes on, logged.

Requests and answers go through :func:`asyncmigfra.peers.exchange.request` and
:func:`asyncmigfra.peers.exchange.serve`, as destination hooks do. Only the destination's agent runs
anything here; the request carries no command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal, Protocol, cast

import structlog

from asyncmigfra.errors import Busy, ConnectionFailed
from asyncmigfra.peers import exchange
from asyncmigfra.peers.bus import (
    JunkLog,
    MessageBus,
    PeerRefusal,
    PeerTopics,
    check_source,
    checked_op_and_id,
    json_map,
    read_request,
    safe_text,
    shown,
    sibling_topic,
    valid_peer_vm_name,
    wire_number,
)

__all__ = [
    "LANE_QOS",
    "LaneKeeper",
    "LaneRequest",
    "LaneServer",
    "hold_peer_lane",
    "lane_topic_of",
    "lane_topics",
    "parse_request",
]

log = structlog.stdlib.get_logger(__name__)

LANE_QOS = 1
#: s a hold lives without a renewal (the holder renews every third of it).
LEASE = 30.0
#: s a requested lease is at least and at most (a lease outside is moved to the bound).
MIN_LEASE = 1.0
MAX_LEASE = 300.0
#: Holds one agent grants at once (to all its peers together).
MAX_HOLDS = 256
#: Holds one agent grants to any *one* peer at once (a swap holds one lane; a peer's swaps at
#: once are bounded by its own ``migration.max-outgoing``, 2 by default).
MAX_HOLDS_PER_SOURCE = 16
#: Bytes of a request or an answer; larger ones are junk.
MAX_REQUEST_BYTES = 4096
#: Keys of a request or an answer.
MAX_KEYS = 16
#: Characters of a string value in a request.
MAX_VALUE_CHARS = 256
#: Characters of an answer's ``details`` kept (escaped) in this agent's result.
MAX_DETAILS_CHARS = 500
#: s a release (and an answer) waits for the broker before it is given up.
RELEASE_LIMIT = 2.0
OPS = ("hold", "renew", "release")
STATUSES = frozenset({"held", "busy", "renewed", "released", "error"})

LockMode = Literal["off", "best-effort", "required"]


def lane_topic_of(task_topic: str) -> str:
    """``fast/migfra/<host>/task`` -> ``fast/migfra/<host>/lane`` (the prefix of this agent's
    lane requests, ``.../lane/<source>``)."""
    return sibling_topic(task_topic, "lane")


def lane_topics(task_topic: str, hostname: str) -> PeerTopics | None:
    """This agent's lane topics (``None``: ``hostname`` is not one level of the task topic)."""
    return PeerTopics.of(task_topic, hostname, "lane")


class LaneKeeper(Protocol):
    """What the server needs from the dispatcher."""

    def hold_lane(self, vm_name: str) -> Callable[[], None] | str:
        """Take ``vm_name``'s lane now: the function that gives it back, or why not."""
        ...


@dataclass(frozen=True, slots=True)
class LaneRequest:
    """A checked lane request; its sender is the topic's."""

    op: Literal["hold", "renew", "release"]
    request_id: str
    hold_id: str
    vm_name: str
    #: s, within [:data:`MIN_LEASE`, :data:`MAX_LEASE`]
    lease: float = LEASE


def _lease(value: object, rid: str) -> float:
    """``lease``: a number of seconds (JSON number or decimal text), finite and > 0, moved
    into [MIN_LEASE, MAX_LEASE]."""
    if value is None:
        return LEASE
    number = wire_number(value)
    if number is None or number <= 0:
        raise PeerRefusal(rid, f"lease must be a number of seconds > 0, got {shown(value)}")
    return min(max(number, MIN_LEASE), MAX_LEASE)


def parse_request(raw: bytes, sender: str, *, peers: Collection[str] | None = None) -> LaneRequest:
    """A lane request of agent ``sender`` (the topic's last level), checked; ``peers``: the
    only senders served (``None``: any).

    Raises:
        PeerRefusal: junk, or a sender not in ``peers`` (answerable when its ``request-id``
        could be read).
    """
    document, rid = read_request(
        raw, sender, limit=MAX_REQUEST_BYTES, max_keys=MAX_KEYS, peers=peers
    )
    for key, value in document.items():
        if key != "lease" and not (isinstance(value, str) and len(value) <= MAX_VALUE_CHARS):
            limit = MAX_VALUE_CHARS
            raise PeerRefusal(
                rid, f"values must be text of at most {limit} characters, {shown(key)} is not"
            )
    op, hold_id = checked_op_and_id(document, rid, ops=OPS, id_key="hold-id")
    vm = document.get("vm-name")
    if not valid_peer_vm_name(vm):
        raise PeerRefusal(rid, f"vm-name is not a valid VM name: {shown(vm)}")
    check_source(document, sender, rid)
    assert isinstance(vm, str)
    lease = _lease(document.get("lease"), rid) if op != "release" else LEASE
    return LaneRequest(
        op=cast(Literal["hold", "renew", "release"], op),
        request_id=rid,
        hold_id=hold_id,
        vm_name=vm,
        lease=lease,
    )


@dataclass(slots=True)
class _Hold:
    source: str
    vm_name: str
    release: Callable[[], None]
    expiry: asyncio.TimerHandle | None = None


class LaneServer:
    """Answers other agents' lane requests for this agent's VMs.

    ``peers``: the only agents whose requests are served (``None``: every agent the broker
    lets publish on this agent's lane topic).
    """

    def __init__(
        self,
        *,
        bus: MessageBus,
        hostname: str,
        task_topic: str,
        keeper: LaneKeeper,
        peers: Collection[str] | None = None,
    ) -> None:
        self._bus = bus
        self._hostname = hostname
        self._topics = lane_topics(task_topic, hostname)
        self._keeper = keeper
        self._peers = frozenset(peers) if peers is not None else None
        #: (source, hold id) -> the hold
        self._holds: dict[tuple[str, str], _Hold] = {}
        self._junk = JunkLog()

    @property
    def holds(self) -> dict[tuple[str, str], str]:
        """(holding agent, hold id) -> VM name, of the holds granted now."""
        return {key: hold.vm_name for key, hold in self._holds.items()}

    async def serve(self) -> None:
        """Answer requests until cancelled; every hold is given back on the way out."""
        try:
            await exchange.serve(
                self._bus,
                self._topics,
                self._answer,
                qos=LANE_QOS,
                event="lanes",
                junk=self._junk,
                answer_within=RELEASE_LIMIT,  # the peer waits no longer than that
                hostname=self._hostname,
            )
        finally:
            for key in list(self._holds):
                self._end(key, reason="agent stopping")

    async def _answer(self, sender: str, raw: bytes) -> dict[str, str]:
        """The answer to ``sender``'s request ``raw`` (junk: :class:`PeerRefusal`)."""
        request = parse_request(raw, sender, peers=self._peers)
        status, details = self._decide(sender, request)
        return exchange.answer_of(request.request_id, status, details, hostname=self._hostname)

    def _decide(self, sender: str, request: LaneRequest) -> tuple[str, str]:
        key = (sender, request.hold_id)
        vm = request.vm_name
        hold = self._holds.get(key)
        if hold is not None and hold.vm_name != vm:
            return "error", f"hold {request.hold_id} of {sender} is not on {vm}"
        if request.op == "release":
            if hold is not None:
                self._end(key, reason="released")
            return "released", ""
        if request.op == "renew":
            if hold is None:
                return "error", (
                    f"no hold {request.hold_id} of {sender} on {vm} "
                    "(it expired, or the agent restarted)"
                )
            self._arm(key, hold, request.lease)
            return "renewed", ""
        if hold is not None:  # the same hold asked again (a QoS 1 duplicate)
            return "held", ""
        if len(self._holds) >= MAX_HOLDS:
            return "busy", f"{MAX_HOLDS} lane holds are granted already"
        if sum(1 for source, _ in self._holds if source == sender) >= MAX_HOLDS_PER_SOURCE:
            return "busy", f"{sender} has {MAX_HOLDS_PER_SOURCE} lane holds here already"
        taken = self._keeper.hold_lane(vm)
        if isinstance(taken, str):
            return "busy", taken
        hold = _Hold(source=sender, vm_name=vm, release=taken)
        self._holds[key] = hold
        self._arm(key, hold, request.lease)
        log.info("lanes.held", vm=vm, holder=sender, hold_id=request.hold_id)
        return "held", ""

    def _arm(self, key: tuple[str, str], hold: _Hold, lease: float) -> None:
        if hold.expiry is not None:
            hold.expiry.cancel()
        loop = asyncio.get_running_loop()
        hold.expiry = loop.call_later(lease, self._end, key, "lease expired")

    def _end(self, key: tuple[str, str], reason: str) -> None:
        hold = self._holds.pop(key, None)
        if hold is None:
            return
        if hold.expiry is not None:
            hold.expiry.cancel()
        hold.release()
        level = log.warning if reason == "lease expired" else log.info
        level("lanes.released", vm=hold.vm_name, holder=hold.source, reason=reason)


# --- the asking side ----------------------------------------------------------------------------


async def _ask(
    bus: MessageBus,
    queue: asyncio.Queue[tuple[str, bytes]],
    *,
    topic: str,
    answers: str,
    request: dict[str, str],
    limit: float,
) -> tuple[str, str] | None:
    """Send one request to ``topic`` and wait ``limit`` s for its answer on ``answers`` (the
    asked agent's level): ``(status, details)``, or ``None`` without an answer. A broker
    problem is an ``error`` answer of this side."""
    try:
        return await exchange.request(
            bus,
            {**request, "request-id": uuid.uuid4().hex},
            to=topic,
            answers=answers,
            qos=LANE_QOS,
            limit=limit,
            read=lambda where, raw, rid: _answer_to(where, raw, answers, rid),
            queue=queue,
        )
    except TimeoutError:
        return None
    except Exception as exc:  # noqa: BLE001 - e.g. TransportError: reported, never raised
        return "error", f"MQTT: {exc}"


_ANSWER_JUNK = JunkLog()


def _answer_to(topic: str, raw: bytes, answers: str, request_id: str) -> tuple[str, str] | None:
    """``(status, details)`` when ``raw`` is a well-formed answer to ``request_id`` on the
    asked agent's ``answers`` topic; ``None`` otherwise (other answers: skipped; junk:
    logged once)."""
    if topic != answers:
        _ANSWER_JUNK("lanes.answer_ignored", reason="not from the agent asked", topic=shown(topic))
        return None
    document = json_map(raw, MAX_REQUEST_BYTES)
    if document is None:
        _ANSWER_JUNK("lanes.answer_ignored", reason="not a JSON object", topic=topic)
        return None
    if document.get("request-id") != request_id:
        return None  # an answer to an earlier request (a renewal that came late)
    status, details = document.get("status"), document.get("details", "")
    if status not in STATUSES or not isinstance(details, str):
        _ANSWER_JUNK(
            "lanes.answer_ignored", reason=f"bad status {shown(status)} or details", topic=topic
        )
        return None
    assert isinstance(status, str)
    return status, safe_text(details, MAX_DETAILS_CHARS)


@asynccontextmanager
async def hold_peer_lane(
    bus: MessageBus | None,
    *,
    task_topic: str,
    hostname: str,
    peer: str,
    vm_name: str,
    mode: LockMode,
    answer_within: float,
    lease: float = LEASE,
) -> AsyncIterator[str | None]:
    """Hold ``vm_name``'s lane on ``peer``'s agent for the block.

    Yields ``None`` when the lane is held (or ``mode`` is ``off``), else the reason it is not
    (``best-effort``: the block runs uncoordinated, the caller reports the reason).

    Raises:
        Busy: the peer's agent has work on ``vm_name``, or is shutting down.
        ConnectionFailed: ``required`` and no hold could be had.
    """
    if mode == "off":
        yield None
        return
    topics = lane_topics(task_topic, hostname)
    target = topics.request_to(peer) if topics is not None else None
    answers = topics.answers_from(peer) if topics is not None else None
    problem: str | None = None
    if bus is None:
        problem = "this agent has no MQTT connection"
    elif target is None or answers is None:
        problem = f"cannot tell {peer}'s lane topic from {lane_topic_of(task_topic)!r}"
    if problem is not None or bus is None or target is None or answers is None:
        yield _uncoordinated(mode, peer, vm_name, problem or "")
        return
    hold_id = uuid.uuid4().hex
    base = {"hold-id": hold_id, "vm-name": vm_name, "source": hostname}
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        try:
            queue = await stack.enter_async_context(bus.subscription(answers, LANE_QOS))
        except Exception as exc:  # noqa: BLE001 - a broker problem: reported like no answer
            yield _uncoordinated(mode, peer, vm_name, f"MQTT: {exc}")
            return
        answer = await _ask(
            bus,
            queue,
            topic=target,
            answers=answers,
            request={**base, "op": "hold", "lease": f"{lease:g}"},
            limit=answer_within,
        )
        if answer is None:
            yield _uncoordinated(mode, peer, vm_name, f"no answer within {answer_within:g} s")
            return
        status, details = answer
        if status == "busy":
            raise Busy(f"{vm_name} is busy on {peer}'s agent ({details}); nothing was moved")
        if status != "held":
            yield _uncoordinated(mode, peer, vm_name, details or f"answered {status}")
            return
        log.info(
            "lanes.holding", vm=vm_name, peer=peer, seconds=round(time.monotonic() - started, 4)
        )
        renewing = asyncio.create_task(
            _renew(bus, queue, target, answers, base, lease=lease, answer_within=answer_within),
            name=f"lane-renew-{vm_name}",
        )
        try:
            yield None
        finally:
            renewing.cancel()
            await asyncio.wait({renewing})  # raises nothing, so a cancel of ours stays ours
            try:
                async with asyncio.timeout(RELEASE_LIMIT):
                    await bus.send(
                        target,
                        json.dumps(
                            {**base, "op": "release", "request-id": uuid.uuid4().hex}
                        ).encode(),
                        LANE_QOS,
                    )
            except Exception as exc:  # noqa: BLE001 - the lease ends the hold anyway
                log.warning("lanes.release_failed", vm=vm_name, peer=peer, error=str(exc))


async def _renew(
    bus: MessageBus,
    queue: asyncio.Queue[tuple[str, bytes]],
    target: str,
    answers: str,
    base: dict[str, str],
    *,
    lease: float,
    answer_within: float,
) -> None:
    """Renew the hold every third of its lease for as long as the block runs."""
    while True:
        await asyncio.sleep(lease / 3)
        try:
            answer = await _ask(
                bus,
                queue,
                topic=target,
                answers=answers,
                request={**base, "op": "renew", "lease": f"{lease:g}"},
                limit=answer_within,
            )
        except Exception as exc:  # noqa: BLE001 - try again at the next renewal
            log.warning("lanes.renew_failed", vm=base["vm-name"], error=str(exc))
            continue
        if answer is None or answer[0] != "renewed":
            why = "no answer" if answer is None else answer[1] or answer[0]
            log.warning("lanes.hold_lost", vm=base["vm-name"], error=why)


def _uncoordinated(mode: LockMode, peer: str, vm_name: str, why: str) -> str:
    if mode == "required":
        raise ConnectionFailed(
            f"could not hold {vm_name}'s lane on {peer}'s agent: {why} "
            "(migration.swap-lock: required); nothing was moved"
        )
    text = f"not coordinated with {peer}'s agent ({why})"
    log.warning("lanes.uncoordinated", vm=vm_name, peer=peer, error=why)
    return text
