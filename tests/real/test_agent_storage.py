"""Storage migration (issue 16) by real agents over MQTT: VMs whose disks are local images in
their host's own ``/var/lib/libvirt/images`` (or another pool's directory), moved with
``parameter: {copy-storage: all | inc | none, migrate-disks: [vda], bandwidth: N}``.

What a test checks on the images it checks with ``rig.storage``: patterns written into the
running guest's disk through QEMU's monitor (before the copy, and while it runs), read back on
the destination inside its mount namespace (with the image's backing chain).

The contract: ``all`` copies the whole disk and ``inc`` the top
overlay onto the same backing file on the destination (the agent creates the overlay there);
progress events then carry ``disk-total``/``disk-processed``/``disk-remaining`` (bytes); the
agent never deletes the source image; a cancelled or failed storage migration leaves no image
on the destination; the pre-checks refuse (``incompatible-destination``) a local disk with
``copy-storage: none``, a disk in a directory with no pool on the destination, and an image
path that already exists there.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from agents import rig_agents
from test_agent_migration import migrate_msg, where
from test_agent_restart import spawn, write_config

import libvirt
from harness import Scheduler, scheduler
from rig import Disk, Rig
from rig.monitor import qmp_log
from rig.storage import (
    IMAGES,
    MiB,
    Scratch,
    copy_image,
    create_image,
    flush_disk,
    image_info,
    list_images,
    verify_identical,
    verify_pattern,
    write_image,
    write_pattern,
)

pytestmark = [pytest.mark.rig, pytest.mark.broker]

SIZE = 128 * MiB
#: (pattern, offset, length): written into the guest's disk before the migration...
BEFORE = ((0x11, 0, 4 * MiB), (0x12, 60 * MiB, 4 * MiB))
#: ... and while its disk is being copied (behind and ahead of the copy)
DURING = ((0x21, 8 * MiB, 1 * MiB), (0x22, 30 * MiB, 2 * MiB), (0x23, 100 * MiB, 2 * MiB))
OTHER_DIR = "/var/lib/libvirt/other"

Pattern = tuple[int, int, int]


def vm_name() -> str:
    return f"t-disk-{uuid.uuid4().hex[:8]}"


def storage_msg(name: str, dest: str, copy_storage: str, **more: object) -> str:
    params: dict[str, object] = {"migration-type": "live", "copy-storage": copy_storage}
    if copy_storage != "none":  # a disk list without a copy is refused as a mistake
        params["migrate-disks"] = "[vda]"
    params.update(more)
    return migrate_msg(name, dest, **params)


def guest_with_disk(
    rig: Rig, start_guest: Callable[..., Any], *, directory: str = IMAGES, backing: str = ""
) -> tuple[Any, str]:
    """A running guest on A with one local disk, ``<name>.qcow2`` in ``directory`` (over
    ``backing`` if given), holding the :data:`BEFORE` patterns; the domain and the path."""
    name = vm_name()
    path = create_image(rig.a, f"{directory}/{name}.qcow2", SIZE, backing=backing or None)
    dom = start_guest("idle", name=name, disks=[Disk(path)])
    for pattern in BEFORE:
        write_pattern(dom, *pattern)
    return dom, path


def verify_on(rig: Rig, host_name: str, name: str, path: str, patterns: Sequence[Pattern]) -> None:
    """Flush the running domain's disk on ``host_name``, then check ``patterns`` in ``path``."""
    host = rig.host(host_name)
    conn = libvirt.open(host.local_uri)
    try:
        flush_disk(conn.lookupByName(name))
    finally:
        conn.close()
    for pattern, offset, length in patterns:
        verify_pattern(host, path, pattern, offset, length)


async def wait_disk_copy(sched: Scheduler, task_id: str, timeout: float = 30) -> dict[str, Any]:
    """The first progress event of ``task_id`` that shows the disk copy under way; fails at
    once if the task ends before (so that a migration which copies nothing fails fast)."""

    def found() -> list[dict[str, Any]]:
        copying = [
            e for e in sched.events_for(task_id, "progress") if e.get("disk-processed", 0) > 0
        ]
        done = [r for r in sched.results if str(r.get("id")) == task_id]
        return copying[:1] or done

    first = (await sched.wait_for(found, timeout))[0]
    assert first.get("event") == "progress", f"the task ended before any disk copy: {first}"
    return dict(first)


async def write_during_copy(dom: Any, patterns: Sequence[Pattern]) -> None:
    """Write ``patterns`` into ``dom``'s disk, each while libvirt's job on the source still
    copies the disk (checked before and after each write)."""

    def write() -> list[tuple[int, int]]:
        seen = []
        for pattern in patterns:
            write_pattern(dom, *pattern)
            stats = dom.jobStats(0)
            seen.append((stats.get("disk_processed", 0), stats.get("disk_remaining", 0)))
        return seen

    seen = await asyncio.to_thread(write)
    assert all(remaining > 0 for _, remaining in seen), f"a write came after the copy: {seen}"


