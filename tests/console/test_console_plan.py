"""``asyncmigfra plan``: against agents on the fake hypervisor over a real mosquitto, and its
table with hostile wire strings (issue 18)."""

from __future__ import annotations

import io
import json

import pytest
from console_support import Served, hostile, raw_controls

from asyncmigfra import cli
from asyncmigfra.console.arguments import build_parser
from asyncmigfra.console.output import Out
from asyncmigfra.console.planning import show_plan
from asyncmigfra.console.tasks import evacuate_task
from asyncmigfra.model import PlanEvacuationSpec
from asyncmigfra.wire.parsing import parse_task


def run(served: Served, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main([*args, *served.conn])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.broker
def test_plan_of_a_vm_and_of_an_evacuation(shared_served: Served, capsys) -> None:
    code, out, err = run(
        shared_served, capsys, "plan", "web-1", "--from", "host-a", "--to", "host-b", "--auto"
    )
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0].split() == [
        "VM", "TO", "MODE", "CONVERGES", "DURATION", "DOWNTIME", "PASSES", "MEMORY", "DISK",
        "DIRTY", "LINK",
    ]  # fmt: skip
    row = lines[1].split()
    assert row[:4] == ["web-1", "host-b", "live", "yes"]
    assert "50.0 MiB/s" in lines[1]  # the fake's dirty rate of web-1
    code, out, err = run(
        shared_served, capsys, "plan", "evacuate", "host-a", "--to", "host-b", "--live", "--json"
    )
    doc = json.loads(out)
    assert doc["result"] == "plan"
    assert {e["wave"] for e in doc["list"] if "wave" in e} == {1}
    assert code == (0 if all(e["status"] == "success" for e in doc["list"]) else 1)


def test_usage_errors_need_no_broker(capsys) -> None:
    assert cli.main(["plan", "a", "b", "--to", "x"]) == 2
    assert cli.main(["plan", "a", "--to", "x", "--to", "y"]) == 2
    assert cli.main(["plan", "a", "--to", "x", "--mode", "scatter"]) == 2
    assert cli.main(["plan", "a", "--to", "x", "--schedule", "predicted"]) == 2
    err = capsys.readouterr().err
    assert "give one VM" in err
    assert "give one --to" in err
    assert "--schedule are for 'plan evacuate HOST'" in err


def test_plan_evacuate_asks_for_the_predicted_schedule() -> None:
    args = build_parser().parse_args(
        ["plan", "evacuate", "a", "--to", "b", "--schedule", "predicted"]
    )
    assert args.schedule == "predicted"
    payload = evacuate_task("p", ["b"], {"schedule": args.schedule}).replace(
        b"task: evacuate node", b"task: plan evacuation", 1
    )
    (sub,) = parse_task(payload).subtasks
    assert isinstance(sub, PlanEvacuationSpec)
    assert sub.evacuation.schedule == "predicted"


def test_the_table_escapes_every_wire_string() -> None:
    doc = {
        "result": "plan",
        "list": [
            {
                "vm-name": hostile("vm"),
                "status": "error",
                "code": hostile("code"),
                "destination": hostile("dest"),
                "mode": hostile("mode"),
                "converges": False,
                "passes": hostile("passes"),
                "memory": 1 << 30,
                "disk": 0,
                "transfer-rate": 1 << 20,
                "blockers": [hostile("blocker")],
                "wave": hostile("wave"),
            },
            {"vm-name": "ok", "status": "success", "details": hostile("details")},
        ],
    }
    stream = io.StringIO()
    show_plan(Out(json_mode=False, stream=stream, err=io.StringIO()), doc, host=hostile("h"))
    text = stream.getvalue()
    assert raw_controls(text) == []
    for tag in ("vm", "code", "dest", "mode", "blocker", "wave", "details"):
        assert f"<{tag}>" in text
