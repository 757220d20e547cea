"""Holding a VM's lane on another agent: a swap's coordination with the destination's agent.

Per-VM lanes (docs/protocol.md §7.2) order the work on a VM within one agent. A swap moves a
second VM that belongs to the *destination's* agent, so without more that agent could stop or
migrate VM 2 in the middle of the swap. Here the swapping agent asks the destination's agent
to hold VM 2's lane for it, the way Nova refuses a second operation on an instance whose
``task_state`` is set:

* **request** (JSON, QoS 1) on the destination's lane topic, the task topic's sibling
  ``lane`` (``fast/migfra/<dest>/lane``): ``op`` (``hold``, ``renew``, ``release``),
  ``request-id``, ``hold-id``, ``vm-name``, ``source`` (the asking agent's host name) and,
  with ``hold``, ``lease`` (s);
* **answer** on the source's ``lane/response`` topic: ``request-id``, ``status`` (``held``,
  ``busy``, ``renewed``, ``released``, ``error``) and ``details``.

The destination's agent grants a hold only when VM 2's lane is empty (no task of its own runs
or waits on VM 2) and it is not shutting down; otherwise it answers ``busy`` and the swap is
refused before anything moves. A granted hold sits at the front of VM 2's lane: a task that
arrives for VM 2 meanwhile queues behind it and runs after the swap. The hold ends with a
``release``, or when its lease runs out without a ``renew`` (the swapping agent died), or
when the holding agent stops. Holds live in memory only: after a restart of the destination's
agent a ``renew`` answers ``error`` and the swap goes on, logged.

Only the destination's agent runs anything here; the request carries no command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal, Protocol

import structlog

from asyncmigfra.errors import Busy, ConnectionFailed
from asyncmigfra.hooks import MessageBus, json_map, peer_topic, sibling_topic

__all__ = [
    "LANE_QOS",
    "LaneKeeper",
    "LaneServer",
    "hold_peer_lane",
    "lane_topic_of",
]

log = structlog.stdlib.get_logger(__name__)

LANE_QOS = 1
#: s a hold lives without a renewal (the holder renews every third of it).
LEASE = 30.0
#: s a requested lease is capped at.
MAX_LEASE = 300.0
#: Holds one agent grants at once (to all its peers together).
MAX_HOLDS = 256
#: Bytes of a request; larger ones are ignored.
MAX_REQUEST_BYTES = 4096
#: s a release (and an answer) waits for the broker before it is given up.
RELEASE_LIMIT = 2.0
_ID_MAX = 64
_NAME_MAX = 256

LockMode = Literal["off", "best-effort", "required"]


def lane_topic_of(task_topic: str) -> str:
    """``fast/migfra/<host>/task`` -> ``fast/migfra/<host>/lane``."""
    return sibling_topic(task_topic, "lane")


class LaneKeeper(Protocol):
    """What the server needs from the dispatcher."""

    def hold_lane(self, vm_name: str) -> Callable[[], None] | str:
        """Take ``vm_name``'s lane now: the function that gives it back, or why not."""
        ...


@dataclass(slots=True)
class _Hold:
    source: str
    vm_name: str
    release: Callable[[], None]
    expiry: asyncio.TimerHandle | None = None


def _request(raw: bytes) -> dict[str, str] | None:
    """A peer's request, checked: a flat map of short strings with the keys its ``op``
    needs; ``None`` otherwise."""
    document = json_map(raw, MAX_REQUEST_BYTES)
    if document is None or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) <= _NAME_MAX
        for k, v in document.items()
    ):
        return None
    if document.get("op") not in ("hold", "renew", "release"):
        return None
    for key in ("request-id", "hold-id"):
        value = document.get(key, "")
        if not value or len(value) > _ID_MAX or not value.isalnum():
            return None
    if not document.get("vm-name") or not document.get("source"):
        return None
    return document


