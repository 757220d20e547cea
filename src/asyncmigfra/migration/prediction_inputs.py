"""What a migration prediction starts from (:mod:`~asyncmigfra.migration.prediction`): the
migration's figures, the fixed costs of the model (a back-end's own: :func:`costs_of`) and
the auto-converge schedule. Pure."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from asyncmigfra.hypervisor.base import KnowsMigrationCosts

__all__ = [
    "AutoConverge",
    "HYPERVISOR_DEFAULT_DOWNTIME",
    "MigrationCosts",
    "PredictionInputs",
    "costs_of",
]


#: QEMU's downtime limit (ms) when nobody sets one; the agent then never changes it.
HYPERVISOR_DEFAULT_DOWNTIME = 300


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationCosts:
    """The model's fixed costs. Defaults: QEMU/KVM as the two-host rig measured it where a
    figure exists, else a documented guess."""

    #: s of a migration that nothing speeds up: the destination QEMU starting, the
    #: hand-over at the end, the source QEMU stopping. The model puts it all before anything
    #: moves. The rig (bench/prediction_accuracy.py, 128 MiB TCG guests, from the migration
    #: call to its end, less the model's transfer time): median 0.35 s over 10 runs, each
    #: 0.27-1.03 s.
    setup: float = 0.35
    #: s a storage copy adds (the destination's NBD server, the mirror jobs starting and
    #: completing), also before anything moves. The rig: median 0.1 s over 6 runs.
    storage_setup: float = 0.1
    #: s: no pass is shorter (the fake's assumption that QEMU syncs the dirty bitmap at
    #: most about every 100 ms; not verified against QEMU).
    min_pass: float = 0.1
    #: s added to every pass (the dirty-bitmap sync; a guess for guests of a few GiB,
    #: not measured).
    pass_overhead: float = 0.005
    #: ms added to a pre-copy switchover (device state, CPU stop and start).
    switchover: float = 10.0
    #: ms the guest is paused when post-copy starts (the rig: 5 ms).
    post_copy_pause: float = 5.0

    def __post_init__(self) -> None:
        for name in (
            "setup",
            "storage_setup",
            "min_pass",
            "pass_overhead",
            "switchover",
            "post_copy_pause",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class AutoConverge:
    """How the hypervisor throttles the vCPUs with ``auto-converge``. The defaults are
    QEMU's (``cpu-throttle-initial`` 20, ``cpu-throttle-increment`` 10,
    ``max-cpu-throttle`` 99, ``throttle-trigger-threshold`` 50): QEMU checks at a
    dirty-bitmap sync at least a second after its last check, and after two high checks
    starts (or raises) the throttle and counts again from zero, so with passes of a second
    or more the throttle rises every second pass from pass 3 on: 20 %, 30 %, 40 %, ..."""

    #: Share of the vCPU time taken when throttling starts.
    initial: float = 0.2
    #: Added at each further step.
    increment: float = 0.1
    maximum: float = 0.99
    #: A check is high when the guest dirtied more than this share of what was sent.
    trigger: float = 0.5
    #: High checks per throttle step.
    checks_per_step: int = 2
    #: After a step the count of high checks starts again from zero (QEMU); ``False``: it
    #: keeps counting, so every further high check is a step.
    restart_count: bool = True
    #: s: a pass end closer than this to the last check is no check (the period goes on).
    period: float = 1.0

    def __post_init__(self) -> None:
        for name in ("initial", "increment", "maximum"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.trigger < 0 or self.period < 0 or self.checks_per_step < 1:
            raise ValueError("trigger and period must be >= 0, checks_per_step >= 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class PredictionInputs:
    """One migration to predict. Sizes in bytes, rates in bytes/s."""

    #: Guest memory to send (what the first pass sends: the guest's memory less the pages
    #: known to be zero, which QEMU sends as a flag).
    memory: int
    #: Bytes of guest RAM the hypervisor walks in the first pass (``memory`` plus the zero
    #: pages it sends as flags): what the engine's policy sees left when pass 1 starts, so
    #: pass 2, however much it sends, is no stall (QEMU counts every page dirty at the
    #: start). ``None``: ``memory``.
    guest_memory: int | None = None
    #: What the link gives this migration (for n migrations sharing a link: its share).
    link_rate: float
    #: s from the start of the job (the engine's ``completion-timeout``).
    completion_timeout: float
    #: Memory the guest dirties per second while it runs unthrottled.
    dirty_rate: float = 0.0
    #: Bytes/s the guest dirties at most (an upper confidence bound of a sampled
    #: ``dirty_rate``, ``migration.dirtysample``): whether the migration converges, and so
    #: the mode ``auto`` picks, is judged at this rate, how long it takes at ``dirty_rate``
    #: (``prediction.cautious``). ``None``: ``dirty_rate`` has no sampling error.
    dirty_rate_bound: float | None = None
    #: s over which ``dirty_rate`` was measured (the probe's sample). A pass shorter than
    #: this is taken to dirty as much as a whole period does: a sample cannot tell a guest
    #: that rewrites a few pages over and over from one that writes steadily, and the
    #: first kind leaves its whole set dirty after any pass (0: the rate holds at every
    #: time scale).
    dirty_period: float = 0.0
    #: Most memory one pass can leave dirty (the guest's writable working set); ``None``:
    #: all of ``memory``.
    dirty_working_set: int | None = None
    #: Disk bytes a storage copy moves (0: no storage copy).
    disk_bytes: int = 0
    #: Disk bytes the guest writes per second while its disks are copied (0: none/unknown).
    disk_write_rate: float = 0.0
    #: ms, the task's (or config's) ``max-downtime``; ``None``: the hypervisor's default
    #: target (:data:`HYPERVISOR_DEFAULT_DOWNTIME`), never stepped.
    max_downtime: int | None = None
    #: The task allows post-copy (``migration-type: post-copy`` or ``auto``).
    post_copy_allowed: bool = False
    auto_converge: bool = False
    page_size: int = 4096
    costs: MigrationCosts = field(default_factory=MigrationCosts)
    throttling: AutoConverge = field(default_factory=AutoConverge)

    def __post_init__(self) -> None:
        for name in (
            "memory",
            "disk_bytes",
            "link_rate",
            "dirty_rate",
            "disk_write_rate",
            "dirty_period",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not self.completion_timeout > 0:
            raise ValueError(f"completion_timeout must be > 0, got {self.completion_timeout!r}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size!r}")
        if self.max_downtime is not None and self.max_downtime < 1:
            raise ValueError(f"max_downtime must be >= 1 ms, got {self.max_downtime!r}")
        bound = self.dirty_rate_bound
        if bound is not None and not (math.isfinite(bound) and bound >= 0):
            raise ValueError(f"dirty_rate_bound must be a finite number >= 0, got {bound!r}")
        if self.guest_memory is not None and self.guest_memory < 0:
            raise ValueError(f"guest_memory must be >= 0, got {self.guest_memory!r}")
        if self.dirty_working_set is not None and self.dirty_working_set < 0:
            raise ValueError(f"dirty_working_set must be >= 0, got {self.dirty_working_set!r}")


def costs_of(hypervisor: object) -> MigrationCosts:
    """The fixed costs to predict ``hypervisor``'s migrations with: its own
    (``KnowsMigrationCosts``, the fake's) over the model's defaults. Figures a back-end
    gives that are not costs, or not finite numbers >= 0, are ignored (the default stays)."""
    if not isinstance(hypervisor, KnowsMigrationCosts):
        return MigrationCosts()
    known = set(MigrationCosts.__dataclass_fields__)
    given: dict[str, float] = {}
    for name, value in hypervisor.migration_costs().items():
        if name in known and 0 <= value < math.inf:  # NaN compares false: ignored too
            given[name] = float(value)
    return MigrationCosts(**given)
