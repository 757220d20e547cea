"""The task's data given to a hook (:class:`HookCall`), the host a hook is about, and the
failure of one hook (``_Failure``, its reason clipped by ``_clip``)."""

from __future__ import annotations

from dataclasses import dataclass

from asyncmigfra.settings import MIGRATE_HOOK_POINTS, HookSettings

#: Characters of a reason (an error line, the answer's details) kept in the failure text.
MAX_REASON_CHARS = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class HookCall:
    """The task's data given to a hook."""

    #: One of :data:`HOOK_POINTS`.
    point: str
    #: The wire task name: ``migrate vm``, ``start vm``, ``stop vm``.
    task: str
    task_id: str | None
    vm_name: str
    #: The agent's host name.
    source: str
    #: Migrations only.
    destination: str | None = None
    #: After-points: ``success`` or ``error``.
    outcome: str | None = None
    #: After-points with outcome ``error``: the error text.
    details: str | None = None


class _Failure(Exception):
    """One hook failed; ``str()`` is the reason."""


def _host(hook: HookSettings, call: HookCall) -> str:
    """The host a hook is about: the destination for ``on: destination`` at migrate points."""
    if hook.on == "destination" and call.point in MIGRATE_HOOK_POINTS:
        if call.destination is None:
            raise _Failure("on: destination, but the task has no destination")
        return call.destination
    return call.source


def _clip(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."
