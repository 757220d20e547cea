"""Messages between agents, and the message bus they travel on.

**The bus.** The engine reaches MQTT only through :class:`MessageBus` (``subscription(topic,
qos)``, ``send(topic, payload, qos)``), implemented by the transport
(``MqttTransport.subscription``/``send``; aiomqtt stays in the ``mqtt`` package) and, in memory, by
:class:`MemoryBus` (tests, the fake back-end's demos): one broker, MQTT's filter rules.

**Messages between agents** (destination hooks in :mod:`asyncmigfra.peers.userhooks`, lane holds in
:mod:`asyncmigfra.peers.lanes`, inbound reservations in :mod:`asyncmigfra.peers.inbound`) carry
their sender as the *last level* of their topic (:class:`PeerTopics`), which the broker's ACL
pins to the sender's MQTT user name (``config/mosquitto.acl.example``): MQTT itself does not
tell a subscriber who published. They are asked and answered through
:mod:`asyncmigfra.peers.exchange` (``request``, ``serve``).

The helpers here check what such a message may hold (:func:`read_request`,
:func:`check_source`, :func:`valid_agent_name`, :func:`valid_peer_vm_name`,
:func:`valid_peer_id`, :func:`wire_number`, ...) and log junk once (:class:`JunkLog`).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog

from asyncmigfra.wire.parsing import valid_vm_name

__all__ = [
    "MAX_TASK_ID",
    "JunkLog",
    "MemoryBus",
    "MessageBus",
    "PeerQueue",
    "PeerRefusal",
    "PeerTopics",
    "check_source",
    "checked_op_and_id",
    "clean_text",
    "json_map",
    "peer_topic",
    "read_request",
    "SUBSCRIPTION_BYTES",
    "safe_text",
    "shown",
    "sibling_topic",
    "topic_matches",
    "valid_agent_name",
    "valid_peer_id",
    "valid_peer_vm_name",
    "valid_task_id",
    "wildcard_levels",
    "wire_number",
]

log = structlog.stdlib.get_logger(__name__)


def sibling_topic(task_topic: str, name: str) -> str:
    """``fast/migfra/<host>/task`` -> ``fast/migfra/<host>/<name>`` (an agent's own topic for
    requests from other agents: ``hook``, ``lane``)."""
    head, slash, _ = task_topic.rpartition("/")
    return f"{head}/{name}" if slash else f"{task_topic}/{name}"


def peer_topic(own_topic: str, hostname: str, peer: str) -> str | None:
    """Another agent's topic: ``own_topic`` with its host-name level replaced (``None`` when
    the host name is not exactly one level of it, or ``peer`` is no agent name, so a peer's
    name can never widen a topic or add a level)."""
    levels = own_topic.split("/")
    if levels.count(hostname) != 1 or not valid_agent_name(peer):
        return None
    return "/".join(peer if level == hostname else level for level in levels)


# --- what messages from other agents may hold -----------------------------------------------------

#: Characters no name, id or text from another agent may hold: C0 and C1 controls, DEL, line
#: and paragraph separators and the bidirectional controls (U+202A-U+202E, U+2066-U+2069 and
#: the marks), as for task fields (``parsing``).
_UNSAFE_CHARS: Final = "\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNSAFE: Final = re.compile(f"[{_UNSAFE_CHARS}]")
#: Agent names as a topic level: the rule of the agent's own ``hostname`` (settings), so
#: never ``+``, ``#``, ``/``, NUL or an empty level.
_AGENT_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")
#: Request and hold ids: plain ASCII letters and digits (this agent sends 32 hex digits).
_PEER_ID: Final = re.compile(r"[A-Za-z0-9]{1,64}")
#: Longest task ``id`` (the task parser's limit).
MAX_TASK_ID: Final = 256


def valid_agent_name(name: object) -> bool:
    """Whether ``name`` can be an agent's name, and so one level of a peer topic."""
    return isinstance(name, str) and _AGENT_NAME.fullmatch(name) is not None


def valid_peer_vm_name(name: object) -> bool:
    """A VM name from another agent: the task parser's rule (1-200 characters, no ``/``, no
    leading ``-`` or ``.``) and none of the control or bidirectional characters."""
    return isinstance(name, str) and valid_vm_name(name) and _UNSAFE.search(name) is None


