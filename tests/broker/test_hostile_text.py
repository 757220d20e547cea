"""Text that could take over a terminal never enters the agent (issue 13): a task id with ESC
sequences or bidirectional controls is refused over the real broker and not echoed, a VM name
with a bidirectional override is refused per VM, and a start whose XML made the name regexes
backtrack is answered while a status sent right behind it still comes within 100 ms."""

from __future__ import annotations

import time

import pytest

from harness import agent_and_scheduler

pytestmark = pytest.mark.broker

ESCAPES = [
    "\x1b[2J\x1b[Hsuccess",  # clear the screen, paint a fake line
    "x\x1b]52;c;cHduZWQ=\x07",  # OSC 52: write the clipboard
    "x\x9b31m",  # C1 CSI
    "x\u202ecod.exe",  # right-to-left override
]


@pytest.mark.parametrize("tail", ESCAPES)
async def test_an_id_with_escapes_is_refused_and_not_echoed(mosquitto, tail):
    async with agent_and_scheduler(mosquitto.port) as (_, sched):
        raw = tail.encode().replace(b"\x1b", b"\\e").replace(b"\x07", b"\\a")
        body = b'id: "t1' + raw.replace(b"\xc2\x9b", b"\\x9b") + b'"\ntask: status\n'
        await sched.publish(body)
        await sched.wait_for(lambda: sched.results, 5)
        (answer,) = sched.results
        assert answer["result"] == "unknown"
        assert answer["list"][0]["code"] == "invalid-message"
        assert "id" not in answer
        assert not any(c in sched.raw_results[0].decode() for c in "\x1b\x07\x9b\u202e")


async def test_a_vm_name_with_a_bidi_override_is_refused(mosquitto):
    async with agent_and_scheduler(mosquitto.port) as (_, sched):
        result = await sched.call('task: start vm\nvm-configurations:\n  - vm-name: "vm\\u202e1"\n')
        (entry,) = result["list"]
        assert entry["status"] == "error"
        assert entry["code"] == "invalid-message"


@pytest.mark.parametrize(
    "xml",
    ["<name>" * 8000, "<domain><name>" + " " * 4000 + "<a/></name></domain>"],
    ids=["lazy-name", "spaces-in-name"],
)
async def test_hostile_xml_is_answered_without_stalling(mosquitto, xml):
    async with agent_and_scheduler(mosquitto.port, hv_type="fake") as (_, sched):
        await sched.publish(f"id: evil\ntask: start vm\nvm-configurations:\n  - xml: '{xml}'\n")
        t0 = time.perf_counter()
        status = await sched.call("task: status\n", timeout=5)
        status_s = time.perf_counter() - t0
        evil = await sched.result_for("evil", timeout=5)
        assert status["result"] == "status"
        assert status_s < 0.1, f"status answered after {status_s * 1000:.0f} ms"
        (entry,) = evil["list"]
        assert entry["status"] == "error"
