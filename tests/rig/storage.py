"""Disk images on the rig's hosts: storage pools, qcow2 images and the data in them.

Each rig host has its *own* ``/var/lib/libvirt/images`` (:data:`IMAGES`; it is under the host's
``/var``, i.e. ``host.dir / "var/lib/libvirt/images"`` from the root namespace), and
:meth:`rig.Rig.up` gives every host the ``default`` dir pool over it, as a real host has.
Every ``path`` argument here is a path *inside* a host (``/var/lib/libvirt/images/x.qcow2``).

* Creating: :func:`create_image` runs ``qemu-img create`` in the host's mount namespace, so a
  backing file may be given either relative (``base.qcow2``: resolved next to the image, inside
  and outside the host) or absolute (resolved only inside the host). It refreshes the host's
  pools, so libvirt (and an agent) see the new volume at once.
* Writing: :func:`write_pattern` writes into a *running* guest's disk through QEMU's monitor
  (HMP ``qemu-io`` on the disk's virtio device). The test kernels have no disk driver; this
  goes through QEMU's block layer like a guest write does, so a running storage migration
  mirrors it to the destination. :func:`write_image` writes into an image no QEMU has open.
* Reading: :func:`verify_pattern` runs ``qemu-io -r -U`` inside the host's mount namespace
  (the image may have an absolute backing path, and may be open by a running QEMU: ``-U``
  shares it read-only). Call :func:`flush_disk` first if a running QEMU wrote to it: QEMU
  caches qcow2 metadata until a flush.
* :class:`Scratch`: what a test added to the hosts' storage, removed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape

if TYPE_CHECKING:
    from rig.hosts import Host

MiB = 1 << 20
#: Where each host keeps its images (its own directory: it is under the host's ``/var``).
IMAGES = "/var/lib/libvirt/images"
#: The pool every rig host has over :data:`IMAGES`.
DEFAULT_POOL = "default"


# --------------------------------------------------------------------------- pools


def pool_xml(name: str, path: str) -> str:
    """A ``dir`` pool named ``name`` over ``path`` (inside the host)."""
    return (
        f"<pool type='dir'><name>{escape(name)}</name>"
        f"<target><path>{escape(path)}</path></target></pool>"
    )


def ensure_pool(
    conn: Any, name: str = DEFAULT_POOL, path: str = IMAGES, *, persistent: bool = True
) -> Any:
    """The active pool ``name`` on ``conn`` (a ``libvirt.virConnect``): started if it exists,
    else created over ``path`` (which must exist in the host): ``persistent`` ones are defined,
    started and set to autostart, as a real host's ``default`` pool; others are transient."""
    for pool in conn.listAllStoragePools(0):
        if pool.name() == name:
            if not pool.isActive():
                pool.create(0)
            return pool
    if not persistent:
        return conn.storagePoolCreateXML(pool_xml(name, path), 0)
    pool = conn.storagePoolDefineXML(pool_xml(name, path), 0)
    pool.setAutostart(1)
    pool.create(0)
    return pool


def remove_pool(conn: Any, name: str) -> bool:
    """Stop and undefine pool ``name`` (its files stay); whether it was there."""
    import libvirt  # noqa: PLC0415

    for pool in conn.listAllStoragePools(0):
        if pool.name() != name:
            continue
        persistent = pool.isPersistent()  # ask first: a stopped transient pool is gone
        with contextlib.suppress(libvirt.libvirtError):
            if pool.isActive():
                pool.destroy()
        if persistent:
            with contextlib.suppress(libvirt.libvirtError):
                pool.undefine()
        return True
    return False


def refresh_pools(host: Host) -> None:
    """Rescan every active pool of ``host``: libvirt caches a pool's volume list, so files
    created or deleted behind its back are seen only after a refresh."""
    import libvirt  # noqa: PLC0415

    conn = libvirt.open(host.local_uri)
    try:
        for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
            with contextlib.suppress(libvirt.libvirtError):  # e.g. its directory is gone
                pool.refresh(0)
    finally:
        conn.close()


# --------------------------------------------------------------------------- images


