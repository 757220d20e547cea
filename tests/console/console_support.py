"""Helpers for the console tests: a ``demo --serve`` cluster as a process, the CLI as a
process, and a tmux terminal to look at what a person would see."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "asyncmigfra"]


def env() -> dict[str, str]:
    e = dict(os.environ, PYTHONUNBUFFERED="1", LANG="C.UTF-8", LC_ALL="C.UTF-8")
    e.pop("NO_COLOR", None)
    return e


@dataclass
class Served:
    """Agents host-a and host-b (``demo --serve``) under a topic prefix of their own."""

    port: int
    prefix: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def conn(self) -> list[str]:
        return ["--broker", f"127.0.0.1:{self.port}", "--topic-prefix", self.prefix]

    def start(self) -> None:
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(
                [*CLI, "demo", "--serve", *self.conn],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env(),
            )
        deadline = time.monotonic() + 20
        while "ready" not in self.log.read_text().splitlines():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"demo --serve did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def cli(
        self, *args: str, stdin: bytes | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run ``asyncmigfra <args> --broker ... --topic-prefix ...`` to completion."""
        out = subprocess.run(
            [*CLI, *args, *self.conn],
            input=stdin,
            capture_output=True,
            timeout=timeout,
            check=False,
            env=env(),
        )
        return subprocess.CompletedProcess(
            out.args, out.returncode, out.stdout.decode(), out.stderr.decode()
        )

    def command(self, *args: str) -> str:
        """The shell command line for a terminal."""
        import shlex  # noqa: PLC0415

        return shlex.join([*CLI, *args, *self.conn])


@contextlib.contextmanager
def served_cluster(port: int, tmp: Path) -> Iterator[Served]:
    s = Served(port=port, prefix=f"t{uuid.uuid4().hex[:8]}/migfra", log=tmp / "serve.log")
    s.start()
    try:
        yield s
    finally:
        code = s.stop()
    assert code == 0, s.log.read_text()


@dataclass
class Terminal:
    """A 160x40 tmux pane on a private tmux server, running one command in bash."""

    socket: str = field(default_factory=lambda: f"amf-{uuid.uuid4().hex[:8]}")
    width: int = 160
    height: int = 40
    started: bool = False

    def _tmux(self, *args: str) -> str:
        out = subprocess.run(
            ["tmux", "-u", "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
            env=env(),
        )
        return out.stdout

    def run(self, command: str) -> None:
        """Start ``command``; when it ends the pane shows ``[exit N]`` and stays."""
        script = f'{command}; echo "[exit $?]"; sleep 600'
        self._tmux(
            "new-session", "-d", "-s", "main", "-x", str(self.width), "-y", str(self.height),
            "bash", "--norc", "--noprofile", "-c", script,
        )  # fmt: skip
        self.started = True

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "main")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "main", *keys)

    def wait_for(
        self,
        what: str | Callable[[str], bool],
        timeout: float = 15,
        *,
        every: Callable[[str], None] | None = None,
    ) -> str:
        """Poll the screen until ``what`` (a regex, or a predicate) matches; ``every`` sees
        each snapshot (to record how the screen changed over time)."""
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if every is not None:
                every(screen)
            ok = what(screen) if callable(what) else re.search(what, screen) is not None
            if ok:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what!r}; the screen was:\n{screen}")

    def close(self) -> None:
        if self.started:
            subprocess.run(
                ["tmux", "-L", self.socket, "kill-server"], capture_output=True, check=False
            )


def exit_code(screen: str) -> int | None:
    m = re.search(r"\[exit (\d+)\]", screen)
    return None if m is None else int(m.group(1))


def need(tool: str, why: str) -> str:
    """Path of ``tool``; skip locally, fail in CI when it is missing (as tests/conftest.py)."""
    import pytest  # noqa: PLC0415

    path = shutil.which(tool) or (
        f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None
    )
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is required in CI ({why}) but is not installed")
        pytest.skip(f"{tool} not installed ({why})")
    return path


def need_tmux() -> None:
    need("tmux", "terminal tests")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(conf: Path, port: int) -> subprocess.Popen[bytes]:
    """A mosquitto with a configuration of the test's own (TLS, passwords)."""
    proc = subprocess.Popen(
        [need("mosquitto", "MQTT broker tests"), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise TimeoutError(f"mosquitto did not listen on {port}")
