"""Two clients with one MQTT client id: the takeover is detected, reported once per takeover,
backed off, and ends ``MqttTransport.run`` with ``ClientIdInUse`` (a ``StartupError``: the
agent exits 2) at ``takeover-limit`` within ``takeover-window``.

Measured with mosquitto 2.0.11 (the broker these tests run against): the broker closes the old
connection without a word for MQTT 3.1.1 *and* 5, so both rely on the "closed soon after
connecting" rule. mosquitto 2.0.15+ sends DISCONNECT 0x8E (session taken over) to MQTT 5
clients; a scripted broker below plays that part.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from structlog.testing import capture_logs

from asyncmigfra.errors import StartupError
from asyncmigfra.settings import MqttSettings
from asyncmigfra.transport.mqtt import (
    ClientIdInUse,
    MqttTransport,
    ToolClient,
    suspect_takeover_within,
    takeover_evidence,
)

PROTOCOLS = ["5", "3.1.1"]


def settings(port: int, client_id: str, protocol: str = "5", **overrides: Any) -> MqttSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "client_id": client_id,
        "protocol": protocol,
        "task_topic": f"{client_id}/task",
        # Small delays keep the ping-pong (and so each test) short: takeover reconnects wait
        # min(5 s, reconnect-max-delay) = 1 s here.
        "reconnect_min_delay": 0.05,
        "reconnect_max_delay": 1.0,
        "takeover_limit": 3,
        "takeover_window": 30.0,
    }
    values.update(overrides)
    return MqttSettings(**values)


def transport(s: MqttSettings) -> MqttTransport:
    return MqttTransport(s, subscriptions=[(s.task_topic, 1)])


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def stop(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def clashes(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == "mqtt.client_id_in_use"]


# --- the classification --------------------------------------------------------------------


def disconnect_error(reason: str) -> aiomqtt.MqttError:
    """What aiomqtt raises from its message iterator after ``on_disconnect(reason)``."""
    try:
        try:
            raise aiomqtt.MqttCodeError(
                ReasonCode(PacketTypes.DISCONNECT, reason), "Unexpected disconnection"
            )
        except aiomqtt.MqttCodeError as cause:
            raise aiomqtt.MqttError("Disconnected during message iteration") from cause
    except aiomqtt.MqttError as exc:
        return exc


def test_session_taken_over_is_a_takeover_however_long_the_connection_was_up() -> None:
    exc = disconnect_error("Session taken over")
    assert "0x8E" in (takeover_evidence(exc, 3600.0, 2.0) or "")
    assert takeover_evidence(exc, None, 2.0) is not None


def test_a_closed_connection_is_a_suspected_takeover_only_soon_after_connecting() -> None:
    exc = disconnect_error("Unspecified error")  # paho's reason for a closed socket
    assert "suspected" in (takeover_evidence(exc, 0.5, 2.0) or "")
    assert takeover_evidence(exc, 2.5, 2.0) is None  # a broker restart, a network failure
    assert takeover_evidence(exc, None, 2.0) is None  # never connected and subscribed


@pytest.mark.parametrize("reason", ["Keep alive timeout", "Server shutting down", "Server busy"])
def test_other_disconnect_reasons_are_no_takeover(reason: str) -> None:
    assert takeover_evidence(disconnect_error(reason), 0.1, 2.0) is None


def test_connect_failures_are_no_takeover() -> None:
    assert takeover_evidence(aiomqtt.MqttError("[Errno 111] Connection refused"), None, 2.0) is None


def test_the_suspect_window_covers_a_peer_that_retries_like_us() -> None:
    # Longer than the other client's takeover wait (5 s, up to 6 s with jitter) plus its
    # reconnect: the established client sees every takeover too, not only the newcomer.
    assert suspect_takeover_within(MqttSettings()) == pytest.approx(9.0)
    assert suspect_takeover_within(MqttSettings(reconnect_min_delay=3.0)) == pytest.approx(14.0)
    assert suspect_takeover_within(MqttSettings(reconnect_max_delay=1.0)) == pytest.approx(4.2)


def test_client_id_in_use_is_a_startup_error_with_one_line() -> None:
    exc = ClientIdInUse("fast-migfra-a", 5, 60.0)
    assert isinstance(exc, StartupError)
    text = str(exc)
    assert "\n" not in text
    assert "'fast-migfra-a'" in text
    assert "5 times within 60 s" in text
    assert "communicator.id" in text


# --- against mosquitto -----------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_two_transports_with_one_client_id_stop_with_client_id_in_use(
    mosquitto: Any, protocol: str
) -> None:
    """(a) MQTT 5 and (b) 3.1.1: one of the two (or both) gives up within a bounded time."""
    s = settings(mosquitto.port, f"clash-{protocol}", protocol)
    first, second = transport(s), transport(s)
    with capture_logs() as logs:
        a = asyncio.create_task(first.run(lambda _: None))
        await wait_until(lambda: first.connects >= 1)
        b = asyncio.create_task(second.run(lambda _: None))
        try:
            async with asyncio.timeout(12):
                done, _ = await asyncio.wait({a, b}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pending = [t for t in (a, b) if not t.done()]
            await stop(*pending)
    ended = next(iter(done))
    with pytest.raises(ClientIdInUse) as info:
        ended.result()
    assert info.value.client_id == s.client_id
    assert info.value.count == 3
    events = clashes(logs)
    assert events, "no mqtt.client_id_in_use event"
    assert all(e["client_id"] == s.client_id for e in events)
    assert all(e["log_level"] == "error" for e in events)
    assert events[-1]["action"] == "exit"
    assert events[-1]["count"] == 3
    # One event per takeover and no generic reconnect warning for them.
    assert len(events) == first.takeovers + second.takeovers
    assert not [e for e in logs if e["event"] == "mqtt.reconnect_scheduled"]
    # Backed off: the takeover reconnects waited >= reconnect-max-delay (1 s) each.
    assert all(e["delay"] >= 1.0 for e in events if e["action"] == "reconnect")


@pytest.mark.broker
@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_broker_restart_is_no_takeover(private_mosquitto: Any, protocol: str) -> None:
    """(c) A connection that was up for a while and is then dropped (broker restart):
    one reconnect, no takeover, no error."""
    s = settings(private_mosquitto.port, f"restart-{protocol}", protocol, takeover_limit=1)
    t = transport(s)
    with capture_logs() as logs:
        task = asyncio.create_task(t.run(lambda _: None))
        try:
            await wait_until(lambda: t.connects >= 1)
            await asyncio.sleep(suspect_takeover_within(s) + 0.2)
            private_mosquitto.restart()
            await wait_until(lambda: t.connects >= 2)
            await asyncio.sleep(0.3)
            assert not task.done()
        finally:
            await stop(task)
    assert t.takeovers == 0
    assert clashes(logs) == []
    assert not [e for e in logs if e["log_level"] == "error"]
    names = [e["event"] for e in logs if e["event"].startswith("mqtt.")]
    assert names[0] == names[-1] == "mqtt.connected"
    assert names.count("mqtt.connected") == 2
    assert set(names[1:-1]) == {"mqtt.reconnect_scheduled"}


@pytest.mark.broker
async def test_a_single_takeover_below_the_limit_keeps_the_transport_running(
    mosquitto: Any,
) -> None:
    """(c) One other client borrowing the id once: one error, one backed-off reconnect."""
    s = settings(mosquitto.port, "borrowed-once", "3.1.1")
    t = transport(s)
    with capture_logs() as logs:
        task = asyncio.create_task(t.run(lambda _: None))
        try:
            await wait_until(lambda: t.connects >= 1)
            async with ToolClient("127.0.0.1", mosquitto.port, client_id=s.client_id):
                await wait_until(lambda: t.takeovers >= 1)
            await wait_until(lambda: t.connects >= 2)
            await asyncio.sleep(0.3)
            assert not task.done()
        finally:
            await stop(task)
    (event,) = clashes(logs)
    assert event["count"] == 1
    assert event["action"] == "reconnect"
    assert event["limit"] == 3
    assert event["window"] == 30.0


# --- MQTT 5 DISCONNECT 0x8E (mosquitto >= 2.0.15), from a scripted broker -----------------------


class TakeoverBroker:
    """Just enough MQTT 5 server for a transport: CONNACK, SUBACK, PINGRESP, and a
    DISCONNECT 0x8E (session taken over) to the older of two connections with one client id."""

    def __init__(self) -> None:
        self.by_id: dict[str, asyncio.StreamWriter] = {}
        self.writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[TakeoverBroker]:
        server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for w in list(self.writers):
                w.close()
            await server.wait_closed()

    @staticmethod
    async def _packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
        kind = (await reader.readexactly(1))[0]
        length, shift = 0, 0
        while True:
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return kind, await reader.readexactly(length)

    @staticmethod
    def _varint(data: bytes, at: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            byte = data[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, at

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                kind, body = await self._packet(reader)
                if kind == 0x10:  # CONNECT: name, version, flags, keepalive, properties, id
                    props, at = self._varint(body, 10)
                    at += props
                    size = int.from_bytes(body[at : at + 2], "big")
                    client_id = body[at + 2 : at + 2 + size].decode()
                    old = self.by_id.get(client_id)
                    if old is not None:
                        old.write(b"\xe0\x02\x8e\x00")  # DISCONNECT, Session taken over
                        await old.drain()
                        old.close()
                    self.by_id[client_id] = writer
                    writer.write(b"\x20\x03\x00\x00\x00")  # CONNACK: success, no properties
                elif kind == 0x82:  # SUBSCRIBE: packet id, properties, (filter, options)*
                    props, at = self._varint(body, 2)
                    at += props
                    granted = bytearray()
                    while at < len(body):
                        size = int.from_bytes(body[at : at + 2], "big")
                        at += 2 + size
                        granted.append(body[at] & 0x03)
                        at += 1
                    rest = body[:2] + b"\x00" + bytes(granted)
                    writer.write(bytes([0x90, len(rest)]) + rest)
                elif kind == 0xC0:  # PINGREQ
                    writer.write(b"\xd0\x00")
                elif kind == 0xE0:  # DISCONNECT
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.mark.broker
async def test_mqtt5_session_taken_over_is_recognised_by_its_reason_code() -> None:
    """A DISCONNECT 0x8E counts however long the connection was up; limit 1 ends at once."""
    async with TakeoverBroker().serve() as broker:
        s = settings(broker.port, "taken-over", "5", takeover_limit=1)
        t = transport(s)
        with capture_logs() as logs:
            task = asyncio.create_task(t.run(lambda _: None))
            try:
                await wait_until(lambda: t.connects >= 1)
                await asyncio.sleep(suspect_takeover_within(s) + 0.2)
                async with ToolClient("127.0.0.1", broker.port, client_id=s.client_id):
                    async with asyncio.timeout(5):
                        with pytest.raises(ClientIdInUse):
                            await task
            finally:
                await stop(task)
    (event,) = clashes(logs)
    assert "0x8E" in event["evidence"]
    assert event["action"] == "exit"
    assert event["count"] == 1


@pytest.mark.broker
async def test_the_established_client_sees_the_clash_too(mosquitto: Any) -> None:
    """The one that was connected first is taken over after the newcomer's takeover wait;
    that is within the suspect window, so it logs the clash as well (the review's case)."""
    s = settings(mosquitto.port, "established", "5", takeover_limit=0)
    first, second = transport(s), transport(s)
    with capture_logs() as logs:
        a = asyncio.create_task(first.run(lambda _: None))
        await wait_until(lambda: first.connects >= 1)
        await asyncio.sleep(suspect_takeover_within(s) + 0.5)  # well established
        b = asyncio.create_task(second.run(lambda _: None))
        try:
            await wait_until(lambda: first.takeovers >= 2 and second.takeovers >= 2, 20)
        finally:
            await stop(a, b)
    assert len(clashes(logs)) == first.takeovers + second.takeovers


@pytest.mark.broker
async def test_another_client_s_subscriptions_in_a_shared_session_are_never_tasks(
    mosquitto: Any,
) -> None:
    """A persistent session that another client of the same id used holds its subscriptions
    too: their messages are dropped (and logged), never handed on as tasks."""
    other = settings(mosquitto.port, "shared-session", task_topic="p/node-b/task")
    mine = settings(mosquitto.port, "shared-session", task_topic="p/node-a/task")
    b = transport(other)
    run_b = asyncio.create_task(b.run(lambda _: None))
    await wait_until(lambda: b.connects >= 1)
    await stop(run_b)  # node-b's subscription stays in the broker's session
    got: list[str] = []
    a = transport(mine)
    with capture_logs() as logs:
        run_a = asyncio.create_task(a.run(lambda m: got.append(m.topic)))
        try:
            await wait_until(lambda: a.connects >= 1)
            async with ToolClient("127.0.0.1", mosquitto.port) as pub:
                await pub.publish("p/node-b/task", b"task: quit\n", qos=1)
                await pub.publish("p/node-a/task", b"task: status\n", qos=1)
            await wait_until(lambda: got and a.foreign >= 1)
        finally:
            await stop(run_a)
    assert got == ["p/node-a/task"]
    foreign = [e for e in logs if e["event"] == "mqtt.foreign_message"]
    assert [e["topic"] for e in foreign] == ["p/node-b/task"]


@pytest.mark.broker
async def test_an_agent_whose_client_id_is_taken_drains_before_it_exits(
    mosquitto: Any, tmp_path: Any
) -> None:
    """At the limit the agent shuts down as on SIGTERM: the running task still finishes and
    its result is kept as owed in the journal (the broker is out of reach for it now), then
    ``Agent.run`` raises ``ClientIdInUse`` (the CLI exits 2)."""
    from asyncmigfra.app import Agent  # noqa: PLC0415
    from asyncmigfra.tasks.journal import Journal  # noqa: PLC0415
    from harness import agent_settings, scheduler  # noqa: PLC0415

    base = agent_settings(
        mosquitto.port,
        hv_type="fake",
        hv_options={
            "start-delay": 2,
            "domains": [{"name": "slow", "vcpus": 1, "memory": 1024, "state": "shutoff"}],
        },
        mqtt={"takeover_limit": 1, "reconnect_max_delay": 1.0},
        agent={"state_dir": str(tmp_path / "state")},
    )
    agent = Agent(base)
    prefix = base.mqtt.task_topic.rsplit("/", 1)[0]
    async with scheduler(mosquitto.port, prefix) as sched:
        run = asyncio.create_task(agent.run())
        await asyncio.wait_for(agent.ready.wait(), 10)
        await sched.publish(
            "id: long\ntask: start vm\nvm-configurations:\n"
            "  - vm-name: slow\n    probe-with-ssh: false\n"
        )
        await sched.wait_for(lambda: sched.events_for("long", "phase"), 10)
        # Another client takes the session (the agent's connection is young: a takeover).
        async with ToolClient("127.0.0.1", mosquitto.port, client_id=base.mqtt.client_id):
            with pytest.raises(ClientIdInUse):
                await asyncio.wait_for(run, 20)
    journal = Journal(tmp_path / "state")
    records = await journal.open()
    await journal.close()
    assert [(r.task_id, r.state) for r in records] == [("long", "finished")]
    assert records[0].result is not None
    assert b"status: success" in records[0].result
