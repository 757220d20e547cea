"""A migration's prediction as it is answered: the :class:`Forecast` (the model's figures,
the inputs it used, what blocks it) and its wire keys (:func:`plan_fields`) and notes
(:func:`notes`) for ``plan`` answers and events (docs/protocol.md §3.13)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from asyncmigfra.migration.dirtyrates import DirtyRate
from asyncmigfra.migration.dirtysample import CONFIDENCE
from asyncmigfra.migration.prediction import PredictionInputs, Verdict

__all__ = ["Blocker", "Forecast", "notes", "plan_fields"]

_MIB: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class Blocker:
    """Why a migration cannot run (or finish): the wire ``code`` and a sentence."""

    code: str
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Forecast:
    """A migration's prediction, the inputs it used and what blocks it."""

    vm_name: str
    destination: str
    #: The migration type that would run: ``live``, ``post-copy``, ``warm`` or ``offline``
    #: (``auto``: the chosen one; ``live`` when none converges).
    mode: str
    #: The migration type asked for (``auto`` included).
    requested: str
    converges: bool
    #: s from the start of the job; ``None``: it does not finish (or was not predicted).
    duration: float | None = None
    #: ms the guest is paused; ``None``: unknown.
    downtime: float | None = None
    passes: int = 0
    #: Bytes of memory and of disks to send.
    memory: int = 0
    disk: int = 0
    dirty: DirtyRate = field(default_factory=lambda: DirtyRate(None, "unknown"))
    #: Bytes/s the migration is predicted to get, and where the figure comes from
    #: (``learned``, ``configured``, ``bandwidth``: the task's or config's cap).
    link_rate: float = 0.0
    link_source: str = "configured"
    #: s, the completion timeout the prediction assumed.
    completion_timeout: float = 0.0
    blockers: tuple[Blocker, ...] = ()
    #: The model's answer (``None``: no prediction: a blocker came first, or warm/offline).
    verdict: Verdict | None = None
    inputs: PredictionInputs | None = None

    @property
    def code(self) -> str | None:
        """The wire code of the first blocker."""
        return self.blockers[0].code if self.blockers else None

    @property
    def reason(self) -> str:
        return "; ".join(b.text for b in self.blockers)


def plan_fields(forecast: Forecast) -> dict[str, object]:
    """The prediction's wire keys, in order (a ``plan`` result entry's and event's)."""
    fields: dict[str, object] = {
        "destination": forecast.destination,
        "mode": forecast.mode,
        "converges": forecast.converges and not forecast.blockers,
    }
    if forecast.duration is not None:
        fields["predicted-duration"] = round(forecast.duration, 3)
    if forecast.downtime is not None:
        fields["predicted-downtime"] = round(forecast.downtime, 1)
    fields["passes"] = forecast.passes
    fields["memory"] = forecast.memory
    fields["disk"] = forecast.disk
    if forecast.dirty.rate is not None:
        fields["dirty-rate"] = round(forecast.dirty.rate)
    fields["transfer-rate"] = round(forecast.link_rate)
    fields["blockers"] = [b.text for b in forecast.blockers]
    return fields


def notes(forecast: Forecast) -> list[str]:
    """What a reader of the prediction should know about its inputs."""
    out: list[str] = []
    if forecast.dirty.note:
        out.append(forecast.dirty.note)
    dirty = forecast.dirty
    if dirty.rate is not None and dirty.bound is not None:
        out.append(
            f"dirty rate sampled from {dirty.sampled} pages: {dirty.rate / _MIB:.1f} MiB/s,"
            f" at most {dirty.bound / _MIB:.1f} MiB/s at {CONFIDENCE:.0%} confidence"
            " (whether it converges is judged at that bound)"
        )
    if forecast.dirty.rate is None and forecast.mode in ("live", "post-copy"):
        out.append("dirty rate unknown: predicted as an idle guest")
    if forecast.link_source == "configured":
        out.append("link rate not learned yet: the configured migration.link-rate")
    return out