class LaneServer:
    """Answers other agents' lane requests for this agent's VMs."""

    def __init__(
        self, *, bus: MessageBus, hostname: str, task_topic: str, keeper: LaneKeeper
    ) -> None:
        self._bus = bus
        self._hostname = hostname
        self._topic = lane_topic_of(task_topic)
        self._keeper = keeper
        self._holds: dict[str, _Hold] = {}

    @property
    def holds(self) -> dict[str, str]:
        """hold id -> VM name, of the holds granted now."""
        return {hold_id: hold.vm_name for hold_id, hold in self._holds.items()}

    async def serve(self) -> None:
        """Answer requests until cancelled; every hold is given back on the way out."""
        try:
            while True:
                try:
                    async with self._bus.subscription(self._topic, LANE_QOS) as queue:
                        log.info("lanes.serving", topic=self._topic)
                        while True:
                            _, raw = await queue.get()
                            await self._answer(raw)
                except Exception as exc:  # noqa: BLE001 - never take the agent down; retry
                    log.error("lanes.serving_failed", error=str(exc))  # noqa: TRY400
                    await asyncio.sleep(1.0)
        finally:
            for hold_id in list(self._holds):
                self._end(hold_id, reason="agent stopping")

    async def _answer(self, raw: bytes) -> None:
        request = _request(raw)
        if request is None:
            log.warning("lanes.request_ignored", reason="unreadable", size=len(raw))
            return
        reply_to = peer_topic(self._topic, self._hostname, request["source"])
        if reply_to is None:
            log.warning("lanes.request_ignored", reason="bad source", source=request["source"])
            return
        status, details = self._decide(request)
        answer = {"request-id": request["request-id"], "status": status}
        if details:
            answer["details"] = f"on {self._hostname}: {details}"
        try:
            async with asyncio.timeout(RELEASE_LIMIT):  # the peer waits no longer than that
                await self._bus.send(f"{reply_to}/response", json.dumps(answer).encode(), LANE_QOS)
        except Exception as exc:  # noqa: BLE001 - the peer asks again or gives up
            log.warning("lanes.answer_failed", error=str(exc))

    def _decide(self, request: Mapping[str, str]) -> tuple[str, str]:
        op, hold_id, vm = request["op"], request["hold-id"], request["vm-name"]
        hold = self._holds.get(hold_id)
        if hold is not None and (hold.vm_name, hold.source) != (vm, request["source"]):
            return "error", f"hold {hold_id} is not {request['source']}'s hold of {vm}"
        if op == "release":
            if hold is not None:
                self._end(hold_id, reason="released")
            return "released", ""
        if op == "renew":
            if hold is None:
                return "error", f"no hold {hold_id} on {vm} (it expired, or the agent restarted)"
            self._arm(hold_id, hold, self._lease(request))
            return "renewed", ""
        if hold is not None:  # the same hold asked again (a QoS 1 duplicate)
            return "held", ""
        if len(self._holds) >= MAX_HOLDS:
            return "busy", f"{MAX_HOLDS} lane holds are granted already"
        taken = self._keeper.hold_lane(vm)
        if isinstance(taken, str):
            return "busy", taken
        hold = _Hold(source=request["source"], vm_name=vm, release=taken)
        self._holds[hold_id] = hold
        self._arm(hold_id, hold, self._lease(request))
        log.info("lanes.held", vm=vm, holder=hold.source, hold_id=hold_id)
        return "held", ""

    @staticmethod
    def _lease(request: Mapping[str, str]) -> float:
        try:
            lease = float(request.get("lease", LEASE))
        except ValueError:
            lease = LEASE
        return min(max(lease, 1.0), MAX_LEASE) if math.isfinite(lease) else LEASE

    def _arm(self, hold_id: str, hold: _Hold, lease: float) -> None:
        if hold.expiry is not None:
            hold.expiry.cancel()
        loop = asyncio.get_running_loop()
        hold.expiry = loop.call_later(lease, self._end, hold_id, "lease expired")

    def _end(self, hold_id: str, reason: str) -> None:
        hold = self._holds.pop(hold_id, None)
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
    topic: str,
    request: dict[str, str],
    limit: float,
) -> tuple[str, str] | None:
    """Send one request and wait ``limit`` s for its answer: ``(status, details)``, or
    ``None`` without an answer. A broker problem is an ``error`` answer of this side."""
    rid = uuid.uuid4().hex
    request = {**request, "request-id": rid}
    try:
        async with asyncio.timeout(limit):
            await bus.send(topic, json.dumps(request).encode(), LANE_QOS)
            while True:
                _, raw = await queue.get()
                answer = _answer_to(raw, rid)
                if answer is not None:
                    return answer
    except TimeoutError:
        return None
    except Exception as exc:  # noqa: BLE001 - e.g. TransportError: reported, never raised
        return "error", f"MQTT: {exc}"


def _answer_to(raw: bytes, request_id: str) -> tuple[str, str] | None:
    document = json_map(raw, MAX_REQUEST_BYTES)
    if document is None or document.get("request-id") != request_id:
        return None
    status, details = document.get("status"), document.get("details", "")
    if not isinstance(status, str) or not isinstance(details, str):
        return None
    return status, details[: _NAME_MAX * 4]


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
    own = lane_topic_of(task_topic)
    target = peer_topic(own, hostname, peer)
    problem: str | None = None
    if bus is None:
        problem = "this agent has no MQTT connection"
    elif target is None:
        problem = f"cannot tell {peer}'s lane topic from {own!r}"
    if problem is not None or bus is None or target is None:
        yield _uncoordinated(mode, peer, vm_name, problem or "")
        return
    hold_id = uuid.uuid4().hex
    base = {"hold-id": hold_id, "vm-name": vm_name, "source": hostname}
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        try:
            queue = await stack.enter_async_context(bus.subscription(f"{own}/response", LANE_QOS))
        except Exception as exc:  # noqa: BLE001 - a broker problem: reported like no answer
            yield _uncoordinated(mode, peer, vm_name, f"MQTT: {exc}")
            return
        answer = await _ask(
            bus, queue, target, {**base, "op": "hold", "lease": f"{lease:g}"}, answer_within
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
            _renew(bus, queue, target, base, lease=lease, answer_within=answer_within),
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
                bus, queue, target, {**base, "op": "renew", "lease": f"{lease:g}"}, answer_within
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
