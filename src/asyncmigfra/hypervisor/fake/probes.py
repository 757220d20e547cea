"""What the ``fake`` back-end tells about rates: its guests' dirty rates and its links
(the optional capabilities :class:`~asyncmigfra.hypervisor.base.MeasuresDirtyRate` and
:class:`~asyncmigfra.hypervisor.base.KnowsLinkRate`).

Rates are per *simulated* second, like everything the fake reports (its samples' transfer
rates, from which the agent learns link rates, and their ``elapsed``): with the default
``time-scale`` 1 that is a real second. Predictions made from them are in simulated seconds
too, which a predicted evacuation compares with the real time its moves take: run one at
``time-scale`` 1.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from asyncmigfra.errors import WrongState
from asyncmigfra.hypervisor.base import DomainState, LinkRate
from asyncmigfra.hypervisor.fake.cluster import _MIB
from asyncmigfra.hypervisor.fake.migration import _MIN_PASS, _SETUP_TIME, _SWITCHOVER_OVERHEAD_MS
from asyncmigfra.hypervisor.fake.sampling import _POSTCOPY_DOWNTIME_MS

if TYPE_CHECKING:
    from asyncmigfra.hypervisor.fake.cluster import FakeCluster, FakeDomain, FakeHost


class _RateProbes:
    """Mixed into :class:`~asyncmigfra.hypervisor.fake.FakeHypervisor`."""

    cluster: FakeCluster
    host: FakeHost
    #: MiB/s (simulated) of one migration's link.
    bandwidth: float
    #: ``MeasuresDirtyRate``: the rate is the simulated guest's steady one, at every time
    #: scale (no sample period).
    samples_pages = False

    async def _enter(self, op: str) -> None:
        raise NotImplementedError

    def _domain(self, name: str) -> FakeDomain:
        raise NotImplementedError

    async def measure_dirty_rate(self, vm_name: str, *, seconds: int = 1) -> float:
        """The domain's simulated dirty rate (bytes/s; option ``dirty-rate``), at once: the
        fake does not sample (``MeasuresDirtyRate``)."""
        await self._enter("dirty-rate")
        dom = self._domain(vm_name)
        if dom.state is not DomainState.RUNNING:
            raise WrongState(f"Wrong domain state: {dom.state.number}")
        return float(dom.dirty_rate)

    def migration_costs(self) -> dict[str, float]:
        """``KnowsMigrationCosts``: the simulation's fixed costs (its disks copy with none)."""
        return {
            "setup": _SETUP_TIME,
            "storage_setup": 0.0,
            "min_pass": _MIN_PASS,
            "pass_overhead": 0.0,
            "switchover": _SWITCHOVER_OVERHEAD_MS,
            "post_copy_pause": _POSTCOPY_DOWNTIME_MS,
        }

    async def link_rate(self, destination: str) -> LinkRate | None:
        """``bandwidth`` for one migration; this host's and the destination's ``nic-rate``
        (``inf`` when unset) for all of them. ``None`` for a host the cluster does not have."""
        target = self.cluster.hosts.get(destination)
        if target is None:
            return None

        def nic(host: FakeHost) -> float:
            return math.inf if host.nic_rate is None else host.nic_rate

        return LinkRate(single=self.bandwidth * _MIB, outgoing=nic(self.host), incoming=nic(target))
