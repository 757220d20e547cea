"""Will a migration converge, how long will it take, and what downtime will it cost? Pure.

The model behind issue 18 (``plan migration``, ``migration-type: auto``, evacuations
scheduled by prediction). No I/O, no asyncio (the pass-by-pass run is in
:mod:`~asyncmigfra.migration.simulation`, re-exported here): :class:`PredictionInputs` in
(defined in :mod:`~asyncmigfra.migration.prediction_inputs` with :class:`MigrationCosts` and
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
  90 % of what was left when the previous one started; when pass 1 starts the engine sees
  all of ``guest_memory`` left, zero pages too, as QEMU counts them, so pass 2 is never a
  stall). Unset: QEMU's default
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
* a dirty rate that varies: it is one number for the whole run. (The sampling error of a
  measured one is not ignored: with ``dirty_rate_bound`` the verdict, whether it
  converges and in which mode, is judged at that upper bound, the duration, downtime and
  passes at ``dirty_rate``; see :func:`cautious`.) libvirt's figure counts pages dirtied
  per period (a guest that
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

from dataclasses import dataclass, replace

from asyncmigfra.migration.prediction_inputs import (
    HYPERVISOR_DEFAULT_DOWNTIME,
    AutoConverge,
    MigrationCosts,
    PredictionInputs,
)
from asyncmigfra.migration.simulation import (
    MAX_PASSES,
    PassPrediction,
    RunEnd,
    RunMode,
    RunPrediction,
    TimeoutAction,
    predict_run,
    rate_text,
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
    "cautious",
    "predict",
    "predict_as",
    "predict_run",
    "smallest_link_share",
]


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


def cautious(inputs: PredictionInputs) -> PredictionInputs:
    """``inputs`` at the dirty rate a verdict must hold at: its ``dirty_rate_bound`` when
    that is higher than ``dirty_rate`` (a sampled rate's upper confidence bound)."""
    bound = inputs.dirty_rate_bound
    if bound is None or bound <= inputs.dirty_rate:
        return inputs
    return replace(inputs, dirty_rate=bound, dirty_rate_bound=None)


def predict(inputs: PredictionInputs) -> Verdict:
    """Live when pre-copy alone converges within the completion timeout (what is left at
    its switchover then fits the target, which never exceeds ``max-downtime``; the
    switchover's fixed cost comes on top, as with QEMU); else post-copy when allowed (a
    ``post-copy`` run whose completion timeout switches to post-copy); else no mode, with
    the reasons (and, when post-copy is not allowed but would converge, what it would do).

    The choice is made at :func:`cautious` inputs (the dirty rate's upper bound); the
    chosen mode's duration, downtime and passes are then those at ``dirty_rate``, unless
    that run does not converge (the engine's policy is not monotone in the rate), when
    they stay the bound's."""
    judged = cautious(inputs)
    verdict = _choose(judged)
    if judged is inputs:
        return verdict
    if verdict.mode is None:
        return replace(verdict, blockers=_bounded(verdict.blockers, inputs, judged))
    return _at_point(verdict, predict_run(inputs, verdict.mode))


def predict_as(
    inputs: PredictionInputs, mode: RunMode, *, timeout_action: TimeoutAction = "post-copy"
) -> Verdict:
    """The verdict on one run of ``mode`` (a migration whose type is given, not ``auto``):
    whether it converges judged at :func:`cautious` inputs, its figures at ``dirty_rate``
    as in :func:`predict`."""
    judged = cautious(inputs)
    run = predict_run(judged, mode, timeout_action=timeout_action)
    verdict = Verdict(
        mode=run.mode if run.converges else None,
        duration=run.duration,
        downtime=run.downtime,
        passes=len(run.passes),
        blockers=_bounded(run.blockers, inputs, judged),
        live=run,
        post_copy=run if run.mode == "post-copy" else None,
    )
    if judged is inputs or not run.converges:
        return verdict
    return _at_point(verdict, predict_run(inputs, mode, timeout_action=timeout_action))


def _at_point(verdict: Verdict, run: RunPrediction) -> Verdict:
    """``verdict`` (judged at the bound) with the figures of ``run`` (at the point
    estimate) when that converges in the same mode."""
    if not run.converges or run.mode != verdict.mode:
        return verdict
    return replace(
        verdict,
        duration=run.duration,
        downtime=run.downtime,
        passes=len(run.passes),
        live=run if run.mode == "live" else verdict.live,
        post_copy=run if run.mode == "post-copy" else verdict.post_copy,
    )


def _bounded(
    blockers: tuple[str, ...], inputs: PredictionInputs, judged: PredictionInputs
) -> tuple[str, ...]:
    """``blockers`` (of a run at ``judged``) saying that the rate in them is a bound (on the
    first: a note, not a blocker of its own)."""
    if judged is inputs or not blockers:
        return blockers
    said = (
        f" (judged at the dirty rate's upper confidence bound, {rate_text(judged.dirty_rate)};"
        f" the sample's estimate: {rate_text(inputs.dirty_rate)})"
    )
    return (blockers[0] + said, *blockers[1:])


def _choose(inputs: PredictionInputs) -> Verdict:
    """:func:`predict` at one dirty rate."""
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
    """The smallest share (0-1] of ``inputs.link_rate`` at which the VM still converges
    (judged as :func:`predict` judges it: at the dirty rate's upper bound): pre-copy alone
    (``live``), or the :func:`predict` verdict (with post-copy allowed, any
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
            return predict_run(cautious(shared), "live").converges
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
