"""The pass-by-pass simulation of one migration run (:func:`predict_run`). Pure.

The model it carries out, and what it leaves out, is described in
:mod:`~asyncmigfra.migration.prediction`, which chooses between runs (``predict``) and
re-exports everything here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from asyncmigfra.hypervisor.base import JobStats
from asyncmigfra.migration.policy import ConvergencePolicy
from asyncmigfra.migration.prediction_inputs import (
    HYPERVISOR_DEFAULT_DOWNTIME,
    AutoConverge,
    PredictionInputs,
)

__all__ = [
    "MAX_PASSES",
    "PassPrediction",
    "RunEnd",
    "RunMode",
    "RunPrediction",
    "TimeoutAction",
    "predict_run",
    "rate_text",
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
                    f"the guest writes its disks at {rate_text(writes)}, at least the"
                    f" {rate_text(self.link)} the link copies them at: the storage copy never"
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
        #: What the engine sees left when pass 1 starts: all guest RAM, zero pages too.
        walked = max(amount, inputs.guest_memory or 0)
        expected: float | None = None
        self.throttle.period_start = t
        for number in range(1, MAX_PASSES + 1):
            rate = inputs.dirty_rate * (1.0 - self.throttle.value)
            action = self.policy.on_iteration(
                JobStats(
                    phase="migrating",
                    iteration=number,
                    elapsed=t,
                    memory_total=walked,
                    memory_processed=processed,
                    memory_remaining=walked if number == 1 else amount,
                    data_remaining=walked if number == 1 else amount,
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
            f"the guest dirties memory at {rate_text(rate)}{throttled} against a link of"
            f" {rate_text(self.memory_link)} (ratio {ratio:.2f})"
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


def rate_text(value: float) -> str:
    """``value`` bytes/s as text (MiB/s, one decimal)."""
    return f"{value / _MIB:.1f} MiB/s"


def _size(value: float) -> str:
    if value >= 1024 * _MIB:
        return f"{value / (1024 * _MIB):.2f} GiB"
    return f"{value / _MIB:.1f} MiB"
