"""Configured pre/post hooks: command hooks with real subprocesses (environment, argv and
shell forms, failures, timeouts and cancellation).

Policies, order, phases, timing and built-in hooks: ``test_userhooks_runner.py``. The MQTT kind
runs against a real broker in ``tests/broker/test_userhooks_mqtt.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from userhooks_support import MIGRATE, START, hook

from asyncmigfra.errors import HookFailed
from asyncmigfra.peers import userhooks
from asyncmigfra.peers.userhooks import HookCall, HookRunner
from asyncmigfra.peers.userhooks.commands import _Capture, _run_command
from harness import RecordingContext as FakeContext


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie waiting for init does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def gone(*pids: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(alive(pid) for pid in pids):
            return True
        await asyncio.sleep(0.02)
    return False


def read_pids(*files: Path) -> list[int]:
    return [int(f.read_text().strip()) for f in files]


async def wait_file(path: Path, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not (path.exists() and path.read_text().endswith("\n")):
        assert time.monotonic() < deadline, f"{path} never written"
        await asyncio.sleep(0.01)


# --- the task's data in the environment -----------------------------------------------------------


def env_of(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines)


async def test_environment_of_a_migration_hook_on_the_destination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "env"
    monkeypatch.setenv("AGENT_OWN_VARIABLE", "kept")
    cmd = script(tmp_path, "env.sh", f"env | grep -e ^ASYNCMIGFRA_ -e ^AGENT_OWN_ > {out}\n")
    # On the destination the hook is run by that host's agent (HookRunner.serve), which hands
    # the call to the same command runner as a local hook.
    on_dest = hook("env", (cmd,), when=("after-migrate",), on="destination")
    call = HookCall(
        point="after-migrate",
        task="migrate vm",
        task_id="42",
        vm_name="vm7",
        source="src-host",
        destination="dst-host",
        outcome="error",
        details="migration-failed: it broke",
    )

    await _run_command(on_dest, call)

    assert env_of(out) == {
        "AGENT_OWN_VARIABLE": "kept",
        "ASYNCMIGFRA_HOOK": "env",
        "ASYNCMIGFRA_POINT": "after-migrate",
        "ASYNCMIGFRA_TASK": "migrate vm",
        "ASYNCMIGFRA_TASK_ID": "42",
        "ASYNCMIGFRA_VM_NAME": "vm7",
        "ASYNCMIGFRA_SOURCE": "src-host",
        "ASYNCMIGFRA_DESTINATION": "dst-host",
        "ASYNCMIGFRA_HOST": "dst-host",
        "ASYNCMIGFRA_OUTCOME": "error",
        "ASYNCMIGFRA_DETAILS": "migration-failed: it broke",
    }
    # The source's agent does not run it itself; without a broker it cannot ask.
    out.unlink()
    with pytest.raises(HookFailed, match="on: destination needs the agent's MQTT connection"):
        await HookRunner([on_dest], bus=None).run(call, FakeContext())
    assert not out.exists()


async def test_environment_of_a_start_hook_has_no_stale_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Variables the call does not set are absent even if the agent's environment has them."""
    out = tmp_path / "env"
    monkeypatch.setenv("ASYNCMIGFRA_DESTINATION", "stale")
    monkeypatch.setenv("ASYNCMIGFRA_OUTCOME", "stale")
    cmd = script(tmp_path, "env.sh", f"env | grep ^ASYNCMIGFRA_ > {out}\n")
    runner = HookRunner([hook("env", (cmd,))], bus=None)
    call = HookCall(point="before-start", task="start vm", task_id=None, vm_name="v", source="h")

    await runner.run(call, FakeContext())

    assert env_of(out) == {
        "ASYNCMIGFRA_HOOK": "env",
        "ASYNCMIGFRA_POINT": "before-start",
        "ASYNCMIGFRA_TASK": "start vm",
        "ASYNCMIGFRA_TASK_ID": "",
        "ASYNCMIGFRA_VM_NAME": "v",
        "ASYNCMIGFRA_SOURCE": "h",
        "ASYNCMIGFRA_HOST": "h",
    }


async def test_on_source_host_is_the_source(tmp_path: Path) -> None:
    out = tmp_path / "host"
    runner = HookRunner(
        [hook("h", f'echo "$ASYNCMIGFRA_HOST" > {out}', when=("before-migrate",))], bus=None
    )
    call = MIGRATE

    await runner.run(call, FakeContext())

    assert out.read_text() == "a\n"


async def test_on_destination_without_a_destination_fails(tmp_path: Path) -> None:
    runner = HookRunner([hook("h", "true", when=("before-migrate",), on="destination")], bus=None)
    call = replace(MIGRATE, destination=None)

    with pytest.raises(HookFailed, match=r"^hook h \(before-migrate\) failed: on: destination"):
        await runner.run(call, FakeContext())