def valid_peer_id(value: object) -> bool:
    """A request or hold id: 1-64 ASCII letters and digits."""
    return isinstance(value, str) and _PEER_ID.fullmatch(value) is not None


def valid_task_id(value: object) -> bool:
    """A task id carried along (``id``): at most 256 characters, no control characters."""
    return isinstance(value, str) and len(value) <= MAX_TASK_ID and _UNSAFE.search(value) is None


def safe_text(text: str, limit: int) -> str:
    """``text`` with control and bidirectional characters shown as ``\\uXXXX`` escapes,
    clipped to ``limit`` characters: what another agent said, fit to be put into a result,
    a log line or an environment variable."""
    text = _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def shown(value: object, limit: int = 80) -> str:
    """A value from the wire for a log line or a refusal: quoted, escaped, clipped."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clean_text(value: object, limit: int) -> bool:
    """Whether ``value`` is text of at most ``limit`` characters without control characters."""
    return isinstance(value, str) and len(value) <= limit and _UNSAFE.search(value) is None


class PeerRefusal(Exception):
    """A message from another agent that is not acted on. ``request_id`` is set when the
    message can be answered (with ``error`` and :attr:`reason`)."""

    def __init__(self, request_id: str | None, reason: str) -> None:
        super().__init__(reason)
        self.request_id = request_id
        self.reason = reason


def read_request(
    raw: bytes, sender: str, *, limit: int, max_keys: int, peers: Collection[str] | None
) -> tuple[dict[str, object], str]:
    """A request of agent ``sender`` (the topic's last level): ``raw`` as a JSON object of at
    most ``limit`` bytes and ``max_keys`` keys whose values are scalars, and its
    ``request-id``. ``peers``: the only senders served (``None``: any).

    Raises:
        PeerRefusal: junk, or a sender not in ``peers`` (answerable when its ``request-id``
        could be read).
    """
    document = json_map(raw, limit)
    if document is None:
        raise PeerRefusal(None, f"not a JSON object of at most {limit} bytes")
    request_id = document.get("request-id")
    rid = request_id if valid_peer_id(request_id) else None
    if rid is None:
        raise PeerRefusal(
            None, f"request-id must be 1-64 letters and digits, got {shown(request_id)}"
        )
    if len(document) > max_keys:
        raise PeerRefusal(rid, f"more than {max_keys} keys")
    for key, value in document.items():
        if isinstance(value, dict | list):
            raise PeerRefusal(rid, f"values must be scalars, {shown(key)} is not")
    if peers is not None and sender not in peers:
        raise PeerRefusal(rid, f"{sender} is not a peer of this agent")
    return document, rid


def checked_op_and_id(
    document: Mapping[str, object], rid: str, *, ops: Sequence[str], id_key: str
) -> tuple[str, str]:
    """A request's ``op`` (one of ``ops``) and its id under ``id_key`` (``hold-id``,
    ``reservation-id``: 1-64 letters and digits), or :class:`PeerRefusal`."""
    op = document.get("op")
    if op not in ops:
        raise PeerRefusal(rid, f"op must be one of {', '.join(ops)}, got {shown(op)}")
    value = document.get(id_key)
    if not valid_peer_id(value):
        raise PeerRefusal(rid, f"{id_key} must be 1-64 letters and digits, got {shown(value)}")
    assert isinstance(op, str)
    assert isinstance(value, str)
    return op, value


def check_source(document: Mapping[str, object], sender: str, rid: str) -> None:
    """A request's ``source``, when it has one, must be its sender: the topic is the proof
    (the broker pins it to the sender's user name); a request that says otherwise is a
    forgery or a bug, and is refused (:class:`PeerRefusal`)."""
    source = document.get("source", sender)
    if source != sender:
        raise PeerRefusal(rid, f"source {shown(source)} is not the sender {sender}")


def wire_number(value: object) -> float | None:
    """A JSON number or decimal text (at most 32 characters) as a finite float; else
    ``None`` (also for an integer beyond any float, which JSON allows)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    if isinstance(value, str) and len(value) > 32:
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True, slots=True)
class PeerTopics:
    """The topics of one kind of message between agents (``hook``, ``lane``).

    Every message carries its **sender as the last level**, so the broker's ACL can pin that
    level to the sender's user name (``pattern write fast/migfra/+/<kind>/%u``):

    * a request of agent S to agent D: ``<prefix>/D/<kind>/S``; D subscribes to
      ``<prefix>/D/<kind>/+`` and takes S from the topic;
    * D's answer: ``<prefix>/S/<kind>-response/D``; S subscribes to exactly that topic, so it
      hears only the agent it asked.

    ``<prefix>/<host>`` is the agent's task topic without its last level, the host level
    replaced. The kind level tells requests from answers, and the sender is a single level
    that can hold no ``/``, so no agent name (not even ``response`` or ``hook-response``) can
    make one kind of topic look like another; a user name with a ``/`` could only ever reach
    a level deeper, where nobody listens.
    """

    hostname: str
    kind: str
    #: The levels of ``<prefix>/<host>``, and where the host level is.
    levels: tuple[str, ...]
    index: int

    @classmethod
    def of(cls, task_topic: str, hostname: str, kind: str) -> PeerTopics | None:
        """``None`` when ``hostname`` is no agent name or not exactly one level of the
        task topic's prefix (then this agent can neither ask nor serve)."""
        head = sibling_topic(task_topic, kind).split("/")[:-1]
        if not valid_agent_name(hostname) or head.count(hostname) != 1:
            return None
        return cls(hostname, kind, tuple(head), head.index(hostname))

    def _at(self, host: str, *tail: str) -> str:
        levels = list(self.levels)
        levels[self.index] = host
        return "/".join([*levels, *tail])

    def is_peer(self, peer: str) -> bool:
        """Whether ``peer`` can be another agent's name (not this one's)."""
        return valid_agent_name(peer) and peer != self.hostname

    @property
    def requests(self) -> str:
        """What this agent subscribes to for requests from others."""
        return self._at(self.hostname, self.kind, "+")

    def request_to(self, peer: str) -> str | None:
        """Where this agent sends a request to ``peer``."""
        return self._at(peer, self.kind, self.hostname) if self.is_peer(peer) else None

    def answers_from(self, peer: str) -> str | None:
        """Where ``peer`` answers this agent (what this agent subscribes to while it asks)."""
        return (
            self._at(self.hostname, f"{self.kind}-response", peer) if self.is_peer(peer) else None
        )

    def answer_to(self, peer: str) -> str | None:
        """Where this agent answers ``peer``'s request."""
        return (
            self._at(peer, f"{self.kind}-response", self.hostname) if self.is_peer(peer) else None
        )

    def sender(self, topic: str) -> str | None:
        """The sender of a request that arrived on ``topic``: its last level, when the topic
        is exactly a request to this agent from another agent; else ``None``."""
        prefix = self._at(self.hostname, self.kind, "")
        if not topic.startswith(prefix):
            return None
        sender = topic[len(prefix) :]
        return sender if self.is_peer(sender) else None


