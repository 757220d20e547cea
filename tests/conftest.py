"""Shared fixtures: a real mosquitto on a free loopback port, hygiene checks.

Tools the tests need (mosquitto, libvirt) are *required* when ``CI`` is set: a missing tool
then fails the run instead of silently skipping, so a green CI means the real parts ran.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from harness import free_port, need, wait_port

ROOT = Path(__file__).resolve().parent.parent
IN_CI = bool(os.environ.get("CI"))


@dataclass
class Mosquitto:
    """A mosquitto process the test controls (stop, kill, restart on the same port)."""

    binary: str
    conf: Path
    port: int
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def mosquitto_conf(path: Path, port: int, *, extra: str = "") -> Path:
    path.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "set_tcp_nodelay true\n"
        "persistence false\n"
        # Debian's 2.0.11 drops QoS 2 publishes beyond the in-flight window: raise it.
        "max_inflight_messages 1000\n"
        "max_queued_messages 100000\n"
        "log_type error\n" + extra
    )
    return path


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    binary = need("mosquitto", "MQTT broker tests")
    port = free_port()
    conf = mosquitto_conf(tmp_path_factory.mktemp("mosquitto") / "mosquitto.conf", port)
    broker = Mosquitto(binary=binary, conf=conf, port=port)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def private_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker of the test's own, for tests that kill or restart it."""
    binary = need("mosquitto", "MQTT broker tests")
    port = free_port()
    broker = Mosquitto(binary=binary, conf=mosquitto_conf(tmp_path / "m.conf", port), port=port)
    broker.start()
    yield broker
    broker.stop(kill=True)


@dataclass
class SmallDisk:
    """A tmpfs of a few hundred KiB the test owns: fill it, free it, make it read-only."""

    path: Path

    def fill(self, *, leave: int = 0) -> None:
        """Write a filler file until the disk is full, then give ``leave`` bytes back."""
        with (self.path / "filler").open("wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
            if leave:
                f.truncate(max(0, f.tell() - leave))

    def free(self) -> None:
        (self.path / "filler").unlink(missing_ok=True)

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 1 MiB tmpfs mounted for the test (needs root; required in CI)."""
    where = tmp_path / "disk"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        if IN_CI:
            pytest.fail(f"cannot mount a tmpfs in CI: {done.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield SmallDisk(where)
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True, scope="module")
def _collect_garbage_per_module() -> Iterator[None]:
    """Collect garbage when a module's tests are done.

    A socket or file nobody closed is reported (ResourceWarning, an error here) only when the
    collector frees it, which otherwise happens at a random later moment and fails whatever
    test runs then (CI, stop 10). Collecting here pins the failure to the module's last test.
    Once per module, not per test: a collection costs tens of milliseconds.
    """
    yield
    gc.collect()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fn = getattr(item, "function", None)
        if fn is not None and inspect.iscoroutinefunction(fn):
            item.fixturenames.append("_no_pending_tasks")  # type: ignore[attr-defined]


@pytest.fixture
async def _no_pending_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks behind (kopf's hygiene check)."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    leftover = [
        t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()
    ]
    for t in leftover:
        t.cancel()
    assert not leftover, f"tasks left pending: {[t.get_name() for t in leftover]}"
