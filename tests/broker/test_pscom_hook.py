"""The pscom hook through MQTT (spec 1.10, and its bugs in spec 9 fixed): a fake group of MPI
processes answers on the response topic while two ``fake`` hosts migrate the VM."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from test_migrate_fake import GIB, _cluster, _dom, two_hosts

from asyncmigfra.transport.mqtt import ToolClient

pytestmark = pytest.mark.broker


def task_subscriptions(agent: Any) -> list[str]:
    """The agent's extra subscriptions besides the peer requests it always serves (lane holds,
    inbound reservations)."""
    always = ("/lane/+", "/inbound/+")
    return [topic for topic, _, _ in agent.transport._extra if not topic.endswith(always)]


def pscom_buffer(pid: int, status: str) -> bytes:
    """What ParaStation's pscom publishes (its whole sprintf buffer, NUL and old tail)."""
    template = b"65536 : COMPLETED\0" if status == "COMPLETED" else b"65536 : ALLOWED\0"
    text = f"{pid} : {status}".encode() + b"\0"
    return text + template[len(text) :]


@dataclass
class MpiProcs:
    """``answers[word]`` processes answer each ``word`` request (after ``delay`` s); before
    them, ``noise`` is published on the response topic (what used to count as answers)."""

    client: ToolClient
    vm: str
    answers: dict[str, int]
    delay: float = 0.0
    #: ``pscom``: answer as ParaStation's pscom does (``<pid> : ALLOWED``), else plain words.
    pscom: bool = False
    noise: list[tuple[str, bytes]] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)
    seen: asyncio.Event = field(default_factory=asyncio.Event)

    def answer(self, word: str, rank: int) -> tuple[str, bytes]:
        if self.pscom:
            pid = 4000 + rank
            status = "ALLOWED" if word == "suspend" else "COMPLETED"
            return f"fast/pscom/{self.vm}/{pid}/response", pscom_buffer(pid, status)
        said = {"suspend": b"suspended", "resume": b"resumed"}.get(word, b"?")
        return f"fast/pscom/{self.vm}/{rank}/response", said

    async def pump(self) -> None:
        async for msg in self.client.messages():
            self.requests.append(msg.payload)
            self.seen.set()
            word = msg.payload.decode()
            if self.delay:
                await asyncio.sleep(self.delay)
            for topic, payload in self.noise:
                await self.client.publish(topic, payload, qos=0)
            for rank in range(self.answers.get(word, 0)):
                topic, payload = self.answer(word, rank)
                await self.client.publish(topic, payload, qos=0)


@contextlib.asynccontextmanager
async def mpi_procs(
    port: int, vm: str, answers: dict[str, int], **kw: Any
) -> AsyncIterator[MpiProcs]:
    client = ToolClient("127.0.0.1", port, client_id=f"mpi-{uuid.uuid4().hex[:8]}")
    async with client:
        await client.subscribe(f"fast/pscom/{vm}/any_proc/request", qos=0)
        procs = MpiProcs(client, vm, answers, **kw)
        async with asyncio.TaskGroup() as tg:
            pump = tg.create_task(procs.pump())
            try:
                yield procs
            finally:
                pump.cancel()


def _vm() -> str:
    return f"mpi-{uuid.uuid4().hex[:6]}"


def _task(vm: str, dest: str, procs: object = 3) -> str:
    return (
        f"task: migrate vm\nvm-name: {vm}\ndestination: {dest}\ntime-measurement: true\n"
        f"parameter:\n  migration-type: live\n  pscom-hook-procs: {procs}\n"
    )


async def test_spec_1_10_suspend_and_resume_around_the_migration(mosquitto):
    vm = _vm()
    async with (
        two_hosts(mosquitto.port, [_dom(vm)]) as (agent, sched, shared),
        mpi_procs(mosquitto.port, vm, {"suspend": 3, "resume": 3}) as mpi,
    ):
        _, dest = shared["names"]
        r = await sched.call(_task(vm, dest), timeout=20)
        assert (r["status"], r["destination"]) == ("success", dest), r
        # Plain words, exactly as the original sends them.
        assert mpi.requests == [b"suspend", b"resume"]
        assert {f"pscom-suspend-{vm}", f"pscom-resume-{vm}"} <= set(r["time-measurement"])
        phases = [e["phase"] for e in sched.events_for(r["id"], "phase")]
        order = ["pre-checks", "pscom-suspend", "detach-devices", "migrating", "pscom-resume"]
        assert [p for p in phases if p in order] == order
        assert _cluster(shared).locate(vm) == dest
        assert task_subscriptions(agent) == []  # the response subscription is gone


async def test_zero_procs_means_no_hook(mosquitto):
    vm = _vm()
    async with (
        two_hosts(mosquitto.port, [_dom(vm)]) as (_, sched, shared),
        mpi_procs(mosquitto.port, vm, {"suspend": 1, "resume": 1}) as mpi,
    ):
        _, dest = shared["names"]
        r = await sched.call(_task(vm, dest, procs=0), timeout=20)
        assert r["status"] == "success", r
        assert mpi.requests == []


