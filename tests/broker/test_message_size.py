"""No message over the broker's size limit: a broker configured as docs/operations.md §2
recommends (``message_size_limit`` = the agent's ``limits.max-message-size``) drops a larger
message silently at MQTT 3.1.1 and disconnects the agent for it at MQTT 5, which then sent it
again after every reconnect. Answers of any kind that a client can make large (a ``status``
of many VMs, a ``stop vm`` of many long unknown names, whose errors repeat each name) reach
the client bounded, with a ``code`` or ``more: true``, and the agent goes on serving."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from typing import Any

import pytest
from structlog.testing import capture_logs

from asyncmigfra import cli
from asyncmigfra.settings import HypervisorSettings, default_settings
from asyncmigfra.transport.mqtt import MessageTooLarge, MqttTransport, Outgoing, ToolClient
from asyncmigfra.transport.publishing import Publisher
from harness import Scheduler, agent_settings, running_agent, scheduler

pytestmark = pytest.mark.broker

#: Bytes: the broker's ``message_size_limit`` and the agent's ``limits.max-message-size``
#: (small, so that a few hundred VMs exceed it).
LIMIT = 64 * 1024
#: A VM name as long as the wire allows, in 3-byte UTF-8 characters.
LONG = "\u4e2d" * 190


@pytest.fixture
def limited_mosquitto(private_mosquitto):  # type: ignore[no-untyped-def]
    """A broker of the test's own that drops messages over :data:`LIMIT` bytes."""
    with private_mosquitto.conf.open("a") as conf:
        conf.write(f"message_size_limit {LIMIT}\n")
    private_mosquitto.restart()
    return private_mosquitto


def _settings(port: int, protocol: str, domains: list[dict[str, object]]) -> Any:
    settings = agent_settings(
        port, protocol=protocol, hv_type="fake", limits={"max_message_size": LIMIT}
    )
    options = {"host": settings.hostname, "domains": domains}
    return replace(settings, hypervisor=HypervisorSettings(type="fake", options=options))


async def _still_serving(sched: Scheduler) -> None:
    """A small task after the large answer gets its answer (nothing stuck ahead of it)."""
    small = await sched.call("task: stop vm\nlist:\n  - vm-name: nosuch\n", 10)
    assert small["result"] == "vm stopped"
    assert small["list"][0]["code"] == "vm-not-found"


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_a_status_of_many_vms_is_answered_within_the_limit(
    limited_mosquitto, protocol, capsys
):
    vms = [f"{i:04d}-{LONG}" for i in range(200)]  # ~130 KB of entries
    settings = _settings(
        limited_mosquitto.port, protocol, [{"name": vm, "memory": 1024} for vm in vms]
    )
    prefix = settings.mqtt.task_topic.rsplit("/", 1)[0]
    async with (
        scheduler(limited_mosquitto.port, prefix, protocol=protocol) as sched,
        running_agent(settings),
    ):
        status = await sched.call("task: status\n", 10)
        assert status["result"] == "status"
        assert status["more"] is True
        listed = [entry["vm-name"] for entry in status["list"]]
        assert 0 < len(listed) < len(vms)
        assert listed == vms[: len(listed)]  # the back-end's order, the first that fit
        assert max(len(raw) for raw in sched.raw_results) <= LIMIT
        await _still_serving(sched)
        # The CLI shows what came and says that there is more.
        args = ["status", settings.hostname, "--mqtt-protocol", protocol,
                "--broker", f"127.0.0.1:{limited_mosquitto.port}"]  # fmt: skip
        code = await asyncio.to_thread(cli.main, args)
        out = capsys.readouterr()
        assert code == 0, out.err
        assert f"Domains ({len(listed)})" in out.out
        assert f"sent its first {len(listed)} domains, all that fit in one answer" in out.err


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_a_result_too_large_is_answered_with_a_code(limited_mosquitto, protocol):
    # Every unknown name comes back in its entry twice (vm-name and details): a task within
    # the limit whose result is not.
    names = [f"{i:03d}-{LONG}" for i in range(60)]
    body = "task: stop vm\nlist:\n" + "".join(f"  - vm-name: {n}\n" for n in names)
    assert len(body.encode()) < LIMIT
    settings = _settings(limited_mosquitto.port, protocol, [])
    prefix = settings.mqtt.task_topic.rsplit("/", 1)[0]
    async with (
        scheduler(limited_mosquitto.port, prefix, protocol=protocol) as sched,
        running_agent(settings),
    ):
        task_id = f"big-{uuid.uuid4().hex[:8]}"
        logs = await _logged_while(sched, task_id, body)
        result = await sched.result_for(task_id, timeout=10)
        assert result["result"] == "vm stopped"
        *kept, last = result["list"]
        # The entries that fit, in order, each whole; then one entry saying what was left out.
        assert 0 < len(kept) < len(names)
        assert [e["vm-name"] for e in kept] == names[: len(kept)]
        assert {e["code"] for e in kept} == {"vm-not-found"}
        assert last["vm-name"] == "n/a"
        assert last["status"] == "error"
        assert last["code"] == "not-supported"
        assert f"{len(names) - len(kept)} of {len(names)} entries" in last["details"]
        assert max(len(raw) for raw in sched.raw_results) <= LIMIT
        # Said once, in the agent's log.
        (said,) = [e for e in logs if e["event"] == "result.too_large"]
        assert (said["task_id"], said["limit"], said["left_out"]) == (
            task_id, LIMIT, len(names) - len(kept),
        )  # fmt: skip
        await _still_serving(sched)


