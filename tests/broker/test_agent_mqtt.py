"""The whole agent in this loop against a real mosquitto: the wire behaviour of spec 1-5."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from asyncmigfra.app import Agent
from harness import agent_and_scheduler, agent_settings, running_agent, scheduler

pytestmark = pytest.mark.broker

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples" / "tasks").glob("*.yaml"))


async def test_spec_1_2_result_shapes_with_dummy(mosquitto):
    """start/stop/suspend/resume/repin use ``list:``; only ``vm migrated`` is flat (spec 1.2)."""
    async with agent_and_scheduler(mosquitto.port) as (_, sched):
        r = await sched.call("task: start vm\nvm-configurations:\n  - vm-name: a\n  - vm-name: b\n")
        assert r["result"] == "vm started"
        assert [e["vm-name"] for e in r["list"]] == ["a", "b"]
        assert all(e["status"] == "success" for e in r["list"])
        assert "details" not in r["list"][0]

        r = await sched.call("task: repin vm\nvm-name: a\nvcpu-map: [[1],[2]]\n")
        assert r["result"] == "vm repinned"
        assert r["list"] == [{"vm-name": "a", "status": "success"}]

        r = await sched.call(
            "task: migrate vm\nvm-name: a\ndestination: b\ntime-measurement: true\n"
        )
        assert r["result"] == "vm migrated"
        assert r["vm-name"] == "a"
        assert r["status"] == "success"
        assert "list" not in r
        assert {"overall", "migrate"} <= set(r["time-measurement"])
        assert list(r)[-1] == "id"


async def test_spec_1_2_id_echoed_verbatim(mosquitto):
    async with agent_and_scheduler(mosquitto.port) as (_, sched):
        await sched.publish("task: suspend vm\nid: 0012\nlist:\n  - vm-name: v\n")
        r = await sched.result_for("0012")
        assert r["id"] == "0012"
        assert r["result"] == "vm suspended"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
async def test_every_example_message_is_answered(mosquitto, path: Path):
    """Each file in examples/tasks is a valid message and gets its result (dummy back-end)."""
    body = path.read_text()
    doc = yaml.safe_load(body)
    async with agent_and_scheduler(mosquitto.port) as (_, sched):
        await sched.publish(body)
        r = await sched.result_for(doc["id"])
        assert r["result"] != "unknown", r
        if doc["task"] == "quit":
            assert r == {
                "result": "quit",
                "list": [{"vm-name": "n/a", "status": "success"}],
                "id": doc["id"],
            }
        elif doc["task"] == "cancel":
            assert r["result"] == "cancelled"
        elif doc["task"] == "tune migration":  # its target is not running here
            assert r["result"] == "tuned"
            assert [e["code"] for e in r["list"]] == ["wrong-state"]
        elif doc["task"] == "migrate vm":
            assert r["status"] == "success"
        else:
            assert all(e["status"] == "success" for e in r["list"]), r


async def test_spec_5_parse_errors_answer_unknown_with_code(mosquitto):
    async with agent_and_scheduler(mosquitto.port) as (_, sched):
        await sched.publish(
            "task: start vm\nid: bad-1\nvm-configurations:\n  - vm-name: a\n    memory: lots\n"
        )
        r = await sched.result_for("bad-1")
        assert r["result"] == "unknown"
        (entry,) = r["list"]
        assert entry["vm-name"] == "unknown"
        assert entry["status"] == "error"
        assert entry["code"] == "invalid-message"
        assert "memory" in entry["details"]
        rejected = await sched.wait_for(lambda: sched.events_for("bad-1", "rejected"))
        assert rejected[0]["code"] == "invalid-message"

        await sched.publish("task: fly vm\nid: bad-2\n")
        r = await sched.result_for("bad-2")
        assert r["list"][0]["code"] == "unknown-task"

        await sched.publish(b"\xff\xfe{{{")
        r = await sched.wait_for(lambda: [x for x in sched.results if "id" not in x])
        assert r[0]["result"] == "unknown"
        assert r[0]["list"][0]["code"] == "invalid-message"


async def test_spec_1_12_dummy_never_throw_false_fails_every_operation(mosquitto):
    async with agent_and_scheduler(mosquitto.port, hv_options={"never-throw": False}) as (_, sched):
        r = await sched.call("task: stop vm\nlist:\n  - vm-name: x\n")
        (entry,) = r["list"]
        assert entry["status"] == "error"
        assert entry["details"] == "Dummy_hypervisor is set to throw always if called."
        assert entry["code"] == "hypervisor-error"
        err = await sched.wait_for(lambda: [e for e in sched.events if e.get("event") == "error"])
        assert err[0]["vm-name"] == "x"


async def test_events_accepted_phase_done(mosquitto):
    async with agent_and_scheduler(mosquitto.port) as (agent, sched):
        r = await sched.call("task: start vm\nvm-configurations:\n  - vm-name: a\n")
        tid = r["id"]
        done = await sched.wait_for(lambda: sched.events_for(tid, "done"))
        accepted = sched.events_for(tid, "accepted")
        assert accepted[0]["task"] == "start vm"
        assert accepted[0]["vm-names"] == ["a"]
        assert accepted[0]["host"] == agent.settings.hostname
        assert done[0]["status"] == "success"
        assert done[0]["vm-name"] == "a"
        assert done[0]["time"].endswith("Z")


async def test_status_retained_online_then_offline(mosquitto):
    settings = agent_settings(mosquitto.port)
    prefix = settings.mqtt.task_topic.rsplit("/", 1)[0]
    async with scheduler(mosquitto.port, prefix) as sched:
        async with running_agent(settings):
            online = await sched.state("online")
            assert online[0]["host"] == settings.hostname
            assert online[0]["hypervisor"] == "dummy"
        await sched.state("offline")
    # A late subscriber sees the retained last state.
    async with scheduler(mosquitto.port, prefix) as late:
        last = await late.wait_for(lambda: late.statuses)
        assert last[-1]["state"] == "offline"


async def test_status_task_lists_domains_and_tasks(mosquitto):
    opts = {"domains": [{"name": "v1", "vcpus": 2, "memory": 1048576, "state": "running"}]}
    async with agent_and_scheduler(mosquitto.port, hv_type="fake", hv_options=opts) as (
        agent,
        sched,
    ):
        r = await sched.call("task: status\n")
        assert r["result"] == "status"
        assert r["host"] == agent.settings.hostname
        assert r["hypervisor"] == "fake"
        assert r["tasks"] == []
        assert r["list"] == [
            {
                "vm-name": "v1",
                "status": "success",
                "state": "running",
                "vcpus": 2,
                "memory": 1048576,
            }
        ]


async def test_same_vm_tasks_never_overlap_and_run_in_order(mosquitto):
    """Tasks on one VM queue in arrival order; other VMs run in parallel (spec 6 fix)."""
    opts = {
        "stop-delay": 0.3,
        "domains": [
            {"name": "v1", "vcpus": 1, "memory": 262144, "state": "running"},
            {"name": "v2", "vcpus": 1, "memory": 262144, "state": "running"},
        ],
    }
    async with agent_and_scheduler(mosquitto.port, hv_type="fake", hv_options=opts) as (_, sched):
        await sched.publish("id: s1\ntask: stop vm\nlist:\n  - vm-name: v1\n")
        await sched.publish(
            "id: s2\ntask: start vm\nvm-configurations:\n"
            "  - vm-name: v1\n    probe-with-ssh: false\n"
        )
        await sched.publish("id: s3\ntask: stop vm\nlist:\n  - vm-name: v2\n")
        r2 = await sched.result_for("s2")
        r1 = await sched.result_for("s1")
        r3 = await sched.result_for("s3")
        # s2 (start) only succeeds if it ran after s1 (stop) completed.
        assert r1["list"][0]["status"] == "success"
        assert r2["list"][0]["status"] == "success", r2
        assert r3["list"][0]["status"] == "success"
        order = [str(r["id"]) for r in sched.results]
        assert order.index("s1") < order.index("s2")


async def test_busy_when_queue_is_full(mosquitto):
    opts = {
        "stop-delay": 0.5,
        "domains": [{"name": "v", "vcpus": 1, "memory": 1024, "state": "running"}],
    }
    limits = {"max_concurrent_tasks": 1, "max_queued_tasks": 1}
    async with agent_and_scheduler(
        mosquitto.port, hv_type="fake", hv_options=opts, limits=limits
    ) as (_, sched):
        await sched.publish("id: b1\ntask: stop vm\nlist:\n  - vm-name: v\n")
        await sched.publish("id: b2\ntask: suspend vm\nlist:\n  - vm-name: v\n")
        await sched.publish("id: b3\ntask: suspend vm\nlist:\n  - vm-name: w\n  - vm-name: x\n")
        r3 = await sched.result_for("b3")
        assert r3["result"] == "vm suspended"
        assert [e["code"] for e in r3["list"]] == ["busy", "busy"]
        assert "max-queued-tasks" in r3["list"][0]["details"]
        assert (await sched.result_for("b1"))["list"][0]["status"] == "success"


async def test_duplicate_task_id_is_not_executed_twice(mosquitto):
    opts = {"domains": [{"name": "v", "vcpus": 1, "memory": 1024, "state": "running"}]}
    async with agent_and_scheduler(mosquitto.port, hv_type="fake", hv_options=opts) as (_, sched):
        body = "id: dup-1\ntask: suspend vm\nlist:\n  - vm-name: v\n"
        await sched.publish(body)
        first = await sched.result_for("dup-1")
        assert first["list"][0]["status"] == "success"
        await sched.publish(body)  # a redelivery: must not suspend again (it would fail)
        both = await sched.wait_for(
            lambda: [r for r in sched.results if r.get("id") == "dup-1"][1:]
        )
        assert both[0] == first


async def test_cancel_queued_and_running(mosquitto):
    opts = {
        "stop-delay": 2.0,
        "domains": [{"name": "v", "vcpus": 1, "memory": 1024, "state": "running"}],
    }
    async with agent_and_scheduler(mosquitto.port, hv_type="fake", hv_options=opts) as (_, sched):
        await sched.publish("id: long\ntask: stop vm\nlist:\n  - vm-name: v\n")
        await sched.publish("id: queued\ntask: suspend vm\nlist:\n  - vm-name: v\n")
        await sched.wait_for(lambda: sched.events_for("long", "phase"))
        r = await sched.call("task: cancel\ntarget: queued\n")
        assert r["result"] == "cancelled"
        assert r["list"] == [{"vm-name": "v", "status": "success", "state": "queued"}]
        rq = await sched.result_for("queued")
        assert rq["list"][0]["code"] == "cancelled"
        r = await sched.call("task: cancel\ntarget: long\n")
        assert r["list"][0]["state"] == "running"
        rl = await sched.result_for("long")
        assert rl["list"][0]["code"] == "cancelled"
        r = await sched.call("task: cancel\ntarget: long\n")
        assert r["list"][0]["code"] == "wrong-state"


async def test_concurrent_execution_false_runs_in_order(mosquitto):
    opts = {
        "start-delay": 0.2,
        "domains": [
            {"name": f"v{i}", "vcpus": 1, "memory": 1024, "state": "shutoff"} for i in range(3)
        ],
    }
    async with agent_and_scheduler(mosquitto.port, hv_type="fake", hv_options=opts) as (_, sched):
        body = "task: start vm\nconcurrent-execution: false\nvm-configurations:\n" + "".join(
            f"  - vm-name: v{i}\n    probe-with-ssh: false\n" for i in range(3)
        )
        r = await sched.call(body)
        assert [e["status"] for e in r["list"]] == ["success"] * 3
        done = list(sched.events_for(r["id"], "done"))
        assert [e["vm-name"] for e in done] == ["v0", "v1", "v2"]
        assert all(e["duration"] >= 0.15 for e in done)


async def test_quit_is_answered_then_agent_stops(mosquitto):
    settings = agent_settings(mosquitto.port)
    prefix = settings.mqtt.task_topic.rsplit("/", 1)[0]
    async with scheduler(mosquitto.port, prefix) as sched:
        agent = Agent(settings)
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(agent.run())
            await asyncio.wait_for(agent.ready.wait(), 10)
            await sched.publish("task: quit\nid: q\n")
            assert await asyncio.wait_for(run, 10) == 0
        r = await sched.result_for("q")
        assert r["list"] == [{"vm-name": "n/a", "status": "success"}]


async def test_quit_refused_when_disabled(mosquitto):
    async with agent_and_scheduler(mosquitto.port, agent={"allow_quit": False}) as (_, sched):
        r = await sched.call("task: quit\n")
        assert r["result"] == "quit"
        assert r["list"][0]["code"] == "not-supported"
        r = await sched.call("task: status\n")
        assert r["result"] == "status"


async def test_mqtt5_response_topic_and_correlation_data(mosquitto):
    async with agent_and_scheduler(mosquitto.port) as (_, sched):
        await sched.client.subscribe("replies/for-me", qos=1)
        await sched.publish(
            "id: rr\ntask: suspend vm\nlist:\n  - vm-name: v\n",
            response_topic="replies/for-me",
            correlation_data=b"corr-42",
        )
        r = await sched.result_for("rr")
        assert r["result"] == "vm suspended"
        (reply,) = await sched.wait_for(lambda: sched.other)
        assert reply.topic == "replies/for-me"
        assert reply.correlation_data == b"corr-42"
        assert yaml.safe_load(reply.payload) == r


async def test_reconnects_and_resubscribes_after_broker_restart(private_mosquitto):
    """The original went deaf after a broker restart (spec 3); this agent resubscribes."""
    port = private_mosquitto.port
    settings = agent_settings(port)
    prefix = settings.mqtt.task_topic.rsplit("/", 1)[0]
    async with running_agent(settings) as agent:
        async with scheduler(port, prefix) as sched:
            r = await sched.call("task: suspend vm\nlist:\n  - vm-name: v\n")
            assert r["list"][0]["status"] == "success"
        private_mosquitto.stop(kill=True)
        await asyncio.sleep(0.3)
        private_mosquitto.start()
        async with asyncio.timeout(10):
            while agent.transport.connects < 2:
                await asyncio.sleep(0.05)
        async with scheduler(port, prefix) as sched:
            r = await sched.call("task: resume vm\nlist:\n  - vm-name: v\n")
            assert r["list"][0]["status"] == "success"


async def test_sequential_subtasks_keep_their_place_in_the_vm_lane(mosquitto):
    """A ``concurrent-execution: false`` subtask reserves its VM's lane on arrival, so a later
    message on that VM waits for it (spec 1.1 with the per-VM order guarantee)."""
    opts = {
        "start-delay": 0.3,
        "domains": [
            {"name": "s0", "vcpus": 1, "memory": 1024, "state": "shutoff"},
            {"name": "s1", "vcpus": 1, "memory": 1024, "state": "shutoff"},
        ],
    }
    async with agent_and_scheduler(mosquitto.port, hv_type="fake", hv_options=opts) as (_, sched):
        await sched.publish(
            "id: seq\ntask: start vm\nconcurrent-execution: false\nvm-configurations:\n"
            "  - vm-name: s0\n    probe-with-ssh: false\n"
            "  - vm-name: s1\n    probe-with-ssh: false\n"
        )
        await sched.publish("id: later\ntask: suspend vm\nlist:\n  - vm-name: s1\n")
        later = await sched.result_for("later")
        seq = await sched.result_for("seq")
        assert [e["status"] for e in seq["list"]] == ["success", "success"]
        assert later["list"][0]["status"] == "success", "suspend ran before s1 was started"


async def test_message_larger_than_the_queue_is_refused_with_a_reason(mosquitto):
    async with agent_and_scheduler(mosquitto.port, limits={"max_queued_tasks": 2}) as (_, sched):
        r = await sched.call(
            "task: stop vm\nlist:\n  - vm-name: a\n  - vm-name: b\n  - vm-name: c\n"
        )
        assert {e["code"] for e in r["list"]} == {"busy"}
        assert "split it" in r["list"][0]["details"]


async def test_retained_status_shows_running_tasks(mosquitto):
    """The fleet view (`asyncmigfra status`) reads only retained topics: the agent re-publishes
    its status when the number of running tasks changes."""
    opts = {
        "stop-delay": 3.0,
        "domains": [{"name": "v", "vcpus": 1, "memory": 1024, "state": "running"}],
    }
    async with agent_and_scheduler(mosquitto.port, hv_type="fake", hv_options=opts) as (_, sched):
        await sched.wait_for(lambda: [s for s in sched.statuses if s.get("tasks") == 0], 10)
        await sched.publish("id: busy-1\ntask: stop vm\nlist:\n  - vm-name: v\n")
        await sched.wait_for(lambda: [s for s in sched.statuses if s.get("tasks") == 1], 10)
        await sched.result_for("busy-1", 10)
        await sched.wait_for(lambda: [s for s in sched.statuses[-1:] if s.get("tasks") == 0], 10)


async def test_an_agent_stopped_while_it_subscribes_stops(mosquitto):
    """Found by the full suite: a stop that met a subscription's acknowledgement was lost
    (Python 3.11's ``wait_for`` inside aiomqtt), and the agent never exited. Stop right after
    connecting, at varying points of the start-up's subscriptions, many times."""
    for i in range(40):
        agent = Agent(agent_settings(mosquitto.port, hv_type="fake"))
        run = asyncio.create_task(agent.run())
        async with asyncio.timeout(10):
            await agent.transport.wait_connected()
        for _ in range(i % 8):
            await asyncio.sleep(0)
        agent.request_stop()
        async with asyncio.timeout(5):
            assert await run == 0, f"run {i}"


async def test_a_small_message_behind_a_large_one_is_accepted_after_it(mosquitto):
    """A large message is parsed in a worker thread; small ones arriving meanwhile wait
    behind it (only a small message that finds nothing waiting is parsed at once)."""
    padding = "".join(f"# padding line {i:05d} {'.' * 40}\n" for i in range(15000))
    bodies = [f"id: big\n{padding}task: stop vm\nlist:\n  - vm-name: v\n"]
    bodies += [f"id: small-{i}\ntask: stop vm\nlist:\n  - vm-name: w{i}\n" for i in range(3)]
    async with agent_and_scheduler(mosquitto.port) as (_, sched):
        # Handed to the client in this order at once: they arrive back to back.
        await asyncio.gather(*(sched.publish(body) for body in bodies))
        for task_id in ("big", "small-0", "small-1", "small-2"):
            await sched.result_for(task_id)
        accepted = [str(e["id"]) for e in sched.events if e.get("event") == "accepted"]
        assert accepted == ["big", "small-0", "small-1", "small-2"]
        # and afterwards, with nothing waiting, a small message is answered as before
        r = await sched.call("task: stop vm\nlist:\n  - vm-name: later\n")
        assert r["list"] == [{"vm-name": "later", "status": "success"}]