@dataclass
class JunkLog:
    """Logs junk from the wire once: the first message of each kind at warning level, then
    only a count, in the next line of that kind at least ``window`` s later. A kind is the
    event, the sender and the reason's first word (the field or the check, never a value
    from the wire, so varying junk is one kind). Keeps at most ``limit`` kinds."""

    window: float = 60.0
    limit: int = 256
    _seen: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)

    def __call__(self, event: str, *, reason: str, sender: str = "", **fields: object) -> None:
        key = (event, sender, reason.split(" ", 1)[0])
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.window:
            entry[1] += 1
            return
        if entry is None and len(self._seen) >= self.limit:
            self._seen.clear()
        suppressed = int(entry[1]) if entry is not None else 0
        self._seen[key] = [now, 0]
        extra: dict[str, object] = {"suppressed": suppressed} if suppressed else {}
        if sender:
            extra["sender"] = sender
        log.warning(event, reason=reason, **extra, **fields)


def json_map(raw: bytes, limit: int) -> dict[Any, Any] | None:
    """``raw`` as a JSON object, or ``None`` when it is longer than ``limit`` bytes, not JSON
    or not an object (another agent's request or answer, checked further by the caller)."""
    if len(raw) > limit:
        return None
    try:
        document: object = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


#: Bytes a subscription's queue holds at most (topics and payloads): what arrives beyond
#: that while nobody reads it is dropped (a peer flooding answers nobody asked for, or
#: requests faster than they are answered, cannot fill the agent's memory).
SUBSCRIPTION_BYTES = 8 * 1024 * 1024


