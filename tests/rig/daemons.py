"""One rig host's libvirtd: its own directory tree and configuration, starting it in its own
mount and UTS namespaces (and network namespace) under tini, and waiting until it answers.

Pitfalls handled here (each one was hit while building the reference rig):

* Zombies: QEMU daemonises, so its parent becomes the nearest subreaper. On the CI machine kind
  PID 1 reaps only about once a second, and libvirt's ``virProcessKillPainfully`` sees a zombie
  as alive: every destroy and every migration's end took 1.2-1.6 s longer and a cold libvirtd
  start 8 s instead of 1.6 s. ``tini -s`` as libvirtd's parent is a subreaper that reaps at once.
* Each daemon gets its own ``/etc/libvirt`` (libvirtd.conf with a distinct ``host_uuid``:
  libvirt refuses to migrate between hosts with the same UUID), ``/run`` (sockets, pid files;
  hiding the real ``/run`` also hides systemd and D-Bus from libvirtd), ``/var`` (domain state,
  logs), ``/etc/hosts`` (rig-a/rig-b resolve without DNS; without it libvirtd logs a failed
  ``getaddrinfo`` on every migration) and an empty ``/etc/resolv.conf``. All are bind mounts
  inside a private mount namespace: the real ``/etc``, ``/run`` and ``/var`` are never written.
  Consequence: paths the hosts must see (state dir, guest kernels, cache) must not be under
  ``/run`` or ``/var`` (:func:`rig.system.check_visible`).
* ``qemu.conf``: QEMU runs as root with no cgroups, no per-VM namespaces, no security driver
  and no virtlogd (``stdio_handler = "file"``), so no system service is needed.
* The daemons run in their own session, so a terminal's SIGINT does not hit them half-way.
* libvirtd creates its socket before it listens on it (see :func:`_listening`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rig.network import _PLANS
from rig.processes import MARKER
from rig.storage import ensure_pool
from rig.system import _PATH, RigError, which
from rig.tls import CERT_DIR, issue_host_certs, make_ca

if TYPE_CHECKING:
    from rig.hosts import Host

# Runs inside the new mount + UTS namespaces (and the host's netns), then becomes tini.
# $1 host dir, $2 hostname, $3 capabilities cache dir or "". `unshare --propagation private`
# keeps these bind mounts from propagating back to the root namespace (where / is usually a
# shared mount). The bind targets in /etc come first, while the real /run (where
# /etc/resolv.conf may point) is still visible; /run and /var hide the originals for good.
_HOST_INIT = r"""
set -eu
dir=$1 name=$2 cache=$3
printf '%s' "$name" > /proc/sys/kernel/hostname
mount --bind "$dir/etc/hosts" /etc/hosts
if [ -e /etc/resolv.conf ]; then mount --bind "$dir/etc/resolv.conf" /etc/resolv.conf; fi
mount --bind "$dir/etc/libvirt" /etc/libvirt
mount --bind "$dir/run" /run
mount --bind "$dir/var" /var
if [ -n "$cache" ]; then mount --bind "$cache" /var/cache/libvirt; fi
exec tini -s -- libvirtd --listen --pid-file /run/libvirtd.pid \
    --config "$dir/etc/libvirt/libvirtd.conf"
"""


def _libvirtd_conf(host: Host) -> str:
    return f"""\
# {host.name}: written by tests/rig/daemons.py. TCP without auth is fine: the address exists
# only inside the rig's namespaces (or on 127.0.0.x in loopback mode).
listen_tls = 0
listen_tcp = 1
listen_addr = "{host.ip}"
tcp_port = "{host.tcp_port}"
auth_tcp = "none"
auth_unix_rw = "none"
auth_unix_ro = "none"
host_uuid = "{host.uuid}"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""


def _qemu_conf(host: Host) -> str:
    low, high = host.migration_ports
    return f"""\
# {host.name}: written by tests/rig/daemons.py. QEMU runs as root (the libvirt-qemu user must
# still exist); no cgroups, security driver, per-VM namespaces or virtlogd.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
# incoming migrations listen on, and are advertised as, this host's address; distinct port
# ranges keep both hosts apart in loopback mode
migration_address = "{host.ip}"
migration_host = "{host.ip}"
migration_port_min = {low}
migration_port_max = {high}
# VIR_MIGRATE_TLS (and the NBD stream of a storage copy): tests/rig/tls.py, verified peers
migrate_tls_x509_cert_dir = "/etc/libvirt/pki/qemu"
migrate_tls_x509_verify = 1
"""


