"""MQTT hooks (``hooks[N].mqtt``) against a real mosquitto, with the agent's real
``MqttTransport`` as the bus and a responder client playing the external system."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from asyncmigfra.errors import HookFailed
from asyncmigfra.peers.userhooks import HookCall, HookRunner
from asyncmigfra.settings import HookSettings, MqttHookSettings
from asyncmigfra.transport.mqtt import MqttTransport, ToolClient
from harness import RecordingContext as FakeContext
from harness import agent_settings

pytestmark = pytest.mark.broker

#: Answers to one request: the request map -> the payloads to publish on the response topic.
Answer = Callable[[dict[str, str]], list[bytes]]


@dataclass
class Responder:
    client: ToolClient
    response_topic: str
    answer: Answer
    #: (topic, request map) of every request seen.
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    async def pump(self) -> None:
        async for msg in self.client.messages():
            request = json.loads(msg.payload)
            self.requests.append((msg.topic, request))
            for payload in self.answer(request):
                await self.client.publish(self.response_topic, payload, qos=1)


@contextlib.asynccontextmanager
async def responder(
    port: int, request_topic: str, response_topic: str, answer: Answer
) -> AsyncIterator[Responder]:
    client = ToolClient("127.0.0.1", port, client_id=f"dcim-{uuid.uuid4().hex[:8]}")
    async with client:
        await client.subscribe(request_topic, qos=1)
        r = Responder(client, response_topic, answer)
        task = asyncio.create_task(r.pump())
        try:
            yield r
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def vm1_responder(
    port: int, prefix: str, answer: Answer
) -> contextlib.AbstractAsyncContextManager[Responder]:
    """The responder for :data:`CALL` with :func:`mqtt_hook`'s topics."""
    return responder(port, f"{prefix}/src/vm1/notify/request", f"{prefix}/src/z/response", answer)


@contextlib.asynccontextmanager
async def agent_bus(port: int) -> AsyncIterator[MqttTransport]:
    """The agent's transport, connected, with no task subscription."""
    transport = MqttTransport(agent_settings(port).mqtt, subscriptions=[])
    task = asyncio.create_task(transport.run(lambda _: None))
    try:
        await asyncio.wait_for(transport.wait_connected(), 10)
        yield transport
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _prefix() -> str:
    return f"dcim-{uuid.uuid4().hex[:8]}"


def mqtt_hook(prefix: str, **kwargs: object) -> HookSettings:
    kwargs.setdefault("when", ("before-migrate",))
    kwargs.setdefault("timeout", 5.0)
    return HookSettings(
        name="notify",
        mqtt=MqttHookSettings(
            request_topic=f"{prefix}/<host>/<vm_name>/<hook>/request",
            response_topic=f"{prefix}/<host>/+/response",
        ),
        **kwargs,  # type: ignore[arg-type]
    )


CALL = HookCall(
    point="before-migrate",
    task="migrate vm",
    task_id="t-7",
    vm_name="vm1",
    source="src",
    destination="dst",
)


def reply(status: str, **extra: str) -> Answer:
    return lambda request: [
        json.dumps({"request-id": request["request-id"], "status": status, **extra}).encode()
    ]


async def test_success_and_placeholders_replaced(mosquitto):
    prefix = _prefix()
    hook = mqtt_hook(prefix, on="destination")
    ctx = FakeContext()
    async with (
        agent_bus(mosquitto.port) as bus,
        responder(
            mosquitto.port,
            f"{prefix}/dst/vm1/notify/request",
            f"{prefix}/dst/x/response",
            reply("success"),
        ) as r,
    ):
        assert await HookRunner([hook], bus=bus).run(CALL, ctx) == []

        assert bus._extra == []  # the response subscription is gone
    ((topic, request),) = r.requests
    assert topic == f"{prefix}/dst/vm1/notify/request"
    request_id = request.pop("request-id")
    assert len(request_id) == 32
    int(request_id, 16)
    assert request == {
        "hook": "notify",
        "point": "before-migrate",
        "task": "migrate vm",
        "id": "t-7",
        "vm-name": "vm1",
        "source": "src",
        "destination": "dst",
        "host": "dst",
    }
    assert ctx.calls == [
        ("phase", "hook:notify"),
        ("start", "hook-notify"),
        ("stop", "hook-notify"),
    ]


async def test_on_source_and_after_point_data(mosquitto):
    prefix = _prefix()
    hook = mqtt_hook(prefix, when=("after-migrate",))
    call = HookCall(
        point="after-migrate",
        task="migrate vm",
        task_id=None,
        vm_name="vm2",
        source="src",
        destination="dst",
        outcome="error",
        details="migration-failed: boom",
    )
    async with (
        agent_bus(mosquitto.port) as bus,
        responder(
            mosquitto.port,
            f"{prefix}/src/vm2/notify/request",
            f"{prefix}/src/y/response",
            reply("success"),
        ) as r,
    ):
        assert await HookRunner([hook], bus=bus).run(call, FakeContext()) == []
    ((_, request),) = r.requests
    assert "id" not in request
    assert (request["host"], request["outcome"], request["details"]) == (
        "src",
        "error",
        "migration-failed: boom",
    )


async def test_error_answer_fails_the_task(mosquitto):
    prefix = _prefix()
    async with (
        agent_bus(mosquitto.port) as bus,
        vm1_responder(mosquitto.port, prefix, reply("error", details="rack is full")),
    ):
        with pytest.raises(HookFailed) as info:
            await HookRunner([mqtt_hook(prefix)], bus=bus).run(CALL, FakeContext())
        assert bus._extra == []
    assert str(info.value) == "hook notify (before-migrate) failed: answered error: rack is full"
    assert info.value.code == "hook-failed"


