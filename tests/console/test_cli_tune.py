"""Issue 17: ``asyncmigfra tune ID``: its payload, its usage errors, and against a real
mosquitto and ``demo --serve`` agents: a running migration's bandwidth and downtime changed,
post-copy refused for a live migration, and a finished target."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
import yaml
from console_support import Served

from asyncmigfra import cli
from asyncmigfra.console.tasks import tune_task
from asyncmigfra.model import TuneSpec
from asyncmigfra.transport.mqtt import ToolClient
from asyncmigfra.wire.parsing import parse_task


def run(
    served: Served | None, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    code = cli.main([*args, *(served.conn if served else [])])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------- without a broker


def test_the_payload_is_a_valid_tune_task() -> None:
    payload = tune_task(
        "tune-1", "0012", vm="on", bandwidth=0, max_downtime=500, force_complete=True
    )
    msg = parse_task(payload)
    assert msg.id == "tune-1"
    (spec,) = msg.subtasks
    assert spec == TuneSpec(
        target="0012", vm_name="on", bandwidth=0, max_downtime=500, force_complete=True
    )
    only = parse_task(tune_task("tune-2", "m", post_copy=True)).subtasks[0]
    assert isinstance(only, TuneSpec)
    assert (only.post_copy, only.bandwidth, only.vm_name) == (True, None, None)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tune", "mig", "--host", "a"], "tune: say what to change"),
        (["tune", "mig", "--host", "a", "--post-copy", "--force-complete"], "not allowed with"),
        (["tune", "mig", "--host", "a", "--bandwidth", "-1"], "must be 0 or more"),
        (["tune", "mig", "--host", "a", "--max-downtime", "0"], "must be positive"),
        (["tune", "mig", "--host", "a", "--vm", "a/b", "--bandwidth", "1"], "not a VM name"),
        (["tune", "x" * 300, "--host", "a", "--bandwidth", "1"], "not a task id"),
        (["tune", "mig", "--bandwidth", "1"], "--host"),
    ],
)
def test_usage_errors_exit_2_before_anything_is_sent(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = cli.main([*args, "--broker", "127.0.0.1:1"])  # nothing listens there
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err


# ---------------------------------------------------------------------- with a broker


def publish(served: Served, host: str, payload: bytes) -> None:
    async def go() -> None:
        async with ToolClient("127.0.0.1", served.port, client_id=f"t-{uuid.uuid4().hex[:8]}") as c:
            await c.publish(f"{served.prefix}/{host}/task", payload, qos=1)

    asyncio.run(go())


def until_tuned(served: Served, capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    """Run ``tune`` until the migration's job runs (before that: wrong-state, not started)."""
    deadline = time.monotonic() + 20
    while True:
        code, out, err = run(served, capsys, "tune", *args)
        doc = yaml.safe_load(out)
        if code == 0 or time.monotonic() > deadline:
            assert code == 0, out + err
            return doc
        assert doc["list"][0]["code"] == "wrong-state", out
        time.sleep(0.2)


@pytest.mark.broker
def test_tune_a_running_migration(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    # db-1: 16 GiB; at 10 MiB/s it runs for minutes.
    publish(
        served,
        "host-a",
        b"id: mig-db\ntask: migrate vm\nvm-name: db-1\ndestination: host-b\n"
        b"parameter:\n  migration-type: live\n  bandwidth: 10\n",
    )
    doc = until_tuned(served, capsys, "mig-db", "--host", "host-a", "--bandwidth", "20")
    assert doc["result"] == "tuned"
    assert doc["list"] == [{"vm-name": "db-1", "status": "success", "bandwidth": 20}]
    assert doc["id"].startswith("tune-")

    code, out, _ = run(
        served, capsys, "tune", "mig-db", "--host", "host-a", "--max-downtime", "900", "--json"
    )
    assert code == 0
    (line,) = out.splitlines()
    assert json.loads(line)["list"] == [
        {"vm-name": "db-1", "status": "success", "max-downtime": 900}
    ]

    code, out, _ = run(served, capsys, "tune", "mig-db", "--host", "host-a", "--post-copy")
    assert code == 1
    entry = yaml.safe_load(out)["list"][0]
    assert (entry["vm-name"], entry["code"]) == ("db-1", "not-supported")
    assert "migration-type live" in entry["details"]

    code, out, _ = run(
        served, capsys, "tune", "mig-db", "--host", "host-a", "--vm", "web-1", "--bandwidth", "5"
    )
    assert code == 1
    assert yaml.safe_load(out)["list"][0]["code"] == "vm-not-found"

    code, _, _ = run(served, capsys, "cancel", "mig-db", "--host", "host-a")
    assert code == 0
    deadline = time.monotonic() + 20
    while True:  # the cancel's result comes before the migration's end
        code, out, _ = run(served, capsys, "tune", "mig-db", "--host", "host-a", "--bandwidth", "1")
        entry = yaml.safe_load(out)["list"][0]
        if entry["vm-name"] == "n/a" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert code == 1
    assert (entry["code"], entry["details"]) == (
        "wrong-state",
        "task 'mig-db' is not queued or running",
    )
