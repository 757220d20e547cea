"""The command line's exit paths as a process, as a newcomer meets them: an unreachable broker
(the demo included) is one line and exit 2, a closed pipe (``| head``) ends any command
quietly with exit 141, ``demo --serve --port N`` listens on N, and MQTT 5 against the
embedded broker (amqtt speaks only MQTT 3.1.1) is refused with a one-line hint."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from console_support import CLI, Served, env

from asyncmigfra.console.exits import BROKER, CLOSED_PIPE
from harness import free_port, wait_port

pytestmark = pytest.mark.broker


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False, env=env()
    )


def one_line(stderr: str) -> str:
    """The single line a failed command printed (and no traceback)."""
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def closed_port() -> int:
    port = free_port()  # bound and released: nothing listens there now
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    return port


# ------------------------------------------------------------------------------ no broker


@pytest.mark.parametrize("serve", [False, True], ids=["demo", "demo-serve"])
def test_demo_with_an_unreachable_broker_is_one_line_and_exit_2(serve):
    port = closed_port()
    started = time.monotonic()
    done = run("demo", *(["--serve"] if serve else []), "--broker", f"127.0.0.1:{port}")
    assert done.returncode == BROKER
    line = one_line(done.stderr)
    assert line.startswith(f"asyncmigfra: cannot reach the MQTT broker at 127.0.0.1:{port}: ")
    assert "refused" in line.lower()
    assert done.stdout == ""
    assert time.monotonic() - started < 8  # no agent kept reconnecting for 10 s


def test_demo_through_a_reachable_broker_still_runs(mosquitto):
    done = run("demo", "--quiet", "--broker", f"127.0.0.1:{mosquitto.port}", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "RESULT: all tasks succeeded" in done.stdout
    assert "Traceback" not in done.stderr


def test_demo_progress_speaks_the_clis_words_within_80_columns():
    done = run("demo", timeout=60)
    assert done.returncode == 0, done.stderr
    progress = [ln for ln in done.stdout.splitlines() if " % " in ln and "pass " in ln]
    assert len(progress) >= 3, done.stdout
    assert all(len(ln) <= 80 for ln in progress), progress
    assert any("ETA " in ln for ln in progress), progress
    assert any("target 30 ms -> max" in ln for ln in progress), progress
    assert not any(word in done.stdout for word in ("iter ", "exp. downtime")), done.stdout


def test_demo_usage_errors_are_one_line():
    done = run("demo", "--broker", "127.0.0.1:1883", "--port", "1884")
    assert done.returncode == 2
    assert "--port is the embedded broker's" in one_line(done.stderr)
    for argv in (["--mqtt-protocol", "5", "demo"], ["demo", "--mqtt-protocol", "5"]):
        done = run(*argv)
        assert done.returncode == 2
        assert "embedded broker (amqtt) speaks only MQTT 3.1.1" in one_line(done.stderr)


def test_demo_help_says_which_mqtt_the_embedded_broker_speaks():
    done = run("demo", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "MQTT 3.1.1" in text
    assert "--port N" in text


# ------------------------------------------------------------------------------ closed pipe


def read_one_line_then_close(
    argv: list[str], *, until: bytes = b"", timeout: float = 30
) -> tuple[int, bytes, str]:
    """``asyncmigfra ARGV | head -1``: read one line of stdout (the first that starts with
    ``until``), then close the pipe."""
    proc = subprocess.Popen(
        [*CLI, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env()
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        first = proc.stdout.readline()
        while first and not first.startswith(until):
            first = proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read().decode()
        return proc.wait(timeout=timeout), first, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def close_before_any_output(argv: list[str], *, timeout: float = 30) -> tuple[int, str]:
    """The reader is gone before the command writes: its first write meets a closed pipe."""
    reader, writer = socket.socketpair()  # a pipe-like fd whose reading end we can close now
    reader.close()
    with writer:
        proc = subprocess.Popen(
            [*CLI, *argv], stdout=writer.fileno(), stderr=subprocess.PIPE, env=env()
        )
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode()


def test_status_with_the_pipe_closed_before_it_writes_exit_141_quietly(shared_served: Served):
    for _ in range(5):  # it was intermittent: the buffer is flushed at exit or earlier
        code, err = close_before_any_output(["status", *shared_served.conn])
        assert (code, err) == (CLOSED_PIPE, "")


def test_status_piped_into_head_1_never_shows_a_traceback(shared_served: Served):
    for _ in range(5):
        code, first, err = read_one_line_then_close(["status", *shared_served.conn])
        assert first.split() == [b"HOST", b"STATE", b"VERSION", b"HYPERVISOR", b"TASKS", b"SINCE"]
        # 0 when the whole table was written before the pipe closed, else 141: never a
        # traceback or "Exception ignored" from the interpreter's last flush.
        assert code in {0, CLOSED_PIPE}
        assert err == ""


def test_migrate_follow_json_piped_into_head_exit_141_quietly(served: Served):
    code, first, err = read_one_line_then_close(
        [
            "--json",
            "migrate",
            "web-1",
            "--from",
            "host-a",
            "--to",
            "host-b",
            "--follow",
            *served.conn,
        ],
    )
    assert first.startswith(b"{")
    assert code == CLOSED_PIPE  # the next event line met the closed pipe
    assert err == ""


def test_demo_piped_into_head_exit_141_quietly():
    # `demo | head -5`: the pipe closes during the migration, whose progress lines are written
    # from a task of a TaskGroup (the error arrives as an ExceptionGroup).
    code, first, err = read_one_line_then_close(["demo"], until=b">>> live-migrate")
    assert first.startswith(b">>> live-migrate demo-vm host-a -> host-b")
    assert code == CLOSED_PIPE
    assert err == ""


# ------------------------------------------------------------------------------ --port, MQTT 5


@contextlib.contextmanager
def serve_on(port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [*CLI, "demo", "--serve", "--port", str(port)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env(),
        )
    try:
        deadline = time.monotonic() + 20
        while "ready" not in log.read_text().splitlines():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            assert proc.wait(timeout=20) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_demo_serve_port_and_mqtt_5_against_the_embedded_broker(tmp_path):
    port = free_port()
    with serve_on(port, tmp_path / "serve.log"):
        wait_port(port)
        banner = (tmp_path / "serve.log").read_text()
        assert f"on 127.0.0.1:{port} (MQTT 3.1.1)" in banner
        assert f"asyncmigfra --broker 127.0.0.1:{port} --mqtt-protocol 3.1.1 status" in banner

        ok = run("--broker", f"127.0.0.1:{port}", "--mqtt-protocol", "3.1.1", "status")
        assert ok.returncode == 0, ok.stderr
        assert {"host-a", "host-b"} <= {line.split()[0] for line in ok.stdout.splitlines()}

        # MQTT 5 (the CLI's default) is refused by amqtt: one line that says what to do.
        v5 = run("--broker", f"127.0.0.1:{port}", "status")
        assert v5.returncode == BROKER
        line = one_line(v5.stderr)
        assert f"cannot reach the MQTT broker at 127.0.0.1:{port}" in line
        assert "does not speak MQTT 5" in line
        assert line.endswith("use --mqtt-protocol 3.1.1")

        # The demo pointed at it with MQTT 5: the same line, before any agent starts.
        demo = run("demo", "--broker", f"127.0.0.1:{port}")
        assert demo.returncode == BROKER
        assert "use --mqtt-protocol 3.1.1" in one_line(demo.stderr)

        # The port is taken now: another embedded broker cannot listen there.
        taken = run("demo", "--port", str(port))
        assert taken.returncode == BROKER
        assert f"cannot listen on 127.0.0.1:{port}: " in one_line(taken.stderr)
        assert "address already in use" in taken.stderr
