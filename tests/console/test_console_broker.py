"""The client commands against a real mosquitto and agents on the fake hypervisor
(``demo --serve`` as a process): results, exit codes, ``--json``, presence checks."""

from __future__ import annotations

import asyncio
import io
import json
import re
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import yaml
from console_support import (
    CLI,
    ROOT,
    Served,
    env,
    free_port,
    hint_after,
    need,
    paste,
    start_broker,
)

from asyncmigfra import cli
from asyncmigfra.transport.mqtt import ToolClient
from harness import leaked_sockets

pytestmark = pytest.mark.broker


def run(served: Served, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``asyncmigfra <args>`` in this process (fast), with the served cluster's options."""
    code = cli.main([*args, *served.conn])
    out = capsys.readouterr()
    return code, out.out, out.err


def retain(port: int, topic: str, payload: bytes) -> None:
    """Publish a retained presence as an agent (or its Will) would."""

    async def go() -> None:
        async with ToolClient("127.0.0.1", port, client_id=f"t-{uuid.uuid4().hex[:8]}") as c:
            await c.publish(topic, payload, qos=1, retain=True)

    asyncio.run(go())


def presence(host: str, state: str) -> bytes:
    return (
        f'---\nstate: {state}\nhost: {host}\nversion: "0.1.0"\nhypervisor: fake\n'
        f'since: "2026-01-01T00:00:00Z"\n...\n'
    ).encode()


# ------------------------------------------------------------------------------ send


def test_send_keeps_the_files_id_and_prints_the_yaml(shared_served, capsys):
    code, out, err = run(
        shared_served, capsys, "send", str(ROOT / "examples/tasks/status.yaml"), "--host", "host-b"
    )
    assert code == 0, err
    assert out.startswith("---\nresult: status\nhost: host-b\n")
    assert out.endswith("id: example-status\n...\n")
    assert "task id" not in err  # the file's own id was kept


def test_send_from_stdin_adds_an_id_and_prints_json(shared_served, capsys, monkeypatch):
    task = b"# no id here\ntask: stop vm\nlist:\n  - vm-name: no-such-vm\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(task)))
    code, out, err = run(shared_served, capsys, "send", "-", "--host", "host-a", "--json")
    assert code == 1  # the agent answered, the entry failed
    (line,) = out.splitlines()
    doc = json.loads(line)
    assert doc["id"].startswith("send-")
    assert f"task id: {doc['id']}" in err
    assert doc["list"] == [
        {
            "vm-name": "no-such-vm",
            "status": "error",
            "details": "Domain not found: no domain with matching name 'no-such-vm'",
            "code": "vm-not-found",
        }
    ]


def test_send_of_an_unknown_task_exit_1(shared_served, capsys, tmp_path):
    f = tmp_path / "dance.yaml"
    f.write_text("task: dance vm\n")
    code, out, _ = run(shared_served, capsys, "send", str(f), "--host", "host-a")
    assert code == 1
    doc = yaml.safe_load(out)
    assert (doc["result"], doc["list"][0]["code"]) == ("unknown", "unknown-task")


# ------------------------------------------------------------------------------ presence


def test_unknown_and_offline_hosts_exit_3(shared_served, capsys, mosquitto):
    task = str(ROOT / "examples/tasks/status.yaml")
    code, _, err = run(shared_served, capsys, "send", task, "--host", "nohost")
    assert code == 3
    assert "no agent named 'nohost'" in err
    topic = f"{shared_served.prefix}/gone/status"
    retain(mosquitto.port, topic, presence("gone", "offline"))
    try:
        code, _, err = run(shared_served, capsys, "status", "gone")
        assert code == 3
        assert "host 'gone' is offline" in err
        # --force sends anyway (the agent's session would queue it) and waits for the agent
        # to come back, past the grace that applies to an agent going offline mid-task.
        code, _, err = run(
            shared_served, capsys, "send", task, "--host", "gone", "--force", "--timeout", "2.5"
        )
        assert code == 4
        assert "note: gone is offline; the task waits in its session" in err
        assert "no result for task 'example-status' from 'gone' within 2.5 s" in err
    finally:
        retain(mosquitto.port, topic, b"")


def test_agent_going_offline_while_waiting_exit_3(shared_served, capsys, mosquitto):
    topic = f"{shared_served.prefix}/ghost/status"
    retain(mosquitto.port, topic, presence("ghost", "online"))
    timer = threading.Timer(0.5, retain, (mosquitto.port, topic, presence("ghost", "offline")))
    timer.start()
    try:
        started = time.monotonic()
        code, _, err = run(shared_served, capsys, "cancel", "x", "--host", "ghost")
        assert code == 3
        assert "host 'ghost' went offline before answering" in err
        assert time.monotonic() - started < 5
    finally:
        timer.join()
        retain(mosquitto.port, topic, b"")


# ------------------------------------------------------------------------------ status


def test_status_table_and_json_lines(shared_served, capsys):
    code, out, _ = run(shared_served, capsys, "status")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["HOST", "STATE", "VERSION", "HYPERVISOR", "TASKS", "SINCE"]
    assert [ln.split()[:2] for ln in lines[1:]] == [["host-a", "online"], ["host-b", "online"]]
    assert "\x1b" not in out  # not a terminal: plain text
    code, out, _ = run(shared_served, capsys, "--json", "--mqtt-protocol", "3.1.1", "status")
    assert code == 0
    docs = [json.loads(ln) for ln in out.splitlines()]
    assert [(d["host"], d["state"], d["hypervisor"]) for d in docs] == [
        ("host-a", "online", "fake"),
        ("host-b", "online", "fake"),
    ]


def test_status_of_one_host_shows_tasks_and_domains(shared_served, capsys):
    code, out, _ = run(shared_served, capsys, "status", "host-a")
    assert code == 0
    assert out.startswith("host-a: online  asyncmigfra ")
    assert "Tasks: none queued or running" in out
    rows = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines()[3:]}
    assert rows["db-1"] == ["running", "4", "16.0", "GiB"]
    code, out, _ = run(shared_served, capsys, "status", "host-a", "--json")
    doc = json.loads(out)
    assert (doc["result"], doc["host"], doc["tasks"]) == ("status", "host-a", [])


