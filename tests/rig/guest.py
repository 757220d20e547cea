"""The rig's test guests: tiny multiboot kernels assembled from ``guest.S`` at test time.

Why assemble at test time: the kernels are a few hundred bytes and take milliseconds to build
with binutils, so the repository carries only the source; nothing binary is checked in. Builds
are cached by a hash of everything that determines the output (source, variant knobs, build
command), so a changed ``guest.S`` can never be masked by a stale kernel, and several sessions
can share one cache directory (each kernel is written to a temporary file and renamed into
place, which is atomic).

Reading the guest's state: :func:`read_state` asks QEMU's monitor for the state block the guest
keeps at guest-physical 0x200000 (see ``guest.S``). The pass counter there is what tests compare
before and after a migration: if it keeps counting on the destination from where it was on the
source, the guest's memory and CPU state really moved.

Ballooning: the ``balloon`` variant (``BALLOON=1`` in ``guest.S``) answers a virtio balloon: it
sets the balloon's ``actual`` to its target on every pass, so ``virDomainSetMemoryFlags`` on a
domain made with ``domain_xml(..., balloon=True)`` changes the domain's current memory
(``dom.info()[2]``) within a pass or two. It gives no memory back for real.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape, quoteattr

if TYPE_CHECKING:
    from rig.hosts import Host

SOURCE = Path(__file__).with_name("guest.S")

#: Guest-physical address of the state block (pass counter, signature, knobs).
STATE_ADDR = 0x200000
#: Written by the guest at boot at ``STATE_ADDR + 4``: proves the right kernel is running.
SIGNATURE = 0xB007AB1E


@dataclass(frozen=True)
class Variant:
    """Build knobs of one guest kernel (``as --defsym`` values, see ``guest.S``)."""

    dirty_mib: int
    spin: int
    doc: str
    #: BALLOON=1: follows a virtio balloon's target (needs ``domain_xml(..., balloon=True)``)
    balloon: bool = False


#: The variants. Rates are TCG on the project's CI machine kind (2 cores), about +-30 %.
VARIANTS: dict[str, Variant] = {
    "idle": Variant(0, 0, "writes only its counter page; about 1500 passes/s"),
    "dirty16": Variant(16, 0, "rewrites 16 MiB per pass, as fast as TCG allows (~3000/s)"),
    "dirty64": Variant(64, 0, "rewrites 64 MiB per pass; needs memory_mib >= 72"),
    "dirty16slow": Variant(16, 200_000, "16 MiB per pass, ~2 passes/s (~32 MiB/s)"),
    "balloon": Variant(0, 0, "idle, plus a cooperative virtio balloon driver", balloon=True),
}

# Assembler and linker flags. `-N` keeps the ELF compact (the multiboot header must be within
# the first 8 KiB of the file) and loads .text at 1 MiB, where multiboot kernels live.
# QEMU's multiboot loader only accepts 32-bit ELF, hence --32 / elf_i386 on an x86_64 host.
_AS = ("as", "--32")
_LD = (
    "ld",
    "-m",
    "elf_i386",
    "-N",
    "-Ttext=0x100000",
    "-e",
    "_start",
    "--build-id=none",
    "--no-warn-rwx-segments",
)


def _digest(source: bytes, name: str, variant: Variant) -> str:
    h = hashlib.sha256()
    knobs = f"{variant.dirty_mib}:{variant.spin}:{int(variant.balloon)}"
    for part in (source, name.encode(), knobs.encode(), repr((_AS, _LD)).encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def build_guests(outdir: Path, variants: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Assemble the guest kernels into ``outdir`` (cached by content hash); return their paths.

    ``outdir`` must be visible inside the rig's hosts: not under ``/run`` or ``/var``, which
    each host replaces with its own directory (see :mod:`rig.daemons`).
    """
    outdir.mkdir(parents=True, exist_ok=True)
    source = SOURCE.read_bytes()
    built: dict[str, Path] = {}
    for name in variants or tuple(VARIANTS):
        variant = VARIANTS[name]
        target = outdir / f"{name}-{_digest(source, name, variant)}.elf"
        if not target.exists():
            _assemble(variant, target)
        built[name] = target
    return built


