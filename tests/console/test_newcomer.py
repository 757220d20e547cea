"""Issue 14, a newcomer's first hour, against a real mosquitto and ``demo --serve`` agents:
every hint the CLI prints is pasted into a "shell" as it is and must work; ``send`` keeps
the file's line numbers and says when a result is a remembered one; same-host migrations
are refused; ``migrate`` finds the source; ``repin``; ``watch`` shows results and presence."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from console_support import (
    CLI,
    Served,
    env,
    free_port,
    hint_after,
    hostile,
    need,
    paste,
    raw_controls,
)
from test_console_broker import presence, retain

pytestmark = pytest.mark.broker


def first_task(served: Served, port: int, host: str) -> subprocess.Popen[bytes]:
    """``mosquitto_sub`` printing the first task published to ``host`` (within 15 s)."""
    sub = need("mosquitto_sub", "MQTT client")
    proc = subprocess.Popen(
        [sub, "-h", "127.0.0.1", "-p", str(port), "-q", "2", "-C", "1", "-W", "15",
         "-t", f"{served.prefix}/{host}/task"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(0.3)  # subscribed
    return proc


# ------------------------------------------------------------------------------ hints


def test_offline_hint_of_stop_is_send_offline_and_pasteable(shared_served, mosquitto):
    """``stop``'s --force destroys the VM: the offline hint must say --send-offline, and the
    pasted command must queue a *graceful* stop."""
    topic = f"{shared_served.prefix}/node2/status"
    retain(mosquitto.port, topic, presence("node2", "offline"))
    try:
        out = shared_served.cli("stop", "vm1", "--host", "node2", "--timeout", "1")
        assert out.returncode == 3
        assert "task id" not in out.stderr  # nothing was sent
        hint = hint_after("to queue the task for when it returns, run: ", out.stderr)
        assert hint == shlex.join(
            ["asyncmigfra", "stop", "vm1", "--host", "node2", "--timeout", "1",
             *shared_served.conn, "--send-offline"]
        )  # fmt: skip
        assert "--force" not in hint
        sub = first_task(shared_served, mosquitto.port, "node2")
        pasted = paste(hint)
        task = yaml.safe_load(sub.communicate(timeout=20)[0])
        assert pasted.returncode == 4  # queued, no agent to answer within --timeout
        assert task["task"] == "stop vm"
        assert task["list"] == [{"vm-name": "vm1"}]  # not force: true
    finally:
        retain(mosquitto.port, topic, b"")


@pytest.mark.parametrize("command", ["send", "start", "suspend", "resume", "cancel", "status"])
def test_every_offline_hint_is_accepted_by_its_command(shared_served, mosquitto, tmp_path, command):
    """The flag in each command's hint is one that command has (argparse exit 2 if not),
    and it sends: the pasted command is stopped by ``--timeout`` (exit 4), not refused."""
    args = {
        "send": ["send", str(Path(__file__).parents[2] / "examples/tasks/status.yaml")],
        "start": ["start", "vm1", "--no-probe"],
        "suspend": ["suspend", "vm1"],
        "resume": ["resume", "vm1"],
        "cancel": ["cancel", "x"],
        "status": ["status", "nohost"],
    }[command]
    if command != "status":
        args += ["--host", "nohost"]
    out = shared_served.cli(*args, "--timeout", "0.5")
    assert out.returncode == 3, out.stderr
    assert "no agent named 'nohost'" in out.stderr
    status = hint_after("check the name with: ", out.stderr).split("; ")[0]
    assert status == shlex.join(["asyncmigfra", "status", *shared_served.conn])
    listed = paste(status)
    assert listed.returncode == 0
    assert [ln.split()[0] for ln in listed.stdout.splitlines()[1:]] == ["host-a", "host-b"]
    hint = hint_after("to send anyway (its session keeps the task), run: ", out.stderr)
    assert hint.endswith(" --send-offline")
    pasted = paste(hint)
    assert pasted.returncode == 4, pasted.stderr
    # status and cancel are answered at once or not at all: no cancel hint for them.
    assert ("cancel it with" in pasted.stderr) == (command in {"start", "suspend", "resume"})


def test_cancel_hint_carries_every_connection_option(shared_served):
    """After ``--timeout`` (and after Ctrl-C, tests/console/test_console_broker.py) the
    cancel hint repeats --broker, --mqtt-protocol, --topic-prefix and --wait."""
    out = shared_served.cli(
        "migrate", "db-1", "--from", "host-a", "--to", "host-b", "--live", "--bandwidth", "50",
        "--timeout", "1", "--mqtt-protocol", "3.1.1", "--wait", "0.7",
    )  # fmt: skip
    assert out.returncode == 4, out.stderr
    task_id = out.stderr.split("task id: ", 1)[1].split()[0]
    hint = hint_after("(cancel it with: ", out.stderr)
    words = shlex.split(hint)
    assert words[:5] == ["asyncmigfra", "cancel", task_id, "--host", "host-a"]
    assert {"--mqtt-protocol", "3.1.1", "--wait", "0.7", *shared_served.conn} <= set(words)
    pasted = paste(hint + " --json")
    assert pasted.returncode == 0, pasted.stderr
    assert json.loads(pasted.stdout)["list"] == [
        {"vm-name": "db-1", "status": "success", "state": "running"}
    ]


def test_no_task_id_and_no_cancel_hint_where_they_would_mislead(shared_served, mosquitto):
    topic = f"{shared_served.prefix}/gone/status"
    retain(mosquitto.port, topic, presence("gone", "offline"))
    try:
        out = shared_served.cli("migrate", "web-1", "--from", "gone", "--to", "host-b")
        assert out.returncode == 3
        assert "task id" not in out.stderr
        out = shared_served.cli("status", "gone", "--force", "--timeout", "0.5")
        assert out.returncode == 4
        assert out.stderr.endswith("no result for task " + out.stderr.split("task ", 1)[1])
        assert "cancel" not in out.stderr
    finally:
        retain(mosquitto.port, topic, b"")


# ------------------------------------------------------------------------------ send


def test_send_again_says_the_result_is_remembered_and_how_to_run_it_again(shared_served, tmp_path):
    task = tmp_path / "pause.yaml"
    task.write_text(
        f"id: pause-{uuid.uuid4().hex[:8]}\ntask: suspend vm\nlist:\n  - vm-name: web-1\n"
    )
    try:
        first = shared_served.cli("send", str(task), "--host", "host-a")
        assert first.returncode == 0, first.stderr
        assert "remembered" not in first.stderr
        again = shared_served.cli("send", str(task), "--host", "host-a")
        assert again.returncode == 0
        assert again.stdout == first.stdout  # the same result, re-sent by the agent
        assert (
            f"note: this is the remembered result of an earlier task with id"
            f" {yaml.safe_load(first.stdout)['id']!r}" in again.stderr
        )
        hint = hint_after("to run it again, with a fresh id: ", again.stderr)
        assert hint == shlex.join(["asyncmigfra", "send", str(task), "--host", "host-a",
                                   "--new-id", *shared_served.conn])  # fmt: skip
        # Pasted, it really runs again: web-1 is paused already.
        pasted = paste(hint)
        assert pasted.returncode == 1
        doc = yaml.safe_load(pasted.stdout)
        assert doc["list"][0]["code"] == "wrong-state"
        assert doc["id"].startswith("send-")
        assert f"task id: {doc['id']}" in pasted.stderr
        assert "remembered" not in pasted.stderr
    finally:
        assert shared_served.cli("resume", "web-1", "--host", "host-a").returncode == 0


def test_send_reports_yaml_errors_at_the_files_lines_and_sends_nothing(tmp_path):
    f = tmp_path / "stop.yaml"
    f.write_text("# stop one VM\ntask: stop vm\nlist:\n  - vm-name: a\n   force: yes\n")
    closed = free_port()  # nothing listens: a connection attempt would say so
    out = subprocess.run(
        [*CLI, "send", str(f), "--host", "host-a", "--broker", f"127.0.0.1:{closed}"],
        capture_output=True, text=True, timeout=30, env=env(), check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.startswith(f"asyncmigfra: {f}: line 5, column 4: not valid YAML: ")
    assert out.stderr.endswith("; nothing was sent\n")
    assert len(out.stderr.splitlines()) == 1


def test_agents_errors_in_a_sent_file_keep_its_line_numbers(shared_served, tmp_path):
    """The id is added after the last line, so the agent's ``error at line L`` is the
    file's line L (it used to be L + 1 with the id inserted first)."""
    f = tmp_path / "start.yaml"
    f.write_text(
        "# start a VM\ntask: start vm\nvm-configurations:\n  - vm-name: a\n    memory: lots\n"
    )
    out = shared_served.cli("send", str(f), "--host", "host-a")
    assert out.returncode == 1
    details = yaml.safe_load(out.stdout)["list"][0]["details"]
    assert "yaml-cpp: error at line 4, column 5: bad conversion" in details


