"""Where each VM of an evacuation goes: pure placement over measured capacities.

The original counted capacity as "CPUs minus number of domains" in a process-wide deque that a
second evacuation cleared under the first one's feet, and its ``auto`` mode overbooked even
with ``overbooking: false`` (docs/protocol.md §3.7, §9.4). Here a placement is a pure function of:

* the VMs to move (name, vCPUs, memory), largest first so big guests are not stranded;
* each destination's real capacity: host CPUs and free memory, minus the vCPUs and memory of
  what already runs there and of what is already on its way (other migrations of this agent);
* for VMs whose local disks are copied (``copy-storage``), the free bytes of the destination's
  storage pools: a disk goes only where a pool covers its directory with room for it.

Modes (the original's names):

``compact``
    fill the first destination (in the given order) before using the next: as few hosts as
    possible stay busy.
``scatter``
    spread: each VM goes to the next destination in turn (round robin) that has room.
``auto``
    water-filling: each VM goes to the destination with the most free vCPUs left (ties: most
    free memory), which balances load.

Memory and pool space are never overbooked (a migration into too little of either fails
anyway). vCPUs may be
overbooked only with ``overbooking: true`` (the original's default); with ``false`` a VM only
goes where its vCPUs fit. A VM that fits nowhere gets no destination (``no-destination``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from asyncmigfra.model import EvacuateMode

__all__ = ["Capacity", "Placement", "VmSize", "place"]


@dataclass(frozen=True, slots=True)
class VmSize:
    name: str
    vcpus: int
    #: KiB
    memory: int
    #: Bytes its copied disks need on the destination, by image directory.
    disk: Mapping[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Capacity:
    """What a destination can still take. Updated as VMs are placed on it."""

    host: str
    cpus: int
    #: vCPUs of domains running there or on their way.
    vcpus_used: int
    #: KiB free (after what is on its way).
    free_memory: int
    #: Free bytes of its storage pools by directory (after what is on its way).
    storage_free: dict[str, int] = field(default_factory=dict)
    placed: list[str] = field(default_factory=list)

    @property
    def free_vcpus(self) -> int:
        return self.cpus - self.vcpus_used

    def fits(self, vm: VmSize, *, overbooking: bool) -> bool:
        if vm.memory > self.free_memory:
            return False
        if any(need > self.storage_free.get(d, -1) for d, need in vm.disk.items()):
            return False
        return overbooking or vm.vcpus <= self.free_vcpus

    def take(self, vm: VmSize) -> None:
        self.vcpus_used += vm.vcpus
        self.free_memory -= vm.memory
        for directory, need in vm.disk.items():
            self.storage_free[directory] -= need
        self.placed.append(vm.name)


@dataclass(frozen=True, slots=True)
class Placement:
    #: VM name -> destination host.
    assignments: Mapping[str, str]
    #: VMs that fit nowhere.
    unplaced: tuple[str, ...]


def place(
    vms: Sequence[VmSize],
    capacities: Sequence[Capacity],
    *,
    mode: EvacuateMode = "auto",
    overbooking: bool = True,
) -> Placement:
    """Assign each VM a destination (see the module docstring). ``capacities`` is updated."""
    order = sorted(vms, key=lambda v: (v.vcpus, v.memory), reverse=True)
    assignments: dict[str, str] = {}
    unplaced: list[str] = []
    cursor = 0
    for vm in order:
        candidates = [c for c in capacities if c.fits(vm, overbooking=overbooking)]
        if not candidates:
            unplaced.append(vm.name)
            continue
        if mode == "compact":
            chosen = candidates[0]
        elif mode == "scatter":
            ring = list(capacities)
            chosen = candidates[0]
            for step in range(len(ring)):
                cap = ring[(cursor + step) % len(ring)]
                if cap in candidates:
                    chosen = cap
                    cursor = (ring.index(cap) + 1) % len(ring)
                    break
        else:
            chosen = max(candidates, key=lambda c: (c.free_vcpus, c.free_memory))
        chosen.take(vm)
        assignments[vm.name] = chosen.host
    return Placement(assignments=assignments, unplaced=tuple(unplaced))