class PeerQueue(asyncio.Queue[tuple[str, bytes]]):
    """A subscription's queue of ``(topic, payload)``, bounded in bytes (:meth:`offer`)."""

    def __init__(self, limit: int | None = None) -> None:
        super().__init__()
        self.limit = SUBSCRIPTION_BYTES if limit is None else limit
        #: Bytes held now, and messages dropped so far.
        self.held = 0
        self.dropped = 0

    def offer(self, topic: str, payload: bytes) -> bool:
        """Queue the message unless that would hold more than :attr:`limit` bytes (then it
        is dropped and counted)."""
        size = len(topic) + len(payload)
        if self.held + size > self.limit:
            self.dropped += 1
            return False
        self.put_nowait((topic, payload))
        return True

    def _put(self, item: tuple[str, bytes]) -> None:
        super()._put(item)
        self.held += len(item[0]) + len(item[1])

    def _get(self) -> tuple[str, bytes]:
        item = super()._get()
        self.held -= len(item[0]) + len(item[1])
        return item


class MessageBus(Protocol):
    """What hooks need from the broker connection."""

    def subscription(
        self, topic: str, qos: int
    ) -> AbstractAsyncContextManager[asyncio.Queue[tuple[str, bytes]]]:
        """Subscribe for the duration of the block; the queue gets ``(topic, payload)``."""
        ...

    async def send(self, topic: str, payload: bytes, qos: int) -> None:
        """Publish one message."""
        ...


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` matches the subscription filter ``pattern`` (MQTT's rules)."""
    return wildcard_levels(pattern, topic) is not None


def wildcard_levels(pattern: str, topic: str) -> list[str] | None:
    """The levels of ``topic`` that ``pattern``'s wildcards matched, or ``None`` when it does
    not match (``#`` gives the rest of the topic as one item)."""
    wanted, levels = pattern.split("/"), topic.split("/")
    matched: list[str] = []
    for i, level in enumerate(wanted):
        if level == "#":
            matched.append("/".join(levels[i:]))
            return matched
        if i >= len(levels) or (level != "+" and level != levels[i]):
            return None
        if level == "+":
            matched.append(levels[i])
    return matched if len(wanted) == len(levels) else None


# --- an in-memory broker ---------------------------------------------------------------------


@dataclass
class MemoryBus:
    """A :class:`MessageBus` in memory: every message goes to the queues whose filter matches
    its topic (MQTT's rules), at once and in order. ``sent`` keeps what was sent through it
    (topic and the decoded JSON object, or the raw bytes when it is none); messages to a topic
    in ``deaf`` are dropped (nobody there)."""

    queues: dict[str, list[PeerQueue]] = field(default_factory=dict)
    sent: list[tuple[str, Any]] = field(default_factory=list)
    deaf: set[str] = field(default_factory=set)

    @asynccontextmanager
    async def subscription(
        self, topic: str, qos: int
    ) -> AsyncIterator[asyncio.Queue[tuple[str, bytes]]]:
        """Subscribe for the duration of the block."""
        queue = PeerQueue()
        self.queues.setdefault(topic, []).append(queue)
        try:
            yield queue
        finally:
            self.queues[topic].remove(queue)
            if not self.queues[topic]:
                del self.queues[topic]

    async def send(self, topic: str, payload: bytes, qos: int) -> None:
        """Publish one message (recorded in :attr:`sent`)."""
        document = json_map(payload, len(payload))
        self.sent.append((topic, document if document is not None else payload))
        self.deliver(topic, payload)

    def deliver(self, topic: str, payload: bytes) -> None:
        """What the broker does with a publish (also one nobody recorded, e.g. a forgery)."""
        if topic in self.deaf:
            return
        for pattern, queues in list(self.queues.items()):
            if topic_matches(pattern, topic):
                for queue in queues:
                    queue.offer(topic, payload)
