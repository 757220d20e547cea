"""The rig's storage, proven with plain libvirt-python (no agent): each host's own ``default``
pool, and a live migration that copies a local disk (``VIR_MIGRATE_NON_SHARED_DISK``) while the
guest's disk is written, ending with identical images on both hosts."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

import libvirt
from rig import Disk, Rig, migrate_p2p
from rig.storage import (
    IMAGES,
    MiB,
    Scratch,
    allocated_bytes,
    create_image,
    flush_disk,
    list_images,
    verify_identical,
    verify_pattern,
    write_pattern,
)

pytestmark = pytest.mark.rig

COPY_ALL = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    | libvirt.VIR_MIGRATE_NON_SHARED_DISK
)


def test_every_host_has_its_own_default_pool(
    rig: Rig, rig_conns: dict[str, Any], rig_storage: Scratch
) -> None:
    for host in rig.hosts:
        pool = rig_conns[host.name].storagePoolLookupByName("default")
        assert (pool.isActive(), pool.isPersistent(), pool.autostart()) == (1, 1, 1)
        assert f"<path>{IMAGES}</path>" in pool.XMLDesc(0)
    # one host's image is not the other's: the directories are the hosts' own
    path = create_image(rig.a, f"{IMAGES}/own-{rig.a.name}.qcow2", 64 * MiB)
    assert path.rsplit("/", 1)[1] in list_images(rig.a)
    assert path.rsplit("/", 1)[1] not in list_images(rig.b)
    vol = rig_conns["rig-a"].storageVolLookupByPath(path)  # the pool saw it (refreshed)
    assert vol.info()[1] == 64 * MiB


def test_copy_storage_all_with_writes_during_the_copy_gives_identical_images(
    rig: Rig, rig_conns: dict[str, Any], start_guest: Callable[..., Any], rig_storage: Scratch
) -> None:
    """128 MiB at 40 MiB/s: the disk copy takes about 3 s. Patterns written before it, and
    while it runs both behind and ahead of its cursor, are all on B afterwards, and
    ``qemu-img compare`` finds A's and B's images identical."""
    size = 128 * MiB
    path = create_image(rig.a, f"{IMAGES}/copy-all-{uuid.uuid4().hex[:8]}.qcow2", size)
    dom = start_guest("idle", disks=[Disk(path)])
    name = dom.name()
    # The writer uses a connection of its own: on the connection that runs migrateToURI3,
    # other calls (jobStats) sometimes wait until the migration has ended.
    on_a = rig_conns["rig-a"].lookupByName(name)
    written = [(0x11, 0, 8 * MiB), (0x12, 100 * MiB, 8 * MiB)]
    for pattern, offset, length in written:
        write_pattern(on_a, pattern, offset, length)

    # (pattern, offset, length): the first one rewrites part of what the copy has sent first
    during = [
        (0x21, 2 * MiB, 2 * MiB),
        (0x22, 40 * MiB, 4 * MiB),
        (0x23, 72 * MiB, 4 * MiB),
        (0x24, 112 * MiB, 2 * MiB),
        (0x25, 124 * MiB, 4 * MiB),
    ]
    # disk_processed/disk_total before and after each write
    seen: list[tuple[int, int, int]] = []
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            deadline = time.monotonic() + 20
            while on_a.jobStats(0).get("disk_processed", 0) == 0:
                assert time.monotonic() < deadline, "the disk copy did not start"
                time.sleep(0.05)
            for pattern, offset, length in during:
                before = on_a.jobStats(0).get("disk_processed", 0)
                write_pattern(on_a, pattern, offset, length)
                stats = on_a.jobStats(0)
                seen.append((before, stats.get("disk_processed", 0), stats.get("disk_total", 0)))
                time.sleep(0.2)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer, name="disk-writer")
    t0 = time.monotonic()
    thread.start()
    try:
        migrate_p2p(dom, rig.b, COPY_ALL, params={libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 40})
    finally:
        thread.join(30)
    took = time.monotonic() - t0
    assert not errors, f"{errors} after the writes {seen} ({took:.2f} s)"
    # every write happened while the disk copy was still under way
    assert len(seen) == len(during), seen
    assert all(before > 0 and after < total for before, after, total in seen), seen
    assert 2.0 < took < 20, f"the bandwidth cap did not hold the copy: {took:.2f} s"

    assert name not in {d.name() for d in rig_conns["rig-a"].listAllDomains()}
    on_b = rig_conns["rig-b"].lookupByName(name)
    assert on_b.isActive()
    flush_disk(on_b)
    # later writes win where they overlap: 0x21 replaced the middle of 0x11
    expected = [(0x11, 0, 2 * MiB), (0x11, 4 * MiB, 4 * MiB), written[1], *during]
    for pattern, offset, length in expected:
        verify_pattern(rig.b, path, pattern, offset, length)
    verify_pattern(rig.b, path, 0x00, 8 * MiB, 32 * MiB)  # never written: zeros
    assert verify_identical(rig.a, path, rig.b, path) == "Images are identical."
    print(f"copy-storage all: {size // MiB} MiB at 40 MiB/s in {took:.2f} s; writes at {seen}")


def test_detect_zeroes_unmap_keeps_the_copy_sparse(
    rig: Rig, rig_conns: dict[str, Any], start_guest: Callable[..., Any], rig_storage: Scratch
) -> None:
    """The default copy allocates the whole destination image; with ``discard='unmap'
    detect_zeroes='unmap'`` on the disk only the data is allocated on B."""
    size, data = 128 * MiB, 16 * MiB
    stamp = uuid.uuid4().hex[:8]
    plain = create_image(rig.a, f"{IMAGES}/plain-{stamp}.qcow2", size)
    unmap = create_image(rig.a, f"{IMAGES}/unmap-{stamp}.qcow2", size)
    dom = start_guest(
        "idle",
        disks=[
            Disk(plain),
            Disk(unmap, "vdb", driver={"discard": "unmap", "detect_zeroes": "unmap"}),
        ],
    )
    write_pattern(dom, 0x5A, 0, data, target="vda")
    write_pattern(dom, 0x5A, 0, data, target="vdb")
    t0 = time.monotonic()
    migrate_p2p(dom, rig.b, COPY_ALL)
    took = time.monotonic() - t0
    assert allocated_bytes(rig.a, plain) < 2 * data
    assert allocated_bytes(rig.a, unmap) < 2 * data
    assert allocated_bytes(rig.b, plain) >= size
    assert allocated_bytes(rig.b, unmap) < 2 * data
    on_b = rig_conns["rig-b"].lookupByName(dom.name())
    for target, path in (("vda", plain), ("vdb", unmap)):
        flush_disk(on_b, target=target)
        verify_pattern(rig.b, path, 0x5A, 0, data)
        verify_identical(rig.a, path, rig.b, path)
    print(
        f"2 x {size // MiB} MiB copied in {took:.2f} s; on B: plain"
        f" {allocated_bytes(rig.b, plain) / MiB:.1f} MiB, unmap"
        f" {allocated_bytes(rig.b, unmap) / MiB:.1f} MiB allocated"
    )
