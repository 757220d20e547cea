"""Know before you move: gather a migration's inputs, predict it, and use the prediction.

:class:`Forecaster` (one per agent) feeds the pure model of
:mod:`~asyncmigfra.migration.prediction` and uses its answer (issue 18):

* **inputs** (:meth:`Forecaster.predict_plan`): the memory to send
  (:meth:`Forecaster.memory_to_send`: the guest's current memory, at most what its QEMU
  keeps resident less the overhead learned from earlier migrations), the disk bytes a
  storage copy moves (the pre-check's ``DiskCopy`` sizes), the guest's dirty rate
  (:class:`~asyncmigfra.migration.dirtyrates.DirtyRates`, with the probe's sample period
  and a page sample's upper bound, probed again while estimate and bound disagree on the
  verdict), the link rate to the destination (learned,
  :class:`~asyncmigfra.tasks.linkrates.LinkRates`, else config ``migration.link-rate``;
  never above the migration's ``bandwidth`` cap), and the downtime target and completion
  timeout of the resolved plan. Nothing of the VM changes;
* **a plan** (:meth:`Forecaster.forecast`, ``plan migration``/``plan evacuation``): every
  pre-check of a migration runs, and each refusal becomes a blocker with its code instead of
  failing;
* **``migration-type: auto``** (:func:`choose`): live when pre-copy is predicted to finish
  within the downtime target and the completion timeout; post-copy when it is not and config
  ``migration.allow-post-copy`` (default true) allows it; otherwise ``will-not-converge``.
  The completion timeout that the task does not give becomes :data:`TIMEOUT_FACTOR` times the
  predicted duration, at least :data:`TIMEOUT_FLOOR` s, at most the agent's default;
* **learning** (:meth:`Forecaster.learn`): after a successful migration, the median transfer
  rate of its memory passes becomes a sample of the destination's link (unless a
  ``bandwidth`` cap held it down), its dirty rate the VM's last-migration figure, and (when
  its resident memory was read before it) the resident memory beyond the guest's non-zero
  pages a sample of the hypervisor process's overhead
  (:class:`~asyncmigfra.tasks.linkrates.ResidentOverheads`); its duration, less the model's
  transfer time, a sample of the destination's fixed cost, which predictions then use
  instead of the constant (:mod:`~asyncmigfra.migration.fixedcosts`).

``warm`` and ``offline`` are outside the model: ``warm`` is estimated as one pass with the
guest paused (downtime = the whole copy), ``offline`` as the setup alone.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Final

import structlog

from asyncmigfra.errors import NotSupported, TaskError, WillNotConverge
from asyncmigfra.hypervisor.base import (
    DomainInfo,
    Hypervisor,
    JobStats,
    KnowsResidentMemory,
    MigrationResult,
)
from asyncmigfra.migration.context import EngineContext
from asyncmigfra.migration.dirtyrates import DirtyRate, DirtyRates
from asyncmigfra.migration.fixedcosts import FixedCostLearning
from asyncmigfra.migration.forecastdomain import (
    check_state,
    disks_anyway,
    find_domain,
    guest_memory,
)
from asyncmigfra.migration.forecastresult import Blocker, Forecast, plan_fields
from asyncmigfra.migration.plan import MigrationPlan, check_not_here, plan_migration
from asyncmigfra.migration.prediction import (
    PredictionInputs,
    TimeoutAction,
    Verdict,
    predict,
    predict_as,
)
from asyncmigfra.migration.prediction_inputs import MigrationCosts, costs_of
from asyncmigfra.model import MigrateSpec
from asyncmigfra.settings import Settings
from asyncmigfra.tasks.hostpolicy import HostPolicy
from asyncmigfra.tasks.linkrates import HOST_KEY, FixedCosts, LinkRates, ResidentOverheads

__all__ = [
    "RESIDENT_FOR",
    "TIMEOUT_FACTOR",
    "TIMEOUT_FLOOR",
    "Forecaster",
    "ObservedRates",
    "choose",
    "costs_of",
    "forecaster_of",
    "predicted",
]

log = structlog.stdlib.get_logger("asyncmigfra.migrating")

_MIB: Final = 1 << 20
#: A completion timeout from a prediction: this many times the predicted duration ...
TIMEOUT_FACTOR: Final = 3.0
#: ... at least this many s (and at most the agent's default completion timeout).
TIMEOUT_FLOOR: Final = 30.0
#: A run's transfer rate counts as the link's only below this share of its bandwidth cap.
CAPPED_SHARE: Final = 0.9
_WILL_NOT_CONVERGE: Final = WillNotConverge.code
#: Samples of one migration kept at most for learning (the first ones are enough).
MAX_SAMPLES: Final = 10_000
#: s a guest's resident memory, read for a prediction, may serve to learn from its
#: migration; VMs remembered at most.
RESIDENT_FOR: Final = 600.0
MAX_RESIDENT: Final = 4096


@dataclass(slots=True)
class ObservedRates:
    """What a running migration's samples showed (fed by the engine, one per sample).

    ``shared_now`` tells, at each sample, whether the link's rate is not this migration's
    alone: another migration out of this host ran, or its bandwidth was changed while it
    ran (a scheduler's cap, an operator's ``tune``). A migration seen ``shared`` at any sample
    teaches no link rate: its rate was a share (a predicted evacuation that learned its caps
    as the link would plan the next one slower, and cap it lower again)."""

    transfer: list[int] = field(default_factory=list)
    dirty: list[int] = field(default_factory=list)
    shared_now: Callable[[], bool] | None = None
    shared: bool = False

    def add(self, stats: JobStats) -> None:
        if stats.phase != "migrating" or stats.iteration < 1 or len(self.transfer) >= MAX_SAMPLES:
            return
        if self.shared_now is not None and self.shared_now():
            self.shared = True
        if stats.transfer_rate > 0:
            self.transfer.append(stats.transfer_rate)
        if stats.iteration >= 2:
            self.dirty.append(max(0, stats.dirty_rate))


class Forecaster:
    """One agent's predictions: its dirty-rate memory, its link rates and its settings."""

    def __init__(
        self,
        *,
        settings: Settings,
        link_rates: LinkRates | None = None,
        dirty_rates: DirtyRates | None = None,
        overheads: ResidentOverheads | None = None,
        fixed_costs: FixedCosts | None = None,
    ) -> None:
        self.settings = settings
        self.link_rates = link_rates if link_rates is not None else LinkRates(None)
        self.dirty_rates = dirty_rates if dirty_rates is not None else DirtyRates()
        self.overheads = overheads if overheads is not None else ResidentOverheads(None)
        self.fixed_costs = FixedCostLearning(fixed_costs)
        #: Per VM: bytes resident when a prediction read it, and when (monotonic).
        self._resident: dict[str, tuple[int, float]] = {}
        #: Migrations out of this host running now (see :meth:`migrating`).
        self.in_flight = 0

    @contextlib.contextmanager
    def migrating(self) -> Iterator[None]:
        """Count a migration out of this host while it runs (:class:`ObservedRates`)."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    # ---- the inputs ------------------------------------------------------------------

    def link_rate(self, destination: str, bandwidth: int | None) -> tuple[float, str]:
        """Bytes/s for ``destination`` and its source; a ``bandwidth`` cap (MiB/s) bounds it."""
        learned = self.link_rates.estimate(destination)
        rate, source = (
            (learned, "learned")
            if learned is not None
            else (self.settings.migration.link_rate * _MIB, "configured")
        )
        if bandwidth is not None and bandwidth * _MIB < rate:
            return float(bandwidth * _MIB), "bandwidth"
        return rate, source

    def costs(self, hypervisor: Hypervisor, destination: str) -> MigrationCosts:
        """The fixed costs of a migration to ``destination``: the back-end's, with the
        setup learned for ``destination`` once there is one."""
        return self.fixed_costs.costs(costs_of(hypervisor), destination)

    async def memory_to_send(self, hypervisor: Hypervisor, vm_name: str, memory: int) -> int:
        """Bytes a migration of ``vm_name`` sends in full: ``memory`` (its current memory),
        at most what its hypervisor process keeps resident less the overhead learned from
        earlier migrations (a page the guest never wrote is not resident, and zero: QEMU
        sends it as a flag). Reading the resident memory asks the host, not the guest; a
        guest that is not running, or a back-end that cannot tell, keeps ``memory``."""
        if not isinstance(hypervisor, KnowsResidentMemory):
            return memory
        try:
            resident_kib = await hypervisor.resident_memory(vm_name)
        except TaskError:
            return memory
        if resident_kib is None or resident_kib <= 0:
            return memory
        resident = resident_kib * 1024
        self._resident.pop(vm_name, None)
        self._resident[vm_name] = (resident, time.monotonic())
        while len(self._resident) > MAX_RESIDENT:
            del self._resident[next(iter(self._resident))]
        overhead = self.overheads.estimate(HOST_KEY) or 0.0
        return min(memory, max(0, int(resident - overhead)))

    async def learn(
        self,
        plan: MigrationPlan,
        observed: ObservedRates,
        result: MigrationResult | None = None,
        *,
        elapsed: float | None = None,
    ) -> None:
        """Take what a successful migration showed (see the module); ``elapsed``: s from
        the migration call to its end (``None``: not known, as for an adopted job)."""
        request = plan.request
        if result is not None:
            await self._learn_overhead(request.vm_name, result)
            if elapsed is not None:
                rate = statistics.median(observed.transfer) if observed.transfer else None
                await self.fixed_costs.learn(
                    request.vm_name,
                    request.destination,
                    elapsed,
                    transfer_rate=rate,
                    post_copy=result.post_copy,
                )
        if observed.dirty:
            self.dirty_rates.observed(request.vm_name, float(statistics.median(observed.dirty)))
        if not observed.transfer or observed.shared:
            return
        rate = float(statistics.median(observed.transfer))
        cap = request.bandwidth
        if cap is not None and rate >= cap * _MIB * CAPPED_SHARE:
            return  # the cap, not the link, set this rate
        await self.link_rates.record(request.destination, rate)

    async def _learn_overhead(self, vm_name: str, result: MigrationResult) -> None:
        """Resident memory (read for the prediction) beyond the guest's non-zero pages (its
        memory less what the job sent as zero pages) is the hypervisor process's own."""
        seen = self._resident.pop(vm_name, None)
        if seen is None or result.zero_bytes is None or result.memory_total <= 0:
            return
        resident, at = seen
        if time.monotonic() - at > RESIDENT_FOR:
            return
        nonzero = max(0, result.memory_total - result.zero_bytes)
        # At least 1 byte: the store keeps only figures above 0.
        await self.overheads.record(HOST_KEY, float(max(1, resident - nonzero)))

    # ---- a plan: every pre-check, refusals as blockers --------------------------------

    async def forecast(
        self,
        spec: MigrateSpec,
        hypervisor: Hypervisor,
        *,
        measure: bool = True,
        domain: DomainInfo | None = None,
    ) -> Forecast:
        """Predict ``spec`` as ``migrate vm`` would run it, changing nothing; each pre-check
        that refuses becomes a blocker (its code and text). ``domain``: the VM as just
        listed, if the caller has it (an evacuation's plan: not listed again per VM)."""
        blockers: list[Blocker] = []
        requested = spec.parameter.migration_type or self.settings.migration.migration_type
        base = Forecast(
            vm_name=spec.vm_name,
            destination=spec.destination,
            mode="live" if requested == "auto" else requested,
            requested=requested,
            converges=False,
        )
        try:
            HostPolicy.from_settings(self.settings).check_subtask(spec)
            check_not_here(spec.destination, self.settings.hostname)
        except TaskError as exc:
            blockers.append(_blocker(exc))
        if spec.parameter.swap_with is not None:
            text = "a plan does not predict swap-with (two migrations that share the link)"
            blockers.append(Blocker(NotSupported.code, text))
        try:
            dom = domain if domain is not None else await find_domain(hypervisor, spec.vm_name)
            check_state(dom, base.mode)
            memory = await guest_memory(hypervisor, dom)
            plan = self._plan(spec, memory_kib=memory // 1024)
        except TaskError as exc:
            return replace(base, blockers=(*blockers, _blocker(exc)))
        try:
            copies = await hypervisor.check_migration(plan.request)
        except TaskError as exc:
            blockers.append(_blocker(exc))
            copies = await disks_anyway(hypervisor, plan)
        if copies:  # the disks' sizes count in the completion timeout, their data is sent
            size = sum(c.size for c in copies)
            plan = self._plan(spec, memory_kib=memory // 1024, disk_bytes=size)
        forecast = await self.predict_plan(
            plan, hypervisor, memory=memory, disk=sum(c.sent for c in copies), measure=measure
        )
        return replace(forecast, requested=requested, blockers=(*blockers, *forecast.blockers))

    def _plan(self, spec: MigrateSpec, *, memory_kib: int, disk_bytes: int = 0) -> MigrationPlan:
        return plan_migration(
            spec,
            defaults=self.settings.migration,
            driver=self.settings.hypervisor.driver,
            transport=self.settings.hypervisor.transport,
            memory_kib=memory_kib,
            disk_bytes=disk_bytes,
        )

    # ---- the prediction itself ---------------------------------------------------------

    async def predict_plan(
        self,
        plan: MigrationPlan,
        hypervisor: Hypervisor,
        *,
        memory: int | None = None,
        disk: int = 0,
        measure: bool = True,
    ) -> Forecast:
        """Predict a resolved ``plan`` (its pre-checks passed, ``disk`` bytes to copy).
        ``measure``: a dirty-rate probe may run (else only a remembered figure is used)."""
        request = plan.request
        mode = "auto" if plan.auto else request.mode
        memory = plan.memory if memory is None else memory
        guest_memory = max(0, memory)
        if mode != "offline":
            memory = await self.memory_to_send(hypervisor, request.vm_name, memory)
        link, link_source = self.link_rate(request.destination, request.bandwidth)
        template = PredictionInputs(
            memory=max(0, memory),
            guest_memory=guest_memory,
            link_rate=link,
            completion_timeout=plan.completion_timeout,
            disk_bytes=max(0, disk),
            max_downtime=plan.max_downtime,
            post_copy_allowed=(
                self.settings.migration.allow_post_copy if mode == "auto" else mode == "post-copy"
            ),
            auto_converge=request.auto_converge,
            costs=self.costs(hypervisor, request.destination),
        )
        action: TimeoutAction = "post-copy" if plan.timeout_action == "post-copy" else "abort"

        def judge(dirty: DirtyRate) -> Verdict:
            inputs = _at(template, dirty)
            if mode == "auto":
                return predict(inputs)
            return predict_as(
                inputs, "live" if mode == "live" else "post-copy", timeout_action=action
            )

        def settled(dirty: DirtyRate) -> bool:
            """Another probe cannot change the verdict: its estimate and its bound agree."""
            return judge(replace(dirty, bound=None)).mode == judge(dirty).mode

        dirty = DirtyRate(None, "unknown")
        if mode in ("live", "post-copy", "auto"):
            dirty = await self.dirty_rates.rate(
                hypervisor, request.vm_name, measure=measure, settled=settled
            )
        inputs = _at(template, dirty)
        if mode in ("live", "post-copy", "auto"):
            self.fixed_costs.predicted(request.vm_name, request.destination, inputs)
        base = Forecast(
            vm_name=request.vm_name,
            destination=request.destination,
            mode=request.mode,
            requested=mode,
            converges=False,
            memory=inputs.memory,
            disk=inputs.disk_bytes,
            dirty=dirty,
            link_rate=link,
            link_source=link_source,
            completion_timeout=plan.completion_timeout,
            inputs=inputs,
        )
        if mode == "warm":
            return _warm(base, inputs)
        if mode == "offline":
            return replace(base, converges=True, duration=inputs.costs.setup, passes=0)
        verdict = judge(dirty)
        blockers = tuple(Blocker(_WILL_NOT_CONVERGE, text) for text in verdict.blockers)
        return replace(
            base,
            mode=verdict.mode or request.mode,
            converges=verdict.converges,
            duration=verdict.duration,
            downtime=verdict.downtime,
            passes=verdict.passes,
            blockers=blockers,
            verdict=verdict,
        )


# ---- using a prediction ----------------------------------------------------------------


def choose(plan: MigrationPlan, forecast: Forecast) -> MigrationPlan:
    """The plan ``migration-type: auto`` runs: the predicted mode, and a completion timeout
    from the prediction when the task gave none. Raises ``WillNotConverge`` (with the
    numbers) when neither pre-copy nor an allowed post-copy finishes. Other types: the plan
    as it is."""
    if not plan.auto:
        return plan
    chosen = forecast.verdict.mode if forecast.verdict is not None else None
    if not forecast.converges or chosen is None:
        raise WillNotConverge(
            "the prediction says this migration cannot finish within its limits with the"
            f" allowed means (pre-copy, post-copy); nothing was started: {forecast.reason}"
            f" [{_numbers(forecast)}]"
        )
    request = replace(plan.request, mode=chosen)
    timeout = plan.completion_timeout
    if not plan.timeout_given and forecast.duration is not None:
        timeout = min(timeout, max(TIMEOUT_FLOOR, TIMEOUT_FACTOR * forecast.duration))
    action = plan.timeout_action
    if chosen == "post-copy" and not plan.timeout_action_given:
        action = "post-copy"  # as the prediction assumed: the timeout switches, not aborts
    return replace(plan, request=request, completion_timeout=timeout, timeout_action=action)


async def predicted(
    plan: MigrationPlan,
    ctx: EngineContext,
    *,
    hypervisor: Hypervisor,
    settings: Settings,
    disk: int,
) -> MigrationPlan:
    """Predict the migration (after the pre-checks, before anything is touched) and publish
    the ``plan`` event: always for ``migration-type: auto`` (a dirty-rate probe may run),
    which then gets its chosen plan (:func:`choose`, which may refuse with
    ``will-not-converge``); for ``live`` and ``post-copy`` only when it is cheap (the VM's
    dirty rate is remembered, so no probe runs), leaving the plan as it is."""
    forecaster = forecaster_of(ctx)
    if forecaster is None:
        if not plan.auto:
            return plan
        forecaster = Forecaster(settings=settings)  # no learned rates: the config's
    if plan.auto:
        ctx.phase("predicting")
        with ctx.measure("prediction"):
            forecast = await forecaster.predict_plan(plan, hypervisor, disk=disk)
    else:
        if plan.request.mode not in ("live", "post-copy"):
            return plan
        known = await forecaster.dirty_rates.rate(hypervisor, plan.request.vm_name, measure=False)
        if known.rate is None:
            # It would take a probe: not for a migration that does not choose. The resident
            # memory is read all the same (one cheap call), to learn from the migration.
            await forecaster.memory_to_send(hypervisor, plan.request.vm_name, plan.memory)
            return plan
        forecast = await forecaster.predict_plan(plan, hypervisor, disk=disk, measure=False)
    log.info(
        "migration.predicted",
        mode=forecast.mode,
        converges=forecast.converges,
        duration=forecast.duration,
        dirty_rate=forecast.dirty.rate,
        link_rate=forecast.link_rate,
    )
    ctx.plan(plan_fields(forecast))
    chosen = choose(plan, forecast)
    if forecast.converges and forecast.duration is not None:
        ctx.outcome.predicted_duration = forecast.duration
    return chosen


def forecaster_of(ctx: EngineContext) -> Forecaster | None:
    """The agent's :class:`Forecaster` on ``ctx`` (a ``SubtaskContext``'s); ``None`` for a
    context without one."""
    forecaster = getattr(ctx, "forecaster", None)
    return forecaster if isinstance(forecaster, Forecaster) else None


# ---- helpers ---------------------------------------------------------------------------


def _blocker(exc: TaskError) -> Blocker:
    return Blocker(exc.code, str(exc) or exc.__class__.__name__)


def _at(template: PredictionInputs, dirty: DirtyRate) -> PredictionInputs:
    return replace(
        template,
        dirty_rate=dirty.rate or 0.0,
        dirty_rate_bound=dirty.bound,
        dirty_period=dirty.period,
    )


def _warm(base: Forecast, inputs: PredictionInputs) -> Forecast:
    """``warm``: the guest is paused while its memory moves, in one pass."""
    costs = inputs.costs
    if inputs.link_rate <= 0:
        return replace(base, blockers=(Blocker(_WILL_NOT_CONVERGE, "the link rate is 0"),))
    disk_time = inputs.disk_bytes / inputs.link_rate
    copy = inputs.memory / inputs.link_rate
    duration = costs.setup + disk_time + copy + costs.switchover / 1000.0
    downtime = copy * 1000.0 + costs.switchover
    if duration > inputs.completion_timeout:
        text = (
            f"a warm copy would take {duration:.1f} s, past the completion timeout of"
            f" {inputs.completion_timeout:g} s"
        )
        return replace(base, blockers=(Blocker(_WILL_NOT_CONVERGE, text),))
    return replace(base, converges=True, duration=duration, downtime=downtime, passes=1)


def _numbers(forecast: Forecast) -> str:
    dirty = forecast.dirty.rate
    shown = "unknown" if dirty is None else f"{dirty / _MIB:.1f} MiB/s"
    if dirty is not None and forecast.dirty.bound is not None:
        shown += f" (at most {forecast.dirty.bound / _MIB:.1f})"
    return (
        f"memory {forecast.memory / _MIB:.0f} MiB, disk {forecast.disk / _MIB:.0f} MiB,"
        f" dirty rate {shown} ({forecast.dirty.source}), link"
        f" {forecast.link_rate / _MIB:.1f} MiB/s ({forecast.link_source}), completion timeout"
        f" {forecast.completion_timeout:g} s"
    )