def write_host_dir(host: Host, statedir: Path, *, netns: bool) -> None:
    """Create ``host``'s own directory tree (its ``/etc``, ``/run`` and ``/var``), afresh: its
    libvirt configuration, TLS certificates (from the rig's CA in ``statedir``) and
    ``/etc/hosts``."""
    shutil.rmtree(host.dir, ignore_errors=True)
    for sub in (
        "etc/libvirt", "run/libvirt", "var/lib/libvirt/qemu", "var/lib/libvirt/images",
        "var/log/libvirt/qemu", "var/cache/libvirt", "var/tmp",
    ):  # fmt: skip
        (host.dir / sub).mkdir(parents=True)
    (host.dir / "var/run").symlink_to("/run")
    (host.dir / "var/lock").symlink_to("/run/lock")
    etc = host.dir / "etc"
    (etc / "libvirt/libvirtd.conf").write_text(_libvirtd_conf(host))
    (etc / "libvirt/qemu.conf").write_text(_qemu_conf(host))
    issue_host_certs(_ca(statedir), host.dir / CERT_DIR.lstrip("/"), host.name, host.ip)
    (etc / "libvirt/libvirt.conf").write_text('uri_default = "qemu:///system"\n')
    hosts = "".join(f"{p.netns_ip if netns else p.loopback_ip}\t{p.name}\n" for p in _PLANS)
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n{hosts}")
    (etc / "resolv.conf").write_text("# empty on purpose: no DNS inside the rig\n")


def _ca(statedir: Path) -> tuple[Path, Path]:
    """The rig's CA (made once per bring-up, in the state dir)."""
    directory = statedir / "ca"
    if not (directory / "ca-cert.pem").exists():
        return make_ca(directory)
    return directory / "ca-cert.pem", directory / "ca-key.pem"


def start_libvirtd(host: Host, statedir: Path, cache: str) -> None:
    """Start ``host``'s libvirtd (under tini, in its namespaces; ``host.proc`` is tini), marked
    as a daemon of the rig in ``statedir``; ``cache`` is its capabilities cache dir or ``""``."""
    prefix = [which("ip") or "ip", "netns", "exec", host.netns] if host.netns else []
    cmd = [
        *prefix,
        which("unshare") or "unshare", "--mount", "--uts", "--propagation", "private",
        "--", "/bin/sh", "-c", _HOST_INIT, "rig-host-init", str(host.dir), host.name, cache,
    ]  # fmt: skip
    env = dict(os.environ, LC_ALL="C", PATH=_PATH)
    env[MARKER] = str(statedir)
    with (host.dir / "libvirtd.out").open("wb") as out:
        host.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def wait_ready(
    hosts: Sequence[Host], spawned_at: dict[str, float], ready_timeout: float, mode: str
) -> None:
    """Wait for the daemons in parallel: each must answer with its hostname and UUID.

    Sets each host's ``ready_seconds`` (since ``spawned_at[host.name]``).
    """
    deadline = time.monotonic() + ready_timeout
    errors: dict[str, BaseException] = {}

    def probe(host: Host) -> None:
        try:
            _probe(host, deadline)
            host.ready_seconds = time.monotonic() - spawned_at[host.name]
        except BaseException as exc:
            errors[host.name] = exc

    threads = [
        threading.Thread(target=probe, args=(h,), name=f"rig-probe-{h.name}", daemon=True)
        for h in hosts
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 1.0)
    for host, t in zip(hosts, threads, strict=True):
        if t.is_alive():
            errors[host.name] = RigError(f"no answer within {ready_timeout:.0f} s")
    if errors:
        by_name = {h.name: h for h in hosts}
        detail = "\n".join(f"{name}: {exc}\n{_tail(by_name[name])}" for name, exc in errors.items())
        raise RigError(f"rig hosts did not come up ({mode} mode):\n{detail}")


def _listening(path: Path) -> bool:
    """True once a unix socket accepts connections.

    libvirtd creates the socket file with bind() and calls listen() a little later; in between,
    connecting fails with "Connection refused" (seen in about 1 of 20 starts).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _probe(host: Host, deadline: float) -> None:
    import libvirt  # noqa: PLC0415 - the rig module itself must import without the bindings

    assert host.proc is not None
    while not _listening(host.socket):
        if host.proc.poll() is not None:
            raise RigError(f"libvirtd exited with {host.proc.returncode}")
        if time.monotonic() > deadline:
            raise RigError("libvirt socket not listening")
        time.sleep(0.01)
    # Connecting works before the drivers are initialised (the connection waits in the listen
    # backlog); libvirtd answers the open only once they are, so this blocks for the QEMU
    # capability probe on a cold start.
    conn = libvirt.open(host.local_uri)
    try:
        hostname = conn.getHostname()
        caps = conn.getCapabilities()
    finally:
        conn.close()
    if hostname != host.name:
        raise RigError(f"hostname is {hostname!r}, expected {host.name!r}")
    if f"<uuid>{host.uuid}</uuid>" not in caps:
        raise RigError(f"host UUID is not {host.uuid}")


def _default_pool(host: Host) -> None:
    """Give ``host`` the ``default`` dir pool over its ``/var/lib/libvirt/images`` (persistent,
    started, autostart), unless it has it already (a restarted daemon keeps it)."""
    import libvirt  # noqa: PLC0415

    conn = libvirt.open(host.local_uri)
    try:
        ensure_pool(conn)
    finally:
        conn.close()


def _tail(host: Host, lines: int = 15) -> str:
    out = []
    for path in (host.dir / "libvirtd.out", host.log):
        with contextlib.suppress(OSError):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path}\n" + "\n".join(text))
    return "\n".join(out)
