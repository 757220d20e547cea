"""Forged messages on a real broker reach the CLI's output escaped: retained status messages
(``status``), a forged agent's results and events (``status HOST``, ``stop``, ``migrate
--follow``), events on an event topic (``watch``), and an error message that quotes a
retained status (exit 3). In a pipe and with ``--json`` (exact JSON, nothing raw); the real
terminal is tests/console/test_hostile_terminal.py.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
from console_support import (
    CLI,
    FORBIDDEN,
    ForgedAgent,
    agent_yaml,
    env,
    forge,
    forged_agent,
    forged_reply,
    forged_status,
    hostile,
    raw_controls,
)

from asyncmigfra import cli
from asyncmigfra.terminal import safe

pytestmark = pytest.mark.broker


@pytest.fixture
def prefix() -> str:
    return f"h{uuid.uuid4().hex[:8]}/migfra"


@pytest.fixture
def evil(mosquitto, prefix: str) -> Iterator[ForgedAgent]:
    """A forged agent ``evil``: hostile retained status, results and events."""
    with forged_agent(mosquitto.port, prefix, "evil", forged_status(), forged_reply()) as a:
        yield a


def _cli(mosquitto, prefix: str, capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main([*args, "--broker", f"127.0.0.1:{mosquitto.port}", "--topic-prefix", prefix])
    out = capsys.readouterr()
    return code, out.out, out.err


def _shows(text: str, *tags: str) -> None:
    assert raw_controls(text) == [], text
    for tag in tags:
        assert safe(hostile(tag)) in text, (tag, text)


def test_status_board_of_forged_retained_status(mosquitto, prefix, evil, capsys):
    forge(
        mosquitto.port,
        f"{prefix}/evil2/status",
        forged_status(lambda t: hostile(f"2{t}"), state=hostile("state")),
        retain=True,
    )
    try:
        code, out, err = _cli(mosquitto, prefix, capsys, "status")
        assert code == 0, err
        _shows(out, "host", "version", "hypervisor", "since", "2host", "2since", "state")
        assert len(out.splitlines()) == 3  # a header and two agents, whatever their LFs
        code, out, _ = _cli(mosquitto, prefix, capsys, "status", "--json")
        assert code == 0
        assert not FORBIDDEN & set(out.replace("\n", ""))
        docs = {d["host"]: d for d in map(json.loads, out.splitlines())}
        assert docs[hostile("host")]["since"] == hostile("since")
        assert docs[hostile("2host")]["state"] == hostile("state")
    finally:
        forge(mosquitto.port, f"{prefix}/evil2/status", b"", retain=True)


def test_host_view_of_a_forged_status_result(mosquitto, prefix, evil, capsys):
    code, out, err = _cli(mosquitto, prefix, capsys, "status", "evil")
    assert code == 1, err  # one entry of the forged result is an error
    _shows(out, "host", "version", "hypervisor", "since", "tid", "task", "tvm", "tphase",
           "dvm", "dstate", "ecode", "edetails")  # fmt: skip
    _shows(err)


def test_raw_result_of_a_forged_stop(mosquitto, prefix, evil, capsys):
    code, out, err = _cli(mosquitto, prefix, capsys, "stop", "x", "--host", "evil")
    assert code == 1
    # The YAML as published (its own escapes are text, shown as such), each line escaped.
    _shows(out)
    for tag in ("vm", "code", "details"):
        assert f"<{tag}>\\\\u001b[2J" in out
    assert "\\u202e" in out
    assert "# forged\\u202eevil\\tcomment\\r" in out.splitlines()
    _shows(err)
    code, out, _ = _cli(mosquitto, prefix, capsys, "stop", "x", "--host", "evil", "--json")
    assert not FORBIDDEN & set(out.replace("\n", ""))
    assert json.loads(out)["list"][0]["details"] == hostile("details")


def test_migrate_follow_of_forged_events_and_result(mosquitto, prefix, evil, capsys):
    code, out, err = _cli(
        mosquitto, prefix, capsys, "migrate", "vm1", "--from", "evil", "--to", "b", "--follow"
    )
    assert code == 1, err
    _shows(out, "accepted", "phase", "action", "ecode", "edetails", "code", "details")
    _shows(err)
    lines = out.splitlines()
    assert lines[0].startswith("Migrating vm1 from evil to b")
    events = [ln for ln in lines if re.match(r" *\d+\.\d s  ", ln)]
    assert len(events) == 4, out  # one plain line per event, LFs or not
    # A progress line is cut to 80 columns: the hostile phase shows escaped as far as it fits.
    (progress,) = [ln for ln in events if "  progress  " in ln]
    assert len(progress) <= 80, progress
    shown = progress.split("  progress  ", 1)[1]
    assert len(shown) > 20
    assert safe(hostile("pphase")).startswith(shown.rstrip(".… ")), progress
    code, out, _ = _cli(
        mosquitto, prefix, capsys,
        "migrate", "vm1", "--from", "evil", "--to", "b", "--follow", "--json",
    )  # fmt: skip
    assert code == 1
    assert not FORBIDDEN & set(out.replace("\n", ""))
    *events, result = map(json.loads, out.splitlines())
    assert [e["event"] for e in events] == ["accepted", "phase", "progress", "error"]
    assert result["details"] == hostile("details")


@pytest.mark.parametrize("host", [["evil"], []])
def test_history_of_a_forged_agent(mosquitto, prefix, evil, capsys, host: list[str]):
    code, out, err = _cli(mosquitto, prefix, capsys, "history", *host)
    assert code == 1, err  # the answer's own error entry
    _shows(out, "hid", "htask", "hvm", "hstarted", "hdest")
    _shows(err, "acode", "adetails")
    assert len(out.splitlines()) == 2  # a header and one item, whatever its LFs
    code, out, _ = _cli(mosquitto, prefix, capsys, "history", *host, "--json")
    assert not FORBIDDEN & set(out.replace("\n", ""))
    (item,) = map(json.loads, out.splitlines())
    assert item["details"] == hostile("hdetails")


def test_follow_of_a_forged_agent(mosquitto, prefix, capsys):
    def value(tag: str) -> str:  # every field forged but the task ids (the CLI takes no such id)
        return "t-1" if tag in {"tid", "hid"} else hostile(tag)

    reply = forged_reply(value)
    with forged_agent(mosquitto.port, prefix, "evil3", forged_status(), reply):
        # Running there, says its status: a task view of forged fields, no result ever.
        code, out, err = _cli(mosquitto, prefix, capsys, "follow", "t-1", "--timeout", "1")
        assert code == 4, err
        _shows(out, "task", "tvm")
        _shows(err)
    # Not running: its history (forged) is asked, and what it says is shown escaped.
    with forged_agent(mosquitto.port, prefix, "evil4", forged_status(), reply_without_tasks(reply)):
        code, out, err = _cli(mosquitto, prefix, capsys, "follow", "t-1", "evil4")
        assert code == 1, err
        _shows(out, "htask", "hvm", "hcode", "hdetails", "hdest")
        _shows(err)


def reply_without_tasks(reply):  # type: ignore[no-untyped-def]
    """``reply`` with a ``status`` answer that lists no task."""

    def answer(task: dict[str, object]) -> list[tuple[str, bytes]]:
        if task.get("task") != "status":
            return reply(task)
        doc = {"result": "status", "id": task.get("id"), "state": "online", "tasks": [], "list": []}
        return [("result", agent_yaml(doc))]

    return answer


def test_error_message_quoting_a_retained_status(mosquitto, prefix, capsys):
    forge(mosquitto.port, f"{prefix}/down/status", forged_status(state="offline"), retain=True)
    try:
        code, out, err = _cli(mosquitto, prefix, capsys, "stop", "x", "--host", "down")
    finally:
        forge(mosquitto.port, f"{prefix}/down/status", b"", retain=True)
    assert code == 3
    assert out == ""
    assert err.startswith("asyncmigfra: host 'down' is offline")
    _shows(err, "since")
    assert err.count("\n") == 1


def test_watch_of_forged_events(mosquitto, prefix):
    conn = ["--broker", f"127.0.0.1:{mosquitto.port}", "--topic-prefix", prefix]
    proc = subprocess.Popen(
        [*CLI, "watch", *conn], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env()
    )
    try:
        assert proc.stderr is not None
        assert proc.stdout is not None
        assert b"watching" in proc.stderr.readline()
        kinds = {
            "accepted": {"task": hostile("task"), "vm-names": [hostile("n")]},
            "phase": {"phase": hostile("phase")},
            "progress": {"phase": hostile("pphase"), "percent": 1.0, "action": hostile("action")},
            "error": {"code": hostile("code"), "details": hostile("details")},
            "done": {"status": hostile("status")},
            hostile("kind"): {hostile("key"): hostile("value")},
        }
        for kind, fields in kinds.items():
            doc = {"event": kind, "id": hostile("id"), "host": hostile("host"),
                   "vm-name": hostile("vm"), "time": hostile("time"), **fields}  # fmt: skip
            forge(mosquitto.port, f"{prefix}/evil/event", agent_yaml(doc))
        lines: list[str] = []
        deadline = time.monotonic() + 15
        while len(lines) < len(kinds) and time.monotonic() < deadline:
            lines.append(proc.stdout.readline().decode())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    text = "".join(lines)
    assert len(lines) == len(kinds)  # one line per event
    _shows(text, "id", "host", "vm", "time", "task", "n", "phase", "pphase", "action", "code",
           "details", "status", "kind", "key", "value")  # fmt: skip
