"""Will a migration converge, how long will it take, and what downtime will it cost? Pure.

The model behind issue 18 (``plan migration``, ``migration-type: auto``, evacuations
scheduled by prediction). No I/O, no asyncio: :class:`PredictionInputs` in (defined in
:mod:`~asyncmigfra.migration.prediction_inputs` with :class:`MigrationCosts` and
:class:`AutoConverge`, and importable from here), :class:`Verdict` (or one
:class:`RunPrediction`) out. The run is simulated pass by pass as
the engine and the hypervisor would carry it out, with the engine's own
:class:`~asyncmigfra.migration.policy.ConvergencePolicy` deciding at the start of each pass,
so the downtime schedule and the stall rules are the engine's, not a copy of them.

What is modelled (times in seconds from the start of the job, sizes in bytes):

* **Setup.** Nothing moves for ``costs.setup`` (the destination QEMU starting, and the
  fixed costs at the end, counted here), plus ``costs.storage_setup`` with a storage copy.
* **Storage copy.** With ``disk_bytes`` > 0 the disks are mirrored first, at the link rate,
  while the guest writes them at ``disk_write_rate``. Each write dirties what was already
  copied, so the mirror's catch-up is a geometric series of ratio write/link: it takes
  ``disk_bytes / (link - write)`` and gets in sync only if the write rate is below the link
  rate. Once in sync the mirror keeps forwarding the writes until the switchover, so the
  memory passes get ``link - write`` of the link (the switchover and post-copy, with the
  guest paused or gone, get all of it).
* **Pre-copy.** Pass 1 sends all of ``memory``; pass *i* sends what the guest dirtied during
  pass *i-1*: ``dirty rate x (1 - throttle) x max(duration, dirty_period)``, rounded up to
  whole pages and at most ``dirty_working_set`` (default all of memory: a page dirtied twice
  is sent once; ``dirty_period``: the probe's sample, below which the rate says nothing). A
  pass lasts ``max(costs.min_pass, sent / link) + costs.pass_overhead`` (``link``: the
  memory passes' share, above). At the end of a
  pass the hypervisor compares what is left with the current downtime target, at the link
  rate (``left / link <= target``, QEMU's test); when it fits, it switches over: the guest
  pauses and the rest goes at the full link rate, ``downtime = left / link +
  costs.switchover`` (ms; device state, CPU stop and start).
* **Downtime target.** ``max_downtime`` set: the engine's geometric schedule
  (``plan._downtime_schedule``, ``plan.DOWNTIME_STEPS`` steps from a tenth of it), one step
  up per stalled pass, decided at a pass's start and compared at its end, exactly as
  :class:`ConvergencePolicy` decides it (a stall: what is left when a pass starts is at least
  90 % of what was left when the previous one started). Unset: QEMU's default
  (:data:`HYPERVISOR_DEFAULT_DOWNTIME`, 300 ms), never changed.
* **Post-copy** (``mode="post-copy"``): the policy switches at the start of a pass (two more
  stalls at the largest target, or at once on a stalled pass whose guest dirties at least
  85 % of the link rate while what is left takes longer than ``max_downtime``: the policy's
  "hopeless" rule), or the completion
  timeout switches mid-pass (``timeout_action="post-copy"``). Then the guest pauses for
  ``costs.post_copy_pause`` (ms: the downtime) and what is left is pulled at the link rate;
  post-copy always finishes (the completion timeout no longer applies), unless the link
  rate is 0. A pre-copy that converges before the policy switches ends as a live switchover.
* **Auto-converge** (``auto_converge``): the hypervisor throttles the vCPUs, which lowers
  the dirty rate to ``rate x (1 - throttle)``. The schedule is :class:`AutoConverge`; its
  default is QEMU's (see there): at a pass end at least ``period`` s after the last check,
  the check is "high" when the guest dirtied more than ``trigger`` of what was sent since
  then; every ``checks_per_step`` high checks the throttle starts at ``initial`` or rises
  by ``increment``, up to ``maximum``. (The ``fake`` back-end throttles differently: +20 %
  every pass from pass 3, whatever the guest does; pass such an :class:`AutoConverge` to
  predict it.)
* **Completion timeout** (``completion_timeout``, s from the start of the job, setup
  included, as the engine counts it): a run that
  has not ended by then is aborted (``timeout_action="abort"``: it does not converge) or, in
  a post-copy run, switched to post-copy (``"post-copy"``, the default). A timeout during
  setup or the disk copy always fails: post-copy can start only once memory moves.

What is **not** modelled (each makes real migrations differ from the prediction):

* compression, XBZRLE, multifd (``parallel-connections``), RDMA and TLS: the link rate is
  taken as the rate at which guest pages arrive, whatever carries them;
* a ``bandwidth`` cap below the link: pass the cap as ``link_rate``; QEMU lifts the cap for
  the switchover, so the downtime is then overestimated (the fake does the same as QEMU);
* zero pages: QEMU sends a page of zeros as a flag (9 bytes), so ``memory`` is the bytes
  that really need sending (``migration.forecast`` bounds them by what the guest's QEMU
  keeps resident); the zero pages' flags and QEMU's scan of them cost nothing here;
* per-page headers (about 0.2 % more on the wire) and the exact QEMU pass boundary (QEMU
  syncs the dirty bitmap once the current pass has less than a downtime target's worth
  left, not when it has nothing left: at most one target's worth of difference per pass);
* dirty-rate sampling error: the dirty rate is one number for the whole run, while a real
  guest's rate varies, and libvirt's figure counts pages dirtied per period (a guest that
  rewrites the same pages shows its working set, not its write bandwidth: with
  ``dirty_period`` a pass shorter than the period is taken to dirty a whole period's worth,
  which over-estimates a guest that writes steadily at that rate);
* the mirror's granularity (a 4 KiB write dirties a whole cluster of the block job) and
  ``copy-storage-synchronous-writes`` (writes that wait for both hosts make any write rate
  converge);
* post-copy's cost to the guest (page faults served over the network while it runs on the
  destination), ``warm`` and ``offline`` migrations, ``timeout-action: suspend``, and
  retries;
* TCG (emulated, not KVM) guests, whose vCPUs run far slower and dirty memory accordingly,
  and hosts too loaded to send at the link rate;
* the engine missing a pass (it judges each pass from a sample taken when the pass begins;
  passes shorter than its sampling latency may be judged together) and steering calls the
  hypervisor refuses.

Sharing the link: ``link_rate`` is what this one migration gets; for *n* concurrent
migrations over one link predict with ``link_rate / n``. :func:`smallest_link_share` answers
"what share of the link does this VM need to still converge", to group hot and cold VMs.

The engine's policy is not monotone in every input (the tests show it): a slightly faster
link can make a migration longer, because passes that no longer stall never raise the
downtime target. The model reproduces that rather than smoothing it over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from asyncmigfra.hypervisor.base import JobStats
from asyncmigfra.migration.policy import ConvergencePolicy
from asyncmigfra.migration.prediction_inputs import (
    HYPERVISOR_DEFAULT_DOWNTIME,
    AutoConverge,
    MigrationCosts,
    PredictionInputs,
)

__all__ = [
    "AutoConverge",
    "HYPERVISOR_DEFAULT_DOWNTIME",
    "MAX_PASSES",
    "MigrationCosts",
    "PassPrediction",
    "PredictionInputs",
    "RunEnd",
    "RunMode",
    "RunPrediction",
    "TimeoutAction",
    "Verdict",
    "predict",
    "predict_run",
    "smallest_link_share",
]


#: A run that neither converges nor times out within this many passes is reported stuck.
MAX_PASSES = 20_000

RunMode = Literal["live", "post-copy"]
#: How a run ends: the first two converge.
RunEnd = Literal["switchover", "post-copy", "timeout", "stuck", "disks-never-sync", "no-link"]
TimeoutAction = Literal["abort", "post-copy"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PassPrediction:
    """One completed pre-copy pass."""

    #: 1 for the pass that sends all memory.
    number: int
    #: s from the start of the job.
    start: float
    #: s.
    duration: float
    #: Bytes sent.
    sent: int
    #: Bytes the guest dirtied meanwhile (what the next pass, or the switchover, sends).
    dirtied: int
    #: The auto-converge throttle in force (0-0.99).
    throttle: float
    #: ms, the downtime target compared at the pass's end.
    target: int
    #: What the policy decided at the pass's start (``raise-downtime``) or ``None``.
    action: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunPrediction:
    """One migration run as the engine would carry it out, with its migration type."""

    mode: RunMode
    end: RunEnd
    passes: tuple[PassPrediction, ...]
    #: s the storage copy takes to get in sync (0: none; ``inf``: never).
    disk_time: float
    #: s from the start of the job to its end; ``None`` when it does not converge.
    duration: float | None
    #: ms the guest is paused; ``None`` when it does not converge.
    downtime: float | None
    #: Bytes pulled in post-copy.
    post_copy_bytes: int = 0
    #: What started post-copy.
    post_copy_by: Literal["policy", "timeout"] | None = None
    #: Why the run does not converge, with the numbers (empty when it converges).
    blockers: tuple[str, ...] = ()

    @property
    def converges(self) -> bool:
        return self.end in ("switchover", "post-copy")


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """What ``migration-type: auto`` would do (see :func:`predict`)."""

    #: ``live``: pre-copy converges in time; ``post-copy``: it does not and post-copy is
    #: allowed; ``None``: neither converges (``will-not-converge``).
    mode: RunMode | None
    #: s, ms and completed passes of the chosen run (``None``/0 when none converges).
    duration: float | None
    downtime: float | None
    passes: int
    blockers: tuple[str, ...]
    #: The pre-copy run, always predicted.
    live: RunPrediction
    #: The post-copy run, predicted whenever pre-copy does not converge (when post-copy is
    #: not allowed: what it would have done).
    post_copy: RunPrediction | None = None

    @property
    def converges(self) -> bool:
        return self.mode is not None

    @property
    def reason(self) -> str:
        """The blockers as one sentence for a result's ``details``."""
        return "; ".join(self.blockers)


