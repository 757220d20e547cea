"""An agent SIGKILLed during a peer-to-peer migration: libvirtd keeps the job; the restarted
agent finds it through its journal, adopts it, follows it and publishes the real outcome."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from agents import libvirt_options
from test_agent_migration import migrate_msg, where

from harness import scheduler
from rig import Rig

pytestmark = [pytest.mark.rig, pytest.mark.broker, pytest.mark.e2e]


def write_config(path: Path, port: int, rig: Rig, prefix: str) -> Path:
    config = {
        "hostname": rig.a.name,
        "communicator": {
            "type": "mqtt",
            "id": f"restart-{prefix}",
            "subscribe-topic": f"{prefix}/rig-a/task",
            "publish-topic": f"{prefix}/rig-a/result",
            "host": "127.0.0.1",
            "port": port,
            "reconnect-min-delay": 0.05,
            "reconnect-max-delay": 0.5,
        },
        "hypervisor": {"type": "libvirt", **libvirt_options(rig, rig.a)},
        "agent": {"state-dir": str(path.parent / "state"), "progress-interval": 0.2},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def spawn(conf: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "asyncmigfra", "agent", "-c", str(conf)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )


async def test_agent_killed_during_p2p_migration_reports_the_outcome_after_restart(
    mosquitto, rig: Rig, start_guest: Callable[..., Any], tmp_path: Path
):
    name = start_guest("dirty16").name()
    prefix = f"restart-{uuid.uuid4().hex[:6]}"
    conf = write_config(tmp_path / "agent.yaml", mosquitto.port, rig, prefix)
    log = tmp_path / "agent.log"
    proc = spawn(conf, log)
    try:
        async with scheduler(mosquitto.port, f"{prefix}/rig-a") as sched:
            await sched.state("online", 30)
            # Slow enough to outlive the agent: 8 MiB/s, converging only once the downtime
            # target has been raised a few steps.
            await sched.publish(
                "id: adopt-me\n"
                + migrate_msg(
                    name,
                    rig.b.name,
                    **{"migration-type": "live", "bandwidth": 8, "max-downtime": 2500},
                )
            )
            await sched.wait_for(
                lambda: [
                    e
                    for e in sched.events_for("adopt-me", "progress")
                    if e.get("iteration", 0) >= 1
                ],
                30,
            )
            proc.kill()
            await asyncio.to_thread(proc.wait)
            assert where(rig, name)["rig-a"][0], "the job outlived the agent"
            proc = spawn(conf, log)
            result = await sched.result_for("adopt-me", 120)
            assert result["status"] == "success", result
            assert result["destination"] == rig.b.name
            phases = [e["phase"] for e in sched.events_for("adopt-me", "phase")]
            assert "reconciling" in phases
            assert "adopted" in phases, (phases, result)
            assert result["details"] == "adopted after an agent restart"
            assert where(rig, name) == {"rig-b": (True, True)}
            await asyncio.sleep(0.5)
            assert [r.get("id") for r in sched.results].count("adopt-me") == 1
    finally:
        if proc.poll() is None:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30)
    assert proc.returncode == 0, log.read_text()[-4000:]
