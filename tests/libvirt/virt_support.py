"""Helpers shared by the tests/libvirt modules (imported by name: this directory is on
``sys.path`` under pytest's default import mode).

Each fake host is a node file under ``data/``; ``test:///abs/path/hostA.xml`` opens a private
copy of it, and the back-end keeps one connection per URI, so one hypervisor instance sees one
consistent host for the whole test.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from harness import RecordingOpContext as Ctx  # noqa: F401 - the tests here import it from this module

DATA = Path(__file__).resolve().parent / "data"


def host_uri(name: str) -> str:
    """``test:///abs/path/<name>.xml``."""
    return f"test://{DATA / name}.xml"


def hv_options(**extra: Any) -> dict[str, object]:
    """Options of a hypervisor on hostA, with hostB reachable through the ``hosts`` map."""
    options: dict[str, object] = {
        "uri": host_uri("hostA"),
        "start-timeout": 1,
        "stop-timeout": 1,
        "hosts": {"hostB": {"uri": host_uri("hostB"), "p2p-uri": host_uri("hostB")}},
    }
    options.update(extra)
    return options


def libvirt_threads() -> list[str]:
    """Names of live threads this back-end starts (pool workers, the event thread)."""
    return [t.name for t in threading.enumerate() if t.name.startswith("libvirt") and t.is_alive()]
