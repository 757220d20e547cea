"""One agent, one name, one journal (docs/operations.md "Several agents on one machine").

Real agent processes on one machine, configured only with the original's migfra.conf format:
the task topic names each agent, each has its own journal under the default ``state-dir``
(here ``$STATE_DIRECTORY``, as systemd's ``StateDirectory=`` sets it), and a journal is never
shared, damaged or full without the agent saying so.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness import Scheduler, scheduler

pytestmark = [pytest.mark.e2e, pytest.mark.broker]


def original_conf(path: Path, port: int, prefix: str, name: str, extra: str = "") -> Path:
    """The original's format: every communicator key, no ``hostname``, no ``state-dir``."""
    path.write_text(
        "communicator:\n"
        "  type: mqtt\n"
        "  id: fast-migfra-<hostname>\n"
        f"  subscribe-topic: {prefix}/{name}/task\n"
        f"  publish-topic: {prefix}/{name}/result\n"
        "  host: 127.0.0.1\n"
        f"  port: {port}\n"
        "  keepalive: 60\n"
        "hypervisor:\n"
        "  type: fake\n"
        "  start-delay: 3\n"
        "  domains:\n"
        "    - {name: slow, vcpus: 1, memory: 1024, state: shutoff}\n" + extra
    )
    return path


class AgentProcess:
    """``asyncmigfra agent -c CONF`` as its own process, with its output in a log file."""

    def __init__(self, conf: Path, env: dict[str, str]) -> None:
        self.conf = conf
        self.env = env
        self.log = conf.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "asyncmigfra", "agent", "-c", str(self.conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await asyncio.to_thread(self.proc.wait)

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, 20)

    async def exit_code(self, timeout: float = 20) -> int:
        assert self.proc is not None
        return await asyncio.to_thread(self.proc.wait, timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The agents' environment: ``auto`` state directories under a directory of the test."""
    state = tmp_path / "state"
    state.mkdir()
    return dict(os.environ, PYTHONUNBUFFERED="1", STATE_DIRECTORY=str(state))


@contextmanager
def reaped(*agents: AgentProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for agent in agents:
            if agent.proc is not None and agent.proc.poll() is None:
                agent.proc.kill()
                agent.proc.wait()


def status_board(port: int, prefix: str) -> list[dict[str, object]]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "asyncmigfra",
            "--broker",
            f"127.0.0.1:{port}",
            "status",
            "--topic-prefix",
            prefix,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


async def online(sched: Scheduler, agent: AgentProcess, count: int = 1) -> None:
    try:
        await sched.wait_for(
            lambda: len([s for s in sched.statuses if s["state"] == "online"]) >= count, 20
        )
    except TimeoutError:
        pytest.fail(f"the agent did not come online:\n{agent.output()[-3000:]}")


async def test_two_agents_with_the_original_format_keep_their_own_names_and_tasks(
    mosquitto, tmp_path, env
):
    prefix = f"id-{uuid.uuid4().hex[:6]}/migfra"
    state = Path(env["STATE_DIRECTORY"])
    a = AgentProcess(original_conf(tmp_path / "a.conf", mosquitto.port, prefix, "node-a"), env)
    b = AgentProcess(original_conf(tmp_path / "b.conf", mosquitto.port, prefix, "node-b"), env)
    with reaped(a, b):
        async with (
            scheduler(mosquitto.port, f"{prefix}/node-a") as to_a,
            scheduler(mosquitto.port, f"{prefix}/node-b") as to_b,
        ):
            a.start()
            b.start()
            await online(to_a, a)
            await online(to_b, b)
            # Each agent is its topic's name: in its presence, its events and the board.
            assert to_a.statuses[-1]["host"] == "node-a"
            assert to_b.statuses[-1]["host"] == "node-b"
            board = await asyncio.to_thread(status_board, mosquitto.port, prefix)
            assert sorted(str(row["host"]) for row in board) == ["node-a", "node-b"]
            assert {(state / n / "journal.sqlite").exists() for n in ("node-a", "node-b")} == {True}

            # A's task is running (a 3 s boot) when both agents are killed.
            await to_a.publish(
                "id: a-task\ntask: start vm\nvm-configurations:\n"
                "  - vm-name: slow\n    probe-with-ssh: false\n"
            )
            await to_a.wait_for(lambda: to_a.events_for("a-task", "phase"), 10)
            assert to_a.events_for("a-task", "accepted")[0]["host"] == "node-a"
            await a.kill()
            await b.kill()

            # B comes back first: it must not touch A's task.
            to_b.statuses.clear()
            b.start()
            await online(to_b, b)
            await asyncio.sleep(1.5)
            assert not [r for r in to_a.results + to_b.results if r.get("id") == "a-task"]
            assert not to_b.events_for("a-task")

            # A comes back: it reconciles its task and answers it once, on its own topic.
            to_a.statuses.clear()
            a.start()
            result = await to_a.result_for("a-task", timeout=30)
            assert result["list"][0]["status"] == "success", result
            reconciled = [
                e for e in to_a.events_for("a-task", "phase") if e["phase"] == "reconciling"
            ]
            assert reconciled
            assert reconciled[0]["host"] == "node-a"
            await asyncio.sleep(0.5)
            assert [r.get("id") for r in to_a.results].count("a-task") == 1
            assert not [r for r in to_b.results if r.get("id") == "a-task"]
            assert await a.stop() == 0
            assert await b.stop() == 0
    for agent in (a, b):
        assert "client_id_in_use" not in agent.output()


async def test_a_second_agent_on_the_same_state_dir_refuses_to_start(mosquitto, tmp_path, env):
    prefix = f"lock-{uuid.uuid4().hex[:6]}/migfra"
    shared = tmp_path / "shared-state"
    extra = f"agent:\n  state-dir: {shared}\n"
    first = AgentProcess(
        original_conf(tmp_path / "1.conf", mosquitto.port, prefix, "one", extra), env
    )
    second = AgentProcess(
        original_conf(tmp_path / "2.conf", mosquitto.port, prefix, "two", extra), env
    )
    with reaped(first, second):
        async with scheduler(mosquitto.port, f"{prefix}/one") as sched:
            first.start()
            await online(sched, first)
            second.start()
            assert await second.exit_code() == 2
            lines = second.output().strip().splitlines()
            assert len(lines) == 1, lines
            assert str(shared) in lines[0]
            assert f"PID {first.pid}" in lines[0]
            # The first agent is not disturbed.
            r = await sched.call("task: status\n")
            assert r["journal"] == "ok"
            assert await first.stop() == 0


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        pytest.param(b"SQLite format 3\0" + b"\xee" * 8000, "damaged", id="corrupt"),
        pytest.param(b"not a database at all\n" * 100, "damaged", id="not-sqlite"),
    ],
)
async def test_a_damaged_journal_stops_the_agent_with_one_line(
    mosquitto, tmp_path, env, damage, expected
):
    prefix = f"bad-{uuid.uuid4().hex[:6]}/migfra"
    journal = Path(env["STATE_DIRECTORY"]) / "node-x" / "journal.sqlite"
    journal.parent.mkdir(parents=True)
    journal.write_bytes(damage)
    agent = AgentProcess(original_conf(tmp_path / "x.conf", mosquitto.port, prefix, "node-x"), env)
    with reaped(agent):
        agent.start()
        assert await agent.exit_code() == 2
    text = agent.output()
    assert "Traceback" not in text
    lines = text.strip().splitlines()
    assert len(lines) == 1, lines
    assert expected in lines[0]
    assert str(journal) in lines[0]
    assert "move it aside" in lines[0]


