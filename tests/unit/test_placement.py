"""Evacuation placement (spec 1.8 with the original's bugs fixed): every mode, with and
without overbooking, on measured capacities."""

from __future__ import annotations

import pytest

from asyncmigfra.tasks.placement import Capacity, VmSize, place

GIB = 1024 * 1024


def caps(*specs: tuple[str, int, int, int]) -> list[Capacity]:
    """(host, cpus, vcpus already used, free GiB)."""
    return [Capacity(host=h, cpus=c, vcpus_used=u, free_memory=m * GIB) for h, c, u, m in specs]


def vms(n: int, vcpus: int = 1, mem_gib: int = 1, prefix: str = "vm") -> list[VmSize]:
    return [VmSize(f"{prefix}{i}", vcpus, mem_gib * GIB) for i in range(n)]


def test_compact_fills_the_first_destination_first():
    plan = place(vms(4), caps(("a", 2, 0, 64), ("b", 8, 0, 64)), mode="compact", overbooking=False)
    hosts = sorted(plan.assignments.values())
    assert hosts == ["a", "a", "b", "b"]
    assert plan.unplaced == ()


def test_compact_with_overbooking_stays_on_the_first_host():
    plan = place(vms(4), caps(("a", 2, 0, 64), ("b", 8, 0, 64)), mode="compact", overbooking=True)
    assert set(plan.assignments.values()) == {"a"}


def test_scatter_spreads_round_robin():
    plan = place(vms(6), caps(("a", 8, 0, 64), ("b", 8, 0, 64), ("c", 8, 0, 64)), mode="scatter")
    counts = {h: list(plan.assignments.values()).count(h) for h in "abc"}
    assert counts == {"a": 2, "b": 2, "c": 2}


def test_scatter_skips_full_hosts_without_overbooking():
    plan = place(vms(4), caps(("a", 1, 0, 64), ("b", 8, 0, 64)), mode="scatter", overbooking=False)
    assert list(plan.assignments.values()).count("a") == 1
    assert list(plan.assignments.values()).count("b") == 3


def test_auto_balances_by_free_vcpus():
    """Water-filling: b (8 free) takes VMs until it has as few free vCPUs as a (2 free); the
    tie then goes to the host with more free memory."""
    plan = place(vms(7), caps(("a", 8, 6, 64), ("b", 8, 0, 64)), mode="auto", overbooking=False)
    counts = {h: list(plan.assignments.values()).count(h) for h in "ab"}
    assert counts == {"a": 1, "b": 6}


def test_auto_never_overbooks_when_told_not_to():
    """The original's auto mode overbooked even with overbooking: false (spec 9.5)."""
    plan = place(vms(10), caps(("a", 2, 0, 64), ("b", 2, 0, 64)), mode="auto", overbooking=False)
    assert len(plan.assignments) == 4
    assert len(plan.unplaced) == 6


@pytest.mark.parametrize("mode", ["auto", "compact", "scatter"])
def test_memory_is_never_overbooked(mode):
    plan = place(vms(3, mem_gib=4), caps(("a", 64, 0, 9)), mode=mode, overbooking=True)
    assert len(plan.assignments) == 2
    assert len(plan.unplaced) == 1


@pytest.mark.parametrize("mode", ["auto", "compact", "scatter"])
def test_vcpus_of_running_domains_count_not_just_their_number(mode):
    """Capacity is real vCPUs, not the original's "CPUs minus number of domains"."""
    plan = place([VmSize("big", 4, GIB)], caps(("a", 8, 6, 64)), mode=mode, overbooking=False)
    assert plan.unplaced == ("big",)


def test_large_vms_are_placed_first_so_they_are_not_stranded():
    plan = place(
        [VmSize("small1", 1, GIB), VmSize("small2", 1, GIB), VmSize("big", 4, GIB)],
        caps(("a", 4, 0, 64), ("b", 2, 0, 64)),
        mode="compact",
        overbooking=False,
    )
    assert plan.assignments["big"] == "a"
    assert plan.unplaced == ()


def test_no_destination_at_all():
    plan = place(vms(2), [], mode="auto")
    assert plan.assignments == {}
    assert plan.unplaced == ("vm0", "vm1")


IMAGES = "/var/lib/libvirt/images"


@pytest.mark.parametrize("mode", ["auto", "compact", "scatter"])
def test_copied_disks_go_only_where_a_pool_has_room_for_them(mode):
    # Two VMs with 60 GiB of local disk each; a has 100 GiB in its pool, b 200 GiB, c no
    # pool over that directory: c never gets one, a at most one.
    disk = {IMAGES: 60 * 2**30}
    moving = [VmSize(f"vm{i}", 1, GIB, disk) for i in range(3)]
    capacities = caps(("a", 64, 0, 64), ("b", 64, 0, 64), ("c", 64, 0, 64))
    capacities[0].storage_free = {IMAGES: 100 * 2**30}
    capacities[1].storage_free = {IMAGES: 200 * 2**30, "/srv": 10**15}
    capacities[2].storage_free = {"/srv": 10**15}
    plan = place(moving, capacities, mode=mode)
    placed = list(plan.assignments.values())
    assert placed.count("c") == 0
    assert placed.count("a") <= 1
    assert placed.count("b") <= 3
    assert len(placed) + len(plan.unplaced) == 3
    for cap in capacities[:2]:
        assert cap.storage_free[IMAGES] >= 0
    # 100 + 200 GiB hold at most 1 + 3 disks of 60: all three fit somewhere.
    assert plan.unplaced == ()


def test_a_vm_without_copied_disks_ignores_pool_space():
    capacities = caps(("a", 8, 0, 64))
    plan = place(vms(2), capacities)
    assert set(plan.assignments.values()) == {"a"}
    assert capacities[0].storage_free == {}
