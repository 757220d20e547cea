"""``task: history`` and ``asyncmigfra history`` against agent processes on the ``fake``
back-end and a real mosquitto: the history survives agent restarts, hostile queries get a
code, hostile VM names are shown escaped, an agent without a journal says so."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_agent_process import start_agent

from harness import scheduler

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

#: rich markup and a zero-width space: a VM name the wire allows, which must not reach a
#: terminal as markup or as an invisible character.
HOSTILE_VM = "[bold red]evil[link=x]\u200bvm"


def fake_config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "communicator:\n"
        "  type: mqtt\n"
        "  host: 127.0.0.1\n"
        f"  port: {port}\n"
        "hypervisor:\n"
        "  type: fake\n"
        "  time-scale: 20\n"
        "  peers: {dest-1: {}}\n"
        "  domains:\n"
        "    - {name: vm1, memory: 1048576}\n"
        '    - {name: "[bold red]evil[link=x]\\u200bvm"}\n'
    )
    return path


def cli(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asyncmigfra", *args, "--broker", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ, LANG="C.UTF-8"),
    )


async def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0


async def _online_again(sched: Any, times: int) -> None:
    await sched.wait_for(
        lambda: sum(1 for s in sched.statuses if s["state"] == "online") >= times, 30
    )


async def test_history_survives_restarts_and_answers_hostile_queries_with_codes(
    mosquitto, tmp_path
):
    host = f"node-{uuid.uuid4().hex[:6]}"
    conf = fake_config(tmp_path, mosquitto.port)
    proc = start_agent(conf, host)
    try:
        async with scheduler(mosquitto.port, f"fast/migfra/{host}") as sched:
            await _online_again(sched, 1)
            r = await sched.call(
                "task: migrate vm\nvm-name: vm1\ndestination: dest-1\n"
                "parameter: {migration-type: live}\n",
                30,
            )
            assert r["status"] == "success", r
            hostile = json.dumps(HOSTILE_VM)
            r = await sched.call(f"task: stop vm\nlist:\n  - {{vm-name: {hostile}, force: true}}\n")
            assert r["list"][0]["status"] == "success", r
            r = await sched.call("task: stop vm\nlist:\n  - vm-name: nosuch\n")
            assert r["list"][0]["code"] == "vm-not-found"

            first = await sched.call("task: history\n")
            assert first["result"] == "history"
            assert (first["host"], first["journal"]) == (host, "ok")
            items = first["list"]
            assert [(i["task"], i["vm-name"], i["status"]) for i in items] == [
                ("stop vm", "nosuch", "error"),
                ("stop vm", HOSTILE_VM, "success"),
                ("migrate vm", "vm1", "success"),
            ]
            migrated = items[2]
            assert migrated["destination"] == "dest-1"
            assert migrated["downtime"] > 0
            assert migrated["duration"] > 0
            assert migrated["id"].startswith("id-")
            assert items[0]["code"] == "vm-not-found"
            assert "nosuch" in items[0]["details"]
            assert [i["started"] for i in items] == sorted(
                (i["started"] for i in items), reverse=True
            )

            # Restart the agent: the history is still there, and grows.
            await _stop(proc)
            proc = start_agent(conf, host)
            await _online_again(sched, 2)
            again = await sched.call("task: history\n")
            assert again["list"] == items
            await sched.call(f"task: start vm\nvm-configurations:\n  - vm-name: {hostile}\n")
            await _stop(proc)
            proc = start_agent(conf, host)
            await _online_again(sched, 3)
            latest = await sched.call("task: history\nlimit: 2\n")
            assert [(i["task"], i["vm-name"]) for i in latest["list"]] == [
                ("start vm", HOSTILE_VM),
                ("stop vm", "nosuch"),
            ]
            only = await sched.call("task: history\nvm-name: vm1\n")
            assert [i["vm-name"] for i in only["list"]] == ["vm1"]
            since = migrated["started"]
            newer = await sched.call(f'task: history\nsince: "{since}"\n')
            assert len(newer["list"]) == 4
            later = await sched.call('task: history\nsince: "9999-01-01"\n')
            assert later["list"] == []

            # Hostile queries: each answered with a code, the agent keeps answering.
            for body in (
                "task: history\nsince: yesterday\n",
                "task: history\nsince: 2026-12-07T10:00:00\n",
                "task: history\nlimit: 100000000\n",
                "task: history\nlimit: -1\n",
                "task: history\nlimit: [1, 2]\n",
                "task: history\nvm-name: {a: b}\n",
                f"task: history\nvm-name: {'v' * 500}\n",
            ):
                r = await sched.call(body)
                assert r["result"] == "unknown", (body, r)
                assert r["list"][0]["code"] == "invalid-message", (body, r)
                assert r["id"].startswith("id-")
            assert (await sched.call("task: history\nlimit: 1\n"))["result"] == "history"

            # The CLI: a table in a pipe (names escaped), JSON lines for scripts.
            out = await asyncio.to_thread(cli, mosquitto.port, "history", host)
            assert out.returncode == 0, out.stderr
            lines = out.stdout.splitlines()
            assert lines[0].split() == [
                "STARTED", "ID", "TASK", "VM", "STATUS", "DURATION", "DOWNTIME",
                "DESTINATION", "CODE",
            ]  # fmt: skip
            assert len(lines) == 5  # the header and 4 tasks
            assert "[bold red]evil[link=x]\\u200bvm" in lines[1]
            assert "\u200b" not in out.stdout
            assert "vm-not-found" in lines[2]
            assert "dest-1" in lines[4]
            assert " ms " in lines[4]
            out = await asyncio.to_thread(
                cli, mosquitto.port, "history", host, "--json", "--vm", "vm1"
            )
            assert out.returncode == 0, out.stderr
            docs = [json.loads(line) for line in out.stdout.splitlines()]
            assert [(d["host"], d["vm-name"], d["destination"]) for d in docs] == [
                (host, "vm1", "dest-1")
            ]
            out = await asyncio.to_thread(cli, mosquitto.port, "history", host, "--limit", "5000")
            assert out.returncode == 2
            assert "at most 1000" in out.stderr
        await _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_an_agent_without_a_journal_says_it_keeps_no_history(mosquitto, tmp_path):
    host = f"node-{uuid.uuid4().hex[:6]}"
    proc = start_agent(fake_config(tmp_path, mosquitto.port), host, state_dir="none")
    try:
        async with scheduler(mosquitto.port, f"fast/migfra/{host}") as sched:
            await _online_again(sched, 1)
            await sched.call("task: stop vm\nlist:\n  - vm-name: vm1\n")
            r = await sched.call("task: history\n")
            assert r["journal"] == "off"
            assert r["list"] == [
                {
                    "vm-name": "n/a",
                    "status": "error",
                    "details": "this agent keeps no history: its journal is off"
                    " (agent.state-dir: none)",
                    "code": "not-supported",
                }
            ]
            out = await asyncio.to_thread(cli, mosquitto.port, "history", host)
            assert out.returncode == 1
            assert f"{host}: not-supported: this agent keeps no history" in out.stderr
        await _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
