"""A swap the agent was running when it stopped (journal recovery, ``reconcile_subtask``): done
when the VMs traded places, run again when neither moved, reported as interrupted otherwise."""

from __future__ import annotations

from collections.abc import Mapping

from asyncmigfra.hypervisor.base import AdoptsMigrations
from asyncmigfra.hypervisor.fake import FakeHypervisor, create
from asyncmigfra.model import MigrateSpec, MigrationParams, SwapWith
from asyncmigfra.settings import Settings
from asyncmigfra.tasks.running import SubtaskContext, reconcile_subtask
from asyncmigfra.timing import TimeMeasurement
from asyncmigfra.wire.events import Events

GIB = 1024 * 1024


class _Sink:
    def __init__(self) -> None:
        self.events: list[Mapping[str, object]] = []

    def emit(self, event: Mapping[str, object], *, terminal: bool = False, qos: int = 1) -> None:
        self.events.append(event)


def _cluster(here: list[str], there: list[str]) -> FakeHypervisor:
    def doms(names: list[str]) -> list[dict[str, object]]:
        return [{"name": n, "memory": GIB, "state": "running"} for n in names]

    return create(
        {"host": "a", "domains": doms(here), "peers": {"b": {"domains": doms(there)}}},
        hostname="a",
        shared={},
    )


SPEC = MigrateSpec(
    vm_name="one",
    destination="b",
    parameter=MigrationParams(migration_type="live", swap_with=SwapWith(vm_name="two")),
)


async def _reconcile(hv: FakeHypervisor) -> tuple[object, _Sink]:
    sink = _Sink()
    ctx = SubtaskContext(
        task_id="t",
        vm_name="one",
        events=Events(sink, host="a"),
        timer=TimeMeasurement(enabled=False),
    )
    await hv.open()
    try:
        entry = await reconcile_subtask(SPEC, ctx, hypervisor=hv, settings=Settings(hostname="a"))
    finally:
        await hv.aclose()
    return entry, sink


async def test_a_swap_that_finished_while_the_agent_was_away_is_success():
    hv = _cluster(["two"], ["one"])
    entry, _ = await _reconcile(hv)
    assert entry.status == "success"
    assert entry.details == "the swap finished while the agent was restarting"
    assert entry.extra["destination"] == "b"
    assert entry.extra["swap-with"] == {"vm-name": "two", "status": "success", "destination": "a"}


async def test_a_swap_where_nothing_moved_runs_again():
    hv = _cluster(["one"], ["two"])
    entry, sink = await _reconcile(hv)
    assert entry.status == "success", entry
    assert entry.extra["swap-with"]["status"] == "success"  # type: ignore[index]
    assert hv.cluster.locate("one") == ["b"]
    assert hv.cluster.locate("two") == ["a"]
    assert any(e.get("phase") == "migrating" for e in sink.events)


async def test_a_half_done_swap_is_reported_with_where_each_vm_is():
    hv = _cluster(["one", "two"], [])
    entry, _ = await _reconcile(hv)
    assert (entry.status, entry.code) == ("error", "migration-failed")
    assert entry.details == (
        "the swap was interrupted by an agent restart: one is here, two is here; "
        "nothing was moved back"
    )


async def test_adopting_a_running_job_is_an_optional_capability():
    """``adopt_migration`` is asked for only of a back-end that has it (``AdoptsMigrations``,
    checked with ``isinstance``); the fake back-end has not."""
    hv = _cluster(["one"], ["two"])
    assert not isinstance(hv, AdoptsMigrations)
    asked: list[str] = []

    async def adopt_migration(vm_name: str, *, destination: str | None = None) -> None:
        asked.append(vm_name)

    hv.adopt_migration = adopt_migration  # type: ignore[attr-defined]
    assert isinstance(hv, AdoptsMigrations)
    await _reconcile(hv)
    assert asked == ["one"]
