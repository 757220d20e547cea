"""What counts as a pscom acknowledgement (``hooks.pscom_answer``, ``PscomHook``): only a
well-formed answer to the round's word, from a process level of the VM's response topic, each
process once. Everything else on the topic is ignored and logged once. Over a real mosquitto:
tests/broker/test_pscom_hook.py; with the example ACL: tests/security/test_peer_acl.py."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from asyncmigfra.errors import HookFailed
from asyncmigfra.peers.bus import topic_matches
from asyncmigfra.peers.pscom import PscomHook, pscom_answer
from asyncmigfra.settings import PscomSettings
from harness import RecordingContext as FakeContext

FILTER = "fast/pscom/vm1/+/response"


def pscom_buffer(pid: int, status: str) -> bytes:
    """What ParaStation's pscom publishes: ``sprintf`` into a buffer initialised with a
    longer text, sent whole (``sizeof``), so a NUL and the old buffer's tail follow."""
    template = b"65536 : COMPLETED\0" if status == "COMPLETED" else b"65536 : ALLOWED\0"
    text = f"{pid} : {status}".encode() + b"\0"
    return text + template[len(text) :]


def test_pscom_buffers_look_as_expected():
    assert pscom_buffer(4242, "ALLOWED") == b"4242 : ALLOWED\0\0"
    assert pscom_buffer(123, "COMPLETED") == b"123 : COMPLETED\0D\0"


@pytest.mark.parametrize(
    ("word", "topic", "payload", "who"),
    [
        ("suspend", "fast/pscom/vm1/4242/response", pscom_buffer(4242, "ALLOWED"), "4242"),
        ("resume", "fast/pscom/vm1/123/response", pscom_buffer(123, "COMPLETED"), "123"),
        ("suspend", "fast/pscom/vm1/0/response", b"suspended", "0"),
        ("resume", "fast/pscom/vm1/rank-2/response", b"resumed\n", "rank-2"),
        ("suspend", "fast/pscom/vm1/7/response", b"  7:allowed ", "7"),
        ("suspend", "fast/pscom/vm1/any/response", b"99 : ALLOWED", "any"),
    ],
)
def test_well_formed_answers_count_for_their_process(word, topic, payload, who):
    assert pscom_answer(word, FILTER, topic, payload) == who


def test_without_a_process_level_the_pid_or_nothing_tells_processes_apart():
    assert (
        pscom_answer("suspend", "pscom/vm1/response", "pscom/vm1/response", b"5 : ALLOWED") == "5"
    )
    assert pscom_answer("suspend", "pscom/vm1/response", "pscom/vm1/response", b"suspended") == ""
    assert pscom_answer("suspend", "pscom/#", "pscom/vm1/9/response", b"allowed") == (
        "vm1/9/response"
    )