def _assemble(variant: Variant, target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        obj = Path(tmp) / "guest.o"
        elf = Path(tmp) / "guest.elf"
        defsyms = (
            *("--defsym", f"DIRTY_MIB={variant.dirty_mib}"),
            *("--defsym", f"SPIN={variant.spin}"),
            *("--defsym", f"BALLOON={int(variant.balloon)}"),
        )
        for cmd in (
            [*_AS, *defsyms, "-o", str(obj), str(SOURCE)],
            [*_LD, "-o", str(elf), str(obj)],
        ):
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"building the rig guest failed: {cmd}\n{proc.stderr}")
        os.replace(elf, target)


@dataclass(frozen=True)
class Disk:
    """A file-backed virtio disk of a rig guest (see :func:`domain_xml`).

    ``path`` is the image's path *inside the host* (e.g. ``/var/lib/libvirt/images/x.qcow2``,
    i.e. under the host's own ``/var``). ``driver``: extra ``<driver>`` attributes, e.g.
    ``{"discard": "unmap", "detect_zeroes": "unmap"}`` (keeps a copied image sparse).
    The guest kernels have no virtio driver: the disk is only attached (tests write to it
    through QEMU's monitor, see ``rig.storage``).
    """

    path: str
    target: str = "vda"
    format: str = "qcow2"
    cache: str = "none"
    driver: Mapping[str, str] = field(default_factory=dict)

    def xml(self) -> str:
        attrs = {"name": "qemu", "type": self.format, "cache": self.cache, **self.driver}
        driver = " ".join(f"{k}={quoteattr(v)}" for k, v in attrs.items())
        return (
            f'<disk type="file" device="disk"><driver {driver}/>'
            f"<source file={quoteattr(self.path)}/>"
            f'<target dev={quoteattr(self.target)} bus="virtio"/></disk>'
        )


def domain_xml(
    name: str,
    kernel: Path | str,
    memory_mib: int = 128,
    vcpus: int = 1,
    *,
    serial_log: str | None = None,
    balloon: bool = False,
    disks: Sequence[Disk] = (),
) -> str:
    """Domain XML for a rig guest: TCG, direct kernel boot, no network, no disk unless given.

    * ``type='qemu'`` (TCG): ``/dev/kvm`` exists on the CI machine kind but is unusable (the
      guest hangs or QEMU asserts on MSRs), and TCG boots this guest in well under a second.
    * ``<cpu check='none'>`` with a fixed model keeps the guest CPU identical on both hosts, so
      a migration never fails a CPU compatibility check.
    * No USB controller, graphics or NIC: nothing to migrate but RAM and CPU (and the
      ``disks``, if any), and nothing that could reach a network.
    * ``disks``: :class:`Disk` s, virtio, attached only (the kernels do not use them).
    * No balloon either (``<memballoon model='none'/>``), unless ``balloon``: then a virtio
      balloon (and ``<currentMemory>`` = ``memory_mib``), which only the ``balloon`` variant
      answers; with another variant ``setMemoryFlags`` is accepted but changes nothing.
    * ``serial_log`` is a path *inside the host* (e.g. ``/var/log/libvirt/qemu/x.serial``,
      i.e. under that host's state dir); each host writes its own file, so after a migration
      the destination's file continues the output. Default: serial to null.
    """
    kernel = str(kernel)
    for hidden in ("/run/", "/var/"):
        if kernel.startswith(hidden):
            raise ValueError(f"guest kernel {kernel} is under {hidden}, which rig hosts hide")
    serial = (
        f"<serial type='file'><source path='{escape(serial_log)}'/></serial>"
        if serial_log
        else "<serial type='null'/>"
    )
    current = f"\n  <currentMemory unit='MiB'>{memory_mib}</currentMemory>" if balloon else ""
    balloon_model = "virtio" if balloon else "none"
    disk_xml = "".join(f"\n    {d.xml()}" for d in disks)
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>{current}
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(kernel)}</kernel>
  </os>
  <cpu mode='custom' match='exact' check='none'><model fallback='forbid'>qemu64</model></cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>{disk_xml}
    {serial}
    <memballoon model='{balloon_model}'/>
  </devices>
