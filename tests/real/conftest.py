"""Fixtures for tests against real libvirtd + QEMU: the project's two-host rig (``tests/rig``).

Fixture API (every test in this directory is marked ``pytest.mark.rig``):

* ``rig`` (session): a :class:`rig.Rig` that is up. ``rig.a`` / ``rig.b`` (or ``rig.hosts``,
  ``rig.host("rig-b")``) are :class:`rig.Host` objects with ``name`` (``rig-a``/``rig-b``),
  ``local_uri`` (for the controller, i.e. the test or the agent, in the root namespace),
  ``p2p_uri`` (how the *other* libvirtd reaches this one), ``migrate_uri`` (QEMU's migration
  stream), ``ip``, ``uuid``, ``log`` and ``qemu_log(domain)``. ``rig.mode`` is ``netns`` or
  ``loopback`` (the 127.0.0.2/127.0.0.3 fallback).
* ``guests`` (session): ``{"idle" | "dirty16" | "dirty64" | "dirty16slow" | "balloon": Path}``,
  the built test kernels (see ``tests/rig/guest.S``).
* ``rig_conns``: ``{host name: libvirt.virConnect}``, opened for the test and closed after it.
* ``start_guest(variant="idle", *, host=None, name=None, memory_mib=128, persistent=True,
  balloon=None, disks=())``: defines and starts a guest (on ``rig.a`` by default) and returns
  its ``virDomain``; every guest it started is destroyed and undefined on *both* hosts
  afterwards, wherever it went. ``balloon``: give it a virtio balloon (default: if the variant
  answers one, i.e. for ``"balloon"``). ``disks``: :class:`rig.Disk` s (images inside the host,
  see ``rig.storage``).
* ``rig_storage``: a :class:`rig.storage.Scratch`: every file that appears in a host's
  ``/var/lib/libvirt/images`` during the test (made by the test, libvirt or an agent) is
  deleted afterwards, and so are the extra pools made with ``rig_storage.pool(...)``. Every
  host has the ``default`` pool over its own ``/var/lib/libvirt/images`` (``Rig.up``).

When the rig cannot run here (not root, a Debian package missing) the tests are skipped with
the reason, except when ``CI`` is set: then they fail, so that a green CI means they ran.

The rig always goes down: at the end of the session (pytest tears session fixtures down on
Ctrl-C too), from ``atexit``, on SIGTERM (turned into KeyboardInterrupt while the rig is up),
and, if pytest is SIGKILLed, from the rig's guard process; the next session sweeps anything
left over at start-up as well.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import pytest

from rig import (
    VARIANTS,
    Disk,
    Host,
    Rig,
    RigUnavailable,
    build_guests,
    domain_xml,
    ensure_system,
    remove_domain,
)
from rig.storage import Scratch

HERE = Path(__file__).resolve().parent
IN_CI = bool(os.environ.get("CI"))
_SUMMARY: list[str] = []


def _unavailable(reason: str) -> NoReturn:
    if IN_CI:
        pytest.fail(f"the rig is required in CI: {reason}", pytrace=False)
    pytest.skip(f"rig unavailable: {reason}")


def cache_dir() -> Path:
    """Where guest kernels and libvirtd's QEMU capabilities cache live across sessions.

    Under /tmp by default (``RIG_CACHE`` overrides it): it must be visible inside the rig's
    hosts, which replace ``/run`` and ``/var``. Only our own, private directory is used.
    """
    path = Path(os.environ.get("RIG_CACHE") or Path(tempfile.gettempdir()) / "asyncmigfra-rig")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if path.is_symlink() or st.st_uid != os.geteuid():
        raise RuntimeError(f"{path} is not a directory of ours; set RIG_CACHE")
    return path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.rig)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _SUMMARY:
        terminalreporter.write_sep("-", "rig")
        for line in _SUMMARY:
            terminalreporter.write_line(line)


def _note(rig: Rig, event: str) -> None:
    t = rig.timings
    if event == "up":
        ready = ", ".join(f"{h.name} {h.ready_seconds:.2f} s" for h in rig.hosts)
        why = f" ({rig.fallback_reason})" if rig.fallback_reason else ""
        _SUMMARY.append(
            f"rig up ({'cold' if rig.cold else 'warm'} capabilities cache, {rig.mode} mode{why}):"
            f" {t['up']:.2f} s [lock wait {t['lock']:.2f}, sweep {t['sweep']:.2f},"
            f" network {t['network']:.2f}; {ready}]"
            + (f"; swept {len(rig.stale_killed)} stale processes" if rig.stale_killed else "")
        )
    else:
        _SUMMARY.append(f"rig down: {t['down']:.2f} s")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While the rig is up, SIGTERM (a CI runner cancelling us) unwinds like Ctrl-C does."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture(scope="session")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """Both rig hosts, up once for the session; always torn down (see the module docstring)."""
    try:
        ensure_system()
    except RigUnavailable as exc:
        _unavailable(str(exc))
    # RIG_LOCK_TIMEOUT: how long to wait for another session's rig (one rig per machine).
    wait = float(os.environ.get("RIG_LOCK_TIMEOUT") or 45)
    the_rig = Rig(tmp_path_factory.mktemp("rig"), cachedir=cache_dir(), lock_timeout=wait)
    atexit.register(the_rig.down)
    try:
        with _sigterm_as_interrupt():
            the_rig.up()  # on failure it has torn itself down already
            _note(the_rig, "up")
            try:
                yield the_rig
            finally:
                the_rig.down()
                _note(the_rig, "down")
    finally:
        atexit.unregister(the_rig.down)


@pytest.fixture(scope="session")
def guests() -> dict[str, Path]:
    """The test kernels by variant (built once, cached by content hash across sessions)."""
    try:
        return build_guests(cache_dir() / "guests")
    except FileNotFoundError as exc:
        _unavailable(f"{exc.filename} missing: apt-get install binutils")


@pytest.fixture
def rig_conns(rig: Rig) -> Iterator[dict[str, Any]]:
    """A libvirt connection to each host, by host name, for this test."""
    import libvirt  # noqa: PLC0415

    conns = {h.name: libvirt.open(h.local_uri) for h in rig.hosts}
    yield conns
    for conn in conns.values():
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


@pytest.fixture
def start_guest(rig: Rig, guests: dict[str, Path]) -> Iterator[Callable[..., Any]]:
    """Factory: define and start a rig guest; removes it from both hosts after the test."""
    import libvirt  # noqa: PLC0415

    started: list[str] = []
    conns: dict[str, Any] = {}

    def start(
        variant: str = "idle",
        *,
        host: Host | None = None,
        name: str | None = None,
        memory_mib: int = 128,
        persistent: bool = True,
        balloon: bool | None = None,
        disks: Sequence[Disk] = (),
    ) -> Any:
        host = host or rig.a
        name = name or f"t-{variant}-{uuid.uuid4().hex[:8]}"
        xml = domain_xml(
            name,
            guests[variant],
            memory_mib,
            serial_log=f"/var/log/libvirt/qemu/{name}.serial",
            balloon=VARIANTS[variant].balloon if balloon is None else balloon,
            disks=disks,
        )
        if host.name not in conns:
            conns[host.name] = libvirt.open(host.local_uri)
        conn = conns[host.name]
        started.append(name)
        if not persistent:
            return conn.createXML(xml, 0)
        dom = conn.defineXML(xml)
        dom.create()
        return dom

    yield start

    for conn in conns.values():
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
    if not started or not rig.is_up:
        return
    # fresh connections: the test may have restarted the rig
    for host in rig.hosts:
        conn = libvirt.open(host.local_uri)
        try:
            for name in started:
                remove_domain(conn, name)
        finally:
            conn.close()


@pytest.fixture
def rig_storage(rig: Rig) -> Iterator[Scratch]:
    """The test's additions to the hosts' storage, removed after it (see the module docstring).
    The order against ``start_guest`` does not matter: deleting the image of a guest that still
    runs is harmless (QEMU keeps its open file until the guest is destroyed)."""
    scratch = Scratch(rig.hosts)
    yield scratch
    if rig.is_up:
        scratch.cleanup()