async def _logged_while(sched: Scheduler, task_id: str, body: str) -> list[dict[str, Any]]:
    """The agent's log lines from sending the task until its result arrived."""
    with capture_logs() as logs:
        await sched.publish(f"id: {task_id}\n{body}")
        await sched.result_for(task_id, timeout=10)
    return logs


async def test_no_message_over_the_limit_reaches_the_session(limited_mosquitto):
    """Below the agent: whatever is published (events, presence, a peer request), a payload
    over the limit is dropped with one log line (publisher) or refused (the bus), at MQTT 5
    too, where the broker disconnected the client for it; one of exactly the limit passes.
    Nothing is sent again, and what follows arrives in order over the one connection."""
    port = limited_mosquitto.port
    base = default_settings(hostname="pub")
    topic = f"size/{uuid.uuid4().hex[:8]}"
    settings = replace(
        base.mqtt,
        host="127.0.0.1",
        port=port,
        protocol="5",
        client_id=f"pub-{uuid.uuid4().hex[:8]}",
        reconnect_min_delay=0.05,
        reconnect_max_delay=0.2,
    )
    transport = MqttTransport(settings, subscriptions=[(f"{topic}/in", 2)], max_payload=LIMIT)
    publisher = Publisher(transport)
    seen: list[bytes] = []
    big = b"x" * (LIMIT + 1)

    async with ToolClient("127.0.0.1", port, client_id=f"sub-{uuid.uuid4().hex[:8]}") as sub:
        await sub.subscribe(topic, qos=1)

        async def pump() -> None:
            async for msg in sub.messages():
                seen.append(msg.payload)

        async with asyncio.TaskGroup() as tg:
            pumping = tg.create_task(pump())
            with capture_logs() as logs:
                publisher.put_nowait(Outgoing(topic, big))  # before the connection
                publisher.put_nowait(Outgoing(topic, b"0"))
                running = tg.create_task(publisher.run())
                connection = tg.create_task(transport.run(lambda _: None))
                await transport.wait_connected()
                publisher.put_nowait(Outgoing(topic, big, qos=0))  # at once: nothing queued
                publisher.put_nowait(Outgoing(topic, b"1" * LIMIT))  # exactly the limit
                with pytest.raises(MessageTooLarge):
                    await transport.send(topic, big, 1)
                publisher.put_nowait(Outgoing(topic, b"2"))
                async with asyncio.timeout(10):
                    while len(seen) < 3:
                        await asyncio.sleep(0.01)
                    await publisher.wait_idle()
            await asyncio.sleep(0.5)  # anything sent again would arrive by now
            for task in (pumping, running, connection):
                task.cancel()
    assert seen == [b"0", b"1" * LIMIT, b"2"]
    assert transport.connects == 1
    assert publisher.too_large == 2
    refused = [e for e in logs if e["event"] == "publish.too_large"]
    assert [(e["size"], e["limit"]) for e in refused] == [(LIMIT + 1, LIMIT)] * 2