async def test_copy_storage_all_moves_the_disk_with_writes_during_the_copy(
    mosquitto, rig: Rig, start_guest: Callable[..., Any], rig_storage: Scratch
):
    dom, path = guest_with_disk(rig, start_guest)
    name = dom.name()
    task_id = f"mig-all-{name}"
    async with rig_agents(mosquitto.port, rig, agent={"progress_interval": 0.2}) as agents:
        # 128 MiB at 32 MiB/s: about 4 s of disk copy
        await agents.to_a.publish(
            f"id: {task_id}\n" + storage_msg(name, rig.b.name, "all", bandwidth=32)
        )
        await wait_disk_copy(agents.to_a, task_id)
        await write_during_copy(dom, DURING)
        r = await agents.to_a.result_for(task_id, 60)
        assert (r["result"], r["status"], r["destination"]) == (
            "vm migrated",
            "success",
            "rig-b",
        ), r
        progress = agents.to_a.events_for(task_id, "progress")

    assert where(rig, name) == {"rig-b": (True, True)}
    verify_on(rig, "rig-b", name, path, [*BEFORE, *DURING])
    # the agent does not delete the source image: libvirt only undefined the source domain
    assert path.rsplit("/", 1)[1] in list_images(rig.a)
    verify_identical(rig.a, path, rig.b, path)

    # (libvirt reports a disk total of 0 until the copy has started)
    disk = [e for e in progress if e.get("disk-total")]
    assert disk, progress
    for e in disk:
        assert e["disk-total"] >= SIZE, e
        assert 0 <= e["disk-processed"] <= e["disk-total"], e
        assert 0 <= e["disk-remaining"] <= e["disk-total"], e
    assert any(e["disk-remaining"] > 0 for e in disk), "no event during the disk copy"
    percents = [e["percent"] for e in progress]
    assert percents == sorted(percents), percents
    assert percents[-1] == 100


async def test_copy_storage_inc_copies_the_overlay_onto_the_same_backing_file(
    mosquitto, rig: Rig, start_guest: Callable[..., Any], rig_storage: Scratch
):
    """base.qcow2 on both hosts, the guest's overlay only on A: the agent creates the overlay
    on B (over B's base) and copies only the overlay's data."""
    base = create_image(rig.a, f"{IMAGES}/base-{uuid.uuid4().hex[:8]}.qcow2", SIZE)
    in_base = (0x33, 8 * MiB, 8 * MiB)
    write_image(rig.a, base, *in_base)
    copy_image(rig.a, base, rig.b)
    base_name = base.rsplit("/", 1)[1]
    dom, top = guest_with_disk(rig, start_guest, backing=base_name)
    name = dom.name()
    assert top.rsplit("/", 1)[1] not in list_images(rig.b)
    async with rig_agents(mosquitto.port, rig) as agents:
        r = await agents.to_a.call(storage_msg(name, rig.b.name, "inc"), 60)
        assert r["status"] == "success", r

    assert where(rig, name) == {"rig-b": (True, True)}
    verify_on(rig, "rig-b", name, top, [*BEFORE, in_base])
    info = image_info(rig.b, top)
    assert Path(info["backing-filename"]).name == base_name, info
    # only the overlay's data came over, not the whole disk
    assert info["actual-size"] < SIZE // 2, info
    verify_pattern(rig.b, base, *in_base)


async def test_cancel_during_the_disk_copy_leaves_no_image_on_the_destination(
    mosquitto, rig: Rig, start_guest: Callable[..., Any], rig_storage: Scratch
):
    dom, path = guest_with_disk(rig, start_guest)
    name = dom.name()
    on_b = list_images(rig.b)
    async with rig_agents(mosquitto.port, rig, agent={"progress_interval": 0.2}) as agents:
        # 128 MiB at 8 MiB/s: 16 s of disk copy, cancelled after its first progress event
        await agents.to_a.publish(
            "id: mig-disk-cancel\n" + storage_msg(name, rig.b.name, "all", bandwidth=8)
        )
        event = await wait_disk_copy(agents.to_a, "mig-disk-cancel")
        assert event["disk-remaining"] > 0, event
        r = await agents.to_a.call("task: cancel\ntarget: mig-disk-cancel\n")
        assert r["list"] == [{"vm-name": name, "status": "success", "state": "running"}]
        result = await agents.to_a.result_for("mig-disk-cancel", 40)
        assert (result["status"], result["code"]) == ("error", "cancelled"), result

    assert where(rig, name) == {"rig-a": (True, True)}
    assert list_images(rig.b) == on_b, "the agent left the image it had B create"
    # the source's disk works and is whole after the aborted copy
    write_pattern(dom, 0x44, 64 * MiB, 1 * MiB)
    flush_disk(dom)
    for pattern in (*BEFORE, (0x44, 64 * MiB, 1 * MiB)):
        verify_pattern(rig.a, path, *pattern)


