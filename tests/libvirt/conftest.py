"""Fixtures for the ``libvirt`` back-end on libvirt's ``test`` driver (no daemon).

libvirt-python is imported lazily here: the test modules skip (or, with ``CI`` set, fail) when
it is missing. Helpers live in ``virt_support.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from virt_support import Ctx, hv_options, libvirt_threads


@pytest.fixture
def ctx() -> Ctx:
    return Ctx()


@pytest.fixture
async def hv() -> AsyncIterator[Any]:
    """An open ``LibvirtHypervisor`` on hostA; closed (and checked for leftovers) after."""
    from asyncmigfra.hypervisor.virt import create  # noqa: PLC0415 - libvirt may be missing

    hypervisor = create(hv_options(), hostname="hostA", shared={})
    await hypervisor.open()
    try:
        yield hypervisor
    finally:
        await hypervisor.aclose()
    assert libvirt_threads() == [], "libvirt threads left running after aclose()"