def predict(inputs: PredictionInputs) -> Verdict:
    """Live when pre-copy alone converges within the completion timeout (what is left at
    its switchover then fits the target, which never exceeds ``max-downtime``; the
    switchover's fixed cost comes on top, as with QEMU); else post-copy when allowed (a
    ``post-copy`` run whose completion timeout switches to post-copy); else no mode, with
    the reasons (and, when post-copy is not allowed but would converge, what it would do)."""
    live = predict_run(inputs, "live")
    if live.converges:
        return _verdict("live", live, live)
    post = predict_run(inputs, "post-copy")
    if post.converges and inputs.post_copy_allowed:
        return _verdict("post-copy", post, live)
    if post.converges:  # and not allowed: say what it would have done
        blockers = (
            *live.blockers,
            f"post-copy is not allowed (post-copy would take {post.duration:.1f} s)",
        )
    else:
        blockers = live.blockers + tuple(b for b in post.blockers if b not in live.blockers)
    return Verdict(
        mode=None,
        duration=None,
        downtime=None,
        passes=0,
        blockers=blockers,
        live=live,
        post_copy=post,
    )


def _verdict(mode: RunMode, run: RunPrediction, live: RunPrediction) -> Verdict:
    return Verdict(
        mode=mode,
        duration=run.duration,
        downtime=run.downtime,
        passes=len(run.passes),
        blockers=(),
        live=live,
        post_copy=run if mode == "post-copy" else None,
    )


