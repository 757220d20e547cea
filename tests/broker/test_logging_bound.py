"""Every log line of a task carries its task id and VM (structlog contextvars)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from asyncmigfra.logs import configure_logging
from asyncmigfra.settings import LoggingSettings
from harness import agent_and_scheduler

pytestmark = pytest.mark.broker


async def test_task_lines_carry_task_id_and_vm(mosquitto):
    out = io.StringIO()
    configure_logging(LoggingSettings(format="json", level="debug"), stream=out, testing=True)
    try:
        async with agent_and_scheduler(mosquitto.port, hv_options={"never-throw": False}) as (
            _,
            sched,
        ):
            r = await sched.call("task: suspend vm\nlist:\n  - vm-name: vm-log\n")
            assert r["list"][0]["status"] == "error"
    finally:
        for h in list(logging.getLogger().handlers):
            if h.get_name() == "asyncmigfra":
                logging.getLogger().removeHandler(h)
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    failed = [line for line in lines if line.get("event") == "task.failed"]
    assert failed, lines
    assert failed[0]["task_id"] == r["id"]
    assert failed[0]["vm"] == "vm-log"
    assert failed[0]["code"] == "hypervisor-error"
    assert any(line.get("logger") == "asyncmigfra.app" for line in lines)
