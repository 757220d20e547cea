"""``on: destination`` command hooks between agents (``userhooks``) over an in-memory bus, and
what every hook command's environment keeps back.

* the serving agent takes the source from the topic's last level, checks every field of a
  request like a task's (the hostile review's ``vm-name`` among them), runs only its own hook
  of that name and answers on the sender's ``hook-response`` topic;
* the asking agent hears answers only from the agent it asked;
* junk is logged once and answered or ignored; the server keeps serving;
* no command sees the MQTT password: not ``ASYNCMIGFRA_MQTT_PASSWORD``, not the variable
  ``communicator.password-env`` names, not a copy of its value (a real command dumps its
  environment).

Over a real mosquitto: tests/broker/test_hooks_fake.py; with the example ACL:
tests/security/test_peer_acl.py.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from test_peerlanes import HOSTILE_VM_NAMES

from asyncmigfra.errors import HookFailed
from asyncmigfra.peers import bus as peers
from asyncmigfra.peers import userhooks
from asyncmigfra.peers.bus import MemoryBus, PeerRefusal
from asyncmigfra.peers.userhooks import HookCall, HookRunner, parse_peer_request
from asyncmigfra.peers.userhooks.remote import _peer_request_of
from asyncmigfra.settings import HookSettings, settings_from_text
from asyncmigfra.wire.parsing import valid_vm_name
from harness import RecordingContext as FakeContext
from harness import serving_on

B_TASKS = "fast/migfra/b/task"
B_REQUESTS = "fast/migfra/b/hook/+"


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def fence(command: tuple[str, ...] | str, **kw: object) -> HookSettings:
    kw.setdefault("when", ("before-migrate", "after-migrate"))
    kw.setdefault("timeout", 5.0)
    return HookSettings(name="fence", on="destination", command=command, **kw)  # type: ignore[arg-type]


def request(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "request-id": "r1",
        "hook": "fence",
        "point": "before-migrate",
        "task": "migrate vm",
        "id": "t-1",
        "vm-name": "vm1",
        "source": "a",
        "destination": "b",
        "host": "b",
    }
    return {key: value for key, value in (base | fields).items() if value is not None}


def parse(doc: dict[str, object], sender: str = "a") -> userhooks.PeerHookRequest:
    return parse_peer_request(json.dumps(doc).encode(), sender, "b")


@asynccontextmanager
async def serving(bus: MemoryBus, runner: HookRunner) -> AsyncIterator[HookRunner]:
    async with serving_on(bus, B_REQUESTS, runner.serve()):
        yield runner


async def ask(bus: MemoryBus, doc: dict[str, object] | bytes, sender: str = "a") -> dict[str, str]:
    """Publish one request as agent ``sender`` (its topic level) and return b's answer."""
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    rid = json.loads(raw).get("request-id")
    async with bus.subscription(f"fast/migfra/{sender}/hook-response/b", 1) as queue:
        bus.deliver(f"fast/migfra/b/hook/{sender}", raw)
        async with asyncio.timeout(5):
            while True:  # answers to earlier requests may still come
                _, answer = await queue.get()
                result: dict[str, str] = json.loads(answer)
                if result["request-id"] == rid:
                    return result


# --- what a request may hold --------------------------------------------------------------------


def test_a_request_of_another_agent_is_checked_and_takes_the_source_from_the_topic():
    got = parse(request(source=None, outcome=None))
    assert got == userhooks.PeerHookRequest(
        request_id="r1", hook="fence", point="before-migrate", task_id="t-1", vm_name="vm1"
    )
    after = parse(request(point="after-migrate", outcome="error", details="it broke: \u00e9"))
    assert (after.outcome, after.details) == ("error", "it broke: \u00e9")