def run_in(host: Host, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in ``host``'s mount namespace (its ``/var``, ``/run``); capture output."""
    proc = subprocess.run(
        [*host.enter(), *cmd], capture_output=True, text=True, check=False, timeout=60
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} on {host.name} failed ({proc.returncode}):"
            f" {proc.stdout.strip()} {proc.stderr.strip()}"
        )
    return proc


def create_image(
    host: Host, path: str, size: int, *, backing: str | None = None, fmt: str = "qcow2"
) -> str:
    """Create a (sparse) ``fmt`` image of ``size`` bytes at ``path`` in ``host``; return
    ``path``. ``backing``: a qcow2 backing file, written into the image as given (relative:
    next to the image). The image's directory is created if missing."""
    host.outside(path).parent.mkdir(parents=True, exist_ok=True)
    cmd = ["qemu-img", "create", "-q", "-f", fmt]
    if backing is not None:
        cmd += ["-F", "qcow2", "-b", backing]
    run_in(host, *cmd, path, str(size))
    refresh_pools(host)
    return path


def copy_image(src: Host, path: str, dst: Host, dst_path: str | None = None) -> str:
    """Copy an image from ``src`` to ``dst`` (the same path by default), keeping it sparse;
    return the destination path. A backing path inside is copied as it is."""
    target = dst_path or path
    out = dst.outside(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["cp", "--sparse=always", str(src.outside(path)), str(out)], check=True, timeout=60
    )
    refresh_pools(dst)
    return target


def remove_images(host: Host, paths: Iterable[str]) -> None:
    """Delete images on ``host`` (missing ones are fine) and refresh its pools."""
    for path in paths:
        host.outside(path).unlink(missing_ok=True)
    refresh_pools(host)


def list_images(host: Host, directory: str = IMAGES) -> list[str]:
    """The names of the files in ``directory`` on ``host``, sorted (``[]`` if it is missing)."""
    try:
        return sorted(e.name for e in os.scandir(host.outside(directory)) if e.is_file())
    except FileNotFoundError:
        return []


def allocated_bytes(host: Host, path: str) -> int:
    """Bytes the image file really occupies on ``host``'s file system (sparse files: less than
    their size)."""
    return host.outside(path).stat().st_blocks * 512


def image_info(host: Host, path: str) -> dict[str, Any]:
    """``qemu-img info`` of an image on ``host`` (in its namespace, shared if in use): keys such
    as ``format``, ``virtual-size``, ``backing-filename``, ``full-backing-filename``."""
    out = run_in(host, "qemu-img", "info", "-U", "--output=json", path).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def write_image(
    host: Host, path: str, pattern: int, offset: int, length: int, *, fmt: str = "qcow2"
) -> None:
    """Write ``length`` bytes of ``pattern`` at ``offset`` into an image on ``host`` that no
    QEMU has open (e.g. a backing file before a guest uses it); for a running guest's disk use
    :func:`write_pattern`."""
    run_in(host, "qemu-io", "-f", fmt, "-c", f"write -P {pattern:#x} {offset} {length}", path)


def verify_pattern(
    host: Host, path: str, pattern: int, offset: int, length: int, *, fmt: str = "qcow2"
) -> None:
    """Assert that ``length`` bytes at ``offset`` of the image (its guest-visible content, with
    its backing chain) on ``host`` all are ``pattern``. Raises ``AssertionError`` with
    qemu-io's output otherwise."""
    spec = f"read -P {pattern:#x} {offset} {length}"
    proc = run_in(host, "qemu-io", "-r", "-U", "-f", fmt, "-c", spec, path, check=False)
    out = f"{proc.stdout.strip()} {proc.stderr.strip()}".strip()
    if proc.returncode != 0 or "verification failed" in out or not out.startswith("read "):
        raise AssertionError(f"{host.name}:{path}: {spec}: exit {proc.returncode}: {out}")


