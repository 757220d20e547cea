"""What a task id, VM name, host, driver and transport from the wire may be.

Shared by the node composer (the id of a rejected message), the field converters, and the
modules that check names outside a task (``valid_vm_name``, ``valid_task_id``).
"""

from __future__ import annotations

import re
from typing import Final

#: Characters no name or id from the wire may hold: C0 and C1 controls (ESC among them), DEL,
#: line and paragraph separators, and the bidirectional controls that make a terminal show
#: text in another order than it is (U+202E "RIGHT-TO-LEFT OVERRIDE" and its kin).
_UNSAFE_CHARS: Final = "\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNSAFE: Final = re.compile(f"[{_UNSAFE_CHARS}]")
#: VM names: libvirt accepts almost anything, but a name also ends up in topics, log lines,
#: file names and URIs. Refused: control and bidirectional characters, ``/``, a leading
#: ``-`` or ``.``, and more than 200 characters.
_VM_NAME: Final = re.compile(f"[^{_UNSAFE_CHARS}/.\\-][^{_UNSAFE_CHARS}/]{{0,199}}")
#: Longest task ``id`` (characters).
MAX_TASK_ID: Final = 256
#: Host names (and IPv4/IPv6 literals) as they go into ``<driver>+<transport>://<host>/``:
#: nothing that could add a path, a query (``?command=...``) or credentials to the URI.
_HOST: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\]")
_DRIVER: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
#: libvirt transports that reach a remote daemon. ``ext`` (runs a program) and ``unix`` are
#: refused: a task must never make libvirt execute something on the host.
TRANSPORTS: Final = ("ssh", "libssh", "libssh2", "tcp", "tls")
#: A disk's target dev as ``migrate-disks`` names it (``vda``, ``sdb``, ``hdc``, ``xvda``):
#: a lowercase letter, then lowercase letters and digits, 32 characters at most.
_DISK_TARGET: Final = re.compile(r"[a-z][a-z0-9]{0,31}")
#: Most entries of ``migrate-disks`` (QEMU guests have far fewer disks).
MAX_MIGRATE_DISKS: Final = 64


_TASK_ID_EXPECTED: Final = (
    f"expected an id of at most {MAX_TASK_ID} characters without control or bidirectional "
    "characters"
)


def valid_task_id(task_id: str) -> bool:
    """A task id can be echoed, remembered and shown: bounded, no control characters."""
    return len(task_id) <= MAX_TASK_ID and _UNSAFE.search(task_id) is None


def valid_vm_name(name: str) -> bool:
    return _VM_NAME.fullmatch(name) is not None


def valid_host(host: str) -> bool:
    """A host name (or address literal) that can go into a libvirt URI as its host part."""
    return _HOST.fullmatch(host) is not None


def valid_disk_target(name: str) -> bool:
    """A ``migrate-disks`` entry: a target dev such as ``vda`` (see :data:`_DISK_TARGET`)."""
    return _DISK_TARGET.fullmatch(name) is not None


_DISK_TARGET_EXPECTED: Final = (
    "expected a disk target such as vda (a-z then a-z or 0-9, at most 32 characters)"
)


_VM_NAME_EXPECTED: Final = (
    "expected a VM name (1-200 characters, no control or bidirectional characters, no '/')"
)
