"""What the ``fake`` back-end tells about rates: its guests' dirty rates and its links
(the optional capabilities :class:`~asyncmigfra.hypervisor.base.MeasuresDirtyRate` and
:class:`~asyncmigfra.hypervisor.base.KnowsLinkRate`).

Rates are per *real* second: the simulation's rates times ``time-scale``, so that they
agree with the agent's clocks (its completion timeouts and measured durations are real
seconds). With the default ``time-scale`` 1 the two are the same.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from asyncmigfra.hypervisor.base import DomainState, LinkRate
from asyncmigfra.hypervisor.fake.cluster import _MIB

if TYPE_CHECKING:
    from asyncmigfra.hypervisor.fake.cluster import FakeCluster, FakeHost


class _RateProbes:
    """Mixed into :class:`~asyncmigfra.hypervisor.fake.FakeHypervisor`."""

    cluster: FakeCluster
    host: FakeHost
    #: MiB/s (simulated) of one migration's link.
    bandwidth: float
    time_scale: float

    async def dirty_rate(self, vm_name: str) -> float | None:
        """The domain's ``dirty-rate`` while it runs, 0 while it does not; ``None`` for a
        domain this host does not have."""
        self.cluster.sync()
        dom = self.host.domains.get(vm_name)
        if dom is None:
            return None
        if dom.state is not DomainState.RUNNING:
            return 0.0
        return float(dom.dirty_rate) * self.time_scale

    async def link_rate(self, destination: str) -> LinkRate | None:
        """``bandwidth`` for one migration; this host's and the destination's ``nic-rate``
        (``inf`` when unset) for all of them. ``None`` for a host the cluster does not have."""
        target = self.cluster.hosts.get(destination)
        if target is None:
            return None
        scale = self.time_scale

        def nic(host: FakeHost) -> float:
            return math.inf if host.nic_rate is None else host.nic_rate * scale

        return LinkRate(
            single=self.bandwidth * _MIB * scale, outgoing=nic(self.host), incoming=nic(target)
        )
