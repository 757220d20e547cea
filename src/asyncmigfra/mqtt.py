"""The MQTT transport: the only module that imports aiomqtt.

What it guarantees, and why each point exists (the original daemon got each one wrong,
spec section 3):

* **Reconnect, then re-subscribe.** The connection loop reconnects with jittered exponential
  backoff and subscribes again every time; the original went deaf after a broker restart.
* **Persistent session.** ``clean_session=False`` (3.1.1) or ``clean_start=False`` with a
  session expiry (5): the broker queues QoS 1/2 tasks published while the agent is away.
* **TCP_NODELAY** on the client socket. paho leaves Nagle on and every QoS 1/2 exchange then
  stalls ~44 ms against delayed ACKs (measured; the original has this stall).
* **No silent drops.** aiomqtt's incoming queue is unbounded (a bounded one discards), and
  :meth:`MqttTransport.publish` waits for a connection and retries until the broker
  acknowledged the message or the caller is cancelled (at-least-once).
* **Errors translated at the edge**: ``aiomqtt.MqttError`` never leaves this module; callers see
  :class:`TransportError`.
* **Client id clashes are reported, not ping-ponged.** Two clients with one client id take the
  session from each other on every reconnect. Each takeover is one ``mqtt.client_id_in_use``
  error, the next reconnect waits a few seconds, and after ``takeover_limit`` of them within
  ``takeover_window`` :meth:`MqttTransport.run` raises :class:`ClientIdInUse` (exit code 2).
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TypeVar

import aiomqtt
import structlog
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from asyncmigfra.errors import AsyncmigfraError, StartupError
from asyncmigfra.settings import MqttSettings

__all__ = [
    "ClientIdInUse",
    "Delivery",
    "Incoming",
    "MqttTransport",
    "Outgoing",
    "ToolClient",
    "TransportError",
    "V5_REFUSED_HINT",
]

log = structlog.stdlib.get_logger(__name__)

MQTT_ERR_NO_CONN = MQTTErrorCode.MQTT_ERR_NO_CONN
_T = TypeVar("_T")


class TransportError(AsyncmigfraError):
    """The broker could not be reached or refused an operation."""


class ClientIdInUse(StartupError):
    """Another client keeps taking the agent's MQTT session over: it connects with the same
    client id. Raised by :meth:`MqttTransport.run` after ``takeover_limit`` takeovers within
    ``takeover_window``; the agent exits with code 2."""

    def __init__(self, client_id: str, count: int, window: float) -> None:
        self.client_id = client_id
        self.count = count
        self.window = window
        super().__init__(
            f"MQTT client id {client_id!r} is in use: another client took the session over "
            f"{count} times within {window:g} s; give every agent its own communicator.id "
            "(or set communicator.takeover-limit: 0 to keep retrying)"
        )


@dataclass(frozen=True, slots=True)
class Incoming:
    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    #: MQTT 5 request/response: where to send the result too.
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    #: MQTT 5: echoed correlation data (for results sent to a response topic).
    correlation_data: bytes | None = None


class Delivery:
    """A message handed to the MQTT session; ``done`` once the broker acknowledged it."""

    __slots__ = ("_info",)

    def __init__(self, info: object) -> None:
        self._info = info

    @property
    def done(self) -> bool:
        return bool(self._info.is_published())  # type: ignore[attr-defined]


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


# Session takeovers (a second client connecting with the agent's client id), as measured
# against mosquitto 2.0.11: the broker closes the old connection the moment the new CONNECT
# arrives, for MQTT 3.1.1 *and* 5, without sending anything; paho then reports "Unspecified
# error" (0x80, its code for a lost connection). mosquitto 2.0.15 and later (as the MQTT 5
# spec asks of every broker) send MQTT 5 clients DISCONNECT "Session taken over" (0x8E) first
# (mosquitto commit 351911bd, issue #2607). Both reach
# us as aiomqtt's "Disconnected during message iteration", raised from the
# ``MqttCodeError(reason)`` its ``on_disconnect`` created.

#: MQTT 5 DISCONNECT reason "Session taken over": certain evidence of a takeover.
SESSION_TAKEN_OVER = 0x8E
#: paho's reason for a connection the peer closed without a DISCONNECT (or an MQTT 5
#: DISCONNECT "Unspecified error"). Not keep-alive timeouts (0x8D) or protocol errors (0x82).
_CONNECTION_CLOSED = 0x80
#: s a reconnect after a takeover waits at least (``reconnect_max_delay`` if that is smaller),
#: jittered up to 20% more: the two clients then take turns every few seconds, not twice a
#: second. Both count every takeover; the one that lost first (the newcomer) reaches
#: ``takeover_limit`` (5) first, about 45 s into the clash with the defaults (within the
#: 60 s ``takeover_window``), and the other then keeps its session.
_TAKEOVER_DELAY = 5.0


def disconnect_reason(exc: BaseException) -> int | None:
    """The MQTT reason code behind a disconnect error (``exc`` or an exception it was raised
    from or during), ``None`` when there is none."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, aiomqtt.MqttCodeError) and isinstance(current.rc, ReasonCode):
            return int(current.rc.value)
        current = current.__cause__ or current.__context__
    return None


