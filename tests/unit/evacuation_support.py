"""Helpers of the ``test_evacuation_*.py`` modules: an evacuation with ``schedule: predicted``
driven through a dispatcher (no broker) on a fake cluster of its own."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from asyncmigfra.hypervisor.fake import FakeHypervisor
from asyncmigfra.hypervisor.fake import create as create_fake
from asyncmigfra.model import ResultMessage
from asyncmigfra.peers.bus import MemoryBus
from asyncmigfra.settings import Settings, default_settings
from asyncmigfra.tasks.dispatching import Dispatcher
from harness import DispatchRecorder, running_dispatcher, submit

MIB = 1024 * 1024
WAIT = 30.0


def plans(rec: DispatchRecorder) -> list[Mapping[str, object]]:
    """The evacuation's ``plan`` events (a migration's own has a ``vm-name``)."""
    return [e for e in rec.of("plan") if "vm-name" not in e]


def vm(name: str, mib: int, dirty: float = 0.0) -> dict[str, Any]:
    return {"name": name, "memory": mib * 1024, "dirty-rate": dirty}


def fake(domains: list[dict[str, Any]], **options: Any) -> FakeHypervisor:
    """Host ``a`` of a fake cluster of its own, with ``b`` and ``c`` to evacuate to."""
    options.setdefault("peers", {"b": {"memory": 64 * MIB}, "c": {"memory": 64 * MIB}})
    return create_fake({"domains": domains, **options}, hostname="a", shared={})


def dispatcher(
    hv: FakeHypervisor,
    max_outgoing: int = 4,
    link_rate: float | None = None,
    bus: MemoryBus | None = None,
) -> contextlib.AbstractAsyncContextManager[tuple[Dispatcher, DispatchRecorder]]:
    base = default_settings(hostname="a")
    migration = replace(base.migration, max_outgoing=max_outgoing, max_incoming=4)
    if link_rate is not None:
        migration = replace(migration, link_rate=link_rate)
    settings: Settings = replace(base, migration=migration)
    return running_dispatcher(hv, settings, wait=WAIT, bus=bus)


def evacuate(d: Dispatcher, task_id: str, parameter: str) -> None:
    submit(d, f"id: {task_id}\ntask: evacuate node\ndestinations: [b, c]\nparameter:\n{parameter}")


def entries(result: ResultMessage) -> dict[str, dict[str, object]]:
    out = {}
    for e in result.entries:
        out[e.vm_name] = {"status": e.status, "code": e.code, **e.extra}
    return out


#: Two guests dirtying 600 MiB/s (converging only with more than half of the 1000 MiB/s
#: NIC) and two idle ones, 200 MiB each.
MIXED = [vm("h1", 200, 600), vm("h2", 200, 600), vm("c1", 200), vm("c2", 200)]
