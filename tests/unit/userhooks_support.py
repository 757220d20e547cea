"""Helpers shared by the ``test_userhooks*.py`` modules: a command hook's settings and two
hook calls (before a start, before a migration)."""

from __future__ import annotations

from asyncmigfra.peers.userhooks import HookCall
from asyncmigfra.settings import HookSettings


def hook(name: str, command: tuple[str, ...] | str, **kwargs: object) -> HookSettings:
    kwargs.setdefault("when", ("before-start",))
    return HookSettings(name=name, command=command, **kwargs)  # type: ignore[arg-type]


START = HookCall(point="before-start", task="start vm", task_id="t-1", vm_name="vm1", source="h1")
MIGRATE = HookCall(
    point="before-migrate",
    task="migrate vm",
    task_id=None,
    vm_name="v",
    source="a",
    destination="b",
)