def verify_identical(src: Host, src_path: str, dst: Host, dst_path: str | None = None) -> str:
    """Assert that two images (on two hosts) have the same guest-visible content; return
    ``qemu-img compare``'s output. Runs in the root namespace: a relative backing path works,
    an absolute ``/var/...`` one does not (compare such an image with :func:`verify_pattern`)."""
    a, b = src.outside(src_path), dst.outside(dst_path or src_path)
    proc = subprocess.run(
        ["qemu-img", "compare", "-U", str(a), str(b)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    out = f"{proc.stdout.strip()} {proc.stderr.strip()}".strip()
    if proc.returncode != 0:
        raise AssertionError(f"{src.name}:{a} vs {dst.name}:{b}: exit {proc.returncode}: {out}")
    return out


# --------------------------------------------------------------------------- guest disks


def _device(target: str) -> str:
    """QEMU's virtio backend of disk ``target`` (``vda`` -> libvirt alias ``virtio-disk0``)."""
    if len(target) != 3 or not target.startswith("vd") or not "a" <= target[2] <= "z":
        raise ValueError(f"not a virtio disk target: {target!r}")
    return f"/machine/peripheral/virtio-disk{ord(target[2]) - ord('a')}/virtio-backend"


def _qemu_io(dom: Any, target: str, command: str) -> None:
    import libvirt_qemu  # noqa: PLC0415

    out = libvirt_qemu.qemuMonitorCommand(
        dom,
        f'qemu-io -d {_device(target)} "{command}"',
        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
    )
    if out.strip():  # HMP qemu-io is silent on success
        raise RuntimeError(f"{dom.name()}: qemu-io {command!r} on {target}: {out.strip()}")


def write_pattern(dom: Any, pattern: int, offset: int, length: int, *, target: str = "vda") -> None:
    """Write ``length`` bytes of ``pattern`` at ``offset`` into disk ``target`` of the running
    domain ``dom`` (a ``libvirt.virDomain``), through QEMU's monitor (see the module
    docstring). Also works during a storage migration: the mirror copies the write."""
    _qemu_io(dom, target, f"write -P {pattern:#x} {offset} {length}")


def flush_disk(dom: Any, *, target: str = "vda") -> None:
    """Make the running ``dom``'s QEMU write its cached qcow2 metadata of disk ``target``,
    so that a reader of the file sees what the guest wrote."""
    _qemu_io(dom, target, "flush")


# --------------------------------------------------------------------------- clean-up


class Scratch:
    """What a test adds to the rig hosts' storage, removed by :meth:`cleanup`.

    At creation it lists :data:`IMAGES` on every host; :meth:`cleanup` deletes every file
    that was not there then, whoever created it (the test, libvirt or an agent), in
    :data:`IMAGES` and in the directories of the pools made with :meth:`pool`, and removes
    those pools.
    """

    def __init__(self, hosts: Iterable[Host]) -> None:
        self.hosts = tuple(hosts)
        self._dirs: dict[tuple[str, str], set[str]] = {}
        self._pools: list[tuple[Host, str, str]] = []
        for host in self.hosts:
            self._watch(host, IMAGES)

    def _watch(self, host: Host, directory: str) -> None:
        self._dirs.setdefault((host.name, directory), set(list_images(host, directory)))

    def pool(self, host: Host, name: str, path: str) -> str:
        """Create the directory ``path`` and a transient dir pool ``name`` over it on
        ``host`` (only there); return ``path``."""
        import libvirt  # noqa: PLC0415

        self._watch(host, path)
        created = not host.outside(path).exists()
        host.outside(path).mkdir(parents=True, exist_ok=True)
        self._pools.append((host, name, path if created else ""))
        conn = libvirt.open(host.local_uri)
        try:
            ensure_pool(conn, name, path, persistent=False)
        finally:
            conn.close()
        return path

    def cleanup(self) -> None:
        import libvirt  # noqa: PLC0415

        by_name = {h.name: h for h in self.hosts}
        for host, name, _ in self._pools:
            conn = libvirt.open(host.local_uri)
            try:
                remove_pool(conn, name)
            finally:
                conn.close()
        for (host_name, directory), before in self._dirs.items():
            host = by_name[host_name]
            new = set(list_images(host, directory)) - before
            if new:
                remove_images(host, (str(PurePosixPath(directory) / n) for n in sorted(new)))
        for host, _, made in self._pools:
            if made:
                with contextlib.suppress(OSError):
                    host.outside(made).rmdir()