async def test_error_answer_with_warn_policy_is_a_warning(mosquitto):
    prefix = _prefix()
    async with (
        agent_bus(mosquitto.port) as bus,
        vm1_responder(mosquitto.port, prefix, reply("error")),
    ):
        warnings = await HookRunner([mqtt_hook(prefix, policy="warn")], bus=bus).run(
            CALL, FakeContext()
        )
    assert warnings == ["hook notify (before-migrate) failed: answered error"]


async def test_answers_to_other_requests_are_ignored(mosquitto):
    prefix = _prefix()

    def other_then_ours(request: dict[str, str]) -> list[bytes]:
        return [
            json.dumps({"request-id": "someone-else", "status": "error"}).encode(),
            json.dumps({"request-id": request["request-id"], "status": "success"}).encode(),
        ]

    async with (
        agent_bus(mosquitto.port) as bus,
        vm1_responder(mosquitto.port, prefix, other_then_ours),
    ):
        assert await HookRunner([mqtt_hook(prefix)], bus=bus).run(CALL, FakeContext()) == []


async def test_only_wrong_ids_is_a_timeout(mosquitto):
    prefix = _prefix()
    wrong = lambda _: [json.dumps({"request-id": "nope", "status": "success"}).encode()]  # noqa: E731
    async with (
        agent_bus(mosquitto.port) as bus,
        vm1_responder(mosquitto.port, prefix, wrong) as r,
    ):
        with pytest.raises(HookFailed) as info:
            await HookRunner([mqtt_hook(prefix, timeout=0.5)], bus=bus).run(CALL, FakeContext())
    assert len(r.requests) == 1
    assert str(info.value) == "hook notify (before-migrate) failed: no answer within 0.5 s"


async def test_yaml_answer_is_accepted(mosquitto):
    prefix = _prefix()
    yaml_answer = lambda request: [  # noqa: E731
        f"# YAML, not JSON\nrequest-id: '{request['request-id']}'\nstatus: success\n".encode()
    ]
    async with (
        agent_bus(mosquitto.port) as bus,
        vm1_responder(mosquitto.port, prefix, yaml_answer),
    ):
        assert await HookRunner([mqtt_hook(prefix)], bus=bus).run(CALL, FakeContext()) == []


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        pytest.param(lambda _: [b"\xff\xfe not text {"], "bad response: not a map: ", id="garbage"),
        pytest.param(lambda _: [b"[1, 2]"], "bad response: not a map: ", id="list"),
        pytest.param(
            lambda _: [b'{"status": "success"}'], "bad response: no request-id", id="no-id"
        ),
        pytest.param(
            lambda r: [json.dumps({"request-id": r["request-id"], "status": "ok"}).encode()],
            "bad response: status must be success or error, got 'ok'",
            id="bad-status",
        ),
        pytest.param(
            lambda r: [json.dumps({"request-id": r["request-id"]}).encode()],
            "bad response: status must be success or error, got None",
            id="no-status",
        ),
        pytest.param(
            lambda r: [
                json.dumps(
                    {"request-id": r["request-id"], "status": "error", "details": [1]}
                ).encode()
            ],
            "bad response: details must be text",
            id="details-not-text",
        ),
    ],
)
async def test_bad_answers_fail(mosquitto, answer: Answer, reason: str):
    prefix = _prefix()
    async with (
        agent_bus(mosquitto.port) as bus,
        vm1_responder(mosquitto.port, prefix, answer),
    ):
        with pytest.raises(HookFailed) as info:
            await HookRunner([mqtt_hook(prefix)], bus=bus).run(CALL, FakeContext())
        assert bus._extra == []
    assert str(info.value).startswith(f"hook notify (before-migrate) failed: {reason}")


async def test_no_answer_is_a_timeout(mosquitto):
    prefix = _prefix()
    async with (
        agent_bus(mosquitto.port) as bus,
        vm1_responder(mosquitto.port, prefix, lambda _: []) as r,
    ):
        started = time.monotonic()
        with pytest.raises(HookFailed) as info:
            await HookRunner([mqtt_hook(prefix, timeout=0.4)], bus=bus).run(CALL, FakeContext())
        elapsed = time.monotonic() - started
        assert bus._extra == []
    assert str(info.value) == "hook notify (before-migrate) failed: no answer within 0.4 s"
    assert 0.4 <= elapsed < 3
    assert len(r.requests) == 1  # the request did go out


async def test_vm_name_that_cannot_be_a_topic_level_fails(mosquitto):
    prefix = _prefix()
    call = HookCall(
        point="before-migrate", task="migrate vm", task_id=None, vm_name="a+b", source="src"
    )
    async with agent_bus(mosquitto.port) as bus:
        with pytest.raises(HookFailed, match=r"'a\+b' cannot be put into a topic \(<vm_name>\)"):
            await HookRunner([mqtt_hook(prefix)], bus=bus).run(call, FakeContext())


async def test_cancellation_removes_the_subscription(mosquitto):
    prefix = _prefix()
    async with (
        agent_bus(mosquitto.port) as bus,
        vm1_responder(mosquitto.port, prefix, lambda _: []) as r,
    ):
        task = asyncio.create_task(
            HookRunner([mqtt_hook(prefix, timeout=30)], bus=bus).run(CALL, FakeContext())
        )
        deadline = time.monotonic() + 5
        while not r.requests:
            assert time.monotonic() < deadline, "no request arrived"
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert bus._extra == []
