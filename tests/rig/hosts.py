"""Two real libvirtd "hosts" on one machine, for live-migration tests.

Topology (default, "netns" mode)::

    root namespaces: pytest, the controller (the agent under test), the guard process
        |  unix sockets are files, so they cross network namespaces:
        |  qemu+unix:///system?socket=<state>/rig-a/run/libvirt/libvirt-sock
    +---------------------------+             +---------------------------+
    | rig-a  netns amfrig-a     |   veth      | rig-b  netns amfrig-b     |
    | 10.200.0.1, libvirtd:16509|=============| 10.200.0.2, libvirtd:16510|
    | own mount + UTS namespace |  rig0/rig0  | own mount + UTS namespace |
    +---------------------------+             +---------------------------+

libvirtd <-> libvirtd (peer-to-peer migration) and QEMU <-> QEMU (the RAM stream) talk over the
veth only. The 10.200.0.0/24 addresses exist only inside the two namespaces: there is no route
to or from the root namespace and no default route, so nothing can leave the machine.

"loopback" mode (``RIG_NETNS=0``, or automatically when ``ip netns add`` or the veth fails):
both daemons stay in the root network namespace on 127.0.0.2 and 127.0.0.3, still each in its
own mount and UTS namespace. 127.0.0.1 itself cannot be used: libvirt's QEMU driver refuses it
as ``migration_host``/``migration_address`` ("must not be the address of the local machine").

Storage: each host has its own ``/var/lib/libvirt/images`` (under its own ``/var``, see below)
and :meth:`Rig.up` gives it a ``dir`` pool named ``default`` over it (persistent, autostart), as
a real host has; ``rig.storage`` has the helpers for images in it, :meth:`Host.outside` maps a
host's path to the root namespace and :meth:`Host.enter` runs a program in the host's mount
namespace.

Pitfalls this module handles (each one was hit while building the reference rig):

* The QEMU driver resolves its compiled-in default user ``libvirt-qemu`` *before* reading
  ``qemu.conf`` (which says ``user = "root"``) and refuses to initialise if it does not exist.
  Debian creates it in libvirt-daemon-system's postinst, which we do not install (it pulls in
  systemd); :func:`ensure_system` creates it the same way.
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
  ``/run`` or ``/var``.
* ``qemu.conf``: QEMU runs as root with no cgroups, no per-VM namespaces, no security driver
  and no virtlogd (``stdio_handler = "file"``), so no system service is needed.
* Unix socket paths are limited to 107 bytes: checked up front with a clear error.
* Ctrl-C: the daemons run in their own session, so a terminal's SIGINT does not hit them
  half-way; teardown kills them in order, and a second SIGINT during teardown is deferred.
* Teardown does not depend on bookkeeping that a crash can lose. Every rig daemon carries the
  ``ASYNCMIGFRA_RIG=<state dir>`` environment variable; teardown kills the marked processes,
  every process in their mount namespaces (QEMU, whose environment libvirt scrubs) and every
  process in the rig's network namespaces, then deletes the namespaces. The same sweep runs
  (for any state dir) when a rig comes up, so a SIGKILLed earlier run is cleaned.
* A guard process (this file run as a script) holds the rig lock together with the owner and
  sweeps when the owner dies without calling :meth:`Rig.down` (SIGKILL, ``os._exit``).
  The lock (``flock``) makes concurrent sessions wait instead of sweeping each other away.
* A graceful libvirtd shutdown takes about 2 s and buys nothing, since the state is throwaway:
  teardown uses SIGKILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = [
    "Rig",
    "Host",
    "RigError",
    "RigUnavailable",
    "RigProcess",
    "MARKER",
    "alive",
    "check_visible",
    "ensure_system",
    "rig_processes",
    "sweep",
]

#: Environment variable that marks every daemon of a rig; its value is the rig's state dir.
MARKER = "ASYNCMIGFRA_RIG"
#: One rig per machine at a time (fixed namespace names, addresses and ports).
LOCK_PATH = Path("/run/lock/asyncmigfra-rig.lock")
NETNS_DIR = Path("/run/netns")
QEMU_USER = "libvirt-qemu"
SUBNET_PREFIX = 24
VETH = "rig0"
_SUN_PATH_MAX = 107
_HIDDEN = (Path("/run"), Path("/var"))


class RigUnavailable(RuntimeError):
    """The machine cannot run the rig (not root, a package missing): callers may skip."""


class RigError(RuntimeError):
    """The rig failed to come up or to go down: always a real error."""


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


@dataclass
class Host:
    """One running libvirtd "host" and how to reach it.

    ``local_uri`` is for the controller in the root namespace; ``p2p_uri`` is how the *other*
    libvirtd reaches this one (peer-to-peer migration); ``migrate_uri`` is where QEMU's
    migration stream goes (``VIR_MIGRATE_PARAM_URI``).
    """

    name: str
    ip: str
    tcp_port: int
    uuid: str
    dir: Path
    netns: str | None
    migration_ports: tuple[int, int]
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    ready_seconds: float = 0.0

    @property
    def socket(self) -> Path:
        return self.dir / "run/libvirt/libvirt-sock"

    @property
    def local_uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def p2p_uri(self) -> str:
        return f"qemu+tcp://{self.ip}:{self.tcp_port}/system"

    @property
    def migrate_uri(self) -> str:
        return f"tcp://{self.ip}"

    @property
    def log(self) -> Path:
        """libvirtd's own log (warnings and errors)."""
        return self.dir / "var/log/libvirt/libvirtd.log"

    def qemu_log(self, domain: str) -> Path:
        """QEMU's stderr and command line for ``domain`` on this host."""
        return self.dir / "var/log/libvirt/qemu" / f"{domain}.log"

    def outside(self, path: str) -> Path:
        """Where ``path``, a path *inside* this host under its own ``/var`` or ``/run``, is
        seen from the root namespace (e.g. ``/var/lib/libvirt/images/x.qcow2``)."""
        inside = Path(path)
        if not any(inside == h or h in inside.parents for h in _HIDDEN):
            raise ValueError(f"{path} is not under the host's own /var or /run")
        return self.dir / inside.relative_to("/")

    def enter(self) -> list[str]:
        """Command prefix that runs a program in this host's mount namespace, where the host's
        own ``/var`` and ``/run`` are mounted (e.g. to open a qcow2 image whose backing file
        is an absolute ``/var/lib/libvirt/images/...`` path). Only the mount namespace: the
        program stays in the root network namespace."""
        assert self.proc is not None, "the rig is not up"
        # tini: `ip netns exec`, `unshare` and the init script exec into it, so the Popen's
        # PID is a process of the host's mount namespace
        return [which("nsenter") or "nsenter", "-t", str(self.proc.pid), "-m", "--"]

    def serial_log(self, domain: str) -> Path:
        """Where a guest's serial output lands, if it was defined with
        ``domain_xml(..., serial_log=f"/var/log/libvirt/qemu/{domain}.serial")`` (the path
        inside the host; this is the same file seen from outside)."""
        return self.dir / "var/log/libvirt/qemu" / f"{domain}.serial"