def takeover_delay(settings: MqttSettings) -> float:
    """s a reconnect after a takeover waits at least (jittered up to 20 % more)."""
    return min(_TAKEOVER_DELAY, settings.reconnect_max_delay)


def suspect_takeover_within(settings: MqttSettings) -> float:
    """s after connect and subscribe within which a connection the broker closed without a
    reason counts as a (suspected) takeover.

    Two agents with one client id take turns: the one that just lost the session waits
    :func:`takeover_delay` (at most 20 % more), then connects and closes the other's
    connection, which had been up about that long. So the window is longer than that wait
    plus a reconnect: both agents see every takeover, the established one too (9 s with the
    defaults). A broker restart, a network failure or a broker limit ends connections that
    have been up for longer, mostly; one that happens within this time counts too, and only
    ``takeover-limit`` of them within ``takeover-window`` end the agent.
    """
    return takeover_delay(settings) * 1.2 + 2 * settings.reconnect_min_delay + 2.0


def takeover_evidence(exc: BaseException, lifetime: float | None, within: float) -> str | None:
    """Why the disconnect ``exc`` is a session takeover, or ``None`` when it is not one.

    ``lifetime`` is how long the connection had been up after connect and subscribe
    (``None``: the connection failed before that).
    """
    reason = disconnect_reason(exc)
    if reason == SESSION_TAKEN_OVER:
        return "the broker sent DISCONNECT 0x8E (session taken over)"
    if reason == _CONNECTION_CLOSED and lifetime is not None and lifetime < within:
        return (
            f"the broker closed the connection {lifetime:.2f} s after connect and subscribe "
            "without a reason (suspected takeover)"
        )
    return None


def _tls_context(settings: MqttSettings) -> ssl.SSLContext | None:
    tls = settings.tls
    if tls is None:
        return None
    ctx = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.insecure:
        ctx.check_hostname = False
    return ctx


