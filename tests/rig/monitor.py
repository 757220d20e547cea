"""What a rig host's libvirtd says to its QEMUs: the QMP commands it sends, logged for one
test through libvirt's admin socket (``virt-admin daemon-log-filters``), then switched off.
Evidence for facts libvirt's API does not show (which TLS credentials an NBD export uses)."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rig.hosts import Host
from rig.system import which

__all__ = ["qmp_log"]

_LOG = "/var/log/libvirt/qmp.log"
_DEFAULT_OUTPUTS = "3:file:/var/log/libvirt/libvirtd.log"


def _admin(host: Host, *args: str) -> None:
    uri = f"libvirtd:///system?socket={host.dir / 'run/libvirt/libvirt-admin-sock'}"
    subprocess.run([which("virt-admin") or "virt-admin", "-c", uri, *args], check=True,
                   capture_output=True)  # fmt: skip


class QmpLog:
    """The QMP commands ``host``'s libvirtd sent while the log was on."""

    def __init__(self, host: Host) -> None:
        self.path: Path = host.dir / _LOG.lstrip("/")

    def commands(self, name: str) -> list[dict[str, Any]]:
        """The ``arguments`` of every ``name`` command sent."""
        found: list[dict[str, Any]] = []
        if not self.path.exists():
            return found
        for line in self.path.read_text(errors="replace").splitlines():
            if "QEMU_MONITOR_SEND_MSG" not in line or f'"{name}"' not in line:
                continue
            text = line[line.index("msg=") + 4 :].split(" fd=", 1)[0].strip()
            with contextlib.suppress(ValueError):
                message = json.loads(text)
                if message.get("execute") == name:
                    found.append(message.get("arguments", {}))
        return found


@contextlib.contextmanager
def qmp_log(host: Host) -> Iterator[QmpLog]:
    """Log ``host``'s QMP traffic while the block runs."""
    _admin(host, "daemon-log-filters", "1:qemu.qemu_monitor")
    _admin(host, "daemon-log-outputs", f"1:file:{_LOG} {_DEFAULT_OUTPUTS}")
    try:
        yield QmpLog(host)
    finally:
        _admin(host, "daemon-log-filters", "")
        _admin(host, "daemon-log-outputs", _DEFAULT_OUTPUTS)
