"""A migration's reads of its guest within ``reading_once`` (hypervisor/virt/guestlook.py) on
libvirt's test driver: one lookup serves the steps, and each step decides, and fails, as it
does without the scope."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

if os.environ.get("CI"):
    import libvirt  # CI must run these: a missing binding fails the run
else:
    libvirt = pytest.importorskip("libvirt")

from virt_support import Ctx, host_uri

from asyncmigfra.errors import ConnectionFailed
from asyncmigfra.hypervisor.base import MigrationRequest
from asyncmigfra.hypervisor.virt import prechecks, storage

pytestmark = pytest.mark.libvirt


@contextmanager
def lookups(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The names looked up on hostA (the source) while the block runs."""
    seen: list[str] = []
    original = libvirt.virConnect.lookupByName

    def counted(conn: Any, name: str) -> Any:
        if str(conn.getURI()) == host_uri("hostA"):
            seen.append(name)
        return original(conn, name)

    with monkeypatch.context() as patched:
        patched.setattr(libvirt.virConnect, "lookupByName", counted)
        yield seen


async def outcome(step: Callable[[], Awaitable[object]]) -> tuple[str, object]:
    """What a step returned, or the class and text of its error."""
    try:
        return "ok", await step()
    except Exception as exc:
        return type(exc).__name__, str(exc)


def check_steps(hv: Any, name: str) -> list[Callable[[], Awaitable[object]]]:
    request = MigrationRequest(vm_name=name, destination="hostB")
    return [
        lambda: hv.domain_named(name),
        lambda: hv.broken_post_copy(request),
        lambda: hv.check_migration(request),
        lambda: hv.check_migration(request, memory=False),
        lambda: hv.resident_memory(name),
    ]