</domain>
"""


@dataclass(frozen=True)
class GuestState:
    """The guest's state block, as read through the QEMU monitor."""

    counter: int
    signature: int
    dirty_mib: int
    spin: int
    #: ``balloon`` variant: the balloon's I/O base the guest found (0: none, or another variant)
    balloon_io: int = 0

    @property
    def booted(self) -> bool:
        return self.signature == SIGNATURE


def read_state(dom: Any) -> GuestState:
    """Read the state block of a running rig guest (``dom`` is a ``libvirt.virDomain``).

    Uses the HMP ``xp`` command: it reads guest-*physical* memory, which is what the guest
    writes (no paging). libvirt marks the domain "tainted: custom-monitor"; harmless here.
    """
    import libvirt_qemu  # noqa: PLC0415 - only needed with a real rig

    out = libvirt_qemu.qemuMonitorCommand(
        dom, f"xp /5wx {STATE_ADDR:#x}", libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    )
    # "0000000000200000: 0x00000316 0xb007ab1e 0x00000000 0x00000000\r\n
    #  0000000000200010: 0x0000c0c0"
    lines = [line.split(":", 1)[1] for line in out.splitlines() if ":" in line]
    words = [int(w, 16) for line in lines for w in line.split()][:5]
    return GuestState(*words)


def wait_counter_above(dom: Any, value: int, timeout: float = 10.0) -> GuestState:
    """Poll until the guest's pass counter exceeds ``value`` (bounded); return the state."""
    deadline = time.monotonic() + timeout
    state = read_state(dom)
    while state.counter <= value:
        if time.monotonic() > deadline:
            raise TimeoutError(f"guest counter stuck at {state.counter} (wanted > {value})")
        time.sleep(0.02)
        state = read_state(dom)
    return state


def remove_domain(conn: Any, name: str) -> bool:
    """Destroy and undefine domain ``name`` on ``conn`` (a ``libvirt.virConnect``) if present.

    Looks the domain up through ``listAllDomains`` rather than ``lookupByName`` so that the
    common "not there" case raises nothing (libvirt's default error handler would print it).
    Destroying also ends a migration the domain is part of. Returns whether it was there.
    """
    import libvirt  # noqa: PLC0415

    for dom in conn.listAllDomains():
        if dom.name() != name:
            continue
        persistent = dom.isPersistent()  # ask first: a destroyed transient domain is gone
        if dom.isActive():
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
        if persistent:
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()
        return True
    return False


def migrate_p2p(
    dom: Any,
    dst: Host,
    flags: int | None = None,
    timeout: float = 60.0,
    *,
    params: Mapping[str, object] | None = None,
) -> None:
    """Peer-to-peer live migration of ``dom`` to rig host ``dst``, aborted after ``timeout``.

    The source libvirtd owns a p2p migration and would keep a non-converging one running
    forever, even after this process died; the timer aborts it so a test fails instead of
    hanging. Default flags: LIVE | PEER2PEER | PERSIST_DEST | UNDEFINE_SOURCE. ``params``:
    more typed parameters (e.g. ``{libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 20}``, MiB/s, which
    also limits a storage copy's rate) next to the migration URI.

    Calls to the domain while this runs (``jobStats``, monitor commands) belong on *another*
    connection: on ``dom``'s own, a ``jobStats`` from another thread sometimes waited until
    the migration had ended (about 1 in 5 storage migrations on the rig; never with a
    connection of its own).
    """
    import libvirt  # noqa: PLC0415

    if flags is None:
        flags = (
            libvirt.VIR_MIGRATE_LIVE
            | libvirt.VIR_MIGRATE_PEER2PEER
            | libvirt.VIR_MIGRATE_PERSIST_DEST
            | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        )

    def abort() -> None:
        with contextlib.suppress(libvirt.libvirtError):
            dom.abortJob()

    timer = threading.Timer(timeout, abort)
    timer.daemon = True
    timer.start()
    try:
        dom.migrateToURI3(
            dst.p2p_uri, {libvirt.VIR_MIGRATE_PARAM_URI: dst.migrate_uri, **(params or {})}, flags
        )
    finally:
        timer.cancel()
