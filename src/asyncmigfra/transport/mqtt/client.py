"""A plain MQTT client for tools (CLI, demo, benchmarks, tests): :class:`ToolClient`."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from asyncmigfra.transport.mqtt.messages import Incoming, TransportError, _incoming
from asyncmigfra.transport.mqtt.plumbing import (
    close_orphaned_sockets,
    honour_cancel,
    map_mqtt_errors,
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
