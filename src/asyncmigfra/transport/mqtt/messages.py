"""What the MQTT package hands its callers: messages in and out, delivery state, the error."""

from __future__ import annotations

from dataclasses import dataclass

import aiomqtt

from asyncmigfra.errors import AsyncmigfraError


class TransportError(AsyncmigfraError):
    """The broker could not be reached or refused an operation."""


class MessageTooLarge(TransportError):
    """A payload larger than the transport's ``max_payload``: never handed to the session
    (a broker limiting messages drops it, or disconnects the client for it at MQTT 5, and
    the session then sends it again after every reconnect)."""

    def __init__(self, topic: str, size: int, limit: int) -> None:
        super().__init__(f"a message of {size} bytes to {topic} exceeds the limit of {limit} bytes")
        self.topic = topic
        self.size = size
        self.limit = limit


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