async def test_local_disk_without_copy_storage_is_refused_before_anything_moves(
    mosquitto, rig: Rig, start_guest: Callable[..., Any], rig_storage: Scratch
):
    dom, _ = guest_with_disk(rig, start_guest)
    name = dom.name()
    on_b = list_images(rig.b)
    async with rig_agents(mosquitto.port, rig) as agents:
        r = await agents.to_a.call(storage_msg(name, rig.b.name, "none"), 60)
        assert (r["status"], r["code"]) == ("error", "incompatible-destination"), r
        assert "vda" in r["details"], r
        phases = [e["phase"] for e in agents.to_a.events_for(r["id"], "phase")]
        assert phases == ["pre-checks"]
    assert where(rig, name) == {"rig-a": (True, True)}
    assert list_images(rig.b) == on_b


async def test_disk_in_a_directory_without_a_pool_on_the_destination_is_refused(
    mosquitto, rig: Rig, start_guest: Callable[..., Any], rig_storage: Scratch
):
    """The image is in A's /var/lib/libvirt/other, with a pool over it only on A: B cannot
    create the target image, so the pre-checks refuse and name the directory."""
    rig_storage.pool(rig.a, "other", OTHER_DIR)
    dom, _ = guest_with_disk(rig, start_guest, directory=OTHER_DIR)
    name = dom.name()
    on_b = list_images(rig.b)
    async with rig_agents(mosquitto.port, rig) as agents:
        r = await agents.to_a.call(storage_msg(name, rig.b.name, "all"), 60)
        assert (r["status"], r["code"]) == ("error", "incompatible-destination"), r
        assert OTHER_DIR in r["details"], r
        phases = [e["phase"] for e in agents.to_a.events_for(r["id"], "phase")]
        assert phases == ["pre-checks"]
    assert where(rig, name) == {"rig-a": (True, True)}
    assert list_images(rig.b) == on_b
    assert not rig.b.outside(OTHER_DIR).exists()


async def test_copy_storage_all_onto_an_existing_image_is_refused(
    mosquitto, rig: Rig, start_guest: Callable[..., Any], rig_storage: Scratch
):
    """libvirt would silently overwrite B's image of the same path: the pre-checks refuse."""
    dom, path = guest_with_disk(rig, start_guest)
    name = dom.name()
    create_image(rig.b, path, SIZE)
    theirs = (0x77, 0, 4 * MiB)
    write_image(rig.b, path, *theirs)
    async with rig_agents(mosquitto.port, rig) as agents:
        r = await agents.to_a.call(storage_msg(name, rig.b.name, "all"), 60)
        assert (r["status"], r["code"]) == ("error", "incompatible-destination"), r
        phases = [e["phase"] for e in agents.to_a.events_for(r["id"], "phase")]
        assert phases == ["pre-checks"]
    assert where(rig, name) == {"rig-a": (True, True)}
    verify_pattern(rig.b, path, *theirs)


async def test_evacuate_two_guests_with_local_disks(
    mosquitto, rig: Rig, start_guest: Callable[..., Any], rig_storage: Scratch
):
    disks = {dom.name(): path for dom, path in (guest_with_disk(rig, start_guest) for _ in "ab")}
    async with rig_agents(mosquitto.port, rig) as agents:
        r = await agents.to_a.call(
            f"task: evacuate node\ndestinations: [{rig.b.name}]\n"
            "parameter:\n  mode: auto\n  overbooking: true\n  migration-type: live\n"
            "  copy-storage: all\n  max-parallel: 2\n",
            90,
        )
        assert r["result"] == "node evacuated"
        assert sorted(e["vm-name"] for e in r["list"]) == sorted(disks)
        assert {(e["status"], e["destination"]) for e in r["list"]} == {("success", rig.b.name)}, r
    for name, path in disks.items():
        assert where(rig, name) == {rig.b.name: (True, True)}
        verify_on(rig, rig.b.name, name, path, BEFORE)


