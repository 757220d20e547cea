"""The project's own two-host libvirt test rig (see ``hosts.py``, which maps its parts), its
test guests (``guest.py``) and the disk images on its hosts (``storage.py``)."""

from rig.guest import (
    SIGNATURE,
    STATE_ADDR,
    VARIANTS,
    Disk,
    GuestState,
    build_guests,
    domain_xml,
    migrate_p2p,
    read_state,
    remove_domain,
    wait_counter_above,
)
from rig.hosts import Host, Rig, RigError, RigUnavailable, ensure_system, rig_processes, sweep

__all__ = [
    "SIGNATURE",
    "STATE_ADDR",
    "VARIANTS",
    "Disk",
    "GuestState",
    "Host",
    "Rig",
    "RigError",
    "RigUnavailable",
    "build_guests",
    "domain_xml",
    "ensure_system",
    "migrate_p2p",
    "read_state",
    "remove_domain",
    "rig_processes",
    "sweep",
    "wait_counter_above",
]
