"""Nothing accepted is lost when the agent dies: a SIGKILLed agent, restarted on the same
journal, runs or reconciles what it had accepted and publishes every result it owed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from asyncmigfra.tasks.journal import Journal
from harness import scheduler

pytestmark = [pytest.mark.e2e, pytest.mark.broker]


def config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "communicator:\n  type: mqtt\n  host: 127.0.0.1\n"
        f"  port: {port}\n  reconnect-min-delay: 0.05\n  reconnect-max-delay: 0.5\n"
        "hypervisor:\n  type: fake\n  start-delay: 3\n  domains:\n"
        "    - {name: slow, vcpus: 1, memory: 1024, state: shutoff}\n"
        "    - {name: quick, vcpus: 1, memory: 1024, state: shutoff}\n"
        f"agent:\n  state-dir: {tmp_path / 'state'}\n"
    )
    return path


def start(conf: Path, host: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "asyncmigfra", "agent", "-c", str(conf), "--hostname", host],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )


async def test_killed_agent_delivers_every_accepted_task_after_restart(mosquitto, tmp_path):
    host = f"crash-{uuid.uuid4().hex[:6]}"
    conf = config(tmp_path, mosquitto.port)
    log = tmp_path / "agent.log"
    proc = start(conf, host, log)
    try:
        async with scheduler(mosquitto.port, f"fast/migfra/{host}") as sched:
            await sched.state("online", 20)
            # One task is running (a 3 s boot), one waits behind it in the same VM lane.
            await sched.publish(
                "id: running\ntask: start vm\nvm-configurations:\n"
                "  - vm-name: slow\n    probe-with-ssh: false\n"
            )
            await sched.publish("id: queued\ntask: suspend vm\nlist:\n  - vm-name: slow\n")
            await sched.wait_for(lambda: sched.events_for("queued", "accepted"), 10)
            await sched.wait_for(lambda: sched.events_for("running", "phase"), 10)
            proc.kill()
            await asyncio.to_thread(proc.wait)
            assert not [r for r in sched.results if r.get("id") in {"running", "queued"}]

            proc = start(conf, host, log)
            r1 = await sched.result_for("running", timeout=30)
            r2 = await sched.result_for("queued", timeout=30)
            # The restarted agent ran the interrupted start again (the fake host restarted
            # too, so the VM was shut off), then the suspend that had waited behind it.
            assert r1["list"][0]["status"] == "success", r1
            assert r2["list"][0]["status"] == "success", r2
            recovered = [
                e for e in sched.events_for("running", "phase") if e["phase"] == "reconciling"
            ]
            assert recovered, "the running task was reconciled, not blindly re-run"
            # Each task got exactly one result.
            await asyncio.sleep(0.5)
            ids = [r.get("id") for r in sched.results]
            assert ids.count("running") == 1
            assert ids.count("queued") == 1
    finally:
        if proc.poll() is None:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 20)
    assert proc.returncode == 0, log.read_text()[-3000:]


async def test_owed_result_is_published_after_restart(mosquitto, tmp_path):
    """A result recorded as owed (the agent died before the broker acknowledged it) is
    published again by the next run."""
    host = f"owed-{uuid.uuid4().hex[:6]}"
    conf = config(tmp_path, mosquitto.port)
    journal = Journal(tmp_path / "state")
    await journal.open()
    await journal.accepted(
        "k-owed",
        task_id="owed-1",
        payload=b"task: quit\nid: owed-1\n",
        response_topic=None,
        correlation=None,
    )
    journal.finished(
        "k-owed",
        b"---\nresult: quit\nlist:\n  - vm-name: n/a\n    status: success\nid: owed-1\n...\n",
    )
    await journal.close()
    async with scheduler(mosquitto.port, f"fast/migfra/{host}") as sched:
        proc = start(conf, host, tmp_path / "agent.log")
        try:
            r = await sched.result_for("owed-1", timeout=20)
            assert r["result"] == "quit"
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 20)
    again = Journal(tmp_path / "state")
    assert await again.open() == []  # delivered now
    await again.close()