def smallest_link_share(
    inputs: PredictionInputs, *, live: bool = True, resolution: float = 0.001
) -> float | None:
    """The smallest share (0-1] of ``inputs.link_rate`` at which the VM still converges:
    pre-copy alone (``live``), or the :func:`predict` verdict (with post-copy allowed, any
    share that moves memory before the completion timeout converges, so without a storage
    copy the answer is at most ``resolution``). ``None``: not even the whole link.

    Found by bisection to within ``resolution``; the share returned is one at which it
    converges. Convergence is not strictly monotone in the link rate under the engine's
    stall-driven policy (see the module), so a share a little above the answer may, rarely,
    not converge."""
    if not 0 < resolution < 1:
        raise ValueError(f"resolution must be in (0, 1), got {resolution!r}")

    def converges(share: float) -> bool:
        shared = replace(inputs, link_rate=inputs.link_rate * share)
        if live:
            return predict_run(shared, "live").converges
        return predict(shared).converges

    if not converges(1.0):
        return None
    low, high = 0.0, 1.0  # low does not converge (0: no link), high does
    while high - low > resolution:
        middle = (low + high) / 2
        if converges(middle):
            high = middle
        else:
            low = middle
    return high


def predict_run(
    inputs: PredictionInputs, mode: RunMode, *, timeout_action: TimeoutAction = "post-copy"
) -> RunPrediction:
    """One run of ``migration-type`` ``mode`` (``live``: pre-copy only; ``post-copy``: the
    policy may switch, and so may the completion timeout with ``timeout_action``
    ``post-copy``), pass by pass as the engine and the hypervisor carry it out."""
    return _Run(inputs, mode, timeout_action).result()


