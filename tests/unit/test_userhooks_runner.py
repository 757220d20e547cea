"""Configured pre/post hooks: the runner's policies, order, phases and timing; what a hook
wants and built-in hooks; the request payload and the hook topics.

Command hooks themselves: ``test_userhooks.py``. The MQTT kind runs against a real broker in
``tests/broker/test_userhooks_mqtt.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from userhooks_support import MIGRATE, START, hook

from asyncmigfra.errors import HookFailed
from asyncmigfra.peers import userhooks
from asyncmigfra.peers.bus import peer_topic
from asyncmigfra.peers.userhooks import (
    HOOK_POINTS,
    HookCall,
    HookRunner,
    hook_topic_of,
    hook_topics,
)
from asyncmigfra.settings import HookSettings, MqttHookSettings
from harness import RecordingContext as FakeContext

# --- policies, order, phases and timing -----------------------------------------------------------


async def test_fail_policy_stops_later_hooks_warn_policy_goes_on(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    hooks = [
        hook("a-warn", "echo a >> " + str(ran) + "; echo nope >&2; exit 1", policy="warn"),
        hook("b-ok", f"echo b >> {ran}"),
        hook("c-fail", f"echo c >> {ran}; echo broken >&2; exit 4", policy="fail"),
        hook("d-never", f"echo d >> {ran}"),
    ]
    ctx = FakeContext()

    with capture_logs() as logs, pytest.raises(HookFailed) as info:
        await HookRunner(hooks, bus=None).run(START, ctx)

    assert str(info.value) == "hook c-fail (before-start) failed: exit status 4: broken"
    assert ran.read_text().split() == ["a", "b", "c"]
    assert [name for kind, name in ctx.calls if kind == "phase"] == [
        "hook:a-warn",
        "hook:b-ok",
        "hook:c-fail",
    ]
    failed = [entry for entry in logs if entry["event"] == "hook.failed"]
    assert [(e["hook"], e["policy"], e["log_level"]) for e in failed] == [
        ("a-warn", "warn", "warning"),
        ("c-fail", "fail", "warning"),
    ]
    assert failed[0]["error"] == "hook a-warn (before-start) failed: exit status 1: nope"


async def test_warnings_are_returned_in_order(tmp_path: Path) -> None:
    hooks = [
        hook("one", "echo first >&2; exit 1", policy="warn"),
        hook("two", "true", policy="warn"),
        hook("three", (str(tmp_path / "missing"),), policy="warn"),
    ]

    warnings = await HookRunner(hooks, bus=None).run(START, FakeContext())

    assert warnings == [
        "hook one (before-start) failed: exit status 1: first",
        f"hook three (before-start) failed: cannot run {tmp_path / 'missing'}: "
        "No such file or directory",
    ]


async def test_each_hook_is_a_phase_and_a_measurement(tmp_path: Path) -> None:
    ctx = FakeContext()
    hooks = [
        hook("first", "true", when=("before-start", "after-stop")),
        hook("elsewhere", "exit 1", when=("after-stop",)),
        hook("second", "true"),
    ]

    assert await HookRunner(hooks, bus=None).run(START, ctx) == []

    assert ctx.calls == [
        ("phase", "hook:first"),
        ("start", "hook-first"),
        ("stop", "hook-first"),
        ("phase", "hook:second"),
        ("start", "hook-second"),
        ("stop", "hook-second"),
    ]


async def test_measurement_spans_the_command(tmp_path: Path) -> None:
    """The timer runs while the command runs (its stop comes after the command ended)."""
    marks: list[tuple[str, float]] = []

    class TimedContext(FakeContext):
        @contextmanager
        def measure(self, tag: str) -> Iterator[None]:
            marks.append(("start", time.monotonic()))
            yield
            marks.append(("stop", time.monotonic()))

    await HookRunner([hook("nap", "sleep 0.3")], bus=None).run(START, TimedContext())

    (_, start), (_, stop) = marks
    assert stop - start >= 0.3


async def test_builtin_hooks_are_not_run(tmp_path: Path) -> None:
    shrink = HookSettings(
        name="shrink",
        when=("before-migrate", "after-migrate"),
        builtin="reduce-memory",
        memory_percent=50.0,
    )
    ctx = FakeContext()
    call = MIGRATE

    assert await HookRunner([shrink], bus=None).run(call, ctx) == []
    assert ctx.calls == []


async def test_mqtt_hook_without_a_bus_fails() -> None:
    mqtt = HookSettings(
        name="dcim",
        when=("before-start",),
        mqtt=MqttHookSettings(request_topic="a/req", response_topic="a/resp"),
    )

    with pytest.raises(HookFailed) as info:
        await HookRunner([mqtt], bus=None).run(START, FakeContext())

    assert str(info.value) == ("hook dcim (before-start) failed: needs the agent's MQTT connection")


async def test_unknown_point_is_a_programming_error() -> None:
    call = HookCall(point="before-lunch", task="start vm", task_id=None, vm_name="v", source="h")

    with pytest.raises(ValueError, match="unknown hook point 'before-lunch'"):
        await HookRunner([], bus=None).run(call, FakeContext())


# --- wants and builtin ----------------------------------------------------------------------------


def test_wants_and_builtin() -> None:
    shrink = HookSettings(
        name="shrink",
        when=("before-migrate", "after-migrate"),
        builtin="reduce-memory",
        memory_mib=1024,
    )
    stop = hook("after", "true", when=("after-stop",))
    runner = HookRunner([shrink, stop], bus=None)

    assert {point: runner.wants(point) for point in HOOK_POINTS} == {
        "before-migrate": False,  # only a builtin there
        "after-migrate": False,
        "before-start": False,
        "after-stop": True,
    }
    assert runner.builtin("reduce-memory") is shrink
    assert runner.builtin("something-else") is None
    assert HookRunner([], bus=None).builtin("reduce-memory") is None
    with pytest.raises(ValueError, match="unknown hook point"):
        runner.wants("before-everything")


def test_memory_target() -> None:
    percent = HookSettings(
        name="s", when=("before-migrate",), builtin="reduce-memory", memory_percent=25.0
    )
    mib = HookSettings(name="s", when=("before-migrate",), builtin="reduce-memory", memory_mib=512)

    assert percent.memory_target_mib(4096) == 1024
    assert mib.memory_target_mib(4096) == 512
    assert mib.memory_target_mib(256) == 256  # never more than the guest has


def test_request_payload_leaves_out_what_is_unset() -> None:
    mqtt = HookSettings(
        name="dcim",
        when=("after-migrate",),
        on="destination",
        mqtt=MqttHookSettings(request_topic="a", response_topic="b"),
    )
    call = HookCall(
        point="after-migrate",
        task="migrate vm",
        task_id=None,
        vm_name="v",
        source="s",
        destination="d",
        outcome="success",
    )

    assert userhooks.hook_request(mqtt, call, "abc") == {
        "request-id": "abc",
        "hook": "dcim",
        "point": "after-migrate",
        "task": "migrate vm",
        "vm-name": "v",
        "source": "s",
        "destination": "d",
        "host": "d",
        "outcome": "success",
    }


def test_hook_topics_of_peers_are_derived_from_the_own_topic():
    assert hook_topic_of("fast/migfra/node1/task") == "fast/migfra/node1/hook"
    assert hook_topic_of("single") == "single/hook"
    own = hook_topics("fast/migfra/node1/task", "node1")
    assert own is not None
    # Requests name their sender last, answers their answering agent last.
    assert own.request_to("node2") == "fast/migfra/node2/hook/node1"
    assert own.requests == "fast/migfra/node1/hook/+"
    assert own.answers_from("node2") == "fast/migfra/node1/hook-response/node2"
    assert own.answer_to("node2") == "fast/migfra/node2/hook-response/node1"
    assert own.sender("fast/migfra/node1/hook/node2") == "node2"
    assert own.sender("fast/migfra/node1/hook") is None
    assert own.sender("fast/migfra/node1/hook/node2/response") is None
    assert peer_topic("fast/migfra/node1/hook", "node1", "node2") == "fast/migfra/node2/hook"
    # The host name must be exactly one level; a peer name cannot widen a topic.
    assert hook_topics("site/x/task", "node1") is None
    assert hook_topics("n/n/task", "n") is None
    assert peer_topic("site/x/hook", "node1", "node2") is None
    for bad in ("a+b", "#", "a/b", "a\0b", "", "node1"):
        assert own.request_to(bad) is None
        if bad != "node1":
            assert peer_topic("fast/migfra/node1/hook", "node1", bad) is None