# ------------------------------------------------------------------------------ migrate


def test_same_host_migration_is_refused_before_connecting():
    closed = free_port()
    out = subprocess.run(
        [*CLI, "migrate", "web-2", "--from", "host-a", "--to", "host-a",
         "--broker", f"127.0.0.1:{closed}"],
        capture_output=True, text=True, timeout=30, env=env(), check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr == (
        "asyncmigfra: migrate: web-2 cannot be migrated from host-a to itself (--to host-a)\n"
    )


def test_migrate_finds_the_source_host(served, tmp_path):
    out = served.cli("migrate", "web-2", "--to", "host-b")
    assert out.returncode == 0, out.stderr
    assert "web-2 is on host-a (running): migrating it from there" in out.stderr
    assert yaml.safe_load(out.stdout)["destination"] == "host-b"
    out = served.cli("migrate", "web-2", "--to", "host-b")
    assert out.returncode == 2
    assert out.stderr == (
        "asyncmigfra: migrate: web-2 is already on host-b (running; --to host-b)\n"
    )
    out = served.cli("migrate", "nosuch", "--to", "host-b")
    assert out.returncode == 2
    assert out.stderr == (
        "asyncmigfra: migrate: no online agent reports a VM named 'nosuch'"
        " (asked host-a, host-b); give --from HOST\n"
    )
    # The same name running on both hosts: the command cannot guess.
    xml = tmp_path / "twin.xml"
    xml.write_text("<domain type='qemu'><name>twin</name><memory unit='MiB'>256</memory>"
                   "<vcpu>1</vcpu></domain>")  # fmt: skip
    for host in ("host-a", "host-b"):
        assert served.cli("start", "--xml", str(xml), "--no-probe", "--host", host).returncode == 0
    out = served.cli("migrate", "twin", "--to", "host-a")
    assert out.returncode == 2
    assert out.stderr == (
        "asyncmigfra: migrate: twin is on more than one host: host-a (running),"
        " host-b (running); say which with --from HOST\n"
    )


# ------------------------------------------------------------------------------ repin


def test_repin_with_follow(shared_served):
    out = shared_served.cli("repin", "web-1", "0-1", "3", "--host", "host-a", "--follow")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    kinds = [ln.split()[3] for ln in lines if not ln.startswith(("---", "...", " ")) and
             len(ln.split()) > 4 and ln.split()[1] == "host-a"]  # fmt: skip
    assert kinds[0] == "accepted"
    assert kinds[-1] == "done"
    doc = yaml.safe_load(out.stdout[out.stdout.index("---") :])
    assert (doc["result"], doc["list"]) == (
        "vm repinned",
        [{"vm-name": "web-1", "status": "success"}],
    )
    out = shared_served.cli("repin", "web-1", "99", "--host", "host-a", "--json")
    assert out.returncode == 1
    assert "CPU 99 does not exist" in json.loads(out.stdout)["list"][0]["details"]
    out = shared_served.cli("repin", "web-1", "3-1", "--host", "host-a")
    assert out.returncode == 2
    assert "not a CPU list: '3-1'" in out.stderr


# ------------------------------------------------------------------------------ watch


def test_watch_shows_results_and_presence_changes_escaped(shared_served, mosquitto):
    proc = subprocess.Popen(
        [*CLI, "watch", *shared_served.conn],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(),
    )  # fmt: skip
    topic = f"{shared_served.prefix}/ghost/status"
    try:
        assert proc.stderr is not None
        assert b"watching" in proc.stderr.readline()
        assert shared_served.cli("stop", "nosuch", "--host", "host-a").returncode == 1
        retain(mosquitto.port, topic, presence("ghost", "online"))
        forged = b"hypervisor: " + json.dumps(hostile("hv")).encode()
        evil = presence("ghost", "draining").replace(b"hypervisor: fake", forged)
        retain(mosquitto.port, topic, evil)
        time.sleep(1.0)
        proc.send_signal(2)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        retain(mosquitto.port, topic, b"")
    assert proc.returncode == 0
    text = out.decode()
    lines = text.splitlines()
    results = [ln.split("  ") for ln in lines if "  result  " in ln]
    assert any(
        r[1:4] == ["host-a", "nosuch", "result"]
        and r[5:] == ["vm stopped", "nosuch error vm-not-found: Domain not found: no domain"
                      " with matching name 'nosuch'"]
        for r in results
    ), lines  # fmt: skip
    ghost = [ln.split("  ") for ln in lines if "  presence  " in ln]
    assert [g[1] for g in ghost] == ["ghost", "ghost"]
    assert ghost[0][5:7] == ["online", "version 0.1.0"]
    assert ghost[1][5] == "draining"
    assert raw_controls(text) == []
    assert "<hv>\\x1b[2J" in text