@dataclass(slots=True)
class _Throttle:
    """The auto-converge state between passes."""

    rules: AutoConverge
    enabled: bool
    value: float = 0.0
    high_checks: int = 0
    period_start: float = 0.0
    period_sent: int = 0
    period_dirtied: int = 0

    def settled(self) -> bool:
        """It can no longer change: off, at its maximum, or unable to see a high check
        (a steady run dirties as much as it sends)."""
        return not self.enabled or self.value >= self.rules.maximum or self.rules.trigger >= 1

    def pass_ended(self, at: float, sent: int, dirtied: int) -> None:
        if not self.enabled:
            return
        rules = self.rules
        self.period_sent += sent
        self.period_dirtied += dirtied
        if at - self.period_start <= rules.period and rules.period > 0:
            return
        high = self.period_dirtied > rules.trigger * self.period_sent
        self.period_start, self.period_sent, self.period_dirtied = at, 0, 0
        if not high:
            return
        self.high_checks += 1
        if self.high_checks < rules.checks_per_step:
            return
        step = rules.initial if self.value == 0 else self.value + rules.increment
        self.value = min(rules.maximum, step)
        if rules.restart_count:
            self.high_checks = 0


class _Run:
    """The simulation of one run (see :func:`predict_run`)."""

    def __init__(self, inputs: PredictionInputs, mode: RunMode, timeout_action: str) -> None:
        self.inputs = inputs
        self.mode: RunMode = mode
        self.switch_at_timeout = mode == "post-copy" and timeout_action == "post-copy"
        self.link = inputs.link_rate
        copying = inputs.disk_bytes > 0
        #: The mirror forwards the guest's disk writes while memory moves.
        self.memory_link = self.link - (inputs.disk_write_rate if copying else 0.0)
        self.cap = inputs.memory
        if inputs.dirty_working_set is not None:
            self.cap = min(self.cap, inputs.dirty_working_set)
        self.policy = ConvergencePolicy(
            max_downtime=inputs.max_downtime, post_copy_allowed=mode == "post-copy"
        )
        self.throttle = _Throttle(inputs.throttling, inputs.auto_converge)
        self.passes: list[PassPrediction] = []
        self.disk_time = 0.0

    # ---- the run --------------------------------------------------------------------

    def result(self) -> RunPrediction:
        inputs = self.inputs
        if self.link <= 0:
            return self._failed("no-link", "the link rate is 0: nothing can move")
        t = inputs.costs.setup
        if inputs.disk_bytes > 0:
            t += inputs.costs.storage_setup
            writes = inputs.disk_write_rate
            if writes >= self.link:
                self.disk_time = math.inf
                return self._failed(
                    "disks-never-sync",
                    f"the guest writes its disks at {_rate(writes)}, at least the"
                    f" {_rate(self.link)} the link copies them at: the storage copy never"
                    " gets in sync (post-copy cannot start before it does)",
                )
            self.disk_time = inputs.disk_bytes / (self.link - writes)
            t += self.disk_time
        if t >= inputs.completion_timeout:
            return self._failed(
                "timeout",
                f"memory would start to move only after {t:.1f} s (setup and storage copy),"
                f" past the completion timeout of {inputs.completion_timeout:g} s",
            )
        return self._passes(t)

    def _passes(self, t: float) -> RunPrediction:
        inputs = self.inputs
        costs = inputs.costs
        timeout = inputs.completion_timeout
        amount = inputs.memory
        processed = 0
        expected: float | None = None
        self.throttle.period_start = t
        for number in range(1, MAX_PASSES + 1):
            rate = inputs.dirty_rate * (1.0 - self.throttle.value)
            action = self.policy.on_iteration(
                JobStats(
                    phase="migrating",
                    iteration=number,
                    elapsed=t,
                    memory_total=inputs.memory,
                    memory_processed=processed,
                    memory_remaining=amount,
                    data_remaining=amount,
                    dirty_rate=int(rate),
                    transfer_rate=int(self.memory_link),
                    expected_downtime=expected,
                )
            )
            if action == "post-copy":
                return self._post_copy(t, amount, by="policy")
            target = self.policy.downtime or HYPERVISOR_DEFAULT_DOWNTIME
            duration = max(costs.min_pass, amount / self.memory_link) + costs.pass_overhead
            end = t + duration
            if end > timeout:
                return self._timed_out(t, amount, rate, target)
            dirtied = self._dirtied(rate * max(duration, inputs.dirty_period))
            self.passes.append(
                PassPrediction(
                    number=number,
                    start=t,
                    duration=duration,
                    sent=amount,
                    dirtied=dirtied,
                    throttle=self.throttle.value,
                    target=target,
                    action=action,
                )
            )
            throttle = self.throttle.value
            self.throttle.pass_ended(end, amount, dirtied)
            processed += amount
            expected = dirtied / self.memory_link * 1000.0
            t = end
            if expected <= target:
                return self._switchover(t, dirtied)
            if t >= timeout:
                return self._timed_out(t, dirtied, rate, target)
            if self._steady(amount, dirtied, throttle):
                return self._stuck(dirtied, rate)
            amount = dirtied
        return self._failed(
            "stuck", f"pre-copy does not switch over within {MAX_PASSES} passes (the model's limit)"
        )

    def _dirtied(self, written: float) -> int:
        page = self.inputs.page_size
        return min(self.cap, math.ceil(written / page) * page)

    def _steady(self, amount: int, dirtied: int, throttle: float) -> bool:
        """Every further pass would repeat this one: same amount, target and throttle, and
        (in a live run) no decision of the policy left that could change them."""
        if dirtied != amount or self.mode == "post-copy":
            return False
        policy = self.policy
        target_settled = not policy.schedule or policy.step == len(policy.schedule) - 1
        return target_settled and self.throttle.settled() and throttle == self.throttle.value

    # ---- how a run ends ---------------------------------------------------------------

    def _switchover(self, t: float, left: int) -> RunPrediction:
        downtime = left / self.link * 1000.0 + self.inputs.costs.switchover
        end = t + downtime / 1000.0
        timeout = self.inputs.completion_timeout
        if end > timeout and not self.switch_at_timeout:
            # The switchover is still running when the timeout aborts the job.
            count = len(self.passes)
            return self._failed(
                "timeout",
                f"pre-copy would converge only at {end:.2f} s, after {count}"
                f" pass{'' if count == 1 else 'es'}, past the completion timeout of"
                f" {timeout:g} s",
            )
        return self._ended("switchover", duration=end, downtime=downtime)

    def _post_copy(
        self, at: float, left: float, *, by: Literal["policy", "timeout"]
    ) -> RunPrediction:
        costs = self.inputs.costs
        left_bytes = math.ceil(min(float(self.inputs.memory), left))
        end = at + costs.post_copy_pause / 1000.0 + left_bytes / self.link
        return self._ended(
            "post-copy",
            duration=end,
            downtime=costs.post_copy_pause,
            post_copy_bytes=left_bytes,
            post_copy_by=by,
        )

    def _timed_out(self, start: float, amount: int, rate: float, target: int) -> RunPrediction:
        """The completion timeout falls in the pass that starts at ``start`` (or at its
        start): post-copy from what is left then, or a failure."""
        timeout = self.inputs.completion_timeout
        if self.switch_at_timeout:
            elapsed = max(0.0, timeout - start)
            sent = min(float(amount), self.memory_link * elapsed)
            dirtied = min(float(self.cap), rate * max(elapsed, self.inputs.dirty_period))
            return self._post_copy(timeout, amount - sent + dirtied, by="timeout")
        number = len(self.passes) + 1
        return self._failed(
            "timeout",
            f"pre-copy does not converge within the completion timeout of {timeout:g} s:"
            f" it falls in pass {number}, which sends {_size(amount)}"
            f" ({amount / self.memory_link * 1000:.0f} ms at the link rate, downtime target"
            f" {target} ms); {self._rates(rate)}",
        )

    def _stuck(self, amount: int, rate: float) -> RunPrediction:
        largest = self.policy.downtime or HYPERVISOR_DEFAULT_DOWNTIME
        return self._failed(
            "stuck",
            f"pre-copy cannot converge: every pass leaves {_size(amount)}"
            f" ({amount / self.memory_link * 1000:.0f} ms at the link rate), more than the"
            f" largest downtime target of {largest} ms; {self._rates(rate)}",
        )

    def _rates(self, rate: float) -> str:
        throttle = self.throttle.value
        throttled = f" (auto-converge throttling {throttle:.0%})" if throttle else ""
        ratio = rate / self.memory_link
        return (
            f"the guest dirties memory at {_rate(rate)}{throttled} against a link of"
            f" {_rate(self.memory_link)} (ratio {ratio:.2f})"
        )

    def _failed(self, end: RunEnd, blocker: str) -> RunPrediction:
        return RunPrediction(
            mode=self.mode,
            end=end,
            passes=tuple(self.passes),
            disk_time=self.disk_time,
            duration=None,
            downtime=None,
            blockers=(blocker,),
        )

    def _ended(
        self,
        end: RunEnd,
        *,
        duration: float,
        downtime: float,
        post_copy_bytes: int = 0,
        post_copy_by: Literal["policy", "timeout"] | None = None,
    ) -> RunPrediction:
        return RunPrediction(
            mode=self.mode,
            end=end,
            passes=tuple(self.passes),
            disk_time=self.disk_time,
            duration=duration,
            downtime=downtime,
            post_copy_bytes=post_copy_bytes,
            post_copy_by=post_copy_by,
        )


_MIB = 1024 * 1024


def _rate(value: float) -> str:
    return f"{value / _MIB:.1f} MiB/s"


def _size(value: float) -> str:
    if value >= 1024 * _MIB:
        return f"{value / (1024 * _MIB):.2f} GiB"
    return f"{value / _MIB:.1f} MiB"