async def test_a_full_disk_refuses_tasks_as_unavailable_until_it_has_room(
    mosquitto, tmp_path, env, small_disk
):
    prefix = f"full-{uuid.uuid4().hex[:6]}/migfra"
    extra = f"agent:\n  state-dir: {small_disk.path / 'state'}\n"
    agent = AgentProcess(
        original_conf(tmp_path / "f.conf", mosquitto.port, prefix, "node-f", extra), env
    )
    # A task large enough to need new room in the journal (its payload is recorded).
    task = "task: stop vm\nlist:\n  - vm-name: slow\n    force: true\n" + "".join(
        f"# {'x' * 1000}\n" for _ in range(300)
    )
    with reaped(agent):
        async with scheduler(mosquitto.port, f"{prefix}/node-f") as sched:
            agent.start()
            await online(sched, agent)
            assert sched.statuses[-1]["journal"] == "ok"
            small_disk.fill()

            await sched.publish(f"id: t-full\n{task}")
            r = await sched.result_for("t-full", timeout=10)
            entry = r["list"][0]
            assert (entry["status"], entry["code"]) == ("error", "unavailable"), r
            assert "journal" in entry["details"]
            assert "nothing was done" in entry["details"]
            assert not sched.events_for("t-full", "accepted")
            assert [e["code"] for e in sched.events_for("t-full", "rejected")] == ["unavailable"]
            assert not sched.events_for("t-full", "phase")
            # Presence says so; the agent serves on (status needs no journal).
            await sched.wait_for(
                lambda: sched.statuses and sched.statuses[-1].get("journal") == "failing", 10
            )
            assert sched.statuses[-1]["state"] == "online"
            assert (await sched.call("task: status\n"))["journal"] == "failing"

            small_disk.free()
            await sched.wait_for(lambda: sched.statuses[-1].get("journal") == "ok", 15)
            # The same task, sent again, is accepted and runs.
            await sched.publish(f"id: t-full\n{task}")
            await sched.wait_for(lambda: len(sched.events_for("t-full", "accepted")) == 1, 10)
            await sched.wait_for(
                lambda: len([r for r in sched.results if r.get("id") == "t-full"]) == 2, 10
            )
            second = [r for r in sched.results if r.get("id") == "t-full"][1]
            assert second["list"][0].get("code") != "unavailable", second
            assert await agent.stop() == 0
