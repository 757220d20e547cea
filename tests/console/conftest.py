"""Fixtures for the console tests: a served fake cluster on the session's mosquitto, a
terminal."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from console_support import Served, Terminal, need_tmux, served_cluster


@pytest.fixture
def served(mosquitto, tmp_path: Path) -> Iterator[Served]:
    """A fresh ``demo --serve`` cluster (its own topic prefix); stopped with SIGTERM, which
    must end it with exit 0."""
    with served_cluster(mosquitto.port, tmp_path) as s:
        yield s


@pytest.fixture(scope="module")
def shared_served(mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One cluster for a module's tests that do not care where VMs are."""
    with served_cluster(mosquitto.port, tmp_path_factory.mktemp("served")) as s:
        yield s


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    need_tmux()
    t = Terminal()
    try:
        yield t
    finally:
        t.close()
