"""Metrics on or off (``metrics.listen``). This module imports no ``prometheus_client``: an
agent without the ``metrics`` extra starts as long as metrics are off, and says which extra
to install when they are on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from asyncmigfra.errors import StartupError
from asyncmigfra.settings import Settings

if TYPE_CHECKING:
    from asyncmigfra.transport.metrics.endpoint import Metrics
    from asyncmigfra.transport.metrics.feed import Route

__all__ = ["open_metrics"]

MISSING = (
    "metrics.listen is set but prometheus_client is not installed: install the agent with its "
    "metrics extra (pip install 'asyncmigfra[metrics]') or remove metrics.listen"
)


def open_metrics(settings: Settings, *, route: Route, version: str) -> Metrics | None:
    """The agent's :class:`~asyncmigfra.transport.metrics.endpoint.Metrics`, not yet
    listening; ``None`` when ``metrics.listen`` is not set."""
    address = settings.metrics.address()
    if address is None:
        return None
    try:
        from asyncmigfra.transport.metrics.endpoint import Metrics  # noqa: PLC0415
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "prometheus_client":
            raise
        raise StartupError(MISSING) from None
    return Metrics(
        address,
        route=route,
        name=settings.hostname,
        version=version,
        hypervisor=settings.hypervisor.type,
    )
