"""The ``dummy`` back-end: the original's never-throw switch, option parsing, the Protocol.

Every test is ``async`` even where nothing is awaited: with the looptime plugin installed, a
sync test that runs before the first async test of its module leaks an event loop
(ResourceWarning, an error under ``filterwarnings = error``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from asyncmigfra.errors import ConfigError, HypervisorError
from asyncmigfra.hypervisor.base import Hypervisor, MigrationJob, MigrationRequest
from asyncmigfra.hypervisor.dummy import DUMMY_ERROR, DummyHypervisor, create
from asyncmigfra.model import StartSpec


class Ctx:
    def __init__(self) -> None:
        self.phases: list[str] = []

    def phase(self, name: str) -> None:
        self.phases.append(name)

    @contextmanager
    def measure(self, tag: str) -> Iterator[None]:
        yield


def make(never_throw: object = True, **extra: object) -> DummyHypervisor:
    return create({"never-throw": never_throw, **extra}, hostname="node1", shared={})


REQUEST = MigrationRequest(vm_name="vm", destination="node2")


async def test_original_error_text_is_exact() -> None:
    assert DUMMY_ERROR == "Dummy_hypervisor is set to throw always if called."


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        ("true", True),
        ("True", True),
        ("TRUE", True),
        ("y", True),
        ("Y", True),
        ("yes", True),
        ("On", True),
        ("false", False),
        ("n", False),
        ("No", False),
        ("OFF", False),
    ],
)
async def test_never_throw_accepts_yaml_cpp_booleans(value: object, expected: bool) -> None:
    assert make(value).never_throw is expected


@pytest.mark.parametrize("value", ["maybe", 1, 0, None, "", [True]])
async def test_never_throw_rejects_non_booleans(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^hypervisor\.never-throw: expected a boolean"):
        make(value)


async def test_never_throw_defaults_to_true() -> None:
    """The original required the key; the embedded default config has no options at all."""
    hv = create({}, hostname="h", shared={})
    assert hv.never_throw is True
    assert isinstance(hv, DummyHypervisor)
    await hv.suspend("x", Ctx())


async def test_generic_libvirt_keys_are_tolerated() -> None:
    hv = make(
        True,
        driver="qemu",
        transport="ssh",
        nodes=["a", "b"],
        **{"start-timeout": 60, "stop-timeout": "30"},
    )
    assert hv.never_throw is True
    assert hv.kind == "dummy"


async def test_unknown_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        make(True, bandwidth=10)
    assert err.value.path == "hypervisor.bandwidth"
    assert str(err.value) == "hypervisor.bandwidth: unknown key"


async def test_satisfies_the_protocol() -> None:
    hv = make(True)
    assert isinstance(hv, Hypervisor)


async def test_never_throw_true_every_operation_succeeds() -> None:
    hv = make(True)
    ctx = Ctx()
    await hv.open()
    await hv.start(StartSpec(vm_name="vm"), ctx)
    await hv.stop("vm", ctx, force=True, undefine=True)
    await hv.suspend("vm", ctx)
    await hv.resume("vm", ctx)
    await hv.repin("vm", ((0,), (1,)), ctx)
    assert await hv.list_domains() == []
    assert await hv.list_domains(active_only=True) == []
    info = await hv.host_info()
    assert info.hostname == "node1"
    assert info.cpus >= 1
    assert 0 < info.free_memory <= info.memory
    await hv.aclose()
    await hv.aclose()  # safe twice


async def test_never_throw_true_migration_completes_immediately() -> None:
    hv = make(True)
    job = await hv.begin_migration(REQUEST, Ctx())
    assert isinstance(job, MigrationJob)
    assert await job.stats() is None
    assert await job.wait_iteration(5) == 0  # over already: returns the final iteration
    result = await job.wait()
    assert result.iterations == 0
    assert result.transferred == 0
    assert result.post_copy is False
    # Steering a finished job is harmless.
    await job.set_max_downtime(500)
    await job.start_post_copy()
    await job.suspend_source()
    await job.abort()
    assert (await job.wait()) == result


async def test_never_throw_false_every_operation_raises_the_original_text() -> None:
    hv = make("no")
    ctx = Ctx()
    await hv.open()  # the daemon still starts; the tasks fail
    calls = [
        hv.start(StartSpec(vm_name="vm"), ctx),
        hv.stop("vm", ctx),
        hv.suspend("vm", ctx),
        hv.resume("vm", ctx),
        hv.repin("vm", ((0,),), ctx),
        hv.begin_migration(REQUEST, ctx),
        hv.list_domains(),
        hv.host_info(),
    ]
    for call in calls:
        with pytest.raises(HypervisorError) as err:
            await call
        assert str(err.value) == DUMMY_ERROR
        assert err.value.code == "hypervisor-error"
    await hv.aclose()
