"""Two real libvirtd "hosts" on one machine, for live-migration tests: the :class:`Rig` (a
session: bring-up, teardown, the rig lock and the guard) and each :class:`Host`.

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
veth only; :mod:`rig.network` has the namespaces, the veth and "loopback" mode (``RIG_NETNS=0``).

Storage: each host has its own ``/var/lib/libvirt/images`` (under its own ``/var``, see
:mod:`rig.daemons`) and :meth:`Rig.up` gives it a ``dir`` pool named ``default`` over it
(persistent, autostart), as a real host has; ``rig.storage`` has the helpers for images in it,
:meth:`Host.outside` maps a host's path to the root namespace and :meth:`Host.enter` runs a
program in the host's mount namespace.

The parts, each with the pitfalls it handles (each one was hit while building the reference
rig): :mod:`rig.system` (what the machine needs, the ``libvirt-qemu`` user), :mod:`rig.network`
(namespaces and veth), :mod:`rig.daemons` (each libvirtd: its configuration and namespaces,
tini), :mod:`rig.processes` (the sweep that kills a rig's processes) and :mod:`rig.guard` (the
process that sweeps when the owner dies). Pitfalls handled here:

* Unix socket paths are limited to 107 bytes: checked up front with a clear error.
* Ctrl-C: the daemons run in their own session, so a terminal's SIGINT does not hit them
  half-way; teardown kills them in order, and a second SIGINT during teardown is deferred.
* A guard process (``rig/guard.py`` run as a script) holds the rig lock together with the owner
  and sweeps when the owner dies without calling :meth:`Rig.down` (SIGKILL, ``os._exit``).
  The lock (``flock``) makes concurrent sessions wait instead of sweeping each other away.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from rig.daemons import _default_pool, _probe, start_libvirtd, wait_ready, write_host_dir
from rig.network import _PLANS, VETH, _Plan, check_links, make_network
from rig.processes import (
    MARKER,
    NETNS_DIR,
    RigProcess,
    _sigint_deferred,
    alive,
    rig_processes,
    sweep,
)
from rig.system import _HIDDEN, RigError, RigUnavailable, check_visible, ensure_system, which

__all__ = [
    "Rig",
    "Host",
    "RigError",
    "RigUnavailable",
    "RigProcess",
    "LOCK_PATH",
    "MARKER",
    "NETNS_DIR",
    "VETH",
    "alive",
    "check_visible",
    "ensure_system",
    "rig_processes",
    "sweep",
]

#: One rig per machine at a time (fixed namespace names, addresses and ports).
LOCK_PATH = Path("/run/lock/asyncmigfra-rig.lock")
_SUN_PATH_MAX = 107
#: The guard's script (see :meth:`Rig._start_guard`).
_GUARD_SCRIPT = Path(__file__).with_name("guard.py")


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
            self.mode, self.fallback_reason = make_network(self.netns_wanted)
            t2 = time.monotonic()
            self.hosts = tuple(self._prepare(plan) for plan in _PLANS)
            for host in self.hosts:
                self._spawn(host)
            wait_ready(self.hosts, self._spawned_at, self.ready_timeout, self.mode)
            check_links(self.a, self.b)
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
                [sys.executable, "-I", str(_GUARD_SCRIPT), "guard", str(self.statedir)],
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
        write_host_dir(host, self.statedir, netns=netns)
        return host

    def _spawn(self, host: Host) -> None:
        cache = ""
        if self.cachedir:
            cache_dir = self.cachedir / host.name
            self.cold = self.cold and not any(cache_dir.glob("qemu/capabilities/*.xml"))
            cache_dir.mkdir(parents=True, exist_ok=True)
            cache = str(cache_dir)
        start_libvirtd(host, self.statedir, cache)
        self._spawned_at[host.name] = time.monotonic()

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