async def test_stdin_is_dev_null(tmp_path: Path) -> None:
    out = tmp_path / "stdin"
    runner = HookRunner([hook("in", f"readlink /proc/self/fd/0 > {out}; cat")], bus=None)

    await asyncio.wait_for(runner.run(START, FakeContext()), 5)

    assert out.read_text() == "/dev/null\n"


async def test_runs_in_a_session_of_its_own(tmp_path: Path) -> None:
    out = tmp_path / "stat"
    runner = HookRunner([hook("sid", f"echo $$ > {out}; cat /proc/$$/stat >> {out}")], bus=None)

    await runner.run(START, FakeContext())

    pid, stat = out.read_text().split("\n", 1)
    # pid (comm) state ppid pgrp session ...
    _, pgrp, session = stat.rpartition(")")[2].split()[1:4]
    assert pgrp == session == pid
    assert int(session) != os.getsid(0)


# --- argv and shell forms -------------------------------------------------------------------------


async def test_argv_form_is_not_run_through_a_shell(tmp_path: Path) -> None:
    out = tmp_path / "args"
    cmd = script(tmp_path, "args.sh", f"printf '%s\\n' \"$@\" > {out}\n")
    runner = HookRunner([hook("argv", (cmd, "a b", "$HOME", "*"))], bus=None)

    await runner.run(START, FakeContext())

    assert out.read_text().splitlines() == ["a b", "$HOME", "*"]


async def test_string_form_is_run_with_sh_c(tmp_path: Path) -> None:
    out = tmp_path / "shell"
    runner = HookRunner(
        [hook("shell", f'for w in one two; do echo "$w-$ASYNCMIGFRA_VM_NAME"; done > {out}')],
        bus=None,
    )

    await runner.run(START, FakeContext())

    assert out.read_text() == "one-vm1\ntwo-vm1\n"


# --- failures -------------------------------------------------------------------------------------


async def test_exit_status_and_last_stderr_line(tmp_path: Path) -> None:
    body = "echo on stdout\necho 'first problem' >&2\necho 'disk full' >&2\necho '  ' >&2\nexit 3\n"
    runner = HookRunner([hook("drain", (script(tmp_path, "f.sh", body),))], bus=None)

    with pytest.raises(HookFailed) as info:
        await runner.run(START, FakeContext())

    assert str(info.value) == "hook drain (before-start) failed: exit status 3: disk full"
    assert info.value.code == "hook-failed"


async def test_exit_status_falls_back_to_stdout(tmp_path: Path) -> None:
    runner = HookRunner([hook("x", "echo 'only stdout'; echo; exit 1")], bus=None)

    with pytest.raises(HookFailed, match=r"failed: exit status 1: only stdout$"):
        await runner.run(START, FakeContext())


async def test_exit_status_without_output(tmp_path: Path) -> None:
    runner = HookRunner([hook("x", "exit 7")], bus=None)

    with pytest.raises(HookFailed, match=r"failed: exit status 7$"):
        await runner.run(START, FakeContext())


async def test_killed_by_a_signal(tmp_path: Path) -> None:
    runner = HookRunner([hook("x", "kill -KILL $$")], bus=None)

    with pytest.raises(HookFailed, match=r"failed: killed by SIGKILL$"):
        await runner.run(START, FakeContext())


async def test_long_output_keeps_its_end(tmp_path: Path) -> None:
    """1 MiB of stderr: the failure still names the last line."""
    runner = HookRunner(
        [
            hook(
                "x",
                "head -c 1048576 /dev/zero | tr '\\0' 'x' >&2; echo >&2; echo the end >&2; exit 2",
            )
        ],
        bus=None,
    )

    with pytest.raises(HookFailed, match=r"failed: exit status 2: the end$"):
        await runner.run(START, FakeContext())


def test_output_tail_is_bounded() -> None:
    capture = _Capture(asyncio.new_event_loop())
    try:
        for _ in range(100):
            capture.pipe_data_received(2, b"y" * 1000)
        capture.pipe_data_received(2, b"\nlast\n")

        assert len(capture.tails[2]) == userhooks.OUTPUT_TAIL_BYTES
        assert capture.last_line() == "last"
    finally:
        capture.exited.get_loop().close()


async def test_missing_executable_is_a_failure(tmp_path: Path) -> None:
    runner = HookRunner([hook("nope", (str(tmp_path / "no-such-program"), "x"))], bus=None)

    with pytest.raises(HookFailed) as info:
        await runner.run(START, FakeContext())

    assert str(info.value) == (
        f"hook nope (before-start) failed: cannot run {tmp_path / 'no-such-program'}: "
        "No such file or directory"
    )


