"""The client commands without a broker: options, task payloads, ids, rendering, exit codes."""

from __future__ import annotations

import io
import re
import socket
import time

import pytest
from rich.console import Console

from asyncmigfra import cli
from asyncmigfra.console.arguments import CONN_DEFAULTS, build_parser
from asyncmigfra.console.connection import Connection, parse_broker, read_password
from asyncmigfra.console.exits import USAGE, CliError
from asyncmigfra.console.follow import MigrationView
from asyncmigfra.console.output import Out, event_fields, fmt_bytes
from asyncmigfra.console.tasks import (
    evacuate_task,
    failures,
    list_task,
    migrate_task,
    start_task,
    succeeded,
)
from asyncmigfra.model import SwapWith
from asyncmigfra.wire.parsing import parse_task

GIB = 1024**3


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("text", "tls", "expected"),
    [
        ("broker", False, ("broker", 1883)),
        ("broker:1884", False, ("broker", 1884)),
        ("broker", True, ("broker", 8883)),
        ("[::1]:1885", False, ("::1", 1885)),
        ("::1", False, ("::1", 1883)),
    ],
)
def test_parse_broker(text, tls, expected):
    assert parse_broker(text, tls=tls) == expected


@pytest.mark.parametrize("text", ["", ":1883", "h:0", "h:x", "h:70000", "[::1"])
def test_parse_broker_rejects(text):
    with pytest.raises(CliError) as err:
        parse_broker(text)
    assert err.value.code == USAGE


def test_connection_topics():
    c = Connection(prefix="site/migfra")
    assert c.topic("n1", "task") == "site/migfra/n1/task"
    assert c.split("site/migfra/n1/event") == ("n1", "event")
    assert c.split("other/n1/event") is None
    assert Connection(host="::1", port=1).where == "[::1]:1"


def test_password_from_file_or_env(tmp_path, monkeypatch):
    f = tmp_path / "pw"
    f.write_text("s3cret\nignored\n")
    assert read_password(str(f)) == "s3cret"
    monkeypatch.setenv("ASYNCMIGFRA_MQTT_PASSWORD", "from-env")
    assert read_password(None) == "from-env"
    with pytest.raises(CliError):
        read_password(str(tmp_path / "missing"))


def test_connection_options_before_or_after_the_command():
    for argv in (
        ["--broker", "b:2", "--json", "status", "--topic-prefix", "x/y"],
        ["status", "--broker", "b:2", "--json", "--topic-prefix", "x/y"],
    ):
        args = build_parser().parse_args(argv)
        for k, v in CONN_DEFAULTS.items():
            if not hasattr(args, k):
                setattr(args, k, v)
        conn = cli._connection(args)
        assert (conn.host, conn.port, conn.prefix, args.json) == ("b", 2, "x/y", True)
        assert conn.protocol == "5"


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for needle in ("exit codes", "cannot reach the MQTT broker", "offline", "--timeout", "130"):
        assert needle in out
    with pytest.raises(SystemExit):
        cli.main(["migrate", "--help"])
    out = capsys.readouterr().out
    assert "--follow" in out
    assert "exit codes" in out