@pytest.mark.parametrize("vm", HOSTILE_VM_NAMES)
def test_hostile_vm_names_are_refused(vm):
    with pytest.raises(PeerRefusal) as info:
        parse(request(**{"vm-name": vm}))
    assert info.value.request_id == "r1"
    assert info.value.reason.startswith("vm-name is not a valid VM name: ")
    assert info.value.reason.isprintable()


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"source": "c"}, "source 'c' is not the sender a"),
        ({"destination": "c"}, "this is b, not 'c'"),
        ({"destination": None}, "this is b, not None"),
        ({"host": "c"}, "this is b, not 'b'"),
        ({"hook": "Fence"}, "hook must be a hook name, got 'Fence'"),
        ({"hook": "../x"}, "hook must be a hook name"),
        ({"hook": "f" * 65}, "hook must be a hook name"),
        ({"hook": None}, "hook must be a hook name, got None"),
        ({"point": "before-start"}, "point must be one of before-migrate, after-migrate"),
        ({"task": "stop vm"}, "task must be 'migrate vm'"),
        ({"id": "t\n1"}, "id is not a valid task id: 't\\n1'"),
        ({"id": "x" * 257}, "values must be text of at most 256 characters, 'id' is not"),
        ({"id": "x\u202e"}, "id is not a valid task id"),
        ({"outcome": "success"}, "outcome must be success or error after-migrate"),
        (
            {"point": "after-migrate", "outcome": "maybe"},
            "outcome must be success or error after-migrate",
        ),
        ({"details": "a\x1b[31mb"}, "details must be text without control characters"),
        (
            {"details": "d" * 2001},
            "values must be text of at most 2000 characters, 'details' is not",
        ),
        ({"vm-name": 7}, "values must be text of at most 256 characters, 'vm-name' is not"),
        ({"vm-name": True}, "values must be text of at most 256 characters, 'vm-name' is not"),
        ({"extra": {"a": 1}}, "values must be scalars, 'extra' is not"),
        ({f"k{i}": "v" for i in range(30)}, "more than 32 keys"),
    ],
)
def test_junk_fields_are_refused_with_an_answerable_reason(fields, reason):
    with pytest.raises(PeerRefusal) as info:
        parse(request(**fields))
    assert info.value.request_id == "r1"
    assert info.value.reason.startswith(reason), info.value.reason


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[1]",
        b'{"request-id": "x/y"}',
        b'{"request-id": 5}',
        b'{"hook": "fence"}',
        b"{" * 20_000,
        json.dumps(request(details="x" * 20_000)).encode(),
    ],
)
def test_requests_without_a_readable_id_cannot_be_answered(raw):
    with pytest.raises(PeerRefusal) as info:
        parse_peer_request(raw, "a", "b")
    assert info.value.request_id is None


def test_only_configured_peers_are_served_by_the_parser():
    doc = json.dumps(request(source=None)).encode()
    assert parse_peer_request(doc, "a", "b", peers={"a"}).vm_name == "vm1"
    with pytest.raises(PeerRefusal, match="c is not a peer of this agent"):
        parse_peer_request(doc, "c", "b", peers={"a"})


@given(st.binary(max_size=600) | st.text(max_size=300).map(str.encode))
@hyp_settings(max_examples=300, deadline=None)
def test_any_bytes_are_a_request_or_a_refusal(raw):
    try:
        parse_peer_request(raw, "a", "b")
    except PeerRefusal as exc:
        assert exc.reason  # noqa: PT017 - the property: a refusal, never another exception


_FIELD_VALUES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["fence", "before-migrate", "after-migrate", "migrate vm", "a", "b", "r1"]),
    st.sampled_from(HOSTILE_VM_NAMES),
    st.integers(),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "request-id",
                "hook",
                "point",
                "task",
                "id",
                "vm-name",
                "source",
                "destination",
                "host",
                "outcome",
                "details",
                "x",
            ]
        ),
        _FIELD_VALUES,
    ),
    st.booleans(),
)
@hyp_settings(max_examples=500, deadline=None)
def test_any_map_gives_a_valid_request_or_a_refusal(fields, complete):
    doc = (request() | fields) if complete else fields
    try:
        got = parse_peer_request(json.dumps(doc).encode(), "a", "b")
    except PeerRefusal:
        return
    assert valid_vm_name(got.vm_name)
    assert peers._UNSAFE.search(got.vm_name) is None
    assert doc.get("source", "a") == "a"
    assert doc["destination"] == "b"
    assert got.point in ("before-migrate", "after-migrate")
    assert got.task_id is None or peers._UNSAFE.search(got.task_id) is None
    assert got.details is None or peers._UNSAFE.search(got.details) is None