# ------------------------------------------------------------------------------ shortcuts


def test_start_suspend_resume_stop_shortcuts(shared_served, capsys, tmp_path):
    def ok(*args: str) -> dict:
        code, out, err = run(shared_served, capsys, *args, "--host", "host-a")
        assert code == 0, out + err
        return yaml.safe_load(out)

    assert ok("start", "batch-1", "--no-probe")["result"] == "vm started"
    assert ok("suspend", "batch-1")["list"][0]["status"] == "success"
    assert ok("resume", "batch-1")["result"] == "vm resumed"
    assert ok("stop", "batch-1", "--force")["list"] == [{"vm-name": "batch-1", "status": "success"}]
    code, out, _ = run(shared_served, capsys, "stop", "batch-1", "--host", "host-a", "--force")
    assert code == 1
    assert yaml.safe_load(out)["list"][0]["code"] == "wrong-state"
    xml = tmp_path / "d.xml"
    xml.write_text("<domain type='qemu'><name>from-xml</name><memory unit='MiB'>256</memory>"
                   "<vcpu>1</vcpu></domain>")  # fmt: skip
    assert ok("start", "--xml", str(xml), "--no-probe")["list"][0]["vm-name"] == "from-xml"
    assert ok("stop", "from-xml", "--force", "--undefine")["result"] == "vm stopped"


def test_cancel_of_nothing_exit_1(shared_served, capsys):
    code, out, _ = run(shared_served, capsys, "cancel", "no-such-task", "--host", "host-a")
    assert code == 1
    entry = yaml.safe_load(out)["list"][0]
    assert (entry["code"], entry["details"]) == (
        "wrong-state",
        "task 'no-such-task' is not queued or running",
    )


def test_migrate_json_and_plain_follow(shared_served, capsys):
    # --follow --json: every event of the task as a JSON line, then the result.
    code, out, _ = run(
        shared_served, capsys,
        "migrate", "web-2", "--from", "host-a", "--to", "host-b", "--live", "--follow", "--json",
    )  # fmt: skip
    assert code == 0
    docs = [json.loads(ln) for ln in out.splitlines()]
    *events, result = docs
    task_id = result["id"]
    assert task_id.startswith("migrate-")
    assert {e["id"] for e in events} == {task_id}
    assert events[0]["event"] == "accepted"
    percents = [e["percent"] for e in events if e["event"] == "progress"]
    assert len(set(percents)) >= 3
    assert percents[-1] == 100.0
    assert (result["status"], result["destination"]) == ("success", "host-b")
    assert "downtime" in result["time-measurement"]
    # --follow in a pipe: plain lines, then the summary; and back to host-a.
    code, out, _ = run(
        shared_served, capsys, "migrate", "web-2", "--from", "host-b", "--to", "host-a",
        "--live", "--max-downtime", "300", "--follow",
    )  # fmt: skip
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("Migrating web-2 from host-b to host-a  (live, id migrate-")
    assert any("progress  completed 100.0 %" in ln for ln in lines)
    assert "web-2 migrated from host-b to host-a" in lines
    assert any(ln.startswith("  downtime     ") and "ms" in ln for ln in lines)
    assert "\x1b" not in out


