"""Issue 17, end to end: an agent process on the ``fake`` hypervisor, configured from a file
(``migration.progress-timeout``, the fake's ``migrate-stall`` fault), over a real mosquitto:
a migration whose stream stops is aborted by the progress timeout, says so in its events and
result, and the VM keeps running on the source; a ``tune migration`` of a running migration
is answered and the migration completes."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import pytest
from test_agent_process import start_agent

from harness import scheduler

pytestmark = [pytest.mark.e2e, pytest.mark.broker]


def config(tmp_path: Path, port: int, host: str) -> Path:
    text = f"""\
communicator:
  host: 127.0.0.1
  port: {port}
hypervisor:
  type: fake
  host: {host}
  bandwidth: 1000
  peers:
    {host}-b: {{}}
  domains:
    - {{name: stuck, memory: 1048576, dirty-rate: 20}}
    - {{name: slow, memory: 2097152, dirty-rate: 10}}
  fail:
    migrate-stall: 1
agent:
  progress-interval: 0.1
migration:
  progress-timeout: 1.5
shutdown:
  grace-period: 5
"""
    path = tmp_path / "asyncmigfra.yaml"
    path.write_text(text)
    return path


async def test_a_stuck_migration_is_aborted_and_a_running_one_tuned(mosquitto, tmp_path):
    host = f"node-{uuid.uuid4().hex[:6]}"
    proc = start_agent(config(tmp_path, mosquitto.port, host), host, state_dir="none")
    try:
        async with scheduler(mosquitto.port, f"fast/migfra/{host}") as sched:
            await sched.state("online", 20)
            # The first migration takes the injected stall: half-way through its first pass
            # the stream stops, and after 1.5 s without data the job is aborted.
            r = await sched.call(
                f"task: migrate vm\nvm-name: stuck\ndestination: {host}-b\n"
                "parameter:\n  migration-type: live\n  bandwidth: 400\n",
                timeout=30,
            )
            assert (r["result"], r["vm-name"], r["status"], r["code"]) == (
                "vm migrated",
                "stuck",
                "error",
                "timeout",
            )
            assert r["details"] == (
                "migration moved no data for 1.5 s (progress-timeout); it was aborted and the"
                " VM keeps running on the source"
            )
            progress = sched.events_for(r["id"], "progress")
            last = progress[-1]
            assert (last["action"], last["reason"]) == ("abort", "progress-timeout")
            assert last["transfer-rate"] == 0
            r = await sched.call("task: status\n")
            states = {e["vm-name"]: e["state"] for e in r["list"]}
            assert states["stuck"] == "running", "still here, running"

            # A slow migration (2 GiB at 5 MiB/s), tuned to unlimited (the fake's link,
            # 1000 MiB/s): it completes in about two seconds.
            await sched.publish(
                f"id: mig-slow\ntask: migrate vm\nvm-name: slow\ndestination: {host}-b\n"
                "parameter:\n  migration-type: live\n  bandwidth: 5\n"
            )
            await sched.wait_for(
                lambda: any(
                    e.get("iteration", 0) >= 1 for e in sched.events_for("mig-slow", "progress")
                ),
                20,
            )
            r = await sched.call("task: tune migration\ntarget: mig-slow\nbandwidth: 0\n")
            assert r["result"] == "tuned"
            assert r["list"] == [{"vm-name": "slow", "status": "success", "bandwidth": 0}]
            done = await sched.result_for("mig-slow", 60)
            assert (done["status"], done["destination"]) == ("success", f"{host}-b")
            tuned = [
                e for e in sched.events_for("mig-slow", "progress") if e.get("action") == "tuned"
            ]
            assert [e["bandwidth"] for e in tuned] == [0]
            proc.send_signal(signal.SIGTERM)
            await sched.state("offline", 20)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