def test_what_this_agent_sends_passes_the_check_on_the_other_side():
    call = HookCall(
        point="after-migrate",
        task="migrate vm",
        task_id="t-9",
        vm_name="web 1 \u00e9",
        source="a",
        destination="b",
        outcome="error",
        details="libvirt said:\n\x1b[1mno\u202e" + "x" * 5000,
    )
    sent = _peer_request_of(fence("true"), call, "abc123")
    got = parse_peer_request(json.dumps(sent).encode(), "a", "b")
    assert got.vm_name == "web 1 \u00e9"
    assert got.details is not None
    assert got.details.startswith("libvirt said:\\u000a\\u001b[1mno\\u202e")
    assert len(got.details) == userhooks.MAX_PEER_DETAILS


# --- serving --------------------------------------------------------------------------------------


async def test_the_hostile_review_request_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    pwned = tmp_path / "pwned"
    cmd = script(tmp_path, "fence.sh", f'echo "$ASYNCMIGFRA_VM_NAME" > {marker}\n')
    bus = MemoryBus()
    runner = HookRunner([fence((cmd,))], bus=bus, hostname="b", task_topic=B_TASKS)  # type: ignore[arg-type]
    with capture_logs() as logs:
        async with serving(bus, runner):
            hostile = request(**{"vm-name": f"../../etc/cron.d/x\n$(touch {pwned})"})
            answer = await ask(bus, hostile)
            assert answer["status"] == "error"
            assert answer["details"].startswith("on b: vm-name is not a valid VM name: ")
            # A legitimate request still runs, with the source from the topic.
            ok = await ask(bus, request(source=None))
            assert ok == {"request-id": "r1", "status": "success"}
    assert marker.read_text() == "vm1\n"
    assert not pwned.exists()
    refused = [e for e in logs if e["event"] == "hook.request_refused"]
    assert [(e["sender"], e["reason"][:22]) for e in refused] == [("a", "vm-name is not a valid")]
    answers = {topic for topic, _ in bus.sent}
    assert answers == {"fast/migfra/a/hook-response/b"}


async def test_the_source_a_command_sees_is_the_topics(tmp_path):
    out = tmp_path / "env"
    cmd = script(tmp_path, "env.sh", f"env | grep ^ASYNCMIGFRA_SOURCE= >> {out}\n")
    bus = MemoryBus()
    runner = HookRunner([fence((cmd,))], bus=bus, hostname="b", task_topic=B_TASKS)  # type: ignore[arg-type]
    async with serving(bus, runner):
        forged = await ask(bus, request(source="c"))  # a claims to be c
        assert forged["status"] == "error"
        assert forged["details"] == "on b: source 'c' is not the sender a"
        assert not out.exists()
        # c asking in its own name, without a JSON source: the command is told c.
        assert (await ask(bus, request(source=None), "c"))["status"] == "success"
    assert out.read_text() == "ASYNCMIGFRA_SOURCE=c\n"


async def test_junk_is_logged_once_and_the_server_keeps_serving(tmp_path):
    cmd = script(tmp_path, "ok.sh", "exit 0\n")
    bus = MemoryBus()
    runner = HookRunner([fence((cmd,))], bus=bus, hostname="b", task_topic=B_TASKS)  # type: ignore[arg-type]
    with capture_logs() as logs:
        async with serving(bus, runner):
            for junk in (b"", b"not json", b"[1]", b'{"request-id": "x"}', b"{" * 5000) * 20:
                bus.deliver("fast/migfra/b/hook/a", junk)
            bus.deliver("fast/migfra/b/hook/a/deeper", json.dumps(request()).encode())
            bus.deliver("fast/migfra/b/hook/b", json.dumps(request()).encode())  # from itself
            assert (await ask(bus, request()))["status"] == "success"
    refused = [e for e in logs if e["event"] == "hook.request_refused"]
    # One line per kind of junk (unreadable, and a request without a hook name), not one per
    # message; the messages that are no request to this agent at all: one more.
    assert sorted(e["reason"] for e in refused) == [
        "hook must be a hook name, got None",
        "not a JSON object of at most 16384 bytes",
    ]
    assert [e["event"] for e in logs].count("hook.request_ignored") == 1
    answered = [m["status"] for _, m in bus.sent]
    assert answered.count("error") == 20, "the answerable junk is answered"
    assert answered.count("success") == 1


