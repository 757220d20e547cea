"""A link rate is learned only from a migration that had the link to itself: one that ran
beside another migration out of the host, or whose bandwidth was changed while it ran (a
predicted evacuation's caps, an operator's ``tune``), showed a share, not the link. On the
``fake`` back-end with a NIC of 100 MiB/s."""

from __future__ import annotations

from dataclasses import replace

from test_dispatcher import dispatcher

from asyncmigfra.hypervisor.fake import create as create_fake
from asyncmigfra.migration.forecast import Forecaster
from asyncmigfra.settings import Settings, default_settings
from harness import submit

MIB = 1 << 20


def _settings() -> Settings:
    base = default_settings(hostname="here")
    return replace(
        base,
        migration=replace(base.migration, link_rate=100.0),
        agent=replace(base.agent, progress_interval=0.1),
    )


def _fake(*names: str) -> object:
    return create_fake(
        {
            "host": "here",
            "domains": [{"name": n, "memory": 200 * 1024} for n in names],
            "peers": {"there": {}},
            "nic-rate": 100,
            "time-scale": 4,
        },
        hostname="here",
        shared={},
    )


def _migrate(tid: str, vm: str) -> str:
    return (
        f"id: {tid}\ntask: migrate vm\nvm-name: {vm}\ndestination: there\n"
        "parameter: {migration-type: live}\n"
    )


async def test_a_migration_alone_teaches_the_link_rate() -> None:
    forecaster = Forecaster(settings=_settings())
    async with dispatcher(_fake("a"), _settings()) as (d, rec):
        d._forecaster = forecaster
        submit(d, _migrate("m", "a"))
        assert (await rec.result("m")).entries[0].status == "success"
    learned = forecaster.link_rates.estimate("there")
    assert learned is not None
    assert 50 * MIB < learned <= 110 * MIB  # the fake's NIC, not a share of it


async def test_migrations_that_share_the_link_teach_nothing() -> None:
    forecaster = Forecaster(settings=_settings())
    async with dispatcher(_fake("a", "b"), _settings()) as (d, rec):
        d._forecaster = forecaster
        submit(d, _migrate("m1", "a"))
        submit(d, _migrate("m2", "b"))
        assert (await rec.result("m1")).entries[0].status == "success"
        assert (await rec.result("m2")).entries[0].status == "success"
    # Each saw about half the NIC; learning that would plan the next migration twice as slow.
    assert forecaster.link_rates.estimate("there") is None


async def test_a_migration_whose_bandwidth_was_changed_teaches_nothing() -> None:
    forecaster = Forecaster(settings=_settings())
    async with dispatcher(_fake("a"), _settings()) as (d, rec):
        d._forecaster = forecaster
        submit(d, _migrate("m", "a"))
        await rec.until(lambda: rec.events_for("m", "progress"))
        submit(d, "id: t\ntask: tune migration\ntarget: m\nbandwidth: 20\n")
        assert (await rec.result("t")).entries[0].status == "success"
        assert (await rec.result("m")).entries[0].status == "success"
    assert forecaster.link_rates.estimate("there") is None
