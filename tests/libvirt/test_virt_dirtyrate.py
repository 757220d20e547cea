"""The dirty-rate probe of the ``libvirt`` back-end (issue 18): its error paths on the test
driver, which has no ``virDomainStartDirtyRateCalc``, and its reading of QEMU's figures
with a stand-in connection (the rig test measures a real guest)."""

from __future__ import annotations

import os
from typing import Any

import pytest

if os.environ.get("CI"):
    import libvirt  # CI must run these: a missing binding fails the run
else:
    libvirt = pytest.importorskip("libvirt")

from asyncmigfra.errors import NotSupported, TaskTimeout, VmNotFound, WrongState
from asyncmigfra.hypervisor.base import MeasuresDirtyRate
from asyncmigfra.hypervisor.virt import LibvirtHypervisor, dirtyrate
from asyncmigfra.migration.dirtyrates import DirtyRates

pytestmark = pytest.mark.libvirt

MIB = 1 << 20


async def test_the_test_driver_cannot_measure_and_says_so(hv: LibvirtHypervisor) -> None:
    assert isinstance(hv, MeasuresDirtyRate)
    with pytest.raises(NotSupported, match="virDomainStartDirtyRateCalc"):
        await hv.measure_dirty_rate("vm1")


async def test_a_guest_that_is_not_running_or_missing_is_refused(hv: LibvirtHypervisor) -> None:
    with pytest.raises(WrongState):
        await hv.measure_dirty_rate("off1")
    with pytest.raises(WrongState):
        await hv.measure_dirty_rate("paused1")
    with pytest.raises(VmNotFound):
        await hv.measure_dirty_rate("nope")


async def test_the_forecast_falls_back_when_the_driver_cannot_measure(
    hv: LibvirtHypervisor,
) -> None:
    answer = await DirtyRates().rate(hv, "vm1", measure=True)
    assert (answer.rate, answer.source) == (None, "unknown")
    assert answer.note is not None
    assert "not supported" in answer.note


class StandIn:
    """A connection whose domain reports what QEMU would, in turn: ``readings`` are the
    successive (calc_status, MiB/s) of ``domainListGetStats``; records the calls."""

    def __init__(self, readings: list[tuple[int, int | None]]) -> None:
        self.readings = readings
        self.started: list[tuple[int, int]] = []

    def lookupByName(self, name: str) -> StandIn:
        return self

    def state(self) -> list[int]:
        return [libvirt.VIR_DOMAIN_RUNNING, 0]

    def maxMemory(self) -> int:
        return 128 * 1024  # KiB

    def startDirtyRateCalc(self, seconds: int, flags: int) -> None:
        self.started.append((seconds, flags))

    def domainListGetStats(self, doms: list[Any], stats: int) -> list[tuple[Any, dict[str, Any]]]:
        assert stats == libvirt.VIR_DOMAIN_STATS_DIRTYRATE
        status, rate = self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]
        record: dict[str, Any] = {"dirtyrate.calc_status": status}
        if rate is not None:
            record["dirtyrate.megabytes_per_second"] = rate
        return [(self, record)]


async def call_with(conn: StandIn) -> Any:
    async def call(fn: Any) -> Any:
        return fn(conn)

    return call


async def test_only_page_sampling_is_asked_for_and_the_figure_is_mib(monkeypatch) -> None:
    monkeypatch.setattr(dirtyrate.asyncio, "sleep", _no_sleep)
    measuring = libvirt.VIR_DOMAIN_DIRTYRATE_MEASURING
    measured = libvirt.VIR_DOMAIN_DIRTYRATE_MEASURED
    conn = StandIn([(measuring, None), (measuring, None), (measured, 12)])
    rate = await dirtyrate.measure(await call_with(conn), "g", 1)
    assert rate == 12 * MIB
    assert conn.started == [(1, libvirt.VIR_DOMAIN_DIRTYRATE_MODE_PAGE_SAMPLING)]


async def test_a_sample_is_the_pages_behind_the_figure(monkeypatch) -> None:
    """A 128 MiB guest: QEMU samples 64 pages; 11 MiB/s (rounded down from 6 pages over a
    period a little longer than 1 s) is 6 dirty pages."""
    monkeypatch.setattr(dirtyrate.asyncio, "sleep", _no_sleep)
    conn = StandIn([(libvirt.VIR_DOMAIN_DIRTYRATE_MEASURED, 11)])
    sample = await dirtyrate.sample(await call_with(conn), "g", 1)
    assert (sample.sampled, sample.dirty, sample.memory, sample.period) == (64, 6, 128 * MIB, 1)
    assert sample.rate == 12 * MIB


async def test_no_figure_within_the_grace_is_a_timeout(monkeypatch) -> None:
    monkeypatch.setattr(dirtyrate, "RESULT_GRACE", 0.05)
    monkeypatch.setattr(dirtyrate, "POLL_INTERVAL", 0.01)
    conn = StandIn([(libvirt.VIR_DOMAIN_DIRTYRATE_MEASURING, None)])
    with pytest.raises(TaskTimeout, match="no figure"):
        await dirtyrate.measure(await call_with(conn), "g", 1)


async def test_the_sample_length_is_bounded() -> None:
    conn = StandIn([(libvirt.VIR_DOMAIN_DIRTYRATE_MEASURED, 1)])
    for seconds in (0, 61):
        with pytest.raises(ValueError, match="seconds"):
            await dirtyrate.measure(await call_with(conn), "g", seconds)


async def _no_sleep(_: float) -> None:
    return None
