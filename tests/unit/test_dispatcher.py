"""The dispatcher's rules without a broker (issue 15 item 7).

A :class:`Dispatcher` is built as ``app`` builds it, but its results go to a recorder and its
events to a list. The back-end is the ``dummy`` one, gated per VM so a test decides when an
operation may finish, or the ``fake`` cluster for migrations and swaps. Each test waits for
events or results, never for a fixed time. Pinned: per-VM lanes, duplicates, cancel,
drain, ``limits.max-queued-tasks`` and exactly one result per message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from typing import Any

import pytest

from asyncmigfra.hypervisor.dummy import DummyHypervisor
from asyncmigfra.hypervisor.fake import create as create_fake
from asyncmigfra.model import ResultMessage, StartSpec
from asyncmigfra.settings import Settings, default_settings
from asyncmigfra.tasks.dispatching import Dispatcher, Reply
from harness import DispatchRecorder, running_dispatcher, submit

GIB = 1024 * 1024  # KiB
#: s any single wait may take before the test fails (they all take milliseconds).
WAIT = 5.0


class GatedDummy(DummyHypervisor):
    """A dummy whose operations on a *held* VM wait until it is released; every operation is
    logged (``begin``/``end``) and VMs in ``raises`` fail with an unexpected exception."""

    def __init__(self) -> None:
        super().__init__(never_throw=True, hostname="here")
        self.log: list[tuple[str, str, str]] = []
        self.held: set[str] = set()
        self.raises: dict[str, BaseException] = {}
        self._released: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._entered: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    def hold(self, *vms: str) -> None:
        self.held.update(vms)

    def release(self, vm: str) -> None:
        self._released[vm].set()

    async def entered(self, vm: str) -> None:
        async with asyncio.timeout(WAIT):
            await self._entered[vm].wait()

    def begun(self, vm: str) -> list[str]:
        return [op for what, op, v in self.log if what == "begin" and v == vm]

    async def _op(self, op: str, vm: str) -> None:
        self.log.append(("begin", op, vm))
        self._entered[vm].set()
        if vm in self.raises:
            raise self.raises[vm]
        if vm in self.held:
            await self._released[vm].wait()
        self.log.append(("end", op, vm))

    async def start(self, spec: StartSpec, ctx: Any) -> None:
        await self._op("start", spec.vm_name)

    async def stop(self, vm_name: str, ctx: Any, **_: bool) -> None:
        await self._op("stop", vm_name)

    async def suspend(self, vm_name: str, ctx: Any) -> None:
        await self._op("suspend", vm_name)

    async def resume(self, vm_name: str, ctx: Any) -> None:
        await self._op("resume", vm_name)


def dispatcher(
    hv: Any, settings: Settings | None = None
) -> contextlib.AbstractAsyncContextManager[tuple[Dispatcher, DispatchRecorder]]:
    """A running dispatcher as ``app.Agent`` wires it, minus MQTT, journal and bus."""
    return running_dispatcher(hv, settings or default_settings(hostname="here"), wait=WAIT)


def stop(task_id: str, *vms: str) -> str:
    return f"id: {task_id}\ntask: stop vm\nlist:\n" + "".join(f"  - vm-name: {v}\n" for v in vms)


def suspend(task_id: str, *vms: str) -> str:
    return f"id: {task_id}\ntask: suspend vm\nlist:\n" + "".join(f"  - vm-name: {v}\n" for v in vms)


def cancel(task_id: str, target: str) -> str:
    return f"id: {task_id}\ntask: cancel\ntarget: {target}\n"


def statuses(result: ResultMessage) -> list[tuple[str, str, str | None]]:
    return [(e.vm_name, e.status, e.code) for e in result.entries]


# ------------------------------------------------------------------------------ lanes


async def test_tasks_on_one_vm_run_one_after_the_other_on_different_vms_concurrently() -> None:
    hv = GatedDummy()
    hv.hold("v", "w")
    async with dispatcher(hv) as (d, rec):
        submit(d, stop("a", "v"))
        submit(d, suspend("b", "v"))
        submit(d, stop("c", "w"))
        await hv.entered("v")
        await hv.entered("w")  # w's task runs while v's first one is still running ...
        assert hv.begun("v") == ["stop"]  # ... and v's second waits in v's lane
        hv.release("w")
        rc = await rec.result("c")
        assert statuses(rc) == [("w", "success", None)]
        assert hv.begun("v") == ["stop"]
        assert not rec.results_for("a")
        assert not rec.results_for("b")
        hv.release("v")
        ra, rb = await rec.result("a"), await rec.result("b")
        assert statuses(ra) == [("v", "success", None)]
        assert statuses(rb) == [("v", "success", None)]
        v_log = [(what, op) for what, op, vm in hv.log if vm == "v"]
        assert v_log == [
            ("begin", "stop"),
            ("end", "stop"),
            ("begin", "suspend"),
            ("end", "suspend"),
        ]
        rec.assert_one_result_each("a", "b", "c")


async def test_the_lane_order_is_the_arrival_order() -> None:
    hv = GatedDummy()
    hv.hold("v")
    async with dispatcher(hv) as (d, rec):
        ops = ["stop", "suspend", "resume", "stop", "suspend"]
        for i, op in enumerate(ops):
            submit(d, f"id: t{i}\ntask: {op} vm\nlist:\n  - vm-name: v\n")
        await hv.entered("v")
        hv.release("v")
        await rec.until(lambda: len(rec.results) == len(ops))
        assert hv.begun("v") == ops
        assert [r.id for r in rec.results] == [f"t{i}" for i in range(len(ops))]
        assert [e["id"] for e in rec.events if e["event"] == "accepted"] == [
            r.id for r in rec.results
        ]


async def test_sequential_subtasks_of_one_message_run_in_list_order() -> None:
    hv = GatedDummy()
    hv.hold("x")
    async with dispatcher(hv) as (d, rec):
        submit(
            d,
            "id: seq\ntask: stop vm\nconcurrent-execution: false\nlist:\n"
            "  - vm-name: x\n  - vm-name: y\n  - vm-name: z\n",
        )
        await hv.entered("x")
        assert [vm for what, _, vm in hv.log if what == "begin"] == ["x"]  # y waits for x
        hv.release("x")
        r = await rec.result("seq")
        assert [vm for what, _, vm in hv.log if what == "begin"] == ["x", "y", "z"]
        assert statuses(r) == [(vm, "success", None) for vm in "xyz"]


# ------------------------------------------------------------------------------ duplicates


async def test_a_finished_duplicate_gets_the_remembered_result_without_running_again() -> None:
    hv = GatedDummy()
    async with dispatcher(hv) as (d, rec):
        text = stop("dup", "v")
        submit(d, text)
        first = await rec.result("dup")
        submit(d, text, reply=Reply("answers/here", b"corr"))
        await rec.until(lambda: len(rec.results) == 2)
        assert rec.results[1] is first  # the remembered result, as it was
        assert rec.replies[1] == Reply("answers/here", b"corr")  # to the copy's requester
        assert hv.begun("v") == ["stop"]
        assert len(rec.events_for("dup", "accepted")) == 1


async def test_the_same_id_with_another_payload_runs_again() -> None:
    hv = GatedDummy()
    async with dispatcher(hv) as (d, rec):
        submit(d, stop("same", "v"))
        await rec.result("same")
        submit(d, suspend("same", "v"))
        await rec.until(lambda: len(rec.results_for("same")) == 2)
        assert hv.begun("v") == ["stop", "suspend"]
        assert [r.result for r in rec.results] == ["vm stopped", "vm suspended"]


async def test_a_duplicate_of_a_running_task_is_rejected_and_the_one_result_follows() -> None:
    hv = GatedDummy()
    hv.hold("v")
    async with dispatcher(hv) as (d, rec):
        text = stop("run", "v")
        submit(d, text)
        await hv.entered("v")
        submit(d, text)
        (rejected,) = await rec.until(lambda: rec.events_for("run", "rejected"))
        assert rejected["code"] == "busy"
        assert "already running" in str(rejected["details"])
        assert not rec.results  # no answer of its own for the copy
        hv.release("v")
        r = await rec.result("run")
        assert statuses(r) == [("v", "success", None)]
        assert hv.begun("v") == ["stop"]
        rec.assert_one_result_each("run")


# ------------------------------------------------------------------------------ cancel


async def test_cancel_takes_a_queued_task_out_and_stops_a_running_one() -> None:
    hv = GatedDummy()
    hv.hold("v")
    async with dispatcher(hv) as (d, rec):
        submit(d, stop("long", "v"))
        submit(d, suspend("queued", "v"))
        await hv.entered("v")
        submit(d, cancel("c1", "queued"))
        c1 = await rec.result("c1")
        assert c1.result == "cancelled"
        assert [(e.vm_name, e.status, e.extra) for e in c1.entries] == [
            ("v", "success", {"state": "queued"})
        ]
        rq = await rec.result("queued")
        assert statuses(rq) == [("v", "error", "cancelled")]
        assert "c1" in (rq.entries[0].details or "")
        submit(d, cancel("c2", "long"))
        c2 = await rec.result("c2")
        assert [(e.status, e.extra) for e in c2.entries] == [("success", {"state": "running"})]
        rl = await rec.result("long")
        assert statuses(rl) == [("v", "error", "cancelled")]
        assert hv.begun("v") == ["stop"]  # the queued suspend never started
        assert hv.log[-1] == ("begin", "stop", "v")  # the running stop never finished
        submit(d, cancel("c3", "long"))
        c3 = await rec.result("c3")
        assert statuses(c3) == [("n/a", "error", "wrong-state")]
        rec.assert_one_result_each("long", "queued", "c1", "c2", "c3")
        assert {e["vm-name"] for e in rec.events if e["event"] == "done"} == {"v"}
        assert [e["code"] for e in rec.events if e["event"] == "error"] == ["cancelled"] * 2


async def test_cancel_aborts_the_running_migration_job_of_the_fake() -> None:
    shared: dict[str, object] = {}
    doms = [{"name": "big", "memory": 8 * GIB, "vcpus": 1, "dirty-rate": 10}]
    # 8 GiB over 100 MiB/s: about 80 s, so the migration is surely still copying.
    hv = create_fake(
        {"host": "here", "domains": doms, "peers": {"there": {}}, "bandwidth": 100},
        hostname="here",
        shared=shared,
    )
    async with dispatcher(hv) as (d, rec):
        submit(
            d,
            "id: mig\ntask: migrate vm\nvm-name: big\ndestination: there\n"
            "parameter:\n  migration-type: live\n",
        )
        await rec.until(
            lambda: any(e["phase"] == "migrating" for e in rec.events_for("mig", "phase"))
        )
        assert len(hv.cluster.jobs) == 1  # the libvirt-side job runs
        submit(d, cancel("stop-it", "mig"))
        rc = await rec.result("stop-it")
        assert [(e.status, e.extra) for e in rc.entries] == [("success", {"state": "running"})]
        rm = await rec.result("mig")
        assert rm.flat  # ``vm migrated`` is flat
        assert statuses(rm) == [("big", "error", "cancelled")]
        assert not hv.cluster.jobs  # aborted, not left running
        assert hv.cluster.locate("big") == ["here"]  # the guest stays on the source
        rec.assert_one_result_each("mig", "stop-it")


# ------------------------------------------------------------------------------ drain


async def test_tasks_arriving_while_draining_are_busy_and_running_work_finishes() -> None:
    hv = GatedDummy()
    hv.hold("v")
    async with dispatcher(hv) as (d, rec):
        submit(d, stop("before", "v"))
        await hv.entered("v")
        draining = asyncio.create_task(d.drain(grace=WAIT))
        await asyncio.sleep(0)  # drain() begins: from now on new work is refused
        assert d.draining
        submit(d, stop("late", "v", "w"))
        late = await rec.result("late")  # answered at once, while "before" still runs
        assert late.result == "vm stopped"
        assert statuses(late) == [("v", "error", "busy"), ("w", "error", "busy")]
        assert "shutting down" in (late.entries[0].details or "")
        (ev,) = rec.events_for("late", "rejected")
        assert ev["code"] == "busy"
        assert not draining.done()
        hv.release("v")
        async with asyncio.timeout(WAIT):
            await draining
        before = await rec.result("before")
        assert statuses(before) == [("v", "success", None)]
        assert hv.begun("v") == ["stop"]
        assert hv.begun("w") == []
        rec.assert_one_result_each("before", "late")


async def test_drain_cancels_what_outlives_the_grace_period_and_still_answers_it() -> None:
    hv = GatedDummy()
    hv.hold("v")
    async with dispatcher(hv) as (d, rec):
        submit(d, stop("stuck", "v"))
        submit(d, suspend("waiting", "v"))
        await hv.entered("v")
        async with asyncio.timeout(WAIT):
            await d.drain(grace=0.01)
        stuck, waiting = await rec.result("stuck"), await rec.result("waiting")
        assert statuses(stuck) == [("v", "error", "cancelled")]
        assert statuses(waiting) == [("v", "error", "cancelled")]
        assert "shutting down" in (stuck.entries[0].details or "")
        assert hv.begun("v") == ["stop"]
        rec.assert_one_result_each("stuck", "waiting")


async def test_after_close_every_task_is_answered_busy() -> None:
    hv = GatedDummy()
    async with dispatcher(hv) as (d, rec):
        d.close()
        submit(d, stop("closed", "v"))
        r = await rec.result("closed")
        assert statuses(r) == [("v", "error", "busy")]
        assert hv.log == []


# ------------------------------------------------------------------------------ limits


async def test_more_queued_subtasks_than_the_limit_are_answered_busy() -> None:
    hv = GatedDummy()
    hv.hold("v")
    settings = default_settings(hostname="here", limits={"max_queued_tasks": 2})
    async with dispatcher(hv, settings) as (d, rec):
        submit(d, stop("runs", "v"))  # runs: not queued
        await hv.entered("v")
        submit(d, suspend("waits", "v"))  # 1 queued
        submit(d, stop("too-many", "x", "y"))  # 1 + 2 > 2
        submit(d, stop("never-fits", "p", "q", "r"))  # more than the limit on its own
        submit(d, stop("fits", "v"))  # 1 + 1 <= 2
        too_many = await rec.result("too-many")
        assert statuses(too_many) == [("x", "error", "busy"), ("y", "error", "busy")]
        assert "limits.max-queued-tasks: 2" in (too_many.entries[0].details or "")
        never = await rec.result("never-fits")
        assert statuses(never) == [(vm, "error", "busy") for vm in "pqr"]
        assert "split it" in (never.entries[0].details or "")
        assert {e["id"] for e in rec.events if e["event"] == "rejected"} == {
            "too-many",
            "never-fits",
        }
        hv.release("v")
        for task_id in ("runs", "waits", "fits"):
            assert (await rec.result(task_id)).ok
        assert hv.begun("x") == []
        assert hv.begun("p") == []
        assert hv.begun("v") == ["stop", "suspend", "stop"]
        rec.assert_one_result_each("runs", "waits", "too-many", "never-fits", "fits")


async def test_at_most_max_concurrent_tasks_run_at_once() -> None:
    hv = GatedDummy()
    hv.hold("a", "b")
    settings = default_settings(hostname="here", limits={"max_concurrent_tasks": 1})
    async with dispatcher(hv, settings) as (d, rec):
        submit(d, stop("one", "a"))
        submit(d, stop("two", "b"))
        await hv.entered("a")
        assert hv.begun("b") == []  # no free slot, though b's lane is free
        hv.release("a")
        await hv.entered("b")
        assert (await rec.result("one")).ok
        hv.release("b")
        assert (await rec.result("two")).ok
        rec.assert_one_result_each("one", "two")


# ------------------------------------------------------------------------------ runner


@pytest.mark.parametrize("concurrent", [True, False], ids=["concurrent", "sequential"])
async def test_an_unexpected_exception_is_an_internal_error_entry_and_the_others_report(
    concurrent: bool,
) -> None:
    hv = GatedDummy()
    hv.raises["boom"] = RuntimeError("kaboom")
    async with dispatcher(hv) as (d, rec):
        submit(
            d,
            f"id: bug\ntask: stop vm\nconcurrent-execution: {str(concurrent).lower()}\n"
            "list:\n  - vm-name: a\n  - vm-name: boom\n  - vm-name: c\n",
        )
        r = await rec.result("bug")
        assert statuses(r) == [
            ("a", "success", None),
            ("boom", "error", "hypervisor-error"),
            ("c", "success", None),
        ]
        assert r.entries[1].details == "internal error: RuntimeError: kaboom"
        assert [("end", "stop", vm) in hv.log for vm in "ac"] == [True, True]
        (error,) = rec.events_for("bug", "error")
        assert (error["vm-name"], error["code"]) == ("boom", "hypervisor-error")
        done = {str(e["vm-name"]): e["status"] for e in rec.events_for("bug", "done")}
        assert done == {"a": "success", "boom": "error", "c": "success"}
        rec.assert_one_result_each("bug")
        # The dispatcher goes on: the next task on the same VMs runs.
        del hv.raises["boom"]
        submit(d, stop("after", "boom"))
        assert (await rec.result("after")).ok


# ------------------------------------------------------------------------------ swap


async def test_a_swap_on_two_fake_hosts_trades_the_vms() -> None:
    shared: dict[str, object] = {}
    doms = [{"name": "one", "memory": GIB, "vcpus": 1}]
    hv = create_fake(
        {
            "host": "here",
            "domains": doms,
            "peers": {"there": {"domains": [{"name": "two", "memory": GIB, "vcpus": 1}]}},
            "time-scale": 1000,
        },
        hostname="here",
        shared=shared,
    )
    # No broker: the partner's lane on the other agent is not held (``swap-lock: off``).
    settings = default_settings(hostname="here", migration={"swap_lock": "off"})
    async with dispatcher(hv, settings) as (d, rec):
        submit(
            d,
            "id: sw\ntask: migrate vm\nvm-name: one\ndestination: there\n"
            "parameter:\n  migration-type: live\n  swap-with:\n    vm-name: two\n",
        )
        r = await rec.result("sw")
        (entry,) = r.entries
        assert (r.result, entry.vm_name, entry.status) == ("vm migrated", "one", "success"), entry
        assert entry.extra["destination"] == "there"
        assert entry.extra["swap-with"] == {
            "vm-name": "two",
            "status": "success",
            "destination": "here",
            "order": "parallel",
        }
        assert hv.cluster.locate("one") == ["there"]
        assert hv.cluster.locate("two") == ["here"]
        assert not hv.cluster.jobs
        migrating = {
            e["vm-name"] for e in rec.events_for("sw", "phase") if e["phase"] == "migrating"
        }
        assert migrating == {"one", "two"}
        rec.assert_one_result_each("sw")