@pytest.mark.parametrize(
    ("word", "topic", "payload", "why"),
    [
        ("suspend", "fast/pscom/vm2/1/response", b"suspended", "is not fast/pscom/vm1/+/response"),
        ("suspend", "fast/pscom/vm1/1/request", b"suspended", "is not"),
        ("suspend", "fast/pscom/vm1/1/response", b"resumed", "'resumed' is no answer to suspend"),
        ("resume", "fast/pscom/vm1/1/response", pscom_buffer(1, "ALLOWED"), "no answer to resume"),
        ("suspend", "fast/pscom/vm1/1/response", b"", "not an answer"),
        ("suspend", "fast/pscom/vm1/1/response", b"anything", "'anything' is no answer"),
        ("suspend", "fast/pscom/vm1/1/response", b"ALLOWED!", "not an answer"),
        ("suspend", "fast/pscom/vm1/1/response", b"\xffALLOWED", "not an answer"),
        ("suspend", "fast/pscom/vm1/1/response", b"1 : ALLOWED : x", "not an answer"),
        ("suspend", "fast/pscom/vm1/1/response", b"-1 : ALLOWED", "not an answer"),
        ("suspend", "fast/pscom/vm1/1/response", b"allowed" + b" " * 300, "bytes (at most 256)"),
        (
            "suspend",
            "fast/pscom/vm1/12/response",
            pscom_buffer(13, "ALLOWED"),
            "pid mismatch: 13 answered on the topic of '12'",
        ),
        ("suspend", "fast/pscom/vm1/1/response", b'{"status": "allowed"}', "not an answer"),
    ],
)
def test_anything_else_is_no_answer(word, topic, payload, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        pscom_answer(word, FILTER, topic, payload)


@given(st.text(max_size=20), st.binary(max_size=300))
@hyp_settings(max_examples=300, deadline=None)
def test_any_message_is_an_answer_or_a_reason(level, payload):
    topic = f"fast/pscom/vm1/{level}/response"
    try:
        who = pscom_answer("suspend", FILTER, topic, payload)
    except ValueError as exc:
        assert str(exc)  # noqa: PT017 - the property: a reason, never another exception
        return
    assert topic_matches(FILTER, topic)
    text = payload.split(b"\0", 1)[0].strip().lower()
    assert text.endswith((b"allowed", b"suspended"))
    assert who == level


@dataclass
class Bus:
    """One subscription at a time; ``script`` is what arrives once the request went out."""

    script: list[tuple[str, bytes]]
    sent: list[tuple[str, bytes]] = field(default_factory=list)
    queue: asyncio.Queue[tuple[str, bytes]] | None = None

    @asynccontextmanager
    async def subscription(self, topic: str, qos: int) -> AsyncIterator[asyncio.Queue]:
        self.queue = asyncio.Queue()
        yield self.queue
        self.queue = None

    async def send(self, topic: str, payload: bytes, qos: int) -> None:
        self.sent.append((topic, payload))
        assert self.queue is not None
        for message in self.script:
            self.queue.put_nowait(message)


def hook(script: list[tuple[str, bytes]], procs: int, timeout: float = 0.3) -> PscomHook:
    return PscomHook(Bus(script), PscomSettings(timeout=timeout), "vm1", procs)  # type: ignore[arg-type]


def at(level: object) -> str:
    return f"fast/pscom/vm1/{level}/response"


async def test_only_well_formed_answers_of_distinct_processes_count():
    forged = [
        (at(1), b"x"),  # any message used to count
        (at(1), b"resumed"),  # the other round's answer
        ("fast/pscom/vm2/1/response", b"suspended"),  # another VM
        (at(1), pscom_buffer(2, "ALLOWED")),  # another process's answer
    ]
    good = [(at(1), pscom_buffer(1, "ALLOWED")), (at(1), b"suspended"), (at(2), b"suspended")]
    with capture_logs() as logs:
        await hook(forged + good, procs=2).suspend(FakeContext())
    ignored = [e for e in logs if e["event"] == "pscom.answer_ignored"]
    # Logged once per kind (wrong answer, other topic, pid mismatch, again), not per message.
    assert [e["reason"].split(":")[0] for e in ignored] == [
        "wrong answer",
        "other topic",
        "pid mismatch",
        "again",
    ]
    done = next(e for e in logs if e["event"] == "pscom.done")
    assert (done["answers"], done["ignored"]) == (2, 5)


async def test_forged_answers_alone_are_too_few():
    forged = [(at(1), b"ok")] * 10 + [(at(1), b"suspended")] * 3
    pscom = hook(forged, procs=3)
    with capture_logs() as logs, pytest.raises(HookFailed) as info:
        await pscom._round("suspend")
    assert str(info.value) == (
        "pscom suspend: 1 of 3 processes answered within 0.3 s (12 other messages ignored)"
    )
    ignored = [e for e in logs if e["event"] == "pscom.answer_ignored"]
    assert len(ignored) == 2, "logged once per reason, not once per message"


async def test_a_vm_name_that_would_widen_the_subscription_is_refused():
    for vm in ("+", "a#", "a/b"):
        with pytest.raises(HookFailed, match="cannot be a topic level"):
            PscomHook(Bus([]), PscomSettings(), vm, 1)  # type: ignore[arg-type]
