"""The ``fake`` back-end's NICs (``nic-rate``): migrations that use a host's NIC share it
max-min fairly, the shares change as migrations start and end, and hosts without a NIC
limit behave as before. Also its rate probes (dirty rate, link rates).

Times are the jobs' simulated ``elapsed`` (``time-scale`` 20), computed by hand: setup
0.3 s, a pass of ``memory / rate`` (at least 0.1 s), a switchover of 10 ms plus what is
left at the link's full rate. A simulated tenth of a second (5 ms of real time at scale 20)
is the tolerance: the figures the tests tell apart are a second or more apart, and a loaded
2-core machine delays the loop by a few milliseconds.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from asyncmigfra.errors import ConfigError, VmNotFound, WrongState
from asyncmigfra.hypervisor.base import (
    KnowsLinkRate,
    LinkRate,
    MeasuresDirtyRate,
    MigrationRequest,
    MigrationResult,
)
from asyncmigfra.hypervisor.fake import SHARED_KEY, FakeHypervisor, create
from asyncmigfra.hypervisor.fake.migration import FakeMigrationJob
from asyncmigfra.migration.forecast import costs_of
from asyncmigfra.migration.prediction import PredictionInputs, predict_run

MIB = 1024 * 1024
SCALE = 20.0

TOL = 0.1  # simulated seconds (see the module docstring)


class Ctx:
    def phase(self, name: str) -> None:
        pass


def vm(name: str, mib: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "memory": mib * 1024, **extra}


def agent(shared: dict[str, object], host: str, **options: Any) -> FakeHypervisor:
    return create({"time-scale": SCALE, **options}, hostname=host, shared=shared)


async def migrate_all(
    *moves: tuple[FakeHypervisor, str, str, dict[str, Any]],
) -> list[tuple[MigrationResult, float]]:
    """Begin every move at once; each one's result and simulated duration."""
    jobs = []
    for hv, name, dest, extra in moves:
        request = MigrationRequest(vm_name=name, destination=dest, mode="live", **extra)
        job = await hv.begin_migration(request, Ctx())  # type: ignore[arg-type]
        assert isinstance(job, FakeMigrationJob)
        jobs.append(job)
    async with asyncio.timeout(10):
        results = [await job.wait() for job in jobs]
    out = []
    for job, result in zip(jobs, results, strict=True):
        final = await job.stats()
        assert final is not None
        out.append((result, final.elapsed))
    return out


async def test_two_migrations_share_the_source_nic(shared: dict[str, object]) -> None:
    # 100 MiB each at half of 100 MiB/s: 0.3 + 2.0 + 0.01 s (alone: 0.3 + 0.1 + 0.01 s).
    a = agent(
        shared,
        "a",
        **{"nic-rate": 100},
        domains=[vm("v1", 100), vm("v2", 100)],
        peers={"b": None, "c": None},
    )
    (r1, t1), (r2, t2) = await migrate_all((a, "v1", "b", {}), (a, "v2", "c", {}))
    assert t1 == pytest.approx(2.31, abs=TOL)
    assert t2 == pytest.approx(2.31, abs=TOL)
    assert r1.iterations == r2.iterations == 1


async def test_the_share_grows_when_a_migration_ends(shared: dict[str, object]) -> None:
    # Both at 50 MiB/s until v1 (100 MiB) has sent everything at 2.3 s; then v2 has 200 of
    # its 300 MiB left and gets all 100 MiB/s: 2.3 + 2.0 + 0.01 s.
    a = agent(
        shared, "a", **{"nic-rate": 100}, domains=[vm("v1", 100), vm("v2", 300)], peers={"b": None}
    )
    (_, t1), (_, t2) = await migrate_all((a, "v1", "b", {}), (a, "v2", "b", {}))
    assert t1 == pytest.approx(2.31, abs=TOL)
    assert t2 == pytest.approx(4.31, abs=TOL)


async def test_a_capped_migration_leaves_the_rest_to_the_other(shared: dict[str, object]) -> None:
    # v2 capped at 20 MiB/s: v1 gets 80 (100 MiB in 1.25 s), v2 stays at its cap (5 s).
    a = agent(
        shared, "a", **{"nic-rate": 100}, domains=[vm("v1", 100), vm("v2", 100)], peers={"b": None}
    )
    (_, t1), (_, t2) = await migrate_all((a, "v1", "b", {}), (a, "v2", "b", {"bandwidth": 20}))
    assert t1 == pytest.approx(0.3 + 1.25 + 0.01, abs=TOL)
    assert t2 == pytest.approx(0.3 + 5.0 + 0.01, abs=TOL)


async def test_two_sources_share_the_destination_nic(shared: dict[str, object]) -> None:
    a = agent(shared, "a", domains=[vm("v1", 100)], peers={"b": {"nic-rate": 100}})
    d = agent(shared, "d", domains=[vm("v2", 100)])
    (_, t1), (_, t2) = await migrate_all((a, "v1", "b", {}), (d, "v2", "b", {}))
    assert t1 == pytest.approx(2.31, abs=TOL)
    assert t2 == pytest.approx(2.31, abs=TOL)


async def test_full_duplex_sending_and_receiving_do_not_share(shared: dict[str, object]) -> None:
    # a sends v1 to b while b sends v2 to a; both have 100 MiB/s NICs: each gets all of it.
    a = agent(shared, "a", **{"nic-rate": 100}, domains=[vm("v1", 100)])
    b = agent(shared, "b", **{"nic-rate": 100}, domains=[vm("v2", 100)])
    (_, t1), (_, t2) = await migrate_all((a, "v1", "b", {}), (b, "v2", "a", {}))
    assert t1 == pytest.approx(0.3 + 1.0 + 0.01, abs=TOL)
    assert t2 == pytest.approx(0.3 + 1.0 + 0.01, abs=TOL)