def test_migrate_swap_with_follow_moves_both_vms(served, capsys):
    """``--swap-with``: web-1 goes host-a -> host-b while web-2 comes back; the plain view
    names the VM on each line, the summary reports both moves and the order."""
    # A swap needs a VM on the destination: send web-2 there first.
    code, _, err = run(served, capsys, "migrate", "web-2", "--from", "host-a", "--to", "host-b")
    assert code == 0, err
    code, out, err = run(
        served, capsys, "migrate", "web-1", "--from", "host-a", "--to", "host-b",
        "--swap-with", "web-2", "--live", "--follow",
    )  # fmt: skip
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0].startswith(
        "Swapping web-1 (host-a -> host-b) with web-2 (host-b -> host-a)  (live, id migrate-"
    )
    progress = [ln.split()[2] for ln in lines if " progress  " in ln]
    assert {"web-1", "web-2"} <= set(progress), lines
    assert any(re.search(r"web-1\s+progress  completed 100\.0 %", ln) for ln in lines)
    assert any(re.search(r"web-2\s+progress  completed 100\.0 %", ln) for ln in lines)
    assert "web-1 migrated from host-a to host-b" in lines
    assert "web-2 migrated from host-b to host-a" in lines
    assert "  order        parallel" in lines
    assert any(re.fullmatch(r"  downtime     web-1 [\d.]+ ms; web-2 [\d.]+ ms", ln) for ln in lines)
    assert "\x1b" not in out
    # Where are they now?
    for host, vm in (("host-b", "web-1"), ("host-a", "web-2")):
        code, out, _ = run(served, capsys, "status", host, "--json")
        assert json.loads(out)["list"][0]["status"] == "success"
        assert vm in {e["vm-name"] for e in json.loads(out)["list"]}
    # A swap whose partner is not on the destination fails (exit 1), and says so for both.
    code, out, _ = run(
        served, capsys, "migrate", "web-1", "--from", "host-b", "--to", "host-a",
        "--swap-with", "nope", "--follow",
    )  # fmt: skip
    assert code == 1
    assert "web-1 was NOT migrated: vm-not-found: " in out
    assert "nope was NOT migrated: the swap ended before its half started" in out


def test_migrate_failure_without_follow_exit_1(shared_served, capsys):
    code, out, err = run(
        shared_served, capsys, "migrate", "nope", "--from", "host-a", "--to", "host-b"
    )
    assert code == 1
    doc = yaml.safe_load(out)
    assert (doc["result"], doc["code"]) == ("vm migrated", "vm-not-found")
    assert f"task id: {doc['id']}" in err


def test_evacuate(shared_served, capsys):
    code, out, err = run(
        shared_served, capsys, "evacuate", "host-b", "--to", "host-a", "--live", "--mode", "scatter"
    )
    assert code == 0, err
    doc = yaml.safe_load(out)
    assert doc["result"] == "node evacuated"
    assert all(e["destination"] == "host-a" for e in doc["list"])


