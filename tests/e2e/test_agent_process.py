"""The agent as a real process, configured with the original's migfra.conf (type: dummy)."""

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

ROOT = Path(__file__).resolve().parents[2]


def original_config(tmp_path: Path, port: int) -> Path:
    """config/migfra-dummy.conf as the original ships it, pointed at the test broker."""
    text = (ROOT / "config" / "migfra-dummy.conf").read_text()
    text = text.replace("host: devon", "host: 127.0.0.1").replace("port: 1883", f"port: {port}")
    assert "<hostname>" in text
    path = tmp_path / "migfra.conf"
    path.write_text(text)
    return path


def start_agent(
    conf: Path, hostname: str, *, state_dir: str | None = None
) -> subprocess.Popen[bytes]:
    """An agent process on ``conf``, logging JSON next to it; ``state_dir`` (default: one
    beside the config per host, ``none``: no journal)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with (conf.parent / f"{hostname}.log").open("wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "asyncmigfra",
                "agent",
                "-c",
                str(conf),
                "--hostname",
                hostname,
                "--log-format",
                "json",
                "--state-dir",
                state_dir or str(conf.parent / f"state-{hostname}"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )


async def test_original_config_with_dummy_answers_like_the_original(mosquitto, tmp_path):
    host = f"node-{uuid.uuid4().hex[:6]}"
    proc = start_agent(original_config(tmp_path, mosquitto.port), host)
    try:
        async with scheduler(mosquitto.port, f"fast/migfra/{host}") as sched:
            await sched.state("online", 20)
            r = await sched.call("task: start vm\nvm-configurations:\n  - vm-name: vm1\n")
            assert r["result"] == "vm started"
            assert r["list"] == [{"vm-name": "vm1", "status": "success"}]
            r = await sched.call(
                "task: migrate vm\nvm-name: vm1\ndestination: pandora1\n"
                "parameter:\n  migration-type: warm\n  rdma-migration: true\n"
            )
            assert (r["result"], r["vm-name"], r["status"]) == ("vm migrated", "vm1", "success")
            r = await sched.call("task: evacuate node\ndestinations: [a, b]\n")
            assert r["result"] == "node evacuated"
            assert r["list"] == []
            # SIGTERM: graceful, retained offline status, exit 0.
            proc.send_signal(signal.SIGTERM)
            await sched.state("offline", 20)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_killed_agent_leaves_offline_will(mosquitto, tmp_path):
    host = f"node-{uuid.uuid4().hex[:6]}"
    proc = start_agent(original_config(tmp_path, mosquitto.port), host)
    try:
        async with scheduler(mosquitto.port, f"fast/migfra/{host}") as sched:
            await sched.state("online", 20)
            proc.kill()
            offline = await sched.state("offline", 20)
            assert offline[0]["host"] == host
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_bad_config_key_exits_non_zero_naming_the_key(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text(
        "communicator:\n  type: mqtt\n  prot: 1883\n"
        "hypervisor:\n  type: dummy\n  never-throw: true\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "asyncmigfra", "agent", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2
    assert "communicator.prot" in out.stderr


def test_version():
    out = subprocess.run(
        [sys.executable, "-m", "asyncmigfra", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith("asyncmigfra ")
