"""The rig's network: the two hosts' fixed plans (names, addresses, ports, identity), their
network namespaces joined by a veth, and the check that each host reaches the other.

In "netns" mode (the default) each host has its own network namespace, ``amfrig-a`` and
``amfrig-b``, joined by the veth pair ``rig0``/``rig0`` (10.200.0.1 and 10.200.0.2): the
10.200.0.0/24 addresses exist only inside the two namespaces, with no route to or from the root
namespace and no default route, so nothing can leave the machine.

"loopback" mode (``RIG_NETNS=0``, or automatically when ``ip netns add`` or the veth fails):
both daemons stay in the root network namespace on 127.0.0.2 and 127.0.0.3, still each in its
own mount and UTS namespace. 127.0.0.1 itself cannot be used: libvirt's QEMU driver refuses it
as ``migration_host``/``migration_address`` ("must not be the address of the local machine").
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rig.processes import sweep
from rig.system import RigError, _run

if TYPE_CHECKING:
    from rig.hosts import Host

SUBNET_PREFIX = 24
VETH = "rig0"


@dataclass(frozen=True)
class _Plan:
    """The fixed part of a host: names, addresses, ports and identity."""

    name: str
    netns: str
    netns_ip: str
    loopback_ip: str
    tcp_port: int
    migration_ports: tuple[int, int]
    uuid: str


_PLANS = (
    _Plan(
        "rig-a", "amfrig-a", "10.200.0.1", "127.0.0.2", 16509, (49152, 49215),
        "0a51c0de-0000-4000-8000-00000000000a",
    ),
    _Plan(
        "rig-b", "amfrig-b", "10.200.0.2", "127.0.0.3", 16510, (49216, 49279),
        "0a51c0de-0000-4000-8000-00000000000b",
    ),
)  # fmt: skip


def make_network(netns_wanted: bool | None) -> tuple[str, str | None]:
    """Create the namespaces and veth (netns mode), or explain why not (loopback mode).

    Returns the mode (``"netns"`` or ``"loopback"``) and, in loopback mode, why (``None`` in
    netns mode). ``netns_wanted``: ``True`` requires namespaces, ``False`` forces loopback mode,
    ``None`` tries namespaces and falls back.
    """
    if netns_wanted is False:
        return "loopback", "RIG_NETNS=0"
    a, b = _PLANS
    created: list[str] = []
    try:
        for plan in _PLANS:
            _run(["ip", "netns", "add", plan.netns])
            created.append(plan.netns)
            _run(["ip", "-n", plan.netns, "link", "set", "lo", "up"])
        # Created directly inside the namespaces: no interface ever appears in the root
        # namespace, so nothing there can collide or be left behind.
        _run(
            [
                "ip", "link", "add", "name", VETH, "netns", a.netns, "type", "veth",
                "peer", "name", VETH, "netns", b.netns,
            ]
        )  # fmt: skip
        for plan in _PLANS:
            _run(["ip", "-n", plan.netns, "addr", "add", f"{plan.netns_ip}/{SUBNET_PREFIX}",
                  "dev", VETH])  # fmt: skip
            _run(["ip", "-n", plan.netns, "link", "set", VETH, "up"])
    except RigError as exc:
        if netns_wanted:
            raise
        sweep(None, created)
        return "loopback", str(exc)
    return "netns", None


def check_links(a: Host, b: Host) -> None:
    """Each host must reach the other's libvirtd over the rig network (the p2p path)."""
    for src, dst in ((a, b), (b, a)):
        if src.netns:
            # bash's /dev/tcp: no ping or nc on the machine, and no Python setns in 3.11
            probe = f"exec 3<>/dev/tcp/{dst.ip}/{dst.tcp_port}"
            proc = _run(["ip", "netns", "exec", src.netns, "bash", "-c", probe], check=False)
            ok, why = proc.returncode == 0, proc.stderr.strip()
        else:
            try:
                socket.create_connection((dst.ip, dst.tcp_port), timeout=5).close()
                ok, why = True, ""
            except OSError as exc:
                ok, why = False, str(exc)
        if not ok:
            raise RigError(f"{src.name} cannot reach {dst.p2p_uri}: {why}")
