"""Session takeovers: another client connecting with the agent's client id."""

from __future__ import annotations

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode

from asyncmigfra.errors import StartupError
from asyncmigfra.settings import MqttSettings


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
