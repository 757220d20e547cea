"""The agent's broker connection: :class:`MqttTransport`."""

from __future__ import annotations

import asyncio
import collections
import math
import random
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import aiomqtt
import structlog
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from asyncmigfra.peers.bus import PeerQueue
from asyncmigfra.settings import MqttSettings
from asyncmigfra.transport.mqtt.messages import (
    Delivery,
    Incoming,
    MessageTooLarge,
    Outgoing,
    TransportError,
    _incoming,
)
from asyncmigfra.transport.mqtt.plumbing import (
    close_orphaned_sockets,
    honour_cancel,
    map_mqtt_errors,
    write_directly,
)
from asyncmigfra.transport.mqtt.takeover import (
    ClientIdInUse,
    suspect_takeover_within,
    takeover_delay,
    takeover_evidence,
)

log = structlog.stdlib.get_logger("asyncmigfra.mqtt")

MQTT_ERR_NO_CONN = MQTTErrorCode.MQTT_ERR_NO_CONN
#: The queue of an extra subscription: (topic, payload) of each message.
_ExtraQueue = PeerQueue
#: Topics whose routes are remembered at most (then forgotten all at once).
_MAX_ROUTES = 1024


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

    ``max_payload``: bytes; a larger message is refused (:class:`MessageTooLarge`) by
    :meth:`publish` and :meth:`publish_nowait` and never reaches the MQTT session.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        subscriptions: Sequence[tuple[str, int]],
        will: Outgoing | None = None,
        on_connected: Callable[[], Awaitable[None]] | None = None,
        max_payload: int | None = None,
    ) -> None:
        self._settings = settings
        self.max_payload = max_payload
        self._subscriptions = tuple(subscriptions)
        self._will = will
        self._on_connected = on_connected
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._subscribed = False
        #: Extra subscriptions (hooks): [topic filter, QoS, queue of (topic, payload)].
        self._extra: list[tuple[str, int, _ExtraQueue]] = []
        #: topic -> where its messages go (``_route``), while ``_extra`` stays as it is.
        self._routes: dict[str, tuple[list[_ExtraQueue], bool]] = {}
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
        write_directly(client)
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
                        queues, task = self._route(message.topic)
                        if queues:
                            self._hand_to_extra(message, queues)
                        if task:
                            handler(_incoming(message))
                        elif not queues:
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

    def _route(self, topic: aiomqtt.Topic) -> tuple[list[_ExtraQueue], bool]:
        """Where a message on ``topic`` goes: the queues of the extra subscriptions it
        matches, and whether it matches a task subscription (the handler's, also when it
        matches an extra one too). Remembered per topic (every task comes on the same one)
        until the extra subscriptions change; bounded."""
        route = self._routes.get(topic.value)
        if route is None:
            queues = [queue for t, _, queue in self._extra if topic.matches(t)]
            route = (queues, any(topic.matches(t) for t, _ in self._subscriptions))
            if len(self._routes) >= _MAX_ROUTES:
                self._routes.clear()
            self._routes[topic.value] = route
        return route

    @staticmethod
    def _hand_to_extra(message: aiomqtt.Message, queues: list[_ExtraQueue]) -> None:
        topic, payload = message.topic.value, bytes(message.payload)
        for queue in queues:
            if not queue.offer(topic, payload) and (
                queue.dropped == 1 or queue.dropped % 1000 == 0
            ):
                log.warning(
                    "mqtt.subscription_full", topic=topic, held=queue.held, dropped=queue.dropped
                )

    @asynccontextmanager
    async def subscription(
        self, topic: str, qos: int
    ) -> AsyncIterator[asyncio.Queue[tuple[str, bytes]]]:
        """Subscribe to ``topic`` for the duration of the block (``MessageBus``).

        The queue gets ``(topic, payload)`` of every matching message. The subscription is
        active (SUBACK received) when the block starts, is renewed after a reconnect, and is
        removed when the block ends, however it ends (bounded; errors are logged).
        """
        queue = PeerQueue()
        entry = (topic, qos, queue)
        self._extra.append(entry)
        self._routes.clear()
        try:
            await self._connected.wait()
            client = self._client
            assert client is not None
            with map_mqtt_errors():
                await honour_cancel(client.subscribe(topic, qos=qos))
            yield queue
        finally:
            self._extra.remove(entry)
            self._routes.clear()
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
        for the reconnect, so it is not published a second time. A payload over
        ``max_payload`` raises :class:`MessageTooLarge` at once.
        """
        self._check_size(msg)
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

    def _check_size(self, msg: Outgoing) -> None:
        limit = self.max_payload
        if limit is not None and len(msg.payload) > limit:
            raise MessageTooLarge(msg.topic, len(msg.payload), limit)

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
        self._check_size(msg)
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
