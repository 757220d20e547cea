"""The convergence policy: one decision per memory iteration (raise the downtime target one
step, or switch to post-copy), respecting what the operator set. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field

from asyncmigfra.hypervisor.base import JobStats
from asyncmigfra.migration.plan import _downtime_schedule

__all__ = [
    "ConvergencePolicy",
]


#: A pass "stalls" when it leaves at least this share of what the previous pass left.
STALL = 0.9


#: A copy is hopeless when the guest dirties at least this share of what the link sends.
HOPELESS_RATE = 0.85


#: Iterations to wait at the maximum downtime before switching to post-copy.
STALLS_BEFORE_POSTCOPY = 2


@dataclass(slots=True)
class ConvergencePolicy:
    """Per-iteration decisions. Pure: feed it one ``JobStats`` per iteration.

    It respects what the operator set with ``tune migration``: a downtime the operator set
    is the target at once and the floor of every later step (a step is ``max(schedule,
    operator)``, so the policy never lowers what the operator raised); a post-copy the
    operator started is not undone; after ``force-complete`` it takes no further step.
    """

    max_downtime: int | None
    post_copy_allowed: bool
    schedule: list[int] = field(init=False)
    step: int = 0
    last_remaining: int | None = None
    stalls_at_max: int = 0
    post_copy_started: bool = False
    #: ms the operator set (``tune migration``), the floor of every later step.
    operator_downtime: int | None = None
    #: The guest was paused on the source (``timeout-action: suspend`` or force-complete).
    source_suspended: bool = False
    #: The operator asked for force-complete: no further step is taken.
    force_completed: bool = False
    #: The downtime target set on the job now (ms); ``None``: the hypervisor's default.
    target: int | None = field(init=False)
    #: (step, target) before the last raise, for :meth:`revert`.
    _before_raise: tuple[int, int | None] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.schedule = _downtime_schedule(self.max_downtime) if self.max_downtime else []
        self.target = self.schedule[0] if self.schedule else None

    def _hopeless(self, stats: JobStats) -> bool:
        # "At least as fast" with a tolerance: a guest that rewrites the same pages every
        # pass shows a dirty rate that levels off right at the link rate (measured on the
        # rig: 7.1-8.0 MiB/s dirtied against 8.0 MiB/s sent), so a strict comparison would
        # flip on noise and cost several pointless passes.
        if stats.transfer_rate <= 0 or stats.dirty_rate < stats.transfer_rate * HOPELESS_RATE:
            return False
        limit = max(self.max_downtime or 0, self.operator_downtime or 0) or None
        if limit is None or stats.expected_downtime is None:
            return True
        return stats.expected_downtime > limit

    def _within_target(self, stats: JobStats) -> bool:
        # The hypervisor switches over at the end of a pass whose rest fits the downtime
        # target: a pass that leaves the same few pages of an idle guest is converging, not
        # stalling, and stepping the target up then only races the job's end.
        target = self.downtime
        expected = stats.expected_downtime
        return target is not None and expected is not None and expected <= target

    @property
    def downtime(self) -> int | None:
        """The current target (ms); ``None`` while the hypervisor's default applies."""
        return self.target

    def set_by_operator(self, ms: int) -> None:
        """The operator set the downtime target (``tune migration``): it is the target now
        and the floor of every later step."""
        self.operator_downtime = ms
        self.target = ms
        self._before_raise = None

    def _next_step(self) -> int | None:
        """The next step of the schedule that raises the target, if any."""
        floor = self.operator_downtime or 0
        for i in range(self.step + 1, len(self.schedule)):
            if self.target is None or max(self.schedule[i], floor) > self.target:
                return i
        return None

    def revert(self, action: str) -> None:
        """Forget ``action``: the hypervisor refused it (the job ended, or it cannot)."""
        if action == "raise-downtime" and self._before_raise is not None:
            self.step, self.target = self._before_raise
            self._before_raise = None
        elif action == "post-copy":
            self.post_copy_started = False

    def on_iteration(self, stats: JobStats) -> str | None:
        """Return the action to take now (``raise-downtime``, ``post-copy``) or ``None``.

        A sample from before the first memory pass (a storage copy's disk phase: iteration 0,
        ``memory_total`` still 0) is no pass: it is neither judged nor remembered."""
        if stats.iteration < 1 or stats.memory_total <= 0:
            return None
        remaining = stats.memory_remaining
        stalled = (
            self.last_remaining is not None
            and remaining > 0
            and remaining >= self.last_remaining * STALL
            and not self._within_target(stats)
        )
        self.last_remaining = remaining
        if stats.iteration < 2 or not stalled or self.post_copy_started or self.force_completed:
            return None
        if self.post_copy_allowed and self._hopeless(stats):
            # The guest dirties memory at least as fast as the link sends it: no downtime
            # target within max-downtime can make pre-copy converge, so stepping up only
            # wastes iterations (KubeVirt's stall detector reasons the same way).
            self.post_copy_started = True
            return "post-copy"
        step = self._next_step() if self.schedule else None
        if step is not None:
            self._before_raise = (self.step, self.target)
            self.step = step
            self.target = max(self.schedule[step], self.operator_downtime or 0)
            return "raise-downtime"
        self.stalls_at_max += 1
        if self.post_copy_allowed and self.stalls_at_max >= STALLS_BEFORE_POSTCOPY:
            self.post_copy_started = True
            return "post-copy"
        return None
