"""Fuzzing the agent process through a real broker (issue item 5).

The whole corpus of ``corpus.generate()`` (10,000 deterministic messages: valid tasks of every
type and their flipped, nulled, truncated, mutated, huge, deep, aliased, oversized, binary and
non-UTF-8 variants) goes to a real ``python -m asyncmigfra agent`` process (``dummy``
back-end, ``never-throw: true``) over the session mosquitto, at QoS 1, paced by a window of
unanswered messages so no broker queue limit is reached. Then:

* the process never dies and exits 0 on SIGTERM, publishing ``offline``;
* every message is answered by exactly one result: by id where the case carries a readable
  id, by count for the rest; no result carries an id from a later YAML document (``decoy-``)
  or the id of a message that must be answered without one;
* every result is one YAML document for ``yaml.safe_load`` with a ``result:`` key; every
  ``result: unknown`` has one entry with ``code`` and ``details``; where the corpus knows the
  outcome (accepted: the task's result name; rejected: the code), it matches;
* every answered id got exactly one ``accepted`` event (tasks that run) or ``rejected`` event
  (``result: unknown``, a refused ``quit``), before its result, and every event is readable by
  PyYAML's C loader (libyaml) too;
* the agent's log holds no uncaught exception (a line that is not JSON), and no result
  reports an internal error except the known ones (``KNOWN_INTERNAL_ERRORS``);
* the agent's RSS after all messages is within ``RSS_GROWTH_LIMIT`` of its RSS after the
  first 2,000 (both printed).

Figures (time, rate, RSS, answers per kind) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from corpus import DEFAULT_COUNT, DEFAULT_SEED, Case, generate

from asyncmigfra.transport.mqtt import ToolClient

pytestmark = [pytest.mark.broker, pytest.mark.slow]

#: Messages published but not answered yet, at most: keeps the broker's and the agent's
#: queues short (mosquitto: max_inflight_messages 1000, max_queued_messages 100000).
WINDOW = 200
#: RSS is read after this many answers, and again after all.
BASELINE_AFTER = 2000
#: Bytes the agent's RSS may grow between the two readings.
RSS_GROWTH_LIMIT = 20 * 1024 * 1024
#: s without progress before the run is declared stuck.
STALL_TIMEOUT = 30.0

#: Events are read with libyaml where PyYAML has it (what fast clients use).
EVENT_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

#: ``details`` of entries that report an unexpected exception inside the agent, and the
#: families in which the lead already knows them (see the fuzz report): regexes that make
#: ``re.compile`` raise ``OverflowError``/``RecursionError`` instead of ``re.error``.
KNOWN_INTERNAL_ERRORS = {("regex", "OverflowError"), ("regex", "RecursionError")}


def agent_config(path: Path, port: int) -> Path:
    state = path.parent / "state"
    path.write_text(
        "communicator:\n"
        "  host: 127.0.0.1\n"
        f"  port: {port}\n"
        "  reconnect-min-delay: 0.05\n"
        "  reconnect-max-delay: 0.5\n"
        "hypervisor:\n"
        "  type: dummy\n"
        "  never-throw: true\n"
        "limits:\n"
        # Nothing may legitimately wait or be refused as busy: every message is answered
        # on its own merits. The message, node, depth and subtask limits stay at their
        # defaults (the corpus has cases on both sides of each).
        "  max-concurrent-tasks: 100000\n"
        "  max-queued-tasks: 1000000\n"
        "agent:\n"
        # The corpus has `task: quit` messages; they must be answered, not obeyed.
        "  allow-quit: false\n"
        # The task journal goes to the test's directory (its default is /var/lib).
        f"  state-dir: {state}\n"
        # Fuzzed migrations may ask for the pscom hook; no MPI process answers here, so each
        # such task ends as hook-failed when this deadline passes (default: 10 s per process).
        "pscom-handler:\n"
        "  timeout: 0.2\n"
        # Fuzzed swaps ask the destination's agent for a lane hold; none runs here, so each
        # goes on uncoordinated when this passes (default: 2 s).
        "migration:\n"
        "  swap-lock-timeout: 0.2\n"
        "logging:\n"
        "  format: json\n"
        "  level: warning\n"
        "shutdown:\n"
        "  grace-period: 10\n"
    )
    return path


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass
class Answers:
    """Everything received on the result, event and status topics, parsed as a scheduler
    would: results with PyYAML's ``safe_load``, events with its C loader (same rules,
    faster; there are about twice as many)."""

    results: list[Any] = field(default_factory=list)
    unreadable: list[tuple[bytes, str]] = field(default_factory=list)
    statuses: list[Any] = field(default_factory=list)
    #: (event, id) -> how often; ``id`` is ``None`` for events without one.
    events: Counter[tuple[str, str | None]] = field(default_factory=Counter)
    #: id -> arrival number of its first ``accepted`` event / of its result.
    accepted_at: dict[str, int] = field(default_factory=dict)
    result_at: dict[str, int] = field(default_factory=dict)
    arrivals: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def count(self) -> int:
        return len(self.results) + len(self.unreadable)

    async def pump(self, client: ToolClient) -> None:
        async for msg in client.messages():
            self.arrivals += 1
            if msg.topic.endswith("/event"):
                self._event(msg.payload)
                continue
            try:
                doc = yaml.safe_load(msg.payload)
            except yaml.YAMLError as exc:
                self.unreadable.append((msg.payload, str(exc)))
            else:
                if msg.topic.endswith("/status"):
                    self.statuses.append(doc)
                else:
                    self.results.append(doc)
                    if isinstance(doc, dict) and isinstance(doc.get("id"), str):
                        self.result_at.setdefault(doc["id"], self.arrivals)
            async with self.changed:
                self.changed.notify_all()

    def _event(self, payload: bytes) -> None:
        try:
            doc = yaml.load(payload, Loader=EVENT_LOADER)
        except yaml.YAMLError as exc:
            self.events[("<unreadable>", str(exc)[:100])] += 1
            return
        if not isinstance(doc, dict) or "event" not in doc:
            self.events[("<no event key>", str(doc)[:100])] += 1
            return
        task_id = doc.get("id")
        self.events[(str(doc["event"]), task_id)] += 1
        if doc["event"] == "accepted" and isinstance(task_id, str):
            self.accepted_at.setdefault(task_id, self.arrivals)

    async def wait(self, predicate: Any, what: str, timeout: float = STALL_TIMEOUT) -> None:
        """Wait until ``predicate()``; fail after ``timeout`` s without a new message."""
        async with self.changed:
            while not predicate():
                seen = self.count
                try:
                    async with asyncio.timeout(timeout):
                        await self.changed.wait()
                except TimeoutError:
                    if self.count == seen:
                        raise AssertionError(
                            f"stuck waiting for {what}: {self.count} answers so far"
                        ) from None


def start_agent(conf: Path, hostname: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "asyncmigfra",
                "agent",
                "-c",
                str(conf),
                "--hostname",
                hostname,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )


def describe(case: Case) -> str:
    return f"#{case.index} {case.family} ({case.note}): {case.payload[:160]!r}"


def check_shape(doc: Any) -> str | None:
    """What is wrong with one result document, or ``None``."""
    if not isinstance(doc, dict) or "result" not in doc:
        return f"not a map with `result:`: {str(doc)[:200]}"
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        return f"id is not a string: {rid!r}"
    if doc["result"] == "unknown":
        entries = doc.get("list")
        if not isinstance(entries, list) or len(entries) != 1:
            return f"result: unknown without exactly one entry: {doc}"
        entry = entries[0]
        if entry.get("vm-name") != "unknown" or entry.get("status") != "error":
            return f"result: unknown with a strange entry: {entry}"
        if entry.get("code") not in {"invalid-message", "unknown-task"}:
            return f"result: unknown with code {entry.get('code')!r}"
        if not isinstance(entry.get("details"), str) or not entry["details"]:
            return f"result: unknown without details: {entry}"
    return None


def entries_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if "list" in doc:
        return list(doc["list"] or [])
    return [doc]  # `vm migrated` is flat


def rss_or_none(proc: subprocess.Popen[bytes]) -> int | None:
    return rss_bytes(proc.pid) if proc.poll() is None else None


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


async def publish_corpus(
    client: ToolClient,
    topic: str,
    cases: list[Case],
    answers: Answers,
    proc: subprocess.Popen[bytes],
    rss: dict[str, int | None],
) -> None:
    """Publish every case, at most ``WINDOW`` unanswered; read the RSS on the way."""
    for n, case in enumerate(cases, 1):
        await answers.wait(lambda n=n: n - 1 - answers.count < WINDOW, "the window")
        await client.publish(topic, case.payload, qos=1)
        if n == BASELINE_AFTER:
            await answers.wait(lambda: answers.count >= BASELINE_AFTER, "2000 answers")
            rss["baseline"] = rss_or_none(proc)
        elif n == len(cases) * 6 // 10:
            rss["60%"] = rss_or_none(proc)
    await answers.wait(lambda: answers.count >= len(cases), "all answers", 15)


@pytest.mark.timeout(300)
async def test_agent_answers_every_fuzzed_message_exactly_once(mosquitto, tmp_path):
    t0 = time.monotonic()
    cases = generate(DEFAULT_SEED, DEFAULT_COUNT)
    t_corpus = time.monotonic() - t0
    assert len(cases) >= 10_000

    host = f"fuzz-{uuid.uuid4().hex[:8]}"
    prefix = f"fast/migfra/{host}"
    log = tmp_path / "agent.log"
    proc = start_agent(agent_config(tmp_path / "agent.yaml", mosquitto.port), host, log)
    answers = Answers()
    rss: dict[str, int | None] = {"baseline": None, "60%": None}
    report = Report()
    exit_code: int | None = None
    try:
        client = ToolClient("127.0.0.1", mosquitto.port, client_id=f"fuzz-{host}", timeout=30)
        async with client, asyncio.TaskGroup() as tg:
            await client.subscribe(f"{prefix}/result", qos=1)
            await client.subscribe(f"{prefix}/event", qos=1)
            await client.subscribe(f"{prefix}/status", qos=1)
            pump = tg.create_task(answers.pump(client), name="test.fuzz-pump")
            await answers.wait(
                lambda: any(s.get("state") == "online" for s in answers.statuses), "online", 30
            )
            answers.statuses.clear()
            rss["start"] = rss_or_none(proc)
            t_start = time.monotonic()
            try:
                await publish_corpus(client, f"{prefix}/task", cases, answers, proc, rss)
            except AssertionError as exc:  # stuck: analyse what arrived, then fail
                report.problem("stuck", str(exc))
            t_answered = time.monotonic() - t_start
            # Anything extra (a second answer) would arrive right behind the last one.
            await asyncio.sleep(1.0)
            rss["end"] = rss_or_none(proc)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                await answers.wait(
                    lambda: any(s.get("state") == "offline" for s in answers.statuses),
                    "offline",
                    30,
                )
            else:
                report.problem("the agent died", f"exit code {proc.returncode}")
            pump.cancel()
        exit_code = await asyncio.to_thread(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    analyse(cases, answers, report)
    log_events, foreign_lines = read_log(log)
    for trace in tracebacks(foreign_lines):
        report.problem("uncaught exception in the agent (its log)", trace)
    base, end = rss["baseline"], rss["end"]
    growth = end - base if end is not None and base is not None else None
    print(
        f"\nfuzz: {len(cases)} messages ({sum(len(c.payload) for c in cases) / 1e6:.1f} MB, "
        f"corpus built in {t_corpus:.1f} s), answered in {t_answered:.1f} s = "
        f"{len(cases) / t_answered:.0f} messages/s\n"
        f"fuzz: agent RSS start {mib(rss['start'])}, after {BASELINE_AFTER} {mib(base)}, "
        f"at 60% {mib(rss['60%'])}, after all {mib(end)} (growth {mib(growth)}, limit "
        f"{mib(RSS_GROWTH_LIMIT)}); exit code {exit_code}\n"
        f"fuzz: {report.summary()}\n"
        f"fuzz: agent log (warning and above): {dict(log_events)}"
    )
    if exit_code != 0:
        report.problem("exit code after SIGTERM", f"{exit_code} (expected 0)")
    if growth is None or growth >= RSS_GROWTH_LIMIT:
        report.problem("memory", f"RSS grew by {mib(growth)} (limit {mib(RSS_GROWTH_LIMIT)})")
    if report.problems:
        pytest.fail(report.failures(), pytrace=False)


def tracebacks(lines: list[str]) -> list[str]:
    """Each traceback the interpreter printed, as its first line and the exception."""
    blocks: list[list[str]] = []
    for line in lines:
        header = blocks and blocks[-1] == [blocks[-1][0]] and blocks[-1][0].endswith(":")
        starts = line.startswith(("Exception in", "Fatal"))
        if not blocks or starts or (line.startswith("Traceback") and not header):
            blocks.append([])
        blocks[-1].append(line)
    return [block[0] if len(block) == 1 else f"{block[0]} ... {block[-1]}" for block in blocks]


def read_log(log: Path) -> tuple[Counter[str], list[str]]:
    """``event (level)`` -> count from the agent's JSON log, and every line that is not JSON
    (what the interpreter prints for an uncaught exception, in a thread or at exit)."""
    events: Counter[str] = Counter()
    foreign: list[str] = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            foreign.append(line)
            continue
        events[f"{entry.get('event')} ({entry.get('level')})"] += 1
    return events, foreign


@dataclass
class Report:
    #: category -> descriptions (a category is one kind of broken promise).
    problems: dict[str, list[str]] = field(default_factory=dict)
    kinds: Counter[str] = field(default_factory=Counter)
    pool: int = 0
    internal: list[str] = field(default_factory=list)
    #: Ids whose ``accepted`` event arrived after their result (§1.4 promises the opposite).
    late_accepted: list[str] = field(default_factory=list)

    def problem(self, category: str, text: str) -> None:
        self.problems.setdefault(category, []).append(text)

    def summary(self) -> str:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.kinds.items()))
        counts = {k: len(v) for k, v in self.problems.items()}
        return (
            f"answers per kind: {kinds}; answered without a recognisable id: {self.pool}; "
            f"internal errors: {len(self.internal)} {sorted(set(self.internal))}; "
            f"accepted after the result: {len(self.late_accepted)}; problems: {counts}"
        )

    def failures(self) -> str:
        out = []
        for category, items in self.problems.items():
            out.append(f"{category}: {len(items)}")
            out += [f"    {item[:400]}" for item in items[:3]]
        return "\n".join(out)


def analyse(cases: list[Case], answers: Answers, rep: Report) -> None:
    for payload, error in answers.unreadable:
        rep.problem("answer not readable by yaml.safe_load", f"{error}: {payload[:200]!r}")
    written = {c.id: c for c in cases if c.id is not None}
    matched: dict[str, list[dict[str, Any]]] = {}
    pool: list[dict[str, Any]] = []
    for doc in answers.results:
        shape = check_shape(doc)
        if shape:
            rep.problem("answer of the wrong shape", shape)
            continue
        code = ""
        if doc["result"] == "unknown":
            code = " " + doc["list"][0]["code"]
        rep.kinds[f"{doc['result']}{code}"] += 1
        rid = doc.get("id")
        case = written.get(rid) if rid is not None else None
        if rid is not None and rid.startswith("decoy-"):
            rep.problem("id read from a later document or a repeated key", rid)
        if case is None:
            pool.append(doc)
            continue
        if case.id_rule == "none":
            rep.problem("id echoed that must not be read", describe(case))
        matched.setdefault(rid, []).append(doc)

    # Exactly once, by id.
    for rid, docs in matched.items():
        if len(docs) > 1:
            rep.problem("answered more than once", f"{len(docs)}x {describe(written[rid])}")
    for case in cases:
        docs = matched.get(case.id or "", [])
        if case.id_rule == "exact" and not docs:
            rep.problem("unanswered (no result with its id)", describe(case))
        if docs and case.id_rule != "none":
            expect(rep, case, docs[0])
        for doc in docs:
            for entry in entries_of(doc):
                details = str(entry.get("details") or "")
                if details.startswith("internal error:"):
                    kind = details.split(":")[1].strip()
                    rep.internal.append(f"{case.family}/{kind}")
                    if (case.family, kind) not in KNOWN_INTERNAL_ERRORS:
                        rep.problem(
                            "unexpected internal error", f"{details[:120]}: {describe(case)}"
                        )

    # Exactly once, by count, for the rest: those without a readable id, and `maybe` cases
    # whose id was damaged or lost (their answer carries no id or an id nobody wrote).
    rep.pool = len(pool)
    rest = [
        c
        for c in cases
        if c.id_rule == "none" or (c.id_rule == "maybe" and not matched.get(c.id or ""))
    ]
    if len(pool) != len(rest):
        rep.problem(
            "answers without a recognisable id do not add up",
            f"{len(pool)} such answers for {len(rest)} such messages",
        )
    foreign = [d for d in pool if d.get("id") is not None]
    damaged = [c for c in rest if c.id_rule == "maybe"]
    if len(foreign) > len(damaged):
        rep.problem("answers with ids nobody sent", f"{len(foreign)}: {foreign[:5]}")
    # Outcomes of the id-less ones, as far as known: rejections must be `result: unknown`.
    must_reject = sum(1 for c in rest if c.id_rule == "none" and c.outcome == "reject")
    must_accept = sum(1 for c in rest if c.id_rule == "none" and c.outcome == "accept")
    unknown = sum(1 for d in pool if d["result"] == "unknown")
    if not must_reject <= unknown <= len(rest) - must_accept:
        rep.problem(
            "wrong outcome (answers without id)",
            f"{unknown} `result: unknown`, expected {must_reject}..{len(rest) - must_accept}",
        )
    total = len(answers.results) + len(answers.unreadable)
    if total != len(cases):
        rep.problem("answers do not add up", f"{total} answers for {len(cases)} messages")
    check_events(rep, answers, {rid: (written[rid], docs[0]) for rid, docs in matched.items()})


def expected_event(doc: dict[str, Any]) -> str | None:
    """The one ``accepted``/``rejected`` event a message with this answer gets (§5.1)."""
    if doc["result"] == "status":
        return None
    if doc["result"] == "unknown":
        return "rejected"
    if doc["result"] == "quit" and doc["list"][0].get("code") == "not-supported":
        return "rejected"
    return "accepted"


def check_events(rep: Report, answers: Answers, matched: dict[str, tuple[Case, Any]]) -> None:
    """Per answered id: exactly one ``accepted`` or ``rejected`` event, before the result."""
    for (kind, task_id), n in answers.events.items():
        if kind.startswith("<"):
            rep.problem(f"event not readable by {EVENT_LOADER.__name__}", f"{n}x {kind} {task_id}")
        elif isinstance(task_id, str) and task_id.startswith("decoy-"):
            rep.problem("id read from a later document or a repeated key", f"{kind}: {task_id}")
    for rid, (case, doc) in matched.items():
        want = expected_event(doc)
        got = {k: answers.events[(k, rid)] for k in ("accepted", "rejected")}
        expected = {k: int(k == want) for k in got}
        if got != expected:
            rep.problem(
                "not exactly one accepted/rejected event",
                f"{got} for `{doc['result']}`: {describe(case)}",
            )
        elif want == "accepted" and answers.accepted_at[rid] > answers.result_at[rid]:
            rep.late_accepted.append(rid)
            rep.problem("`accepted` event after the result (protocol §1.4)", describe(case))


def expect(rep: Report, case: Case, doc: dict[str, Any]) -> None:
    """Compare one answer with what the corpus knows about its message."""
    if case.outcome == "reject":
        if doc["result"] != "unknown" or doc["list"][0]["code"] != case.code:
            rep.problem("wrong outcome", f"expected {case.code}, got {doc}: {describe(case)}")
    elif case.outcome == "accept" and doc["result"] != case.result:
        got = doc["result"]
        if got == "unknown":
            got += f" ({doc['list'][0]['details']})"
        rep.problem("wrong outcome", f"expected `{case.result}`, got `{got}`: {describe(case)}")
