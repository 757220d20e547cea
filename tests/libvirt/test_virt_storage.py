"""The storage-copy pre-checks and the record of created images, against libvirt's test
driver (two private ``test:///`` hosts). The copy itself, and every check below with QEMU,
runs on the rig (tests/real/test_agent_storage.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from virt_support import host_uri

import libvirt
from asyncmigfra.errors import IncompatibleDestination
from asyncmigfra.hypervisor.base import MigrationRequest
from asyncmigfra.hypervisor.virt import disks, storage

IMAGES = "/var/lib/libvirt/images"


def _pool(conn: Any, name: str, path: str, kind: str = "dir") -> Any:
    source = "<source><host name='nas'/><dir path='/export'/></source>" if kind == "netfs" else ""
    return conn.storagePoolCreateXML(
        f"<pool type='{kind}'><name>{name}</name>{source}"
        f"<target><path>{path}</path></target></pool>",
        0,
    )


def _volume(pool: Any, name: str) -> Any:
    return pool.createXML(
        f"<volume><name>{name}</name><capacity>1048576</capacity>"
        "<target><format type='qcow2'/></target></volume>",
        0,
    )


def _guest(conn: Any, name: str, disks: str) -> Any:
    dom = conn.defineXML(
        f"<domain type='test'><name>{name}</name><memory>65536</memory>"
        f"<os><type>hvm</type></os><devices>{disks}</devices></domain>"
    )
    dom.create()
    return dom


def _file_disk(path: str, dev: str, extra: str = "") -> str:
    return (
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{path}'/><target dev='{dev}'/>{extra}</disk>"
    )


@pytest.fixture
def hosts() -> Iterator[tuple[Any, Any]]:
    a = libvirt.open(host_uri("hostA"))
    b = libvirt.open(host_uri("hostB"))
    yield a, b
    a.close()
    b.close()


def _request(**keys: Any) -> MigrationRequest:
    return MigrationRequest(vm_name="g", destination="hostB", **keys)


def test_disks_are_grouped_by_what_a_copy_does_with_them(hosts: tuple[Any, Any]) -> None:
    a, _b = hosts
    _volume(_pool(a, "images", IMAGES), "g.qcow2")
    _volume(_pool(a, "nfs", "/mnt/nfs", kind="netfs"), "shared.qcow2")
    _guest(
        a,
        "g",
        _file_disk(f"{IMAGES}/g.qcow2", "vda")
        + _file_disk("/mnt/nfs/shared.qcow2", "vdb")
        + "<disk type='network' device='disk'><source protocol='rbd' name='p/i'/>"
        "<target dev='vdc'/></disk>"
        + "<disk type='file' device='cdrom'><source file='/iso/a.iso'/><target dev='hdc'/>"
        "<readonly/></disk>" + _file_disk(f"{IMAGES}/ro.qcow2", "vdd", "<readonly/>"),
    )
    by_target = {d.target: d for d in disks.guest_disks(a, "g")}
    # test:/// is a local URI: the agent sees the mounts (here / is not NFS)
    assert by_target["vda"].sharing == "local"
    assert by_target["vda"].why == "pool 'images' (dir)"
    assert (by_target["vdb"].sharing, by_target["vdb"].why) == ("shared", "pool 'nfs' (netfs)")
    assert (by_target["vdc"].sharing, by_target["vdc"].why) == ("shared", "a rbd disk")
    assert by_target["hdc"].sharing == "skipped"
    assert (by_target["vdd"].sharing, by_target["vdd"].why) == ("skipped", "read-only")
    assert by_target["vda"].capacity > 0  # blockInfo


def test_without_copy_storage_a_local_disk_is_refused_by_name(hosts: tuple[Any, Any]) -> None:
    a, b = hosts
    _volume(_pool(a, "images", IMAGES), "g.qcow2")
    _guest(a, "g", _file_disk(f"{IMAGES}/g.qcow2", "vda"))
    with pytest.raises(IncompatibleDestination, match=r"local disks .*vda .*copy-storage"):
        storage.plan_storage(a, b, _request(), host="hostB")


def test_without_copy_storage_shared_disks_pass(hosts: tuple[Any, Any]) -> None:
    a, b = hosts
    _volume(_pool(a, "nfs", "/mnt/nfs", kind="netfs"), "g.qcow2")
    _guest(a, "g", _file_disk("/mnt/nfs/g.qcow2", "vda"))
    plan = storage.plan_storage(a, b, _request(), host="hostB")
    assert plan.copies == ()


def test_a_destination_without_a_pool_for_the_directory_is_refused(
    hosts: tuple[Any, Any],
) -> None:
    a, b = hosts
    _volume(_pool(a, "images", IMAGES), "g.qcow2")
    _guest(a, "g", _file_disk(f"{IMAGES}/g.qcow2", "vda"))
    _pool(b, "elsewhere", "/srv/images")
    with pytest.raises(IncompatibleDestination, match=f"no storage pool on hostB covers {IMAGES}"):
        storage.plan_storage(a, b, _request(copy_storage="all"), host="hostB")


def test_an_image_already_on_the_destination_is_never_overwritten(
    hosts: tuple[Any, Any],
) -> None:
    a, b = hosts
    _volume(_pool(a, "images", IMAGES), "g.qcow2")
    _guest(a, "g", _file_disk(f"{IMAGES}/g.qcow2", "vda"))
    _volume(_pool(b, "images", IMAGES), "g.qcow2")
    with pytest.raises(IncompatibleDestination, match=r"already exists .* would overwrite"):
        storage.plan_storage(a, b, _request(copy_storage="all"), host="hostB")


def test_room_in_the_destination_pool_is_checked(hosts: tuple[Any, Any]) -> None:
    # The test driver reports 1 TiB for every disk and 100 GiB free in every pool.
    a, b = hosts
    _volume(_pool(a, "images", IMAGES), "g.qcow2")
    _guest(a, "g", _file_disk(f"{IMAGES}/g.qcow2", "vda"))
    _pool(b, "images", IMAGES)
    with pytest.raises(IncompatibleDestination, match=r"not enough room in storage pool 'images'"):
        storage.plan_storage(a, b, _request(copy_storage="all"), host="hostB")


def test_migrate_disks_must_name_copyable_disks(hosts: tuple[Any, Any]) -> None:
    a, b = hosts
    _volume(_pool(a, "images", IMAGES), "g.qcow2")
    _volume(_pool(a, "nfs", "/mnt/nfs", kind="netfs"), "s.qcow2")
    _guest(a, "g", _file_disk(f"{IMAGES}/g.qcow2", "vda") + _file_disk("/mnt/nfs/s.qcow2", "vdb"))
    with pytest.raises(IncompatibleDestination, match="vdz, which the VM does not have"):
        storage.plan_storage(
            a, b, _request(copy_storage="all", migrate_disks=("vdz",)), host="hostB"
        )
    with pytest.raises(IncompatibleDestination, match=r"vdb, which is not copied: pool 'nfs'"):
        storage.plan_storage(
            a, b, _request(copy_storage="all", migrate_disks=("vdb",)), host="hostB"
        )


def test_source_copies_lists_local_disks_with_their_sizes(hosts: tuple[Any, Any]) -> None:
    a, _b = hosts
    _volume(_pool(a, "images", IMAGES), "g.qcow2")
    _volume(_pool(a, "nfs", "/mnt/nfs", kind="netfs"), "s.qcow2")
    _guest(a, "g", _file_disk(f"{IMAGES}/g.qcow2", "vda") + _file_disk("/mnt/nfs/s.qcow2", "vdb"))
    copies = disks.source_copies(a, _request(copy_storage="all"))
    assert [(c.target, c.path) for c in copies] == [("vda", f"{IMAGES}/g.qcow2")]
    assert copies[0].size == copies[0].room > 0
    assert disks.source_copies(a, _request()) == ()


def test_pool_room_is_keyed_by_directory(hosts: tuple[Any, Any]) -> None:
    _a, b = hosts
    _pool(b, "images", IMAGES + "/")
    assert storage.pool_room(b) == {IMAGES: 107374182400}


def test_the_record_of_created_images_lets_only_its_source_remove_them(
    hosts: tuple[Any, Any],
) -> None:
    a, b = hosts
    _volume(_pool(a, "images", IMAGES), "g.qcow2")
    dom = _guest(a, "g", _file_disk(f"{IMAGES}/g.qcow2", "vda"))
    created = _volume(_pool(b, "images", IMAGES), "g.qcow2").path()
    storage.mark(dom, source="hostA", destination="hostB", paths=[created])
    record = storage.marked(dom)
    assert record == storage.CopyRecord("hostA", "hostB", (created,))
    # Another host's record (a guest that arrived here carries it) is not ours to act on.
    assert storage.release(dom, b, "g", source="hostC", destination="hostB") == ([], [])
    assert storage.release(dom, b, "g", source="hostA", destination="hostX") == ([], [])
    assert b.storageVolLookupByPath(created) is not None
    # While the VM runs on the destination, its images there are in use: kept.
    there = _guest(b, "g", _file_disk(created, "vda"))
    removed, problems = storage.release(dom, b, "g", source="hostA", destination="hostB")
    assert removed == []
    assert problems == ["g is active on hostB: its images were kept"]
    there.destroy()
    there.undefine()
    removed, problems = storage.release(dom, b, "g", source="hostA", destination="hostB")
    assert (removed, problems) == ([created], [])
    with pytest.raises(libvirt.libvirtError):
        b.storageVolLookupByPath(created)
    assert storage.marked(dom) is None  # the record goes with the images


def test_release_paths_ignores_images_never_created(hosts: tuple[Any, Any]) -> None:
    _a, b = hosts
    _pool(b, "images", IMAGES)
    assert storage.release_paths(b, [f"{IMAGES}/never.qcow2"]) == ([], [])


def test_release_keeps_an_image_another_domain_on_the_destination_uses(
    hosts: tuple[Any, Any],
) -> None:
    a, b = hosts
    _volume(_pool(a, "images", IMAGES), "g.qcow2")
    dom = _guest(a, "g", _file_disk(f"{IMAGES}/g.qcow2", "vda"))
    created = _volume(_pool(b, "images", IMAGES), "g.qcow2").path()
    b.defineXML(  # defined, not running: its configuration still names the image
        "<domain type='test'><name>other</name><memory>65536</memory><os><type>hvm</type>"
        f"</os><devices>{_file_disk(created, 'vdb')}</devices></domain>"
    )
    storage.mark(dom, source="hostA", destination="hostB", paths=[created])
    removed, problems = storage.release(dom, b, "g", source="hostA", destination="hostB")
    assert removed == []
    assert problems == [f"{created}: kept, domain other uses it"]
    assert b.storageVolLookupByPath(created) is not None
    assert storage.marked(dom) is not None  # kept until nothing is left to remove


def test_a_directory_both_hosts_share_is_found_by_a_probe_and_left_alone(
    hosts: tuple[Any, Any],
) -> None:
    # One test:/// host on both sides stands in for storage both hosts share.
    a, _b = hosts
    _volume(_pool(a, "images", IMAGES), "g.qcow2")
    _guest(a, "g", _file_disk(f"{IMAGES}/g.qcow2", "vda"))
    assert storage.shares_directory(a, a, IMAGES) is True
    assert storage.plan_storage(a, a, _request(), host="hostB").copies == ()
    assert storage.plan_storage(a, a, _request(copy_storage="all"), host="hostB").copies == ()
    with pytest.raises(IncompatibleDestination, match=r"vda, which is not copied: .*shared"):
        storage.plan_storage(
            a, a, _request(copy_storage="all", migrate_disks=("vda",)), host="hostB"
        )
    # the probe's file is gone again
    assert a.storagePoolLookupByName("images").listVolumes() == ["g.qcow2"]


def test_a_directory_the_destination_does_not_share_is_told_by_the_probe(
    hosts: tuple[Any, Any],
) -> None:
    a, b = hosts
    _pool(a, "images", IMAGES)
    _pool(b, "images", IMAGES)
    assert storage.shares_directory(a, b, IMAGES) is False
    assert storage.shares_directory(a, b, "/srv/nowhere") is None
    assert b.storagePoolLookupByName("images").listVolumes() == []


def test_create_images_makes_each_image_and_never_overwrites(hosts: tuple[Any, Any]) -> None:
    a, b = hosts
    _volume(_pool(a, "images", IMAGES), "g.qcow2")
    _volume(_pool(a, "images2", "/srv/images"), "h.qcow2")
    _guest(
        a, "g", _file_disk(f"{IMAGES}/g.qcow2", "vda") + _file_disk("/srv/images/h.qcow2", "vdb")
    )
    _pool(b, "images", IMAGES)
    _pool(b, "images2", "/srv/images")
    guest = [d for d in disks.guest_disks(a, "g") if d.target in ("vda", "vdb")]
    plan = storage.StoragePlan(mode="all", copies=(), disks=tuple(guest))
    created = storage.create_images(b, plan, host="hostB")
    assert created == [f"{IMAGES}/g.qcow2", "/srv/images/h.qcow2"]
    assert b.storageVolLookupByPath(f"{IMAGES}/g.qcow2").info()[1] == guest[0].capacity
    # the second attempt finds the first image there: refused, and removes nothing it did not make
    b.storageVolLookupByPath("/srv/images/h.qcow2").delete(0)
    with pytest.raises(IncompatibleDestination, match=r"appeared at .*g\.qcow2 on hostB"):
        storage.create_images(b, plan, host="hostB")
    assert b.storageVolLookupByPath(f"{IMAGES}/g.qcow2") is not None
    with pytest.raises(libvirt.libvirtError):
        b.storageVolLookupByPath("/srv/images/h.qcow2")