@pytest.mark.parametrize("name", ["vm1", "off1", "paused1", "nowhere"])
async def test_the_pre_checks_decide_and_fail_as_without_the_scope(
    hv: Any, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    alone = [await outcome(step) for step in check_steps(hv, name)]
    with lookups(monkeypatch) as seen, hv.reading_once(name):
        together = [await outcome(step) for step in check_steps(hv, name)]
    assert together == alone
    if name == "off1":
        # One lookup served every step but the resident memory, which a guest that does not
        # run has not: that read fails on its own, in its own words.
        assert seen == [name, name]
    elif name != "nowhere":
        assert seen == [name]  # one lookup served every step
    else:
        assert len(seen) > 1  # the look failed: each step read (and failed) for itself


async def test_the_scope_is_its_guests_only_and_one_within_starts_afresh(
    hv: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with lookups(monkeypatch) as seen, hv.reading_once("vm1"):
        await hv.domain_named("off1")  # another guest: its own read
        await hv.domain_named("vm1")
        with hv.reading_once("vm1"):
            await hv.domain_named("vm1")  # a scope within: a read of its own
            await hv.domain_named("vm1")
        await hv.domain_named("vm1")  # the outer scope's read again
        with hv.reading_once("vm1"):
            await prechecks.start_facts(hv, hv.uri, "vm1")  # the job starts within
        await hv.domain_named("vm1")  # which ended the outer scope's read too
    assert seen == ["off1", "vm1", "vm1", "vm1", "vm1"]


async def test_the_checks_devices_and_start_share_one_read_until_the_first_change(
    hv: Any, ctx: Ctx, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = MigrationRequest(vm_name="vm1", destination="hostB")
    facts = await prechecks.start_facts(hv, hv.uri, "vm1")
    with lookups(monkeypatch) as seen, hv.reading_once("vm1"):
        await hv.domain_named("vm1")
        await hv.broken_post_copy(request)
        assert await hv.detach_ivshmem("vm1", ctx, unplug_timeout=1) is None
        assert await hv.detach_hostdevs("vm1", ctx, unplug_timeout=1) == {}
        assert seen == ["vm1"]
        # What guards the job's start is read right before it (others may have changed
        # the guest since the look).
        assert await prechecks.start_facts(hv, hv.uri, "vm1") == facts
        assert seen == ["vm1"] * 2
        # The job started: what is read after it (a retry, a recovery) is read again.
        assert await prechecks.start_facts(hv, hv.uri, "vm1") == facts
        assert await hv.detach_hostdevs("vm1", ctx, unplug_timeout=1) == {}
        await hv.domain_named("vm1")
    assert seen == ["vm1"] * 5


async def test_start_facts_refuse_as_without_the_scope(
    hv: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("vm1", "off1", "paused1", "nowhere"):
        alone = await outcome(lambda n=name: prechecks.start_facts(hv, hv.uri, n))
        with hv.reading_once(name):
            await outcome(lambda n=name: hv.domain_named(n))
            together = await outcome(lambda n=name: prechecks.start_facts(hv, hv.uri, n))
        assert together == alone


async def test_the_scope_ends_with_its_block(hv: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with hv.reading_once("vm1"):
        await hv.domain_named("vm1")
    with lookups(monkeypatch) as seen:
        await hv.domain_named("vm1")
        await hv.domain_named("vm1")
    assert seen == ["vm1", "vm1"]


async def test_the_copy_record_reads_the_same_from_the_live_definition(hv: Any) -> None:
    def read(mark: bool) -> tuple[Any, Any]:
        conn = hv._pool[hv.uri].get()
        dom = conn.lookupByName("vm1")
        if mark:
            storage.mark(dom, source="hostA", destination="b&<'", paths=["/i/a", '/i/"b'])
        return storage.marked(dom), storage.marked_in(storage.ET.fromstring(dom.XMLDesc(0)))

    assert await asyncio.to_thread(read, False) == (None, None)
    by_call, by_definition = await asyncio.to_thread(read, True)
    assert by_call is not None
    assert by_definition == by_call


def shut_off_by_someone_else(hv: Any) -> None:
    """``virsh destroy vm1`` on the host (the test driver's host is the back-end's
    connection: a connection of its own would open a private copy)."""
    hv._pool[hv.uri].get().lookupByName("vm1").destroy()


async def test_the_job_start_sees_a_guest_shut_off_after_the_pre_checks(hv: Any, ctx: Ctx) -> None:
    # The pre-checks read the guest; someone shuts it off before the job starts. The job's
    # start refuses as it does without the scope (WrongState, in migfra's words) rather
    # than going on with the state the pre-checks saw.
    request = MigrationRequest(vm_name="vm1", destination="hostB")
    with hv.reading_once("vm1"):
        await hv.domain_named("vm1")
        await hv.check_migration(request, memory=False)
        await asyncio.to_thread(shut_off_by_someone_else, hv)
        together = await outcome(lambda: hv.begin_migration(request, ctx))
    assert together == ("WrongState", "Wrong domain state: 5")
    assert await outcome(lambda: hv.begin_migration(request, ctx)) == together


def suspended_by_someone_else(hv: Any) -> None:
    hv._pool[hv.uri].get().lookupByName("vm1").suspend()


async def test_a_scope_is_its_tasks_own(hv: Any) -> None:
    # Two migrations' tasks at once on one host (an evacuation, a status or stop beside a
    # migration): each reads the guest for itself; one's look never answers the other, and
    # reads outside any scope read the host as it is now.
    looked, changed = asyncio.Event(), asyncio.Event()

    async def first() -> list[object]:
        with hv.reading_once("vm1"):
            before = (await hv.domain_named("vm1")).state
            looked.set()
            await changed.wait()
            return [before, (await hv.domain_named("vm1")).state]

    async def second() -> object:
        await looked.wait()
        await asyncio.to_thread(suspended_by_someone_else, hv)
        with hv.reading_once("vm1"):
            state = (await hv.domain_named("vm1")).state
        changed.set()
        return state

    seen_first, seen_second = await asyncio.gather(first(), second())
    outside = (await hv.domain_named("vm1")).state
    assert [s.value for s in seen_first] == ["running", "running"]  # its own look, both times
    assert seen_second.value == outside.value == "paused"  # the host as it is now


@contextmanager
def libvirtd_away(hv: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """hostA's libvirtd stopped: each attempt to reach it fails ``connection-failed`` (after
    ``RECONNECT_GRACE`` s in the agent; at once here). Yields the attempts."""
    attempts: list[str] = []

    def get() -> Any:
        attempts.append("get")
        raise ConnectionFailed(f"Failed to connect to libvirt with uri: {hv.uri}: gone")

    with monkeypatch.context() as patched:
        patched.setattr(hv._pool[hv.uri], "get", get)
        yield attempts


@pytest.mark.parametrize("step", range(5))
async def test_libvirtd_away_costs_each_step_one_attempt_as_without_the_scope(
    hv: Any, monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    # Each attempt waits up to RECONNECT_GRACE (15 s) for libvirtd: a failed look followed
    # by the step's own read would make a migration wait twice as long to fail.
    read = check_steps(hv, "vm1")[step]
    with libvirtd_away(hv, monkeypatch) as attempts:
        alone = await outcome(read)
        alone_attempts = len(attempts)
        attempts.clear()
        with hv.reading_once("vm1"):
            together = await outcome(read)
        assert together == alone
        assert len(attempts) == alone_attempts
