"""The agent's log as an operator reads it: where the broker is (host:port) in every connect
and reconnect line, and one ``task.finished`` line per finished task (the audit trail)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs
from test_migrate_fake import _dom, two_hosts

from asyncmigfra.transport.mqtt import suspect_takeover_within
from harness import agent_settings, running_agent

pytestmark = pytest.mark.broker


async def _until(predicate: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_every_finished_task_leaves_one_audit_line(mosquitto):
    with capture_logs() as logs:
        async with two_hosts(mosquitto.port, [_dom("moved"), _dom("stays")]) as (_, sched, shared):
            src, dest = shared["names"]
            ok = await sched.call(
                f"task: migrate vm\nvm-name: moved\ndestination: {dest}\n"
                "parameter:\n  migration-type: live\n",
                timeout=20,
            )
            refused = await sched.call(
                f"task: migrate vm\nvm-name: stays\ndestination: {src}\n"
                "parameter:\n  migration-type: live\n"
            )
            stopped = await sched.call("task: stop vm\nlist:\n  - vm-name: stays\n")
    finished = {str(e["task_id"]): e for e in logs if e["event"] == "task.finished"}
    assert set(finished) >= {ok["id"], refused["id"], stopped["id"]}
    line = finished[ok["id"]]
    assert line["log_level"] == "info"
    assert (line["task"], line["vms"], line["result"]) == ("migrate vm", ["moved"], "success")
    assert "code" not in line
    assert line["duration"] > 0
    line = finished[refused["id"]]
    assert (line["result"], line["code"]) == ("error", "incompatible-destination")
    assert finished[stopped["id"]]["vms"] == ["stays"]
    assert sum(1 for e in logs if e["event"] == "task.finished" and e["task_id"] == ok["id"]) == 1


async def test_connect_and_reconnect_lines_name_the_broker(private_mosquitto):
    settings = agent_settings(private_mosquitto.port)
    where = f"127.0.0.1:{private_mosquitto.port}"
    with capture_logs() as logs:
        async with running_agent(settings):
            await _until(lambda: any(e["event"] == "mqtt.connected" for e in logs))
            # (a connection dropped sooner would be taken for a client-id takeover)
            await asyncio.sleep(suspect_takeover_within(settings.mqtt) + 0.2)
            private_mosquitto.restart()
            await _until(lambda: sum(e["event"] == "mqtt.connected" for e in logs) >= 2)
    connected = [e for e in logs if e["event"] == "mqtt.connected"]
    scheduled = [e for e in logs if e["event"] == "mqtt.reconnect_scheduled"]
    assert scheduled, [e["event"] for e in logs if e["event"].startswith("mqtt.")]
    assert all(e["broker"] == where for e in connected + scheduled)