async def test_requests_of_one_agent_are_bounded_and_duplicates_run_once(tmp_path):
    gate = tmp_path / "gate"
    count = tmp_path / "count"
    cmd = script(
        tmp_path,
        "slow.sh",
        f"echo x >> {count}\nwhile [ ! -e {gate} ]; do sleep 0.02; done\n",
    )

    def runs() -> int:
        return len(count.read_text().splitlines()) if count.exists() else 0

    bus = MemoryBus()
    runner = HookRunner([fence((cmd,))], bus=bus, hostname="b", task_topic=B_TASKS)  # type: ignore[arg-type]
    async with serving(bus, runner), bus.subscription("fast/migfra/a/hook-response/b", 1) as queue:
        for i in range(userhooks.PEER_CONCURRENCY_PER_SOURCE):
            raw = json.dumps(request(**{"request-id": f"r{i}"})).encode()
            bus.deliver("fast/migfra/b/hook/a", raw)
            bus.deliver("fast/migfra/b/hook/a", raw)  # a QoS 1 duplicate
        async with asyncio.timeout(5):
            while runs() < userhooks.PEER_CONCURRENCY_PER_SOURCE:
                await asyncio.sleep(0.02)
        bus.deliver("fast/migfra/b/hook/a", json.dumps(request(**{"request-id": "r99"})).encode())
        async with asyncio.timeout(5):
            _, raw = await queue.get()
        refused = json.loads(raw)
        assert refused["request-id"] == "r99"
        assert refused["details"] == (
            f"on b: {userhooks.PEER_CONCURRENCY_PER_SOURCE} hooks of a run here already"
        )
        # Another agent is not held up by a's: its command starts too.
        other = asyncio.create_task(ask(bus, request(source=None, **{"request-id": "r5"}), "c"))
        async with asyncio.timeout(5):
            while runs() < userhooks.PEER_CONCURRENCY_PER_SOURCE + 1:
                await asyncio.sleep(0.02)
        gate.touch()
        assert (await other)["status"] == "success"
        async with asyncio.timeout(10):
            answers = [json.loads((await queue.get())[1]) for _ in range(4)]
    assert sorted(a["request-id"] for a in answers) == ["r0", "r1", "r2", "r3"]
    assert runs() == userhooks.PEER_CONCURRENCY_PER_SOURCE + 1


# --- asking ---------------------------------------------------------------------------------------


async def test_the_asking_agent_hears_only_the_agent_it_asked():
    """a asks b; c answers (in its own name, and as a level below b's): not taken."""
    bus = MemoryBus()
    runner = HookRunner(
        [fence(("true",), timeout=0.3)],  # with PEER_MARGIN the wait is 2.3 s
        bus=bus,  # type: ignore[arg-type]
        hostname="a",
        task_topic="fast/migfra/a/task",
    )
    call = HookCall(
        point="before-migrate",
        task="migrate vm",
        task_id=None,
        vm_name="v",
        source="a",
        destination="b",
    )

    async def answer_on(*topics: str) -> None:
        async with bus.subscription("fast/migfra/b/hook/+", 1) as queue:
            topic, raw = await queue.get()
            assert topic == "fast/migfra/b/hook/a"
            rid = json.loads(raw)["request-id"]
            for where in topics:
                bus.deliver(where, json.dumps({"request-id": rid, "status": "success"}).encode())

    forger = asyncio.create_task(
        answer_on("fast/migfra/a/hook-response/c", "fast/migfra/a/hook-response/b/x")
    )
    await asyncio.sleep(0)
    with pytest.raises(HookFailed, match=r"no answer within 2\.3 s"):
        await runner.run(call, FakeContext())
    await forger

    b = asyncio.create_task(answer_on("fast/migfra/a/hook-response/b"))
    await asyncio.sleep(0)
    assert await runner.run(call, FakeContext()) == []
    await b


# --- secrets --------------------------------------------------------------------------------------


