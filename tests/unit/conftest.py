"""Fixtures of the fake back-end's tests (``test_hypervisor_fake*.py``, ``test_fake_*.py``,
...): the shared per-process dict (every module here uses this one) and the fake
hypervisors of hosts "a" and "b" (a module that defines its own fixture of the same name
uses its own)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_hypervisor_support import DOMAINS, make

from asyncmigfra.hypervisor.fake import SHARED_KEY, FakeCluster, FakeHypervisor


@pytest.fixture
def shared() -> Iterator[dict[str, object]]:
    """The per-process dict; afterwards no migration job may still be running."""
    data: dict[str, object] = {}
    yield data
    cluster = data.get(SHARED_KEY)
    if isinstance(cluster, FakeCluster):
        assert not cluster.jobs, f"jobs left running: {cluster.jobs}"


@pytest.fixture
def a(shared: dict[str, object]) -> FakeHypervisor:
    return make(
        shared,
        "a",
        domains=DOMAINS,
        peers={"b": None, "small": {"memory": 128 * 1024, "cpus": 2}},
    )


@pytest.fixture
def b(shared: dict[str, object], a: FakeHypervisor) -> FakeHypervisor:
    return make(shared, "b")