def test_ctrl_c_while_waiting_exit_130_and_the_hint_cancels_it(shared_served):
    """Without --follow, Ctrl-C leaves the task running and says how to cancel it; the
    ``cancel`` command then stops the running migration."""
    proc = subprocess.Popen(
        [*CLI, "migrate", "db-1", "--from", "host-a", "--to", "host-b", "--live",
         "--bandwidth", "50", *shared_served.conn],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(),
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        task_id = proc.stderr.readline().decode().removeprefix("task id: ").strip()
        assert task_id.startswith("migrate-")
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 130
        assert f"interrupted: task {task_id!r} keeps running on 'host-a'" in err.decode()
        hint = hint_after("(cancel it with: ", err.decode())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    # The hint is pasted as it is: it carries the broker and the topic prefix.
    assert hint == shlex.join(["asyncmigfra", "cancel", task_id, "--host", "host-a",
                               *shared_served.conn])  # fmt: skip
    out = paste(hint + " --json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["list"] == [
        {"vm-name": "db-1", "status": "success", "state": "running"}
    ]


# ------------------------------------------------------------------------------ watch


def _read_json_lines(proc: subprocess.Popen[bytes], until, timeout: float = 15) -> list[dict]:
    assert proc.stdout is not None
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if not ready:
            continue
        chunk = proc.stdout.read1(65536)  # type: ignore[attr-defined]
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        seen.extend(json.loads(ln) for ln in lines if ln)
        if until(seen):
            return seen
    raise AssertionError(f"watch did not show it; saw {seen}")


def test_watch_json_filtered_until_ctrl_c(shared_served):
    proc = subprocess.Popen(
        [*CLI, "watch", "--json", "--host", "host-a", "--vm", "target", *shared_served.conn],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env(),
    )
    try:
        assert proc.stderr is not None
        assert b"watching" in proc.stderr.readline()
        for vm in ("other", "target"):
            assert shared_served.cli("stop", vm, "--host", "host-a").returncode == 1
        seen = _read_json_lines(proc, lambda s: any("result" in e for e in s))
        # (A presence change of host-a, shown whatever the filter, may come in between: its
        # running-task count is re-published when the presence loop sees the stop run.)
        *events, result = [e for e in seen if "event" in e or "result" in e]
        assert [e["event"] for e in events] == ["accepted", "error", "done"]
        assert all(e["host"] == "host-a" for e in events)
        assert events[0]["vm-names"] == ["target"]
        assert events[1]["vm-name"] == "target"
        # The result is shown too (a result has no host field; the topic says where).
        assert (result["result"], result["list"][0]["vm-name"]) == ("vm stopped", "target")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# ------------------------------------------------------------------------------ TLS, auth


def _tls_broker(tmp_path, port: int) -> subprocess.Popen[bytes]:
    """mosquitto with TLS (a fresh CA; the server certificate names only DNS:localhost)
    and a password file (user ``u``, password ``pw``)."""
    openssl = need("openssl", "TLS test certificates")
    passwd = need("mosquitto_passwd", "MQTT password file")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, timeout=30)

    sh(openssl, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
       "-subj", "/CN=asyncmigfra test CA")  # fmt: skip
    sh(openssl, "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (tmp_path / "ext").write_text("subjectAltName=DNS:localhost\n")
    sh(openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
       "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "ext")  # fmt: skip
    sh(passwd, "-b", "-c", "passwd", "u", "pw")
    conf = tmp_path / "m.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\n"
        f"password_file {tmp_path / 'passwd'}\ncafile {tmp_path / 'ca.pem'}\n"
        f"certfile {tmp_path / 'server.pem'}\nkeyfile {tmp_path / 'server.key'}\n"
        "persistence false\nlog_type error\n"
        # Started as root, mosquitto drops to user mosquitto before it reads the key, which
        # then cannot enter pytest's private tmp directory. (No effect when not root.)
        "user root\n"
    )
    return start_broker(conf, port)


def test_tls_and_credentials_reach_the_broker(tmp_path, capsys, monkeypatch):
    leaked_sockets()
    port = free_port()
    broker = _tls_broker(tmp_path, port)
    try:
        pw = tmp_path / "pw.txt"
        pw.write_text("pw\n")
        base = ["--broker", f"127.0.0.1:{port}", "--tls-ca", str(tmp_path / "ca.pem")]

        def status(*extra: str) -> tuple[int, str]:
            code = cli.main([*base, *extra, "status", "--wait", "0.1"])
            return code, capsys.readouterr().err

        # The certificate names localhost, not 127.0.0.1: refused unless --tls-insecure.
        code, err = status("--username", "u", "--password-file", str(pw))
        assert code == 2
        assert f"cannot reach the MQTT broker at 127.0.0.1:{port}: " in err
        assert "certificate" in err.lower()
        code, err = status("--tls-insecure", "--username", "u", "--password-file", str(pw))
        assert (code, err) == (0, "no agent has a retained status on fast/migfra/+/status\n")
        monkeypatch.setenv("ASYNCMIGFRA_MQTT_PASSWORD", "pw")
        assert status("--tls-insecure", "--username", "u")[0] == 0
        monkeypatch.setenv("ASYNCMIGFRA_MQTT_PASSWORD", "wrong")
        code, err = status("--tls-insecure", "--username", "u")
        assert code == 2
        assert "not authori" in err.lower()
        # paho leaves the socket of the failed handshake open; the CLI closes it.
        assert leaked_sockets() == []
    finally:
        broker.kill()
        broker.wait()
