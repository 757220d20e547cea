"""``asyncmigfra follow ID`` believes only the host the task runs on: a forged agent that
publishes events and a result with the same task id on its own topics (peers prove who they
are by their topic) changes nothing that ``follow`` shows, nor its exit code. The task is a
real migration on a ``demo --serve`` cluster; the forged agent ``host-x`` is online beside it.
"""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest
from console_support import CLI, Served, agent_yaml, env, forge, forged_agent

from asyncmigfra.console.tasks import migrate_task

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

FORGED = "FORGED-BY-HOST-X"


def _forged_reply(task_id: str):  # type: ignore[no-untyped-def]
    """host-x's answer to anything: a ``status`` or ``history`` result without the task,
    then events and a successful result of the task on its own topics."""

    def reply(task: dict[str, object]) -> list[tuple[str, bytes]]:
        tid, kind = task.get("id"), str(task.get("task"))
        own = {"result": kind, "id": tid, "host": "host-x", "list": []}
        if kind == "status":
            own.update(state="online", tasks=[])
        event = {"id": task_id, "host": "host-x", "vm-name": "db-1", "time": "2026-01-01T00:00Z"}
        return [
            ("result", agent_yaml(own)),
            ("event", agent_yaml({**event, "event": "phase", "phase": FORGED})),
            ("event", agent_yaml({**event, "event": "progress", "phase": "completed",
                                  "percent": 100.0, "iteration": 99, "downtime": 1,
                                  "memory-total": 1, "data-remaining": 0, "action": FORGED})),
            ("event", agent_yaml({**event, "event": "error", "code": FORGED, "details": FORGED})),
            ("result", agent_yaml({"result": "vm migrated", "id": task_id, "vm-name": "db-1",
                                   "status": "success", "destination": FORGED,
                                   "details": FORGED})),
        ]  # fmt: skip

    return reply


def test_follow_shows_only_what_the_tasks_own_host_publishes(served: Served, tmp_path):
    task_id = f"mig-{uuid.uuid4().hex[:8]}"
    # db-1: 16 GiB at 100 MiB/s: it runs until the test cancels it.
    payload = migrate_task(task_id, "db-1", "host-b", {"migration-type": "live", "bandwidth": 100})
    forge(served.port, f"{served.prefix}/host-a/task", payload)
    status = agent_yaml({"state": "online", "host": "host-x", "version": "0", "since": "x"})
    with forged_agent(served.port, served.prefix, "host-x", status, _forged_reply(task_id)):
        err = tmp_path / "follow.err"
        with err.open("wb") as err_file:
            proc = subprocess.Popen(
                [*CLI, "follow", task_id, *served.conn],
                stdout=subprocess.PIPE,
                stderr=err_file,
                env=env(),
            )
            try:
                deadline = time.monotonic() + 30
                while "following task" not in err.read_text() and proc.poll() is None:
                    assert time.monotonic() < deadline, err.read_text()
                    time.sleep(0.1)
                if proc.poll() is None:
                    time.sleep(2)  # (host-x's answers have come by now: it answered the ask)
                    cancelled = served.cli("cancel", task_id, "--host", "host-a")
                    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
                out, _ = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    stdout, stderr = out.decode(), err.read_text()
    print(stdout, stderr)
    assert FORGED not in stdout + stderr
    assert "host-x" not in stdout
    assert stdout.startswith(f"Migrating db-1 from host-a to host-b  (attached, id {task_id})")
    assert "db-1 was NOT migrated: cancelled" in stdout
    assert proc.returncode == 1