async def test_not_executable_is_a_failure(tmp_path: Path) -> None:
    path = tmp_path / "plain.txt"
    path.write_text("echo hi\n")
    runner = HookRunner([hook("plain", (str(path),))], bus=None)

    with pytest.raises(HookFailed, match=r"cannot run .*plain.txt: Permission denied$"):
        await runner.run(START, FakeContext())


# --- timeouts and cancellation: no process survives -----------------------------------------------


GROUP_SCRIPT = """\
sleep 60 &
echo $! > {child}
echo $$ > {leader}
wait
"""


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    child, leader = tmp_path / "child", tmp_path / "leader"
    cmd = script(tmp_path, "g.sh", GROUP_SCRIPT.format(child=child, leader=leader))
    runner = HookRunner([hook("slow", (cmd,), timeout=0.5)], bus=None)
    started = time.monotonic()

    with pytest.raises(HookFailed) as info:
        await runner.run(START, FakeContext())

    assert str(info.value) == "hook slow (before-start) failed: no answer within 0.5 s"
    assert time.monotonic() - started < 2.5  # SIGTERM sufficed: no 2 s wait for SIGKILL
    pids = read_pids(child, leader)
    assert await gone(*pids), pids


async def test_timeout_escalates_to_sigkill(tmp_path: Path) -> None:
    """A command that ignores SIGTERM (and its child) is killed 2 s later."""
    child, leader = tmp_path / "child", tmp_path / "leader"
    body = "trap '' TERM\n" + GROUP_SCRIPT.format(child=child, leader=leader)
    runner = HookRunner(
        [hook("stubborn", (script(tmp_path, "g.sh", body),), timeout=0.3)], bus=None
    )
    started = time.monotonic()

    with pytest.raises(HookFailed, match=r"no answer within 0.3 s$"):
        await runner.run(START, FakeContext())

    elapsed = time.monotonic() - started
    assert userhooks.KILL_GRACE <= elapsed < userhooks.KILL_GRACE + 2
    pids = read_pids(child, leader)
    assert await gone(*pids), pids


async def test_cancellation_kills_the_command_and_propagates(tmp_path: Path) -> None:
    child, leader = tmp_path / "child", tmp_path / "leader"
    cmd = script(tmp_path, "g.sh", GROUP_SCRIPT.format(child=child, leader=leader))
    after = tmp_path / "after"
    runner = HookRunner(
        [hook("slow", (cmd,), timeout=30), hook("later", f"touch {after}")], bus=None
    )
    ctx = FakeContext()
    task = asyncio.create_task(runner.run(START, ctx))
    await wait_file(leader)
    await wait_file(child)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)

    pids = read_pids(child, leader)
    assert await gone(*pids), pids
    assert not after.exists()
    assert ctx.calls == [("phase", "hook:slow"), ("start", "hook-slow"), ("stop", "hook-slow")]


async def test_cancel_while_the_command_starts_does_not_wait_for_its_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found under load: a cancel that lands while asyncio still connects the command's pipes
    hit asyncio's own clean-up (Python 3.11), which kills only the leader and then waits
    until every process holding the pipes is gone, here a 60 s background child. The start
    is now let finish and the whole group stopped. The pipes' connection is held back until
    the child runs, so the cancel always lands in that window."""
    child, leader = tmp_path / "child", tmp_path / "leader"
    cmd = script(tmp_path, "g.sh", GROUP_SCRIPT.format(child=child, leader=leader))
    loop = asyncio.get_running_loop()
    connect = loop.connect_read_pipe
    connecting = asyncio.Event()

    async def connect_late(*args: Any, **kwargs: Any) -> Any:
        connecting.set()
        await wait_file(child)
        return await connect(*args, **kwargs)

    monkeypatch.setattr(loop, "connect_read_pipe", connect_late)
    runner = HookRunner([hook("slow", (cmd,), timeout=30)], bus=None)
    task = asyncio.create_task(runner.run(START, FakeContext()))
    await connecting.wait()
    await wait_file(child)
    await wait_file(leader)
    pids = read_pids(child, leader)
    try:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        assert await gone(*pids), pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_child_left_holding_the_output_does_not_delay_success(tmp_path: Path) -> None:
    """The hook exited 0; a background child still holding its stdout is not waited for."""
    child = tmp_path / "child"
    runner = HookRunner([hook("bg", f"sleep 60 & echo $! > {child}; exit 0")], bus=None)
    started = time.monotonic()
    try:
        assert await runner.run(START, FakeContext()) == []
        assert time.monotonic() - started < userhooks.DRAIN_GRACE + 1.5
    finally:
        (pid,) = read_pids(child)
        os.kill(pid, signal.SIGKILL)
