"""The lane-hold protocol between agents (``peerlanes``) over an in-memory bus: the server's
decisions, leases, renewals, releases and its answers to junk; that the sender is the topic's
last level (never a JSON field), every field is checked, and holds are bounded per sender. The
asking side's outcomes: test_peerlanes_asking.py. The same exchange over a real mosquitto
between two agents: tests/broker/test_swap_lanes.py; with the example ACL:
tests/security/test_peer_acl.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from peerlanes_support import (
    A_TASKS,
    B_TASKS,
    Keeper,
    answer_topic,
    request,
    request_topic,
    serving,
)

from asyncmigfra.peers import bus as peers
from asyncmigfra.peers import lanes as peerlanes
from asyncmigfra.peers.bus import MemoryBus, PeerRefusal, topic_matches
from asyncmigfra.peers.lanes import MAX_HOLDS_PER_SOURCE, lane_topic_of, lane_topics, parse_request

#: The exact values of the hostile review, and their kin.
HOSTILE_VM_NAMES = [
    "../../etc/cron.d/x\n$(touch /tmp/pwned)",
    "../../etc/cron.d/x",
    "a/b",
    "x\n$(id)",
    "-rf",
    ".hidden",
    "",
    "x" * 201,
    "a\x00b",
    "a\x1b[2Jb",
    "a\x7fb",
    "a\x85b",
    "a\u2028b",
    "evil\u202egnp.exe",
    "a\u202ab",
    "a\u2066b",
    "a\u2069b",
]


async def ask(bus: MemoryBus, request: dict[str, object], sender: str = "a") -> dict[str, str]:
    """Send one raw request as agent ``sender`` (its topic level) and return the answer."""
    async with bus.subscription(answer_topic(sender), 1) as queue:
        bus.deliver(request_topic(sender), json.dumps(request).encode())
        async with asyncio.timeout(2):
            _, raw = await queue.get()
    answer: dict[str, str] = json.loads(raw)
    return answer


async def no_answer(bus: MemoryBus, payload: bytes, sender: str = "a", within: float = 0.1) -> None:
    async with bus.subscription(answer_topic(sender), 1) as queue:
        bus.deliver(request_topic(sender), payload)
        await asyncio.sleep(within)
        assert queue.empty(), queue.get_nowait()


# --- topics ---------------------------------------------------------------------------------------


def test_the_sender_is_the_last_level_of_every_lane_topic():
    assert lane_topic_of("fast/migfra/node1/task") == "fast/migfra/node1/lane"
    assert lane_topic_of("single") == "single/lane"
    a = lane_topics(A_TASKS, "a")
    assert a is not None
    assert a.request_to("b") == "fast/migfra/b/lane/a"
    assert a.answers_from("b") == "fast/migfra/a/lane-response/b"
    b = lane_topics(B_TASKS, "b")
    assert b is not None
    assert b.requests == "fast/migfra/b/lane/+"
    assert b.answer_to("a") == a.answers_from("b")
    assert b.sender(a.request_to("b") or "") == "a"
    # Another prefix shape: the host level is wherever the host name is.
    site = lane_topics("site/node1/tasks/in", "node1")
    assert site is not None
    assert site.request_to("node2") == "site/node2/tasks/lane/node1"


@pytest.mark.parametrize(
    "topic",
    [
        "fast/migfra/b/lane",  # the old request topic
        "fast/migfra/b/lane/response",  # from an agent named `response` (no answer topic now)
        "fast/migfra/c/lane/a",  # to another agent
        "fast/migfra/b/lane/a/response",  # one level deeper (a user name with a '/')
        "fast/migfra/b/lane-response/a",  # an answer, not a request
        "fast/migfra/b/hook/a",  # another kind
        "fast/migfra/b/lane/b",  # from itself
        "fast/migfra/b/lane/",  # empty sender
        "fast/migfra/b/lane/a b",  # no agent name
        "xfast/migfra/b/lane/a",
    ],
)
def test_only_a_request_to_this_agent_has_a_sender(topic):
    b = lane_topics(B_TASKS, "b")
    assert b is not None
    expected = "response" if topic == "fast/migfra/b/lane/response" else None
    assert b.sender(topic) == expected


@pytest.mark.parametrize("name", ["response", "hook", "lane-response", "hook-response", "task"])
def test_no_agent_name_makes_one_kind_of_topic_look_like_another(name):
    """Requests and answers differ in their kind level, which no sender level can change."""
    b = lane_topics(B_TASKS, "b")
    other = lane_topics(f"fast/migfra/{name}/task", name)
    assert b is not None
    assert other is not None
    req = other.request_to("b")
    ans = b.answer_to(name)
    assert req is not None
    assert ans is not None
    assert b.sender(req) == name
    assert other.sender(ans) is None, "an answer is never a request"
    assert not topic_matches(b.requests, ans)
    assert not topic_matches(other.requests, ans)


@pytest.mark.parametrize("peer", ["a+b", "#", "+", "a/b", "a\0b", "", "b", "a b", "[::1]"])
def test_a_peer_name_can_never_widen_or_deepen_a_topic(peer):
    a = lane_topics(A_TASKS, "a")
    assert a is not None
    if peer == "b":
        assert a.request_to(peer) == "fast/migfra/b/lane/a"
        return
    assert a.request_to(peer) is None
    assert a.answers_from(peer) is None


def test_an_agent_whose_name_is_not_one_level_has_no_lane_topics():
    assert lane_topics("site/x/task", "node1") is None
    assert lane_topics("n/n/task", "n") is None
    assert lane_topics("fast/migfra/migfra/task", "migfra") is None  # two levels of that name
    assert lane_topics(A_TASKS, "a/b") is None


# --- the server -----------------------------------------------------------------------------------


async def test_a_hold_takes_the_lane_until_it_is_released():
    bus, keeper = MemoryBus(), Keeper()
    async with serving(bus, keeper) as server:
        assert (await ask(bus, request("hold")))["status"] == "held"
        assert keeper.held == ["v2"]
        assert server.holds == {("a", "h1"): "v2"}
        # A QoS 1 duplicate of the same hold is answered the same, and takes nothing more.
        assert (await ask(bus, request("hold")))["status"] == "held"
        assert keeper.held == ["v2"]
        assert (await ask(bus, request("renew")))["status"] == "renewed"
        assert (await ask(bus, request("release")))["status"] == "released"
        assert keeper.held == []
        assert (await ask(bus, request("release")))["status"] == "released"  # idempotent
    answers = [topic for topic, _ in bus.sent]
    assert set(answers) == {answer_topic("a")}, "every answer goes to the sender's topic"


async def test_the_json_source_may_be_left_out_but_never_disagree():
    bus, keeper = MemoryBus(), Keeper()
    async with serving(bus, keeper) as server:
        plain = request("hold")
        del plain["source"]
        assert (await ask(bus, plain))["status"] == "held"
        forged = request("hold", "h2", "v3", source="c")
        answer = await ask(bus, forged)
        assert answer["status"] == "error"
        assert answer["details"] == "on b: source 'c' is not the sender a"
        assert server.holds == {("a", "h1"): "v2"}


async def test_a_vm_with_work_on_it_is_busy():
    bus, keeper = MemoryBus(), Keeper(busy={"v2"})
    async with serving(bus, keeper):
        answer = await ask(bus, request("hold"))
    assert answer == {
        "request-id": "rhold",
        "status": "busy",
        "details": "on b: a task of this agent runs or waits on v2",
    }


async def test_a_hold_whose_lease_runs_out_is_given_back():
    bus, keeper = MemoryBus(), Keeper()
    async with serving(bus, keeper) as server:
        assert (await ask(bus, request("hold", lease="1")))["status"] == "held"
        await asyncio.sleep(0.6)
        assert (await ask(bus, request("renew", lease=1)))["status"] == "renewed"
        await asyncio.sleep(0.6)
        assert keeper.held == ["v2"], "the renewal moved the end"
        async with asyncio.timeout(2):
            while keeper.held:
                await asyncio.sleep(0.05)
        assert server.holds == {}
        answer = await ask(bus, request("renew"))
    assert answer["status"] == "error"
    assert "expired, or the agent restarted" in answer["details"]


async def test_stopping_the_server_gives_every_hold_back():
    bus, keeper = MemoryBus(), Keeper()
    async with serving(bus, keeper):
        await ask(bus, request("hold", "h1", "v1"))
        await ask(bus, request("hold", "h2", "v2"))
        assert sorted(keeper.held) == ["v1", "v2"]
    assert keeper.held == []


async def test_another_agent_can_neither_release_nor_renew_a_hold():
    """The holder is the topic's sender: c, knowing a's hold id and VM, changes nothing."""
    bus, keeper = MemoryBus(), Keeper()
    async with serving(bus, keeper) as server:
        await ask(bus, request("hold"))
        # With its own name in the JSON: its own (non-existent) hold.
        theirs = {"source": "c"}
        assert (await ask(bus, request("release") | theirs, "c"))["status"] == "released"
        renew = await ask(bus, request("renew") | theirs, "c")
        assert renew["status"] == "error"
        assert "no hold h1 of c" in renew["details"]
        # With a's name in the JSON: refused as a forgery.
        for op in ("release", "renew"):
            forged = await ask(bus, request(op), "c")
            assert forged["status"] == "error"
            assert forged["details"] == "on b: source 'a' is not the sender c"
        # The same hold id for another VM is no hold of a's either.
        other = await ask(bus, request("release", vm="v9"))
        assert other["status"] == "error"
        assert keeper.held == ["v2"]
        assert server.holds == {("a", "h1"): "v2"}


async def test_holds_are_bounded_per_sender_and_the_review_flood_blocks_nobody_else():
    """The hostile review: 256 holds made every swap of a VM fail with busy. Now one sender
    gets at most MAX_HOLDS_PER_SOURCE at once, and holds of another VM or another sender
    still work."""
    bus, keeper = MemoryBus(), Keeper()
    async with serving(bus, keeper) as server:
        statuses = []
        for i in range(256):
            answer = await ask(bus, request("hold", f"m{i}", f"vm{i}", source="mallory"), "mallory")
            statuses.append(answer["status"])
        assert statuses.count("held") == MAX_HOLDS_PER_SOURCE
        assert statuses.count("busy") == 256 - MAX_HOLDS_PER_SOURCE
        assert len(server.holds) == MAX_HOLDS_PER_SOURCE
        # An agent whose VM the flood did not take gets its hold at once.
        assert (await ask(bus, request("hold", "h1", "vm200")))["status"] == "held"
        # And the flood cannot hold in a's name: refused.
        forged = await ask(bus, request("hold", "x1", "vm201"), "mallory")
        assert forged["status"] == "error"
        # Released holds free the sender's places again.
        assert (await ask(bus, request("release", "m0", "vm0", source="mallory"), "mallory"))[
            "status"
        ] == "released"
        again = await ask(bus, request("hold", "m999", "vm999", source="mallory"), "mallory")
        assert again["status"] == "held"


async def test_only_configured_peers_are_served():
    bus, keeper = MemoryBus(), Keeper()
    async with serving(bus, keeper, peers={"a"}):
        assert (await ask(bus, request("hold")))["status"] == "held"
        answer = await ask(bus, request("hold", "h2", "v3", source="c"), "c")
        assert keeper.held == ["v2"]
    assert answer["status"] == "error"
    assert answer["details"] == "on b: c is not a peer of this agent"


@pytest.mark.parametrize("vm", HOSTILE_VM_NAMES)
async def test_hostile_vm_names_are_refused(vm):
    bus, keeper = MemoryBus(), Keeper()
    async with serving(bus, keeper):
        answer = await ask(bus, request("hold", vm=vm))
    assert answer["status"] == "error"
    assert answer["details"].startswith("on b: vm-name is not a valid VM name: ")
    assert keeper.held == []
    # What is echoed shows no control or bidirectional character raw.
    assert answer["details"].isprintable()
    assert not any(
        "\u202a" <= c <= "\u202e" or "\u2066" <= c <= "\u2069" for c in answer["details"]
    )


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"op": "steal"}, "op must be one of hold, renew, release, got 'steal'"),
        ({"hold-id": "h/x"}, "hold-id must be 1-64 letters and digits"),
        ({"hold-id": "h" * 65}, "hold-id must be 1-64 letters and digits"),
        ({"hold-id": "\u0663"}, "hold-id must be 1-64 letters and digits"),  # a non-ASCII digit
        ({"vm-name": 5}, "values must be text of at most 256 characters, 'vm-name' is not"),
        ({"vm-name": None}, "values must be text of at most 256 characters, 'vm-name' is not"),
        ({"lease": "nan"}, "lease must be a number of seconds > 0, got 'nan'"),
        ({"lease": "inf"}, "lease must be a number of seconds > 0"),
        ({"lease": "x"}, "lease must be a number of seconds > 0"),
        ({"lease": -1}, "lease must be a number of seconds > 0"),
        ({"lease": True}, "lease must be a number of seconds > 0"),
        ({"lease": "1" * 40}, "lease must be a number of seconds > 0"),
        ({"lease": 10**400}, "lease must be a number of seconds > 0"),  # beyond any float
        ({"vm-name": ["v"]}, "values must be scalars, 'vm-name' is not"),
        ({"x": {"nested": 1}}, "values must be scalars, 'x' is not"),
        ({f"k{i}": "v" for i in range(20)}, "more than 16 keys"),
        ({"details": "d" * 300}, "values must be text of at most 256 characters, 'details' is not"),
    ],
)
async def test_junk_with_a_request_id_is_answered_error(extra, reason):
    bus, keeper = MemoryBus(), Keeper()
    async with serving(bus, keeper):
        answer = await ask(bus, request("hold") | extra)
        assert keeper.held == []
        assert (await ask(bus, request("hold")))["status"] == "held", "it keeps serving"
    assert (answer["request-id"], answer["status"]) == ("rhold", "error")
    assert answer["details"].startswith(f"on b: {reason}"), answer


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1, 2]",
        b"",
        b"\xff\xfe",
        json.dumps({"op": "hold", "hold-id": "h", "vm-name": "v"}).encode(),
        json.dumps({"op": "hold", "request-id": "r/x", "hold-id": "h", "vm-name": "v"}).encode(),
        json.dumps({"op": "hold", "request-id": 7, "hold-id": "h", "vm-name": "v"}).encode(),
        b"{" * 100_000,
        b"[" * 5000 + b"]" * 5000,
        b'{"request-id": "' + b"1" * 5000 + b'"}',
    ],
    ids=[
        "not-json",
        "not-a-map",
        "empty",
        "not-utf8",
        "no-request-id",
        "bad-request-id",
        "number-id",
        "huge",
        "deep",
        "long-id",
    ],
)
async def test_unanswerable_junk_is_ignored_and_the_server_keeps_serving(payload):
    bus, keeper = MemoryBus(), Keeper()
    async with serving(bus, keeper):
        await no_answer(bus, payload)
        # Also on topics that are no request to this agent.
        bus.deliver("fast/migfra/b/lane/a/deeper", json.dumps(request("hold")).encode())
        assert (await ask(bus, request("hold")))["status"] == "held"
    answers = [m for topic, m in bus.sent if "/lane-response/" in topic]
    assert [a["request-id"] for a in answers] == ["rhold"], "junk got no answer"


async def test_junk_is_logged_once():
    from structlog.testing import capture_logs  # noqa: PLC0415

    bus, keeper = MemoryBus(), Keeper()
    with capture_logs() as logs:
        async with serving(bus, keeper):
            for _ in range(50):
                await no_answer(bus, b"not json", within=0)
            await ask(bus, request("hold"))
    refused = [e for e in logs if e["event"] == "lanes.request_refused"]
    assert len(refused) == 1, refused
    assert refused[0]["sender"] == "a"


def test_leases_are_bounded():
    def lease(value: object) -> float:
        return parse_request(json.dumps(request("hold", lease=value)).encode(), "a").lease

    assert lease("0.01") == 1.0
    assert lease("1e9") == peerlanes.MAX_LEASE
    assert lease(45) == 45.0
    assert lease("7.5") == 7.5
    assert parse_request(json.dumps(request("hold")).encode(), "a").lease == peerlanes.LEASE


# --- properties -----------------------------------------------------------------------------------


def _checked(raw: bytes, sender: str = "a") -> peerlanes.LaneRequest | None:
    refusal: PeerRefusal | None = None
    try:
        return parse_request(raw, sender)
    except PeerRefusal as exc:
        refusal = exc
    assert refusal.reason
    assert refusal.request_id is None or refusal.request_id.isascii()
    return None


@given(st.binary(max_size=600) | st.text(max_size=300).map(str.encode))
@hyp_settings(max_examples=300, deadline=None)
def test_any_bytes_are_a_request_or_a_refusal_never_an_exception(raw):
    parsed = _checked(raw)
    if parsed is not None:
        assert parsed.op in ("hold", "renew", "release")
        assert parsed.request_id.isascii()
        assert parsed.request_id.isalnum()


@given(
    st.dictionaries(
        st.sampled_from(["op", "request-id", "hold-id", "vm-name", "source", "lease", "x"]),
        st.one_of(
            st.text(max_size=20),
            st.sampled_from(["hold", "renew", "release", "a", "r1", "h1", "v1", "../x", "5"]),
            st.integers(),
            st.floats(),
            st.none(),
            st.booleans(),
            st.lists(st.text(), max_size=2),
        ),
    )
)
@hyp_settings(max_examples=500, deadline=None)
def test_any_json_map_is_a_checked_request_or_a_refusal(document):
    parsed = _checked(json.dumps(document).encode())
    if parsed is not None:
        assert document.get("source", "a") == "a"
        assert parsed.vm_name == document["vm-name"]
        assert "/" not in parsed.vm_name
        assert parsed.vm_name.isprintable()
        assert peerlanes.MIN_LEASE <= parsed.lease <= peerlanes.MAX_LEASE


@given(st.text(min_size=1, max_size=250))
@hyp_settings(max_examples=500, deadline=None)
def test_a_vm_name_is_taken_only_when_a_task_could_name_it(vm):
    from asyncmigfra.wire.parsing import valid_vm_name  # noqa: PLC0415

    parsed = _checked(json.dumps(request("hold", vm=vm)).encode())
    if parsed is not None:
        assert valid_vm_name(vm)
        assert peers._UNSAFE.search(vm) is None
    elif valid_vm_name(vm) and peers._UNSAFE.search(vm) is None:
        pytest.fail(f"refused a valid name {vm!r}")
