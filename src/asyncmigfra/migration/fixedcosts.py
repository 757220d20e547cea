"""The fixed cost of a migration to each destination, learned from this agent's migrations.

The model (:mod:`~asyncmigfra.migration.prediction`) puts ``costs.setup`` s before anything
moves: the connection, the destination QEMU starting, the hand-over at the end. The
constant (:class:`~asyncmigfra.migration.prediction_inputs.MigrationCosts`) is what an idle
rig showed; a loaded host took 0.3-1.4 s. So the agent learns it per destination:

* each prediction's inputs are remembered per VM (:meth:`FixedCostLearning.predicted`);
* after that VM's migration ended in pre-copy, one sample is its duration (from the
  migration call to its end) less the model's transfer time: the same inputs with no setup,
  at the transfer rate the run showed where it showed one (:func:`fixed_cost_sample`),
  bounded to [:data:`MIN_FIXED`, :data:`MAX_FIXED`] s;
* the estimate is the median of the destination's last
  :data:`~asyncmigfra.tasks.linkrates.SAMPLES` samples
  (:class:`~asyncmigfra.tasks.linkrates.FixedCosts`, kept across restarts beside the link
  rates); predictions use it instead of the constant once there is one
  (:meth:`FixedCostLearning.costs`).

A migration that switched to post-copy, or was adopted from an earlier agent run, or whose
prediction is older than :data:`PREDICTED_FOR` s, teaches nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Final

from asyncmigfra.migration.prediction_inputs import MigrationCosts, PredictionInputs
from asyncmigfra.migration.simulation import predict_run
from asyncmigfra.tasks.linkrates import FixedCosts

__all__ = [
    "MAX_FIXED",
    "MIN_FIXED",
    "PREDICTED_FOR",
    "FixedCostLearning",
    "fixed_cost_sample",
]

#: s: bounds of one sample (a run faster than the model's transfer time gives the floor).
MIN_FIXED: Final = 0.01
MAX_FIXED: Final = FixedCosts.largest
#: s a prediction's inputs may serve to learn from the migration that follows it.
PREDICTED_FOR: Final = 3600.0
#: VMs whose prediction is remembered at most.
MAX_REMEMBERED: Final = 4096


def fixed_cost_sample(
    inputs: PredictionInputs, elapsed: float, *, transfer_rate: float | None = None
) -> float | None:
    """s of ``elapsed`` (a pre-copy run of ``inputs``, from the migration call to its end)
    beyond the model's transfer time: ``inputs`` with no setup, at ``transfer_rate`` bytes/s
    when given (what the run showed), judged at ``dirty_rate`` (not its bound). Bounded to
    [:data:`MIN_FIXED`, :data:`MAX_FIXED`]; ``None`` when ``elapsed`` is no finite number
    >= 0 or the model has no pre-copy run of ``inputs`` that converges."""
    if not (math.isfinite(elapsed) and elapsed >= 0):
        return None
    at = replace(inputs, costs=replace(inputs.costs, setup=0.0), dirty_rate_bound=None)
    if transfer_rate is not None and math.isfinite(transfer_rate) and transfer_rate > 0:
        at = replace(at, link_rate=transfer_rate)
    run = predict_run(at, "live", timeout_action="abort")
    if not run.converges or run.duration is None:
        return None
    return min(MAX_FIXED, max(MIN_FIXED, elapsed - run.duration))


class FixedCostLearning:
    """The predictions' inputs per VM and the learned fixed costs (see the module)."""

    def __init__(self, store: FixedCosts | None = None) -> None:
        self.store = store if store is not None else FixedCosts(None)
        #: VM -> (destination, the inputs its last prediction used, when: monotonic s).
        self._predicted: dict[str, tuple[str, PredictionInputs, float]] = {}

    def costs(self, base: MigrationCosts, destination: str) -> MigrationCosts:
        """``base`` with the setup learned for ``destination``, when there is one."""
        learned = self.store.estimate(destination)
        return base if learned is None else replace(base, setup=learned)

    def predicted(self, vm_name: str, destination: str, inputs: PredictionInputs) -> None:
        """Remember the inputs of ``vm_name``'s prediction, to learn from its migration."""
        self._predicted.pop(vm_name, None)
        self._predicted[vm_name] = (destination, inputs, time.monotonic())
        while len(self._predicted) > MAX_REMEMBERED:
            del self._predicted[next(iter(self._predicted))]

    async def learn(
        self,
        vm_name: str,
        destination: str,
        elapsed: float,
        *,
        transfer_rate: float | None,
        post_copy: bool,
    ) -> float | None:
        """Record the sample of ``vm_name``'s migration to ``destination`` that took
        ``elapsed`` s, if its prediction is known (see the module); the sample."""
        seen = self._predicted.pop(vm_name, None)
        if seen is None or post_copy:
            return None
        predicted_for, inputs, at = seen
        if predicted_for != destination or time.monotonic() - at > PREDICTED_FOR:
            return None
        sample = fixed_cost_sample(inputs, elapsed, transfer_rate=transfer_rate)
        if sample is not None:
            await self.store.record(destination, sample)
        return sample