@pytest.mark.e2e
async def test_agent_killed_during_a_storage_migration_adopts_it_after_restart(
    mosquitto, rig: Rig, start_guest: Callable[..., Any], rig_storage: Scratch, tmp_path: Path
):
    dom, path = guest_with_disk(rig, start_guest)
    name = dom.name()
    prefix = f"restart-{uuid.uuid4().hex[:6]}"
    conf = write_config(tmp_path / "agent.yaml", mosquitto.port, rig, prefix)
    log = tmp_path / "agent.log"
    proc: subprocess.Popen[bytes] = spawn(conf, log)
    try:
        async with scheduler(mosquitto.port, f"{prefix}/rig-a") as sched:
            await sched.state("online", 30)
            # 128 MiB at 12 MiB/s: about 10 s of disk copy, enough to outlive the agent
            await sched.publish(
                "id: adopt-disk\n" + storage_msg(name, rig.b.name, "all", bandwidth=12)
            )
            await wait_disk_copy(sched, "adopt-disk")
            proc.kill()
            await asyncio.to_thread(proc.wait)
            assert where(rig, name)["rig-a"][0], "the job outlived the agent"
            proc = spawn(conf, log)
            result = await sched.result_for("adopt-disk", 50)
            assert result["status"] == "success", result
            assert result["destination"] == rig.b.name
            phases = [e["phase"] for e in sched.events_for("adopt-disk", "phase")]
            assert "adopted" in phases, (phases, result)
            await asyncio.sleep(0.5)
            assert [r.get("id") for r in sched.results].count("adopt-disk") == 1
    finally:
        if proc.poll() is None:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30)
    assert proc.returncode == 0, log.read_text()[-4000:]
    assert where(rig, name) == {"rig-b": (True, True)}
    verify_on(rig, rig.b.name, name, path, BEFORE)


async def test_with_tls_the_disk_copy_is_nbd_over_tls_on_the_migration_network(
    mosquitto, rig: Rig, start_guest: Callable[..., Any], rig_storage: Scratch
):
    """``tls: true``: QEMU's NBD export on B and the mirror's NBD client on A both use the
    migration TLS credentials (verified peers, the rig's CA), and the client connects to B's
    migration address (the host of ``migrate-uri``), as libvirt's QMP commands show."""
    dom, path = guest_with_disk(rig, start_guest)
    name = dom.name()
    with qmp_log(rig.a) as on_a, qmp_log(rig.b) as on_b:
        async with rig_agents(mosquitto.port, rig) as agents:
            r = await agents.to_a.call(storage_msg(name, rig.b.name, "all", tls="true"), 60)
            assert (r["status"], r["destination"]) == ("success", rig.b.name), r
    [server] = on_b.commands("nbd-server-start")
    assert server["tls-creds"], server
    assert server["addr"]["data"]["host"] == rig.b.ip
    [creds] = [c for c in on_b.commands("object-add") if c["id"] == server["tls-creds"]]
    assert (creds["qom-type"], creds["endpoint"], creds["verify-peer"]) == (
        "tls-creds-x509",
        "server",
        True,
    )
    [client] = [c for c in on_a.commands("blockdev-add") if c.get("driver") == "nbd"]
    assert client["tls-creds"], client
    assert client["tls-hostname"] == rig.b.ip, client
    assert client["server"]["host"] == rig.b.ip, client
    assert where(rig, name) == {"rig-b": (True, True)}
    verify_on(rig, rig.b.name, name, path, BEFORE)


@pytest.mark.e2e
async def test_a_restarted_agent_removes_the_images_of_an_adopted_copy_it_cancels(
    mosquitto, rig: Rig, start_guest: Callable[..., Any], rig_storage: Scratch, tmp_path: Path
):
    """The record of what the copy created lives with the domain, not the agent: the agent
    that adopts the job after a restart cleans up when it is cancelled."""
    dom, _path = guest_with_disk(rig, start_guest)
    name = dom.name()
    on_b = list_images(rig.b)
    prefix = f"restart-{uuid.uuid4().hex[:6]}"
    conf = write_config(tmp_path / "agent.yaml", mosquitto.port, rig, prefix)
    log = tmp_path / "agent.log"
    proc: subprocess.Popen[bytes] = spawn(conf, log)
    try:
        async with scheduler(mosquitto.port, f"{prefix}/rig-a") as sched:
            await sched.state("online", 30)
            # 128 MiB at 4 MiB/s: about 30 s of disk copy
            await sched.publish(
                "id: adopt-cancel\n" + storage_msg(name, rig.b.name, "all", bandwidth=4)
            )
            await wait_disk_copy(sched, "adopt-cancel")
            assert list_images(rig.b) != on_b, "B has the image being copied"
            proc.kill()
            await asyncio.to_thread(proc.wait)
            proc = spawn(conf, log)
            await sched.state("online", 30)
            await sched.wait_for(
                lambda: (
                    "adopted" in [e["phase"] for e in sched.events_for("adopt-cancel", "phase")]
                ),
                20,
            )
            await sched.call("task: cancel\ntarget: adopt-cancel\n", 20)
            result = await sched.result_for("adopt-cancel", 40)
            assert (result["status"], result["code"]) == ("error", "cancelled"), result
    finally:
        if proc.poll() is None:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30)
    assert proc.returncode == 0, log.read_text()[-4000:]
    assert where(rig, name) == {"rig-a": (True, True)}
    assert list_images(rig.b) == on_b, "the adopting agent left the image B had created"