# --------------------------------------------------------------------------- system checks

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


# --------------------------------------------------------------------------- process sweep


@dataclass(frozen=True)
class _ProcInfo:
    pid: int
    ppid: int
    mnt: str
    net: int
    marker: str | None


def _ns_inode(link: str) -> int:
    # "net:[4026531840]" -> 4026531840
    return int(link.rsplit("[", 1)[1].rstrip("]"))


def _processes() -> Iterator[_ProcInfo]:
    """All live processes with their namespaces and rig marker (zombies have none: skipped)."""
    prefix = f"{MARKER}=".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            mnt = os.readlink(f"/proc/{entry.name}/ns/mnt")
            net = _ns_inode(os.readlink(f"/proc/{entry.name}/ns/net"))
            env = Path(f"/proc/{entry.name}/environ").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # gone, a zombie, or a kernel thread
        marker = next(
            (
                v[len(prefix) :].decode(errors="replace")
                for v in env.split(b"\0")
                if v.startswith(prefix)
            ),
            None,
        )
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        yield _ProcInfo(int(entry.name), ppid, mnt, net, marker)


def alive(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie (a zombie holds no namespace or resource)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _netns_inodes(names: Iterable[str]) -> set[int]:
    inodes = set()
    for name in names:
        with contextlib.suppress(OSError):
            inodes.add(os.stat(NETNS_DIR / name).st_ino)
    return inodes


@dataclass(frozen=True)
class RigProcess:
    """A process of a rig: its parent and whether it carries the marker (tini, libvirtd)."""

    ppid: int
    marked: bool


def rig_processes(markers: Collection[str] | None, netns: Iterable[str]) -> dict[int, RigProcess]:
    """The rig's processes by PID.

    A process belongs to the rig if it carries the marker (for ``markers=None``: any value),
    shares a mount namespace with such a process (QEMU: libvirt scrubs its environment), or
    lives in one of the ``netns`` network namespaces. Our own (root) mount and network
    namespaces are never used as a criterion: a just-forked child is briefly marked while still
    in them, and selecting by them would kill the whole machine.
    """
    own_mnt = os.readlink("/proc/self/ns/mnt")
    own_net = _ns_inode(os.readlink("/proc/self/ns/net"))
    procs = list(_processes())
    marked = {
        p.pid for p in procs if p.marker is not None and (markers is None or p.marker in markers)
    }
    mnts = {p.mnt for p in procs if p.pid in marked} - {own_mnt}
    nets = _netns_inodes(netns) - {own_net}
    spared = {1, os.getpid(), os.getppid()}
    return {
        p.pid: RigProcess(p.ppid, p.pid in marked)
        for p in procs
        if (p.pid in marked or p.mnt in mnts or p.net in nets) and p.pid not in spared
    }


def sweep(
    markers: Collection[str] | None, netns: Iterable[str], timeout: float = 15.0
) -> list[int]:
    """SIGKILL every rig process (see :func:`rig_processes`) and delete the ``netns``.

    Order matters because of zombies. QEMU and libvirtd are both children of tini, the
    subreaper, and tini exits as soon as libvirtd does: so QEMU (unmarked) goes first, while
    tini is there to reap it at once, then libvirtd, then whatever is left. A zombie passed to
    PID 1 instead lingers for about a second here. Repeats until nothing is left, since a dying
    libvirtd may have forked meanwhile. Returns the PIDs killed. Deleting a network namespace
    also deletes the veth end inside it, and so the pair.
    """
    netns = list(netns)
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while found := rig_processes(markers, netns):
        children = {pid for pid, p in found.items() if p.ppid in found}
        victims = {pid for pid in children if not found[pid].marked} or children or set(found)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed.extend(sorted(victims))
        while any(alive(p) for p in victims):
            if time.monotonic() > deadline:
                raise RigError(f"rig processes survive SIGKILL: {sorted(victims)}")
            time.sleep(0.005)
        # let the parent (tini: milliseconds) reap them before it is killed in turn; bounded,
        # since the parent may be PID 1 or a busy libvirtd
        reaped_by = time.monotonic() + 0.25
        while time.monotonic() < reaped_by and any(
            Path(f"/proc/{p}").exists() and alive(found[p].ppid) for p in victims
        ):
            time.sleep(0.005)
    for name in netns:
        if (NETNS_DIR / name).exists():
            _run(["ip", "netns", "delete", name])
    return killed


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold SIGINT (a second Ctrl-C) until the block is done; it is delivered afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# --------------------------------------------------------------------------- configuration

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
# {host.name}: written by tests/rig/hosts.py. TCP without auth is fine: the address exists
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
# {host.name}: written by tests/rig/hosts.py. QEMU runs as root (the libvirt-qemu user must
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


# --------------------------------------------------------------------------- the rig


class Rig:
    """Two libvirtd hosts, ``rig-a`` and ``rig-b``; see the module docstring.

    ``statedir`` holds everything per host (configs, sockets, domain state, logs); it is wiped
    and recreated by :meth:`up`. ``cachedir`` (optional, may be shared by later sessions) keeps
    each libvirtd's QEMU capabilities cache: a cold libvirtd probes QEMU for about 1.6 s.
    ``netns``: ``True`` requires namespaces, ``False`` forces loopback mode, ``None`` (default)
    reads ``RIG_NETNS`` (``0``/``1``) and otherwise tries namespaces and falls back.

    :meth:`up` and :meth:`down` are idempotent; the context manager calls both.
    """

    def __init__(
        self,
        statedir: Path,
        *,
        cachedir: Path | None = None,
        netns: bool | None = None,
        ready_timeout: float = 60.0,
        lock_timeout: float = 45.0,
    ) -> None:
        self.statedir = statedir.absolute()
        self.cachedir = cachedir.absolute() if cachedir else None
        if netns is None and os.environ.get("RIG_NETNS") in {"0", "1"}:
            netns = os.environ["RIG_NETNS"] == "1"
        self.netns_wanted = netns
        self.ready_timeout = ready_timeout
        self.lock_timeout = lock_timeout
        self.mode = "down"
        self.fallback_reason: str | None = None
        self.cold = True
        self.hosts: tuple[Host, ...] = ()
        self.timings: dict[str, float] = {}
        self.stale_killed: list[int] = []
        self._lock_fd: int | None = None
        self._guard: subprocess.Popen[bytes] | None = None
        self._guard_w: int | None = None
        self._netns_created: list[str] = []
        self._spawned_at: dict[str, float] = {}

    # -- public API ---------------------------------------------------------------------

    @property
    def a(self) -> Host:
        return self.hosts[0]

    @property
    def b(self) -> Host:
        return self.hosts[1]

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    @property
    def guard_pid(self) -> int | None:
        return self._guard.pid if self._guard else None

    @property
    def is_up(self) -> bool:
        return self._lock_fd is not None

    def __enter__(self) -> Rig:
        return self.up()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    def up(self) -> Rig:
        """Bring both hosts up and wait until each answers over its socket (bounded)."""
        if self.is_up:
            return self
        ensure_system()
        check_visible(self.statedir, "rig state dir")
        if self.cachedir:
            check_visible(self.cachedir, "rig cache dir")
        longest = self.statedir / "rig-a/run/libvirt/libvirt-sock"
        if len(str(longest)) > _SUN_PATH_MAX:
            raise RigError(f"state dir path too long for a unix socket: {longest}")
        t0 = time.monotonic()
        self.cold, self.fallback_reason, self.timings = True, None, {}
        try:
            self._take_lock()
            t_lock = time.monotonic()
            self._start_guard()
            # Anything marked or in our namespaces now belongs to a dead session: we hold the lock.
            self.stale_killed = sweep(None, [p.netns for p in _PLANS])
            t1 = time.monotonic()
            self.mode = self._make_network()
            t2 = time.monotonic()
            self.hosts = tuple(self._prepare(plan) for plan in _PLANS)
            for host in self.hosts:
                self._spawn(host)
            self._wait_ready()
            self._check_links()
            for host in self.hosts:
                _default_pool(host)
            t3 = time.monotonic()
            self.timings.update(
                lock=t_lock - t0, sweep=t1 - t_lock, network=t2 - t1, daemons=t3 - t2, up=t3 - t0
            )
            self._describe()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Kill everything of this rig and delete its namespaces; safe to call at any time."""
        if not self.is_up:
            return
        t0 = time.monotonic()
        with _sigint_deferred():
            try:
                sweep([str(self.statedir)], [p.netns for p in _PLANS])
                for host in self.hosts:
                    if host.proc is not None:
                        # tini, our child: dead by now, only to be reaped
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            host.proc.wait(timeout=5)
                        host.proc = None
                self._stop_guard(done=True)
            finally:
                self._stop_guard(done=False)  # no-op unless the sweep failed: the guard retries
                self._release_lock()
                self.mode = "down"
        self.timings["down"] = time.monotonic() - t0

    def restart_daemon(self, host: Host, *, timeout: float = 30.0) -> None:
        """Restart one host's libvirtd (SIGTERM, then start it again), as an operator or a
        package upgrade would. Guests keep running; the new daemon reconnects to them."""
        assert host.proc is not None, "the rig is not up"
        host.proc.terminate()  # tini forwards it to libvirtd and exits with it
        try:
            host.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            host.proc.kill()
            host.proc.wait(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            host.socket.unlink()
        self._spawn(host)
        _probe(host, time.monotonic() + timeout)
        _default_pool(host)

    # -- locking and the guard -------------------------------------------------------------

    def _take_lock(self) -> None:
        LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    holder = LOCK_PATH.read_text().strip() or "?"
                    raise RigError(
                        f"another rig is up on this machine (lock {LOCK_PATH}: {holder}); "
                        f"waited {self.lock_timeout:.0f} s"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} state {self.statedir}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the guard, if alive, still holds it
            self._lock_fd = None

    def _start_guard(self) -> None:
        """Start a process that sweeps this rig if we die without :meth:`down`.

        It inherits the lock (same open file description), so a new session cannot start
        before the guard has finished cleaning. It waits for EOF on a pipe: that happens when
        we close it or when we die, however we die.
        """
        assert self._lock_fd is not None
        self.statedir.mkdir(parents=True, exist_ok=True)
        read_end, self._guard_w = os.pipe()
        env = {k: v for k, v in os.environ.items() if k != MARKER}
        with (self.statedir / "guard.log").open("ab") as log:
            self._guard = subprocess.Popen(
                [sys.executable, "-I", __file__, "guard", str(self.statedir)],
                stdin=read_end,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(self._lock_fd,),
                start_new_session=True,
                env=env,
            )
        os.close(read_end)

    def _stop_guard(self, *, done: bool) -> None:
        if self._guard_w is not None:
            with contextlib.suppress(OSError):
                if done:
                    os.write(self._guard_w, b"done")
            os.close(self._guard_w)
            self._guard_w = None
        if self._guard is not None:
            try:
                self._guard.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._guard.kill()
                self._guard.wait()
            self._guard = None

    # -- bring-up steps -----------------------------------------------------------------------

    def _make_network(self) -> str:
        """Create the namespaces and veth (netns mode), or explain why not (loopback mode)."""
        if self.netns_wanted is False:
            self.fallback_reason = "RIG_NETNS=0"
            return "loopback"
        a, b = _PLANS
        try:
            for plan in _PLANS:
                _run(["ip", "netns", "add", plan.netns])
                self._netns_created.append(plan.netns)
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
            if self.netns_wanted:
                raise
            sweep(None, self._netns_created)
            self.fallback_reason = str(exc)
            return "loopback"
        finally:
            self._netns_created.clear()
        return "netns"

    def _prepare(self, plan: _Plan) -> Host:
        netns = self.mode == "netns"
        host = Host(
            name=plan.name,
            ip=plan.netns_ip if netns else plan.loopback_ip,
            tcp_port=plan.tcp_port,
            uuid=plan.uuid,
            dir=self.statedir / plan.name,
            netns=plan.netns if netns else None,
            migration_ports=plan.migration_ports,
        )
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
        from rig.tls import CERT_DIR, issue_host_certs  # noqa: PLC0415 - see _default_pool

        issue_host_certs(self._ca(), host.dir / CERT_DIR.lstrip("/"), host.name, host.ip)
        (etc / "libvirt/libvirt.conf").write_text('uri_default = "qemu:///system"\n')
        hosts = "".join(f"{p.netns_ip if netns else p.loopback_ip}\t{p.name}\n" for p in _PLANS)
        (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n{hosts}")
        (etc / "resolv.conf").write_text("# empty on purpose: no DNS inside the rig\n")
        return host

    def _ca(self) -> tuple[Path, Path]:
        """The rig's CA (made once per bring-up, in the state dir)."""
        from rig.tls import make_ca  # noqa: PLC0415 - see _default_pool

        directory = self.statedir / "ca"
        if not (directory / "ca-cert.pem").exists():
            return make_ca(directory)
        return directory / "ca-cert.pem", directory / "ca-key.pem"

    def _spawn(self, host: Host) -> None:
        cache = ""
        if self.cachedir:
            cache_dir = self.cachedir / host.name
            self.cold = self.cold and not any(cache_dir.glob("qemu/capabilities/*.xml"))
            cache_dir.mkdir(parents=True, exist_ok=True)
            cache = str(cache_dir)
        prefix = [which("ip") or "ip", "netns", "exec", host.netns] if host.netns else []
        cmd = [
            *prefix,
            which("unshare") or "unshare", "--mount", "--uts", "--propagation", "private",
            "--", "/bin/sh", "-c", _HOST_INIT, "rig-host-init", str(host.dir), host.name, cache,
        ]  # fmt: skip
        env = dict(os.environ, LC_ALL="C", PATH=_PATH)
        env[MARKER] = str(self.statedir)
        with (host.dir / "libvirtd.out").open("wb") as out:
            host.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._spawned_at[host.name] = time.monotonic()

    def _wait_ready(self) -> None:
        """Wait for both daemons in parallel: each must answer with its hostname and UUID."""
        deadline = time.monotonic() + self.ready_timeout
        errors: dict[str, BaseException] = {}

        def probe(host: Host) -> None:
            try:
                _probe(host, deadline)
                host.ready_seconds = time.monotonic() - self._spawned_at[host.name]
            except BaseException as exc:
                errors[host.name] = exc

        threads = [
            threading.Thread(target=probe, args=(h,), name=f"rig-probe-{h.name}", daemon=True)
            for h in self.hosts
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()) + 1.0)
        for host, t in zip(self.hosts, threads, strict=True):
            if t.is_alive():
                errors[host.name] = RigError(f"no answer within {self.ready_timeout:.0f} s")
        if errors:
            detail = "\n".join(
                f"{name}: {exc}\n{_tail(self.host(name))}" for name, exc in errors.items()
            )
            raise RigError(f"rig hosts did not come up ({self.mode} mode):\n{detail}")

    def _check_links(self) -> None:
        """Each host must reach the other's libvirtd over the rig network (the p2p path)."""
        for src, dst in ((self.a, self.b), (self.b, self.a)):
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

    def _describe(self) -> None:
        """Write ``rig.json`` in the state dir: what is running where, for humans and tools."""
        info = {
            "mode": self.mode,
            "fallback_reason": self.fallback_reason,
            "cold": self.cold,
            "timings": self.timings,
            "hosts": [
                {
                    "name": h.name,
                    "ip": h.ip,
                    "uuid": h.uuid,
                    "netns": h.netns,
                    "local_uri": h.local_uri,
                    "p2p_uri": h.p2p_uri,
                    "migrate_uri": h.migrate_uri,
                    "tini_pid": h.proc.pid if h.proc else None,
                }
                for h in self.hosts
            ],
        }
        (self.statedir / "rig.json").write_text(json.dumps(info, indent=2) + "\n")


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
    from rig.storage import ensure_pool  # noqa: PLC0415 - the guard script runs without `rig`

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


# --------------------------------------------------------------------------- the guard


def _guard_main(statedir: str) -> int:
    """Body of the guard process (see :meth:`Rig._start_guard`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the owner
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if sys.stdin.buffer.read() == b"done":
        return 0
    t0 = time.monotonic()
    killed = sweep([statedir], [p.netns for p in _PLANS])
    print(
        f"guard: owner died without teardown; killed {killed} in {time.monotonic() - t0:.2f} s",
        flush=True,
    )
    return 0


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "guard":
        return _guard_main(argv[1])
    if argv == ["sweep"]:
        # manual clean-up after a crash: python tests/rig/hosts.py sweep (refuses if a rig is up)
        fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"a rig is up ({LOCK_PATH}): not sweeping", file=sys.stderr)
            return 1
        print(f"killed {sweep(None, [p.netns for p in _PLANS])}")
        return 0
    print("usage: hosts.py sweep", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
