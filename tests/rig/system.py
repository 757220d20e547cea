"""What the machine must have for the rig, and how the rig runs the machine's commands.

Pitfalls handled here (each one was hit while building the reference rig):

* The QEMU driver resolves its compiled-in default user ``libvirt-qemu`` *before* reading
  ``qemu.conf`` (which says ``user = "root"``) and refuses to initialise if it does not exist.
  Debian creates it in libvirt-daemon-system's postinst, which we do not install (it pulls in
  systemd); :func:`ensure_system` creates it the same way.
* Every rig host replaces ``/run`` and ``/var`` with its own (see :mod:`rig.daemons`): paths the
  hosts must see (state dir, guest kernels, cache) must not be under them
  (:func:`check_visible`).
"""

from __future__ import annotations

import grp
import importlib.util
import os
import pwd
import shutil
import subprocess
from pathlib import Path

QEMU_USER = "libvirt-qemu"
_HIDDEN = (Path("/run"), Path("/var"))


class RigUnavailable(RuntimeError):
    """The machine cannot run the rig (not root, a package missing): callers may skip."""


class RigError(RuntimeError):
    """The rig failed to come up or to go down: always a real error."""


_BINARIES = (
    ("libvirtd", "libvirt-daemon"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("tini", "tini"),
    ("ip", "iproute2"),
    ("unshare", "util-linux"),
    ("mount", "mount"),
    ("bash", "bash"),
    ("as", "binutils"),
    ("ld", "binutils"),
    ("qemu-img", "qemu-utils"),
    ("qemu-io", "qemu-utils"),
    ("nsenter", "util-linux"),
)
_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])


def which(binary: str) -> str | None:
    """``shutil.which`` that also looks in the sbin dirs a non-login root PATH may lack."""
    return shutil.which(binary, path=_PATH)


def _missing_packages() -> list[str]:
    missing = [pkg for binary, pkg in _BINARIES if which(binary) is None]
    drivers = [
        *Path("/usr/lib").glob("*/libvirt/connection-driver/libvirt_driver_qemu.so"),
        *Path("/usr/lib64/libvirt/connection-driver").glob("libvirt_driver_qemu.so"),
    ]
    if not drivers:
        missing.append("libvirt-daemon-driver-qemu")
    return sorted(set(missing))


def ensure_system() -> None:
    """Check what the rig needs and create the ``libvirt-qemu`` user/group if missing.

    Raises :class:`RigUnavailable` naming the missing Debian packages (or pip package, for the
    Python bindings). The user is created like Debian's libvirt-daemon-system postinst does;
    that and an empty ``/etc/libvirt`` (a bind-mount target) are the only changes to the system.
    """
    if os.geteuid() != 0:
        raise RigUnavailable("the rig needs root (network/mount namespaces, libvirtd)")
    problems = []
    missing = _missing_packages()
    if missing:
        problems.append(
            f"missing Debian packages: apt-get install --no-install-recommends {' '.join(missing)}"
        )
    if importlib.util.find_spec("libvirt") is None:
        problems.append(
            "missing Python bindings: pip install libvirt-python==12.8.0 "
            "(builds against Debian's libvirt-dev and pkg-config)"
        )
    if problems:
        raise RigUnavailable("; ".join(problems))
    try:
        grp.getgrnam(QEMU_USER)
    except KeyError:
        _run(["groupadd", "--system", QEMU_USER])
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        _run(
            [
                "useradd", "--system", "--no-create-home", "--home-dir", "/var/lib/libvirt",
                "--shell", "/usr/sbin/nologin", "--gid", QEMU_USER, "--comment", "Libvirt Qemu",
                QEMU_USER,
            ]
        )  # fmt: skip
    Path("/etc/libvirt").mkdir(exist_ok=True)


def _run(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = which(cmd[0]) or cmd[0]
    proc = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RigError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def check_visible(path: Path, what: str) -> None:
    """Refuse paths that rig hosts cannot see (their ``/run`` and ``/var`` are replaced)."""
    path = path.absolute()
    for hidden in _HIDDEN:
        if path == hidden or hidden in path.parents:
            raise RigError(f"{what} {path} is under {hidden}, which every rig host replaces")
