"""``/metrics`` against hostile and careless clients: connections that never send a request
(slowloris) take a bounded number of threads and file descriptors,
and are closed after a timeout; a scrape works again once they are gone."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import urllib.request

import pytest

from asyncmigfra.transport.metrics import endpoint
from asyncmigfra.transport.metrics.endpoint import MAX_CONNECTIONS, Metrics


def _serving() -> int:
    """The server's threads that serve a connection."""
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        body: bytes = answer.read()
    return body


async def _until(check, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)
    assert check(), what


@pytest.fixture
async def metrics(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(endpoint, "CONNECTION_TIMEOUT", 2.0)
    m = Metrics(("127.0.0.1", 0), route=lambda *_: None, name="h", version="v", hypervisor="dummy")
    await m.start()
    try:
        yield m
    finally:
        await m.stop()


async def test_idle_connections_take_bounded_threads_and_are_closed(metrics: Metrics):
    assert b"asyncmigfra_agent_info" in await asyncio.to_thread(_scrape, metrics.port)
    await _until(lambda: _serving() == 0, "the scrape's thread stays")
    fds = _fds()
    most = {"threads": 0, "fds": 0}
    idle: list[socket.socket] = []

    def sample() -> None:
        most["threads"] = max(most["threads"], _serving())
        most["fds"] = max(most["fds"], _fds() - fds - len(idle))

    try:
        for _ in range(200):
            idle.append(socket.create_connection(("127.0.0.1", metrics.port)))
            sample()
        # Every connection was accepted once the last one got an answer (closed at once: no
        # slot) or a thread that timed out.
        idle[-1].settimeout(5)
        assert idle[-1].recv(1) == b""
        sample()
        print(f"200 idle connections: at most {most['threads']} threads, {most['fds']} fds")
        assert 0 < most["threads"] <= MAX_CONNECTIONS
        assert most["fds"] <= MAX_CONNECTIONS + 1  # (+ the one being accepted and closed)
        # The server closes the idle ones after its timeout (and frees their slots).
        await _until(lambda: _serving() == 0, "idle connections keep their threads")
        for s in idle:
            s.settimeout(5)
            assert s.recv(1) == b""
    finally:
        for s in idle:
            s.close()
    assert b"asyncmigfra_agent_info" in await asyncio.to_thread(_scrape, metrics.port)
