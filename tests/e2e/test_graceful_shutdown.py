"""SIGTERM on a busy agent process: status ``draining``, new tasks answered ``busy``, running
work finishes within the grace period, results published, status ``offline``, exit 0. A second
SIGTERM cuts the grace period short: running work is cancelled and still answered."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from harness import scheduler

pytestmark = [pytest.mark.e2e, pytest.mark.broker]


def start(tmp_path: Path, port: int, host: str, *, delay: float, grace: float):
    conf = tmp_path / "agent.yaml"
    conf.write_text(
        f"communicator:\n  host: 127.0.0.1\n  port: {port}\n"
        f"hypervisor:\n  type: fake\n  start-delay: {delay}\n  domains:\n"
        "    - {name: slow, vcpus: 1, memory: 1024, state: shutoff}\n"
        f"agent:\n  state-dir: none\nshutdown:\n  grace-period: {grace}\n"
    )
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncmigfra", "agent", "-c", str(conf), "--hostname", host],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    log.close()
    return proc


START = "task: start vm\nvm-configurations:\n  - vm-name: slow\n    probe-with-ssh: false\n"


async def test_sigterm_drains_running_work_then_goes_offline(mosquitto, tmp_path):
    host = f"drain-{uuid.uuid4().hex[:6]}"
    proc = start(tmp_path, mosquitto.port, host, delay=1.5, grace=20)
    try:
        async with scheduler(mosquitto.port, f"fast/migfra/{host}") as sched:
            await sched.state("online", 20)
            await sched.publish("id: running\n" + START)
            await sched.wait_for(lambda: sched.events_for("running", "phase"), 10)
            proc.send_signal(signal.SIGTERM)
            await sched.state("draining", 10)
            late = await sched.call("task: suspend vm\nlist:\n  - vm-name: slow\n")
            assert late["list"][0]["code"] == "busy"
            assert "shutting down" in late["list"][0]["details"]
            r = await sched.result_for("running", 20)
            assert r["list"][0]["status"] == "success"
            await sched.state("offline", 20)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_second_sigterm_cancels_running_work_and_answers_it(mosquitto, tmp_path):
    host = f"drain2-{uuid.uuid4().hex[:6]}"
    proc = start(tmp_path, mosquitto.port, host, delay=30, grace=60)
    try:
        async with scheduler(mosquitto.port, f"fast/migfra/{host}") as sched:
            await sched.state("online", 20)
            await sched.publish("id: long\n" + START)
            await sched.wait_for(lambda: sched.events_for("long", "phase"), 10)
            proc.send_signal(signal.SIGTERM)
            await sched.state("draining", 10)
            proc.send_signal(signal.SIGTERM)
            r = await sched.result_for("long", 20)
            assert r["list"][0]["code"] == "cancelled"
            await sched.state("offline", 20)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
