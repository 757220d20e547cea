"""Where an agent keeps its state (the journal, learned link rates and overheads):
``agent.state-dir`` resolved to a directory, or ``None`` for no journal."""

from __future__ import annotations

import os
from pathlib import Path

from asyncmigfra.settings import Settings

__all__ = ["resolve_state_dir"]


def resolve_state_dir(settings: Settings) -> Path | None:
    """The journal directory from ``agent.state-dir`` (``auto``, ``none`` or a path).

    ``auto`` is one directory per agent name: ``$STATE_DIRECTORY/<name>`` when systemd's
    ``StateDirectory=`` set it, else ``/var/lib/asyncmigfra/<name>`` for root, else
    ``$XDG_STATE_HOME/asyncmigfra/<name>`` (``~/.local/state``).
    """
    value = settings.agent.state_dir
    if value.lower() == "none":
        return None
    if value.lower() != "auto":
        return Path(value)
    # systemd may list several directories (colon-separated); the first is ours.
    systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return Path(systemd) / settings.hostname
    if os.geteuid() == 0:
        return Path("/var/lib/asyncmigfra") / settings.hostname
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "asyncmigfra" / settings.hostname