def dump_env(tmp_path: Path, name: str) -> tuple[str, Path]:
    out = tmp_path / f"{name}.env"
    return script(tmp_path, f"{name}.sh", f"env -0 > {out}\n"), out


def read_env(path: Path) -> dict[str, str]:
    entries = path.read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in entries if e)


SECRET = "pw-s3cr3t-\u00e9-value"


@pytest.fixture
def agent_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's environment as systemd's EnvironmentFile= gives it."""
    monkeypatch.setenv("MQTT_PW", SECRET)
    monkeypatch.setenv("ASYNCMIGFRA_MQTT_PASSWORD", "console-" + SECRET)
    monkeypatch.setenv("COPY_OF_THE_PASSWORD", SECRET)
    monkeypatch.setenv("HOOK_OWN_SETTING", "kept")


def settings_with_hooks(tmp_path: Path, hooks_yaml: str) -> object:
    return settings_from_text(
        "communicator:\n  username: <hostname>\n  password-env: MQTT_PW\n" + hooks_yaml,
        hostname="b",
        source="agent.yaml",
        base_dir=tmp_path,
    )


@pytest.mark.usefixtures("agent_env")
async def test_no_hook_command_sees_the_mqtt_password(tmp_path):
    """The hostile review: ``password-env: MQTT_PW`` leaked into every hook's environment."""
    local_cmd, local_out = dump_env(tmp_path, "local")
    shell_cmd, shell_out = dump_env(tmp_path, "shell")
    settings = settings_with_hooks(
        tmp_path,
        "hooks:\n"
        f"  - name: local\n    when: [before-start]\n    command: [{local_cmd}]\n"
        f"  - name: shell\n    when: [before-start]\n    command: {shell_cmd}\n",
    )
    assert settings.mqtt.password == SECRET  # type: ignore[attr-defined]
    runner = HookRunner.from_settings(settings, bus=None)  # type: ignore[arg-type]
    call = HookCall(point="before-start", task="start vm", task_id="t", vm_name="v", source="b")

    assert await runner.run(call, FakeContext()) == []

    for out in (local_out, shell_out):
        env = read_env(out)
        assert "MQTT_PW" not in env
        assert "ASYNCMIGFRA_MQTT_PASSWORD" not in env
        assert "COPY_OF_THE_PASSWORD" not in env
        assert SECRET not in out.read_bytes().decode()
        assert env["HOOK_OWN_SETTING"] == "kept"
        assert env["PATH"] == os.environ["PATH"]
        assert env["ASYNCMIGFRA_VM_NAME"] == "v"


@pytest.mark.usefixtures("agent_env")
async def test_a_destination_hook_run_for_another_agent_sees_no_password_either(tmp_path):
    cmd, out = dump_env(tmp_path, "fence")
    settings = settings_with_hooks(
        tmp_path,
        "hooks:\n"
        "  - name: fence\n    when: [before-migrate]\n    on: destination\n"
        f"    command: [{cmd}]\n",
    )
    bus = MemoryBus()
    runner = HookRunner.from_settings(settings, bus=bus)  # type: ignore[arg-type]
    async with serving(bus, runner):
        assert (await ask(bus, request()))["status"] == "success"
    env = read_env(out)
    assert {"MQTT_PW", "ASYNCMIGFRA_MQTT_PASSWORD", "COPY_OF_THE_PASSWORD"}.isdisjoint(env)
    assert SECRET not in out.read_bytes().decode()
    assert (env["ASYNCMIGFRA_SOURCE"], env["ASYNCMIGFRA_HOST"]) == ("a", "b")


def test_the_base_environment_drops_secrets_by_name_and_by_value():
    environ = {
        "A": "1",
        "MQTT_PW": "s",
        "ASYNCMIGFRA_MQTT_PASSWORD": "t",
        "OTHER": "s",
        "ASYNCMIGFRA_VM_NAME": "stale",
        "NAMED": "x",
    }
    assert userhooks.hook_base_environment(
        environ, secret_names=["NAMED"], secret_values=["s", ""]
    ) == {"A": "1"}
    # Even without settings, the console's password variable never reaches a command.
    assert userhooks.hook_base_environment({"ASYNCMIGFRA_MQTT_PASSWORD": "t", "A": ""}) == {"A": ""}
