"""A migration's one read of its guest (hypervisor/virt/guestlook.py) on real QEMU: what
someone else does to the guest after the pre-checks read it is seen when the job starts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from agents import libvirt_options

from asyncmigfra.errors import Busy
from asyncmigfra.hypervisor.base import MigrationRequest
from rig import Rig, migrate_p2p

pytestmark = pytest.mark.rig


class _Ctx:
    def phase(self, name: str) -> None:
        pass

    @contextlib.contextmanager
    def measure(self, tag: str) -> Iterator[None]:
        yield


def _job_type(conn: Any, name: str) -> int:
    return int(conn.lookupByName(name).jobStats().get("type", 0))


async def test_a_job_someone_else_starts_after_the_pre_checks_is_refused_not_taken(
    rig: Rig, start_guest: Callable[..., Any]
) -> None:
    """The pre-checks read the guest (no job then); an operator's ``virsh migrate`` starts
    before ours: ``begin_migration`` refuses (``busy``) and leaves that job alone, rather than
    taking its statistics for its own job's (and steering or aborting it)."""
    import libvirt  # noqa: PLC0415
    from asyncmigfra.hypervisor.virt import create  # noqa: PLC0415

    name = start_guest("dirty16").name()
    hv = create(libvirt_options(rig, rig.a), hostname=rig.a.name, shared={})
    await hv.open()
    operator_conn = libvirt.open(rig.a.local_uri)
    watch_conn = libvirt.open(rig.a.local_uri)
    operator_dom = operator_conn.lookupByName(name)
    operator: asyncio.Future[None] | None = None
    try:
        request = MigrationRequest(vm_name=name, destination=rig.b.name)
        with hv.reading_once(name):
            await hv.check_migration(request)
            # 1 MiB/s: the operator's job runs until it is aborted below.
            bandwidth = {libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 1}
            operator = asyncio.ensure_future(
                asyncio.to_thread(migrate_p2p, operator_dom, rig.b, timeout=120, params=bandwidth)
            )
            deadline = time.monotonic() + 20
            while await asyncio.to_thread(_job_type, watch_conn, name) == 0:
                assert time.monotonic() < deadline, "the operator's job never showed"
                await asyncio.sleep(0.05)
            with pytest.raises(Busy, match="has a job running"):
                await hv.begin_migration(request, _Ctx())
        assert await asyncio.to_thread(_job_type, watch_conn, name) != 0  # still running
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            operator_dom.abortJob()
        if operator is not None:
            with contextlib.suppress(libvirt.libvirtError):
                await operator
        await hv.aclose()
        for conn in (watch_conn, operator_conn):
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