def test_usage_errors_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as err:
        cli.main(["migrate", "vm"])  # no --from/--to
    assert err.value.code == 2
    assert cli.main(["send", str(tmp_path / "nope.yaml"), "--host", "h"]) == 2
    assert "cannot read the task file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"task: status\nvm-name: \xff\n")
    assert cli.main(["send", str(bad), "--host", "h"]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_broker_unreachable_exit_2(capsys):
    port = _closed_port()
    started = time.monotonic()
    assert cli.main(["--broker", f"127.0.0.1:{port}", "status"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the MQTT broker at 127.0.0.1:{port}: " in err
    assert "refused" in err.lower()
    assert time.monotonic() - started < 5


# ------------------------------------------------------------------------------ payloads


def test_task_builders_parse_as_intended():
    m = parse_task(
        migrate_task(
            "m-1",
            "on",
            "host-b",
            {
                "migration-type": "post-copy",
                "max-downtime": 300,
                "bandwidth": 100,
                "completion-timeout": 90.5,
                "timeout-action": "suspend",
                "auto-converge": True,
                "compressed": False,
                "tls": None,
            },
        )
    )
    (spec,) = m.subtasks
    assert (m.id, spec.vm_name, spec.destination) == ("m-1", "on", "host-b")  # type: ignore[attr-defined]
    assert spec.time_measurement
    p = spec.parameter  # type: ignore[attr-defined]
    assert (p.migration_type, p.max_downtime, p.bandwidth) == ("post-copy", 300, 100)
    assert (p.completion_timeout, p.timeout_action, p.auto_converge) == (
        90.5,
        "suspend",
        True,
    )
    # swap-with: a nested map, its value quoted like the others (a VM named "0012" stays a
    # string), read back by the agent's parser as a SwapWith.
    payload = migrate_task(
        "m-2", "web-1", "host-b", {"migration-type": "live", "swap-with": {"vm-name": "0012"}}
    )
    assert b'parameter:\n  migration-type: "live"\n  swap-with:\n    vm-name: "0012"\n' in payload
    (spec,) = parse_task(payload).subtasks
    assert spec.parameter.swap_with == SwapWith(vm_name="0012")  # type: ignore[attr-defined]
    assert spec.parameter.migration_type == "live"  # type: ignore[attr-defined]
    assert b"swap-with" not in migrate_task("m-3", "v", "b", {"swap-with": {"vm-name": None}})
    m = parse_task(list_task("stop vm", "s-1", ["a", "0012"], force=True, undefine=False))
    assert [s.result_name for s in m.subtasks] == ["a", "0012"]
    assert m.subtasks[0].force  # type: ignore[attr-defined]
    assert not m.subtasks[0].undefine  # type: ignore[attr-defined]
    m = parse_task(start_task("st-1", ["a"], ["<domain><name>x</name></domain>"], probe=False))
    assert [s.result_name for s in m.subtasks] == ["a", "x"]
    m = parse_task(evacuate_task("e-1", ["b", "c"], {"mode": "scatter", "max-parallel": 3}))
    assert m.subtasks[0].destinations == ("b", "c")  # type: ignore[attr-defined]


def test_succeeded():
    assert succeeded({"result": "vm migrated", "status": "success"})
    assert not succeeded({"result": "vm migrated", "status": "error"})
    assert succeeded({"result": "node evacuated", "list": []})
    assert not succeeded({"result": "vm stopped", "list": [{"status": "success"}, {}]})
    assert not succeeded({"result": "unknown", "list": []})


# ------------------------------------------------------------------------------ rendering


def test_plain_table_and_lines_have_no_escape_codes():
    buf = io.StringIO()
    out = Out(stream=buf, err=io.StringIO())
    assert not out.tty
    out.table(["HOST", "STATE"], [["host-a", "online"], ["b", "offline"]], styles={1: {}})
    assert buf.getvalue().splitlines() == ["HOST    STATE", "host-a  online", "b       offline"]
    assert "\x1b" not in buf.getvalue()


def test_event_fields():
    progress = {
        "event": "progress",
        "phase": "migrating",
        "iteration": 2,
        "percent": 47.9,
        "data-remaining": GIB // 2,
        "transfer-rate": 1000 * 1024 * 1024,
        "dirty-rate": 50 * 1024 * 1024,
        "expected-downtime": 51.2,
        "max-downtime": 30,
        "action": "raise-downtime",
    }
    text = event_fields(progress)
    for needle in ("migrating  47.9 %", "pass 2", "remaining 512.0 MiB", "rate 1000.0 MiB/s",
                   "dirty 50.0 MiB/s", "expected downtime 51.2 ms", "target 30 ms",
                   "action raise-downtime"):  # fmt: skip
        assert needle in text
    assert event_fields({"event": "error", "code": "timeout", "details": "x"}) == "timeout: x"
    assert event_fields({"event": "done", "status": "success", "duration": 1.5}) == (
        "success in 1.500 s"
    )
    assert event_fields({"event": "accepted", "task": "stop vm", "vm-names": ["a", "b"]}) == (
        "stop vm [a, b]"
    )
    assert fmt_bytes(None) == "?"


def test_watch_line_plain():
    buf = io.StringIO()
    Out(stream=buf).event(
        "host-a",
        {"event": "phase", "id": "t1", "host": "host-a", "vm-name": "v", "phase": "migrating",
         "time": "2026-11-22T00:19:38.163Z"},
    )  # fmt: skip
    cols = buf.getvalue().split()
    assert cols[1:] == ["host-a", "v", "phase", "t1", "migrating"]
    assert cols[0].endswith(".163")


def test_migration_view_and_summary():
    v = MigrationView(vm="v", source="a", destination="b", task_id="t", migration_type="live")
    v.feed({"event": "accepted"})
    for pct, extra in ((10.0, {}), (50.0, {"action": "raise-downtime", "max-downtime": 53})):
        v.feed({"event": "progress", "phase": "migrating", "percent": pct, "iteration": 2,
                "data-remaining": GIB, **extra})  # fmt: skip
    v.feed({"event": "phase", "phase": "post-copy"})
    v.feed({"event": "progress", "phase": "completed", "percent": 100.0, "iteration": 3,
            "downtime": 5.0, "action": "post-copy"})  # fmt: skip
    assert v.percents == [10.0, 50.0, 100.0]
    assert v.actions == ["raise-downtime to 53 ms", "post-copy"]
    assert v.final_downtime == 5.0
    ok = {
        "result": "vm migrated",
        "status": "success",
        "destination": "b",
        "time-measurement": {"migrate": 1.2, "downtime": 0.005, "overall": 1.25},
    }
    text = "\n".join(t for t, _ in v.summary(ok, 1.3))
    assert "v migrated from a to b" in text
    assert "total time   1.30 s  (agent: migrate 1.200 s, overall 1.250 s)" in text
    # One downtime line: the result's measurement (the final event's is the fallback).
    assert [ln for ln in text.splitlines() if "downtime" in ln.split()[:1]] == [
        "  downtime     5.0 ms"
    ]
    assert "passes       3" in text
    bad = {"result": "vm migrated", "status": "error", "code": "cancelled", "details": "c"}
    failed = [t for t, _ in v.summary(bad, 2.0)]
    assert failed[0] == "v was NOT migrated: cancelled: c"
    assert failed[1] == "  v stays on a"


def test_out_json_lines():
    buf = io.StringIO()
    out = Out(json_mode=True, stream=buf)
    out.json_line({"a": 1, "b": "ü"})
    assert buf.getvalue() == '{"a": 1, "b": "ü"}\n'
    assert not out.tty


# ------------------------------------------------------------------------------ swap view


def _progress(vm: str, pct: float, iteration: int, **extra: object) -> dict:
    return {
        "event": "progress",
        "id": "t",
        "vm-name": vm,
        "phase": "migrating",
        "percent": pct,
        "iteration": iteration,
        "memory-total": 2 * GIB,
        "data-remaining": int(2 * GIB * (1 - pct / 100)),  # what ``pct`` says is left
        **extra,
    }


def _swap_view() -> MigrationView:
    return MigrationView(
        vm="web-1", source="host-a", destination="host-b", task_id="t",
        migration_type="live", swap_with="web-2",
    )  # fmt: skip


def test_swap_view_keeps_one_lane_per_vm():
    """The two halves' events share the task id; each goes to its own VM's bar."""
    v = _swap_view()
    assert v.header() == (
        "Swapping web-1 (host-a -> host-b) with web-2 (host-b -> host-a)  (live, id t)"
    )
    events = [
        {"event": "accepted", "id": "t", "task": "migrate vm", "vm-names": ["web-1"]},
        {"event": "phase", "id": "t", "vm-name": "web-1", "phase": "pre-checks"},
        {"event": "phase", "id": "t", "vm-name": "web-1", "phase": "migrating"},
        {"event": "phase", "id": "t", "vm-name": "web-2", "phase": "migrating"},
        _progress("web-1", 10.0, 1),
        _progress("web-2", 40.0, 1),
        _progress("web-1", 20.0, 1),
        _progress("web-2", 80.0, 2, action="raise-downtime", **{"max-downtime": 53}),
        {**_progress("web-2", 100.0, 2, downtime=12.5), "phase": "completed"},
        _progress("web-1", 30.0, 1),
        {"event": "error", "id": "t", "vm-name": "web-2", "code": "hook-failed", "details": "x"},
    ]
    plain = []
    for doc in events:
        v.feed(doc)
        plain.append(v.plain(doc).split(None, 2)[2])  # without the elapsed time
    one, two = v.lanes["web-1"], v.lanes["web-2"]
    assert (one.source, one.destination, two.source, two.destination) == (
        "host-a", "host-b", "host-b", "host-a",
    )  # fmt: skip
    assert one.percents == [10.0, 20.0, 30.0]
    assert two.percents == [40.0, 80.0, 100.0]
    assert (one.phase, two.phase) == ("migrating", "completed")
    assert (one.passes, two.passes) == (1, 2)
    assert (one.actions, two.actions) == ([], ["raise-downtime to 53 ms"])
    assert (one.final_downtime, two.final_downtime) == (None, 12.5)
    # The one-VM names are VM 1's lane.
    assert (v.percents, v.percent, v.phase) == ([10.0, 20.0, 30.0], 30.0, "migrating")
    assert v.action_text() == "web-1: none; web-2: raise-downtime to 53 ms"
    assert v.notes == ["web-2: error: hook-failed: x"]
    # Plain lines name the VM of each event ("-" for the task's own events).
    assert plain[0] == "-      accepted  migrate vm [web-1]"
    assert plain[3] == "web-2  phase     migrating"
    assert plain[4].startswith("web-1  progress  migrating  10.0 %  pass 1")
    assert plain[5].startswith("web-2  progress  migrating  40.0 %  pass 1")
    assert plain[8].startswith("web-2  progress  completed 100.0 %  pass 2")


def test_swap_view_renders_one_bar_per_vm():
    v = _swap_view()
    v.feed(_progress("web-1", 25.0, 1))
    v.feed(_progress("web-2", 75.0, 3))
    buf = io.StringIO()
    Console(file=buf, width=160, color_system=None).print(v)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("Swapping web-1 (host-a -> host-b) with web-2")
    bar1 = next(ln for ln in lines if ln.startswith("web-1 -> host-b "))
    bar2 = next(ln for ln in lines if ln.startswith("web-2 -> host-a "))
    assert re.search(r" 25\.0 % pass 1 ETA \? +migrating$", bar1), bar1
    assert re.search(r" 75\.0 % pass 3 ETA \? +migrating$", bar2), bar2
    assert "web-1  remaining 1.5 GiB of 2.0 GiB" in lines
    assert not [ln for ln in lines if "actions" in ln]  # only for a VM that had any
    assert any(ln.startswith("elapsed ") for ln in lines)
    # The one-VM view is unchanged: a single bar with its elapsed time.
    one = MigrationView(vm="v", source="a", destination="b", task_id="t")
    one.feed(_progress("v", 50.0, 2))
    buf = io.StringIO()
    Console(file=buf, width=160, color_system=None).print(one)
    text = buf.getvalue()
    assert "Migrating v from a to b  (agent's default type, id t)" in text
    assert " 50.0 % pass 2 ETA ? elapsed " in text
    assert "web" not in text


def _summary(v: MigrationView, result: dict) -> list[str]:
    return [t for t, _ in v.summary(result, 3.0)]


def test_swap_summary_reports_both_moves_and_the_order():
    v = _swap_view()
    v.feed({**_progress("web-1", 100.0, 3), "phase": "completed"})
    v.feed({**_progress("web-2", 100.0, 1, downtime=9.0), "phase": "completed"})
    result = {
        "result": "vm migrated", "vm-name": "web-1", "status": "success",
        "time-measurement": {"migrate-web-1": 2.3, "downtime-web-1": 0.0151, "migrate-web-2": 1.3,
                             "migrate": 2.4, "overall": 2.5},
        "destination": "host-b",
        "swap-with": {"vm-name": "web-2", "status": "success", "destination": "host-a",
                      "order": "sequential"},
        "id": "t",
    }  # fmt: skip
    assert _summary(v, result) == [
        "web-1 migrated from host-a to host-b",
        "web-2 migrated from host-b to host-a",
        "  order        sequential",
        "  total time   3.00 s  (agent: migrate 2.400 s, overall 2.500 s)",
        "  downtime     web-1 15.1 ms; web-2 9 ms (final progress event)",
        "  passes       web-1 3, web-2 1",
        "  actions      web-1: none; web-2: none",
    ]
    assert v.ok(result)
    assert succeeded(result)


_FAILED_HALVES = {
    # VM 2's repin failed after it arrived; VM 1 moved (protocol §3.6).
    "partner-failed-after-arrival": (
        {"status": "error", "code": "hook-failed", "destination": "host-b",
         "details": "swap-with web-2: repin failed: bad map",
         "swap-with": {"vm-name": "web-2", "status": "error", "code": "hook-failed",
                       "details": "repin failed: bad map", "destination": "host-a",
                       "order": "parallel"}},
        ["web-1 migrated from host-a to host-b",
         "web-2 moved from host-b to host-a, but: hook-failed: repin failed: bad map",
         "  order        parallel"],
    ),
    # VM 1 failed; VM 2's half was stopped and stays home.
    "vm1-failed-partner-stopped": (
        {"status": "error", "code": "migration-failed", "details": "Migration failed: boom",
         "swap-with": {"vm-name": "web-2", "status": "error", "code": "cancelled",
                       "details": "stopped because the migration of web-1 failed; web-2 stays"
                                  " on host-b", "order": "parallel"}},
        ["web-1 was NOT migrated: migration-failed: Migration failed: boom",
         "  web-1 stays on host-a",
         "web-2 was NOT migrated: cancelled: stopped because the migration of web-1 failed;"
         " web-2 stays on host-b",
         "  order        parallel"],
    ),
    # VM 2 failed; VM 1 was stopped: the top-level details carry both, VM 2's first.
    "partner-failed-vm1-stopped": (
        {"status": "error", "code": "migration-failed",
         "details": "swap-with web-2: Migration failed: boom; stopped because the migration of"
                    " web-2 failed; web-1 stays on host-a",
         "swap-with": {"vm-name": "web-2", "status": "error", "code": "migration-failed",
                       "details": "Migration failed: boom", "order": "sequential"}},
        ["web-1 was NOT migrated: stopped because the migration of web-2 failed; web-1 stays"
         " on host-a",
         "web-2 was NOT migrated: migration-failed: Migration failed: boom",
         "  web-2 stays on host-b",
         "  order        sequential"],
    ),
    # Both failed.
    "both-failed": (
        {"status": "error", "code": "timeout",
         "details": "Migration timed out; swap-with web-2: Migration failed: boom",
         "swap-with": {"vm-name": "web-2", "status": "error", "code": "migration-failed",
                       "details": "Migration failed: boom", "order": "parallel"}},
        ["web-1 was NOT migrated: timeout: Migration timed out",
         "  web-1 stays on host-a",
         "web-2 was NOT migrated: migration-failed: Migration failed: boom",
         "  web-2 stays on host-b",
         "  order        parallel"],
    ),
    # Refused in the pre-checks: no swap-with map, nothing moved.
    "refused-before-anything-moved": (
        {"status": "error", "code": "incompatible-destination",
         "details": "neither host has room"},
        ["web-1 was NOT migrated: incompatible-destination: neither host has room",
         "web-2 was NOT migrated: the swap ended before its half started"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_FAILED_HALVES))
def test_swap_summary_reports_the_failure_of_either_half(case):
    fields, expected = _FAILED_HALVES[case]
    result = {"result": "vm migrated", "vm-name": "web-1", **fields, "id": "t"}
    lines = _summary(_swap_view(), result)
    assert lines[: len(expected)] == expected
    assert lines[len(expected)].startswith("  total time   3.00 s")
    assert not _swap_view().ok(result)
    assert not succeeded(result)


def test_swap_summary_without_a_swap_with_map_goes_by_vm2s_events():
    """A cancelled swap's result may carry VM 1 only: VM 2's line then says what its own
    events showed (running: stopped with the task and stays; completed: it arrived)."""
    cancelled = {"result": "vm migrated", "vm-name": "web-1", "status": "error",
                 "code": "cancelled", "details": "cancelled by task 'c-1'", "id": "t"}  # fmt: skip
    v = _swap_view()
    v.feed(_progress("web-1", 5.0, 1))
    v.feed(_progress("web-2", 10.0, 1))
    v.cancel_answer = "accepted by host-a (running)"
    assert _summary(v, cancelled) == [
        "web-1 was NOT migrated: cancelled: cancelled by task 'c-1'",
        "  web-1 stays on host-a",
        "web-2 was NOT migrated: the task ended with cancelled",
        "  web-2 stays on host-b",
        "  total time   3.00 s",
        "  passes       web-1 1, web-2 1",
        "  actions      web-1: none; web-2: none",
        "  cancel       accepted by host-a (running)",
    ]
    v.feed({**_progress("web-2", 100.0, 1), "phase": "completed"})
    assert _summary(v, cancelled)[2] == (
        "web-2: the result reports no outcome for it; its last progress event said completed"
        " (host-b -> host-a)"
    )
    assert not v.ok(cancelled)


def test_swap_exit_status_needs_both_halves():
    """The agent already sets the top-level status to error when either half failed; the
    client does not rely on it, and a swap whose result says nothing of VM 2 is no success."""
    half = {"vm-name": "web-2", "status": "error", "code": "x", "details": "y"}
    doc = {"result": "vm migrated", "status": "success", "swap-with": half}
    assert not succeeded(doc)
    assert failures(doc) == ["web-2: x: y"]
    plain = {"result": "vm migrated", "status": "success", "destination": "host-b"}
    assert succeeded(plain)
    assert not _swap_view().ok(plain)
    assert _summary(_swap_view(), plain)[:2] == [
        "web-1 migrated from host-a to host-b",
        "web-2 was NOT migrated: the result reports no outcome for it (does the agent know"
        " swap-with?)",
    ]
    assert MigrationView(vm="v", source="a", destination="b", task_id="t").ok(plain)


def test_migrate_swap_with_option():
    args = build_parser().parse_args(
        ["migrate", "web-1", "--from", "a", "--to", "b", "--swap-with", "web-2", "--follow"]
    )
    assert (args.vm, args.swap_with, args.follow) == ("web-1", "web-2", True)
    assert build_parser().parse_args(["migrate", "v", "--from", "a", "--to", "b"]).swap_with is None


def test_swap_with_itself_is_a_usage_error(capsys):
    # Refused before any connection is made (the broker port is closed).
    port = _closed_port()
    code = cli.main(["migrate", "v", "--from", "a", "--to", "b", "--swap-with", "v",
                     "--broker", f"127.0.0.1:{port}"])  # fmt: skip
    assert code == USAGE
    assert "--swap-with: 'v' cannot swap with itself" in capsys.readouterr().err