class MqttTransport:
    """One broker connection with reconnect, a task subscription and reliable publishing.

    ``run(handler)`` owns the connection for the agent's lifetime: it connects, subscribes,
    calls ``on_connected`` (the agent publishes its retained ``online`` status there) and feeds
    every message to ``handler`` (a non-blocking function) until cancelled.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        subscriptions: Sequence[tuple[str, int]],
        will: Outgoing | None = None,
        on_connected: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._settings = settings
        self._subscriptions = tuple(subscriptions)
        self._will = will
        self._on_connected = on_connected
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._subscribed = False
        #: Extra subscriptions (hooks): [topic filter, QoS, queue of (topic, payload)].
        self._extra: list[tuple[str, int, asyncio.Queue[tuple[str, bytes]]]] = []
        self.connects = 0
        #: Session takeovers seen (all of them, not only those within the window).
        self.takeovers = 0
        #: Messages on topics this transport never subscribed to (dropped).
        self.foreign = 0
        self._foreign_topics: set[str] = set()

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    @property
    def v5(self) -> bool:
        return self._settings.protocol == "5"

    def _make_client(self) -> aiomqtt.Client:
        s = self._settings
        will = None
        if self._will is not None:
            will = aiomqtt.Will(
                self._will.topic, self._will.payload, qos=self._will.qos, retain=self._will.retain
            )
        kwargs: dict[str, object] = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = s.session_expiry
            kwargs["properties"] = props
            kwargs["clean_start"] = False
            protocol = aiomqtt.ProtocolVersion.V5
        else:
            kwargs["clean_session"] = False
            protocol = aiomqtt.ProtocolVersion.V311
        client = aiomqtt.Client(
            s.host,
            s.port,
            identifier=s.client_id,
            username=s.username,
            password=s.password,
            protocol=protocol,
            keepalive=s.keepalive,
            will=will,
            tls_context=_tls_context(s),
            # paho's default of 20 in-flight QoS>0 messages throttles pipelined results.
            max_inflight_messages=1000,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            timeout=30,
            **kwargs,  # type: ignore[arg-type]
        )
        # Many acknowledgements outstanding is normal for a pipelined publisher, not a smell.
        client.pending_calls_threshold = 1_000_000
        return client

    async def run(self, handler: Callable[[Incoming], None]) -> None:
        """Connect, subscribe and deliver messages forever; reconnect on every failure.

        The same client object is reused across reconnects (aiomqtt supports re-entering it):
        paho then keeps its session state, and QoS 1/2 messages that were in flight or
        published while disconnected are sent again after the reconnect, so the pending
        ``publish`` calls complete instead of being lost with a discarded client.

        A session takeover (another client connected with the same client id, see
        :func:`takeover_evidence`) is logged as one ``mqtt.client_id_in_use`` error and
        followed by a longer wait; the ``takeover_limit``-th within ``takeover_window``
        raises :class:`ClientIdInUse` instead.
        """
        attempt = 0
        s = self._settings
        client = self._make_client()
        self._client = client
        loop = asyncio.get_running_loop()
        suspect_within = suspect_takeover_within(s)
        takeovers: collections.deque[float] = collections.deque()
        while True:
            #: When this connection was up (connected and subscribed), in loop time.
            up_since: float | None = None
            try:
                async with client:
                    for topic, qos in self._subscriptions:
                        await honour_cancel(client.subscribe(topic, qos=qos))
                    for topic, qos in {(t, q) for t, q, _ in self._extra}:
                        await honour_cancel(client.subscribe(topic, qos=qos))
                    up_since = loop.time()
                    self._subscribed = True
                    self._connected.set()
                    self.connects += 1
                    attempt = 0
                    log.info(
                        "mqtt.connected",
                        broker=f"{s.host}:{s.port}",
                        host=s.host,
                        port=s.port,
                        client_id=s.client_id,
                    )
                    if self._on_connected is not None:
                        await self._on_connected()
                    async for message in client.messages:
                        if self._route_extra(message):
                            continue
                        if any(message.topic.matches(t) for t, _ in self._subscriptions):
                            handler(_incoming(message))
                        else:
                            self._foreign(message.topic.value)
            except aiomqtt.MqttError as exc:
                close_orphaned_sockets(exc)
                self._connected.clear()
                attempt += 1
                now = loop.time()
                lifetime = None if up_since is None else now - up_since
                evidence = takeover_evidence(exc, lifetime, suspect_within)
                if evidence is not None:
                    await self._after_takeover(evidence, takeovers, now)
                    continue
                delay = min(s.reconnect_max_delay, s.reconnect_min_delay * 2 ** min(attempt, 16))
                delay = random.uniform(delay / 2, delay)  # noqa: S311 - jitter, not crypto
                log.warning(
                    "mqtt.reconnect_scheduled",
                    broker=f"{s.host}:{s.port}",
                    error=str(exc),
                    attempt=attempt,
                    delay=round(delay, 3),
                )
                await asyncio.sleep(delay)
            finally:
                self._connected.clear()

    async def _after_takeover(
        self, evidence: str, takeovers: collections.deque[float], now: float
    ) -> None:
        """Count one takeover at ``now`` (``takeovers``: the times of those in the window),
        log it, then raise :class:`ClientIdInUse` at the limit or wait before reconnecting."""
        s = self._settings
        self.takeovers += 1
        takeovers.append(now)
        while takeovers and takeovers[0] <= now - s.takeover_window:
            takeovers.popleft()
        count = len(takeovers)
        give_up = s.takeover_limit > 0 and count >= s.takeover_limit
        base = takeover_delay(s)
        delay = random.uniform(base, base * 1.2)  # noqa: S311 - jitter, not crypto
        log.error(
            "mqtt.client_id_in_use",
            broker=f"{s.host}:{s.port}",
            client_id=s.client_id,
            count=count,
            limit=s.takeover_limit,
            window=s.takeover_window,
            evidence=evidence,
            action="exit" if give_up else "reconnect",
            delay=None if give_up else round(delay, 3),
            hint="another client connected with the same client id (communicator.id); "
            "give every agent its own",
        )
        if give_up:
            raise ClientIdInUse(s.client_id, count, s.takeover_window)
        await asyncio.sleep(delay)

    def _foreign(self, topic: str) -> None:
        """A message on a topic this agent never subscribed to: a persistent session the
        broker shared with another client of the same client id delivers that client's
        subscriptions too. Never a task of this agent: dropped, logged once per topic."""
        self.foreign += 1
        if topic not in self._foreign_topics and len(self._foreign_topics) < 100:
            self._foreign_topics.add(topic)
            log.error(
                "mqtt.foreign_message",
                topic=topic,
                client_id=self._settings.client_id,
                hint="the broker session of this client id holds another client's "
                "subscriptions: give every agent its own communicator.id",
            )

    def _route_extra(self, message: aiomqtt.Message) -> bool:
        """Hand ``message`` to every extra subscription it matches (not to the task handler,
        unless it also matches a task subscription)."""
        if not self._extra:
            return False
        matched = False
        for topic, _, queue in self._extra:
            if message.topic.matches(topic):
                queue.put_nowait((message.topic.value, bytes(message.payload)))
                matched = True
        if matched and any(message.topic.matches(t) for t, _ in self._subscriptions):
            return False
        return matched

    @asynccontextmanager
    async def subscription(
        self, topic: str, qos: int
    ) -> AsyncIterator[asyncio.Queue[tuple[str, bytes]]]:
        """Subscribe to ``topic`` for the duration of the block (``MessageBus``).

        The queue gets ``(topic, payload)`` of every matching message. The subscription is
        active (SUBACK received) when the block starts, is renewed after a reconnect, and is
        removed when the block ends, however it ends (bounded; errors are logged).
        """
        queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        entry = (topic, qos, queue)
        self._extra.append(entry)
        try:
            await self._connected.wait()
            client = self._client
            assert client is not None
            with map_mqtt_errors():
                await honour_cancel(client.subscribe(topic, qos=qos))
            yield queue
        finally:
            self._extra.remove(entry)
            if all(t != topic for t, _, _ in self._extra):
                await self._unsubscribe_quietly(topic)

    async def _unsubscribe_quietly(self, topic: str) -> None:
        client = self._client
        if client is None or not self._connected.is_set():
            return
        try:
            async with asyncio.timeout(5.0):
                await honour_cancel(client.unsubscribe(topic))
        except (aiomqtt.MqttError, TimeoutError) as exc:
            log.warning("mqtt.unsubscribe_failed", topic=topic, error=str(exc))

    async def send(self, topic: str, payload: bytes, qos: int) -> None:
        """Publish one message (``MessageBus``); see :meth:`publish`."""
        await self.publish(Outgoing(topic, payload, qos=qos))

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def publish(self, msg: Outgoing) -> None:
        """Publish ``msg`` once the broker is reachable and wait for its acknowledgement.

        paho keeps every QoS 1/2 message in its session until the broker acknowledged it and
        sends it again after a reconnect, so this waits without a timeout (``math.inf``
        also spares a timer task per message). A message paho could not send because the
        connection dropped in the meantime (``MQTT_ERR_NO_CONN``) is already queued in paho
        for the reconnect, so it is not published a second time.
        """
        topic = msg.topic
        props: Properties | None = None
        if msg.correlation_data is not None and self.v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = msg.correlation_data
        while True:
            await self._connected.wait()
            client = self._client
            assert client is not None
            try:
                await honour_cancel(
                    client.publish(
                        topic,
                        msg.payload,
                        qos=msg.qos,
                        retain=msg.retain,
                        properties=props,
                        timeout=math.inf,
                    )
                )
            except aiomqtt.MqttCodeError as exc:
                if exc.rc == MQTT_ERR_NO_CONN and msg.qos > 0:
                    log.info("mqtt.publish_queued_for_reconnect", topic=topic)
                    return
                log.warning("mqtt.publish_retry", topic=topic, error=str(exc))
                await asyncio.sleep(0.2)
                continue
            return

    def publish_nowait(self, msg: Outgoing) -> Delivery:
        """Hand ``msg`` to the client's MQTT session at once, without awaiting the broker.

        This is the fast path of the publisher (no task, future or timer per message). It is
        as reliable as :meth:`publish`: paho keeps every QoS 1/2 message until the broker
        acknowledged it and sends it again after a reconnect (the client object is reused),
        also when it was handed over while disconnected. The returned :class:`Delivery`
        tells when the broker acknowledged it. It reaches into aiomqtt's paho client
        (``aiomqtt>=2.5,<3`` is pinned for this); without it, it raises ``TransportError``
        and callers use :meth:`publish`.
        """
        paho_client = getattr(self._client, "_client", None)
        if paho_client is None:
            raise TransportError("no MQTT session yet")
        props: Properties | None = None
        if msg.correlation_data is not None and self.v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = msg.correlation_data
        info = paho_client.publish(msg.topic, msg.payload, msg.qos, msg.retain, props)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTT_ERR_NO_CONN):
            raise TransportError(f"publish refused by the MQTT client: rc={info.rc}")
        return Delivery(info)


def _incoming(message: aiomqtt.Message) -> Incoming:
    data = bytes(message.payload)  # aiomqtt 2.x delivers bytes
    response_topic = None
    correlation = None
    props = message.properties
    if props is not None:
        response_topic = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
    return Incoming(
        topic=message.topic.value,
        payload=data,
        qos=message.qos,
        retain=message.retain,
        response_topic=response_topic,
        correlation_data=correlation,
    )


#: Added to a tool's connect error when the broker refuses MQTT 5 (CONNACK 0x84, "Unsupported
#: protocol version"): what amqtt, the demo's embedded broker, answers.
V5_REFUSED_HINT = (
    "the broker does not speak MQTT 5 (the embedded broker of `asyncmigfra demo` speaks"
    " only MQTT 3.1.1); use --mqtt-protocol 3.1.1"
)


class ToolClient:
    """A plain client for tools (CLI, demo, benchmarks, tests) with the same socket options.

    ``async with ToolClient(host, port) as c:`` then :meth:`subscribe`, :meth:`publish` and
    ``async for msg in c.messages():``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str | None = None,
        protocol: str = "5",
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._client = aiomqtt.Client(
            host,
            port,
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5
            if protocol == "5"
            else aiomqtt.ProtocolVersion.V311,
            username=username,
            password=password,
            tls_context=tls,
            max_inflight_messages=1000,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            timeout=timeout,
        )
        self._client.pending_calls_threshold = 1_000_000
        self.v5 = protocol == "5"

    async def __aenter__(self) -> ToolClient:
        try:
            await self._client.__aenter__()
        except aiomqtt.MqttError as exc:
            close_orphaned_sockets(exc)
            reason = str(exc)
            if self.v5 and isinstance(exc, aiomqtt.MqttCodeError) and exc.rc == 132:
                reason += f": {V5_REFUSED_HINT}"
            raise TransportError(reason) from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        with map_mqtt_errors():
            await self._client.__aexit__(None, None, None)

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        with map_mqtt_errors():
            await honour_cancel(self._client.subscribe(topic, qos=qos))

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> None:
        props = None
        if self.v5 and (response_topic or correlation_data is not None):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation_data is not None:
                props.CorrelationData = correlation_data
        with map_mqtt_errors():
            await honour_cancel(
                self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
            )

    async def messages(self) -> AsyncIterator[Incoming]:
        with map_mqtt_errors():
            async for message in self._client.messages:
                yield _incoming(message)