async def test_too_few_answers_is_hook_failed_and_resume_is_still_sent(mosquitto):
    vm = _vm()
    async with (
        two_hosts(mosquitto.port, [_dom(vm)], pscom={"timeout": 0.5}) as (agent, sched, shared),
        mpi_procs(mosquitto.port, vm, {"suspend": 2, "resume": 3}) as mpi,
    ):
        src, dest = shared["names"]
        r = await sched.call(_task(vm, dest), timeout=20)
        assert (r["status"], r["code"]) == ("error", "hook-failed"), r
        assert "2 of 3" in r["details"]
        assert "destination" not in r
        assert mpi.requests == [b"suspend", b"resume"]  # the original resumed nothing
        assert _cluster(shared).locate(vm) == src  # the migration never started
        phases = [e["phase"] for e in sched.events_for(r["id"], "phase")]
        assert "migrating" not in phases
        assert task_subscriptions(agent) == []


async def test_resume_failure_after_the_migration_says_where_the_vm_is(mosquitto):
    vm = _vm()
    async with (
        two_hosts(mosquitto.port, [_dom(vm)], pscom={"timeout": 0.5}) as (_, sched, shared),
        mpi_procs(mosquitto.port, vm, {"suspend": 3, "resume": 1}),
    ):
        _, dest = shared["names"]
        r = await sched.call(_task(vm, dest), timeout=20)
        assert (r["status"], r["code"]) == ("error", "hook-failed"), r
        assert r["destination"] == dest
        assert f"migrated to {dest}" in r["details"]
        assert _cluster(shared).locate(vm) == dest


async def test_failed_migration_resumes_on_the_source(mosquitto):
    vm = _vm()
    async with (
        two_hosts(mosquitto.port, [_dom(vm, memory=GIB, dirty=500)], bandwidth=200) as (
            _,
            sched,
            shared,
        ),
        mpi_procs(mosquitto.port, vm, {"suspend": 2, "resume": 2}) as mpi,
    ):
        src, dest = shared["names"]
        r = await sched.call(
            _task(vm, dest, procs=2) + "  completion-timeout: 1\n  timeout-action: abort\n",
            timeout=20,
        )
        assert (r["status"], r["code"]) == ("error", "timeout"), r
        assert mpi.requests == [b"suspend", b"resume"]
        assert _cluster(shared).locate(vm) == src


async def test_cancel_during_suspend_still_sends_resume(mosquitto):
    vm = _vm()
    async with (
        two_hosts(mosquitto.port, [_dom(vm)], pscom={"timeout": 30}) as (agent, sched, shared),
        mpi_procs(mosquitto.port, vm, {"suspend": 0, "resume": 3}) as mpi,
    ):
        src, dest = shared["names"]
        await sched.publish(f"id: pc\n{_task(vm, dest)}")
        async with asyncio.timeout(10):
            await mpi.seen.wait()
        r = await sched.call("task: cancel\ntarget: pc\n")
        assert r["list"][0]["status"] == "success", r
        rm = await sched.result_for("pc", timeout=15)
        assert (rm["status"], rm["code"]) == ("error", "cancelled"), rm
        assert mpi.requests == [b"suspend", b"resume"]
        assert _cluster(shared).locate(vm) == src
        assert task_subscriptions(agent) == []


async def test_pscom_answers_in_parastations_own_format(mosquitto):
    vm = _vm()
    async with (
        two_hosts(mosquitto.port, [_dom(vm)]) as (_, sched, shared),
        mpi_procs(mosquitto.port, vm, {"suspend": 2, "resume": 2}, pscom=True) as mpi,
    ):
        _, dest = shared["names"]
        r = await sched.call(_task(vm, dest, procs=2), timeout=20)
        assert (r["status"], r["destination"]) == ("success", dest), r
        assert mpi.requests == [b"suspend", b"resume"]


async def test_junk_on_the_response_topic_is_no_acknowledgement(mosquitto):
    """Any message used to count as an answer: three forged ones made a suspend of three
    processes succeed with none of them suspended."""
    vm = _vm()
    noise = [
        (f"fast/pscom/{vm}/0/response", b"x"),
        (f"fast/pscom/{vm}/1/response", b"resumed"),  # the wrong round
        (f"fast/pscom/{vm}/2/response", pscom_buffer(7, "ALLOWED")),  # another process's pid
        (f"fast/pscom/{vm}/3/response", b"suspended" + b" " * 300),  # too long
    ]
    async with (
        two_hosts(mosquitto.port, [_dom(vm)], pscom={"timeout": 0.5}) as (agent, sched, shared),
        mpi_procs(mosquitto.port, vm, {"suspend": 1, "resume": 3}, noise=noise) as mpi,
    ):
        src, dest = shared["names"]
        r = await sched.call(_task(vm, dest), timeout=20)
        assert (r["status"], r["code"]) == ("error", "hook-failed"), r
        assert r["details"] == (
            "pscom suspend: 1 of 3 processes answered within 0.5 s (4 other messages ignored)"
        )
        assert mpi.requests == [b"suspend", b"resume"]
        assert _cluster(shared).locate(vm) == src
        assert task_subscriptions(agent) == []