async def test_without_nic_rate_every_migration_gets_its_bandwidth(
    shared: dict[str, object],
) -> None:
    a = agent(shared, "a", bandwidth=100, domains=[vm("v1", 100), vm("v2", 100)], peers={"b": None})
    (_, t1), (_, t2) = await migrate_all((a, "v1", "b", {}), (a, "v2", "b", {}))
    assert t1 == pytest.approx(1.31, abs=TOL)
    assert t2 == pytest.approx(1.31, abs=TOL)
    assert not shared[SHARED_KEY].links.jobs  # type: ignore[attr-defined]


async def test_the_samples_report_the_share(shared: dict[str, object]) -> None:
    a = agent(
        shared,
        "a",
        **{"nic-rate": 100},
        domains=[vm("v1", 1000), vm("v2", 1000)],
        peers={"b": None},
    )
    jobs = []
    for name in ("v1", "v2"):
        request = MigrationRequest(vm_name=name, destination="b", mode="live")
        jobs.append(await a.begin_migration(request, Ctx()))  # type: ignore[arg-type]
    await asyncio.sleep(1.0 / SCALE)  # past the setup
    stats = [await job.stats() for job in jobs]
    assert [s.transfer_rate if s else None for s in stats] == [50 * MIB, 50 * MIB]
    await jobs[0].abort()
    after = await jobs[1].stats()
    assert after is not None
    assert after.transfer_rate == 100 * MIB
    await jobs[1].abort()
    for job in jobs:
        with pytest.raises(Exception, match="aborted"):
            await job.wait()


async def test_a_hot_guest_converges_only_once_it_has_the_nic_alone(
    shared: dict[str, object],
) -> None:
    # hot dirties 60 MiB/s: at its 50 MiB/s share its passes never shrink (the prediction
    # agrees); once idle (500 MiB at 50 MiB/s) has gone, it gets all 100 MiB/s and converges.
    a = agent(
        shared,
        "a",
        **{"nic-rate": 100},
        domains=[vm("hot", 200, **{"dirty-rate": 60}), vm("idle", 500)],
        peers={"b": None},
    )
    costs = costs_of(a)  # the fake's own fixed costs
    inputs = PredictionInputs(
        memory=200 * MIB,
        link_rate=50 * MIB,
        dirty_rate=60 * MIB,
        completion_timeout=1e6,
        page_size=1,
        costs=costs,
    )
    assert not predict_run(inputs, "live").converges
    (hot, t_hot), (_, t_idle) = await migrate_all((a, "hot", "b", {}), (a, "idle", "b", {}))
    # idle: 500 MiB at 50 MiB/s while hot runs beside it: 0.3 + 10 + 0.01 s.
    assert t_idle == pytest.approx(10.31, abs=0.05)
    assert t_hot > t_idle
    assert hot.iterations > 3


async def test_prediction_agrees_with_two_migrations_sharing(shared: dict[str, object]) -> None:
    a = agent(
        shared,
        "a",
        **{"nic-rate": 200},
        domains=[vm("v1", 400, **{"dirty-rate": 20}), vm("v2", 400, **{"dirty-rate": 20})],
        peers={"b": None},
    )
    (r1, t1), _ = await migrate_all((a, "v1", "b", {}), (a, "v2", "b", {}))
    inputs = PredictionInputs(
        memory=400 * MIB,
        link_rate=100 * MIB,
        dirty_rate=20 * MIB,
        completion_timeout=1e6,
        page_size=1,
        costs=costs_of(a),  # the fake's own fixed costs, as the agent predicts it
    )
    predicted = predict_run(inputs, "live")
    assert predicted.duration is not None
    assert r1.iterations == len(predicted.passes)
    # The switchover gets more than a share in the fake once the other one is done.
    assert t1 == pytest.approx(predicted.duration, abs=0.05)


async def test_nic_rate_options(shared: dict[str, object]) -> None:
    a = agent(shared, "a", **{"nic-rate": 125}, peers={"b": {"nic-rate": 50.5}, "c": None})
    cluster = a.cluster
    assert cluster.hosts["a"].nic_rate == 125 * MIB
    assert cluster.hosts["b"].nic_rate == 50.5 * MIB
    assert cluster.hosts["c"].nic_rate is None
    for options, path in (
        ({"nic-rate": 0}, "hypervisor.nic-rate"),
        ({"nic-rate": "fast"}, "hypervisor.nic-rate"),
        ({"peers": {"x": {"nic-rate": -1}}}, "hypervisor.peers.x.nic-rate"),
    ):
        with pytest.raises(ConfigError) as info:
            create(options, hostname="z", shared={})
        assert path in str(info.value)


async def test_rate_probes(shared: dict[str, object]) -> None:
    a = agent(
        shared,
        "a",
        bandwidth=300,
        **{"nic-rate": 1000},
        domains=[vm("hot", 100, **{"dirty-rate": 40}), vm("off", 100, state="shutoff")],
        peers={"b": {"nic-rate": 500}, "c": None},
    )
    assert isinstance(a, MeasuresDirtyRate)
    assert isinstance(a, KnowsLinkRate)
    # Per simulated second, like the fake's samples (whatever the time-scale).
    assert await a.measure_dirty_rate("hot") == 40 * MIB
    with pytest.raises(WrongState):
        await a.measure_dirty_rate("off")
    with pytest.raises(VmNotFound):
        await a.measure_dirty_rate("nowhere")
    assert await a.link_rate("b") == LinkRate(
        single=300 * MIB, outgoing=1000 * MIB, incoming=500 * MIB
    )
    to_c = await a.link_rate("c")
    assert to_c is not None
    assert math.isinf(to_c.incoming)
    assert await a.link_rate("nowhere") is None
