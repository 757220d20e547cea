"""Helpers shared by the ``test_peerlanes*.py`` modules: the topics of agents ``a`` and ``b``,
a lane server for ``b`` with its keeper, and the asking side of ``a``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from asyncmigfra.peers.bus import MemoryBus
from asyncmigfra.peers.lanes import LaneServer, hold_peer_lane
from harness import serving_on

A_TASKS = "fast/migfra/a/task"
B_TASKS = "fast/migfra/b/task"
B_REQUESTS = "fast/migfra/b/lane/+"


def request_topic(sender: str = "a") -> str:
    """Where ``sender`` asks agent ``b``."""
    return f"fast/migfra/b/lane/{sender}"


def answer_topic(sender: str = "a") -> str:
    """Where ``b`` answers ``sender``."""
    return f"fast/migfra/{sender}/lane-response/b"


@dataclass
class Keeper:
    """The dispatcher's side: VMs with work on them, and the lanes given out."""

    busy: set[str] = field(default_factory=set)
    held: list[str] = field(default_factory=list)

    def hold_lane(self, vm_name: str) -> Callable[[], None] | str:
        if vm_name in self.busy or vm_name in self.held:
            return f"a task of this agent runs or waits on {vm_name}"
        self.held.append(vm_name)
        return lambda: self.held.remove(vm_name)


@asynccontextmanager
async def serving(bus: MemoryBus, keeper: Keeper, **kw: object) -> AsyncIterator[LaneServer]:
    server = LaneServer(bus=bus, hostname="b", task_topic=B_TASKS, keeper=keeper, **kw)  # type: ignore[arg-type]
    async with serving_on(bus, B_REQUESTS, server.serve()):
        yield server


def request(op: str, hold_id: str = "h1", vm: str = "v2", **extra: object) -> dict[str, object]:
    return {
        "op": op,
        "request-id": f"r{op}",
        "hold-id": hold_id,
        "vm-name": vm,
        "source": "a",
    } | extra


def hold(bus: MemoryBus, mode: str = "best-effort", **kw: object):  # type: ignore[no-untyped-def]
    return hold_peer_lane(
        bus,  # type: ignore[arg-type]
        task_topic=A_TASKS,
        hostname="a",
        peer="b",
        vm_name="v2",
        mode=mode,  # type: ignore[arg-type]
        answer_within=kw.pop("answer_within", 0.5),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )
