"""Keep docs/protocol.md honest: its tables and examples are checked against the code.

* every wire code in ``errors.CODES`` has a row in the error code table;
* every event type ``events.Events`` can emit, every progress field the migration engine
  emits and every phase name the code announces has a row in the events section;
* every task name has a heading in the tasks section, every result name a row in the results
  table;
* every YAML example that is a task parses with ``parse_task``, unless it is marked
  ``<!-- invalid -->``, in which case it must be *rejected*; a block marked
  ``<!-- rejection-of-previous -->`` must be, byte for byte, the reply to the invalid example
  before it;
* every result, event and presence example loads with PyYAML's ``safe_load`` as one document,
  and is byte for byte what the agent's renderer produces from its content (so key order,
  quoting, number formats and the ``---``/``...`` framing in the doc are the real ones).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from asyncmigfra import errors
from asyncmigfra.errors import TaskRejected
from asyncmigfra.hypervisor.base import JobStats
from asyncmigfra.migration.progress import _Progress
from asyncmigfra.model import ResultEntry, ResultMessage, TaskKind
from asyncmigfra.wire.events import Events
from asyncmigfra.wire.parsing import parse_task
from asyncmigfra.wire.rendering import parse_error_result, render_event, render_result

ROOT = Path(__file__).resolve().parents[2]
DOC_PATH = ROOT / "docs" / "protocol.md"
SRC = ROOT / "src" / "asyncmigfra"

INVALID = "<!-- invalid -->"
REJECTION = "<!-- rejection-of-previous -->"


# --------------------------------------------------------------------------------------------
# Reading the document


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    #: The last non-blank line before the opening fence (an HTML comment marker, or prose).
    marker: str
    line: int

    @property
    def top_keys(self) -> set[str]:
        return set(re.findall(r"^([A-Za-z][A-Za-z0-9_-]*):", self.text, flags=re.MULTILINE))

    @property
    def kind(self) -> str:
        keys = self.top_keys
        # An ``accepted`` event has a ``task:`` key and a status result a ``state:`` key.
        if "event" in keys:
            return "event"
        if "result" in keys:
            return "result"
        if "task" in keys:
            return "task"
        if "state" in keys:
            return "presence"
        return "other"

    def __str__(self) -> str:
        return f"docs/protocol.md:{self.line} ({self.kind})"


def _blocks(doc: str) -> list[Block]:
    out: list[Block] = []
    lines = doc.split("\n")
    i = 0
    last_text = ""
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence is None:
            if line.strip():
                last_text = line.strip()
            i += 1
            continue
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        out.append(Block(fence.group(1), "\n".join(body) + "\n", last_text, start + 1))
        last_text = ""
        i += 1
    return out


def _section(doc: str, number: int) -> str:
    """The text of top-level section ``## <number>. ...`` up to the next ``## ``."""
    match = re.search(rf"^## {number}\. .*?(?=^## |\Z)", doc, flags=re.MULTILINE | re.DOTALL)
    assert match is not None, f"docs/protocol.md has no section '## {number}.'"
    return match.group(0)


def _table_names(text: str) -> set[str]:
    """Backticked names in the first column of the Markdown tables of ``text``."""
    return set(re.findall(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE))


DOC = DOC_PATH.read_text(encoding="utf-8")
BLOCKS = _blocks(DOC)
YAML_BLOCKS = [b for b in BLOCKS if b.lang == "yaml"]


# --------------------------------------------------------------------------------------------
# What the code emits


class _Recorder:
    def __init__(self) -> None:
        self.events: list[Mapping[str, object]] = []

    def emit(self, event: Mapping[str, object], *, terminal: bool = False, qos: int = 1) -> None:
        self.events.append(event)


def _emitted_event_types() -> set[str]:
    """Call every public builder of ``Events`` and collect the ``event:`` values."""
    sink = _Recorder()
    events = Events(sink, host="h")
    events.accepted("t", task="start vm", vm_names=["a"])
    events.rejected("t", code="busy", details="d")
    events.phase("t", "a", "migrating")
    events.progress("t", "a", {"phase": "migrating"})
    events.error("t", "a", code="timeout", details="d")
    events.done("t", "a", status="success", duration=1.0)
    events.plan("t", {"schedule": "placement", "details": "d"})
    builders = {n for n in dir(Events) if not n.startswith("_") and callable(getattr(Events, n))}
    assert len(sink.events) == len(builders), (
        f"Events has builders this test does not call: {sorted(builders)}"
    )
    return {str(e["event"]) for e in sink.events}


def _progress_fields() -> set[str]:
    """Every key a progress event can carry (sample, sample with action, final)."""
    stats = JobStats(
        phase="migrating",
        iteration=2,
        elapsed=1.0,
        memory_total=100,
        memory_processed=60,
        memory_remaining=40,
        data_remaining=40,
        dirty_rate=1,
        transfer_rate=2,
        expected_downtime=3.0,
    )
    progress = _Progress(max_downtime=100)
    keys = set(progress.fields(None, phase="migrating", action=None, downtime=10))
    keys |= set(progress.fields(stats, phase="migrating", action="raise-downtime", downtime=10))
    keys |= set(progress.final(downtime=10))
    # A storage copy (issue 16): its disk phase, then memory with the disks in sync.
    disks = _Progress(max_downtime=100, memory=100)
    disk_phase = replace(
        stats, iteration=0, memory_total=0, disk_total=50, disk_processed=5, disk_remaining=45
    )
    keys |= set(disks.fields(disk_phase, phase="migrating", action=None, downtime=10))
    keys |= set(disks.final(downtime=10))
    keys.add("downtime")  # added to the final event by migrating.engine._migrate_once
    return keys


def _phase_names_in_code() -> set[str]:
    found: set[str] = set()
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        found |= set(re.findall(r"""\.phase\(\s*["']([a-z-]+)["']\s*\)""", text))
        # f"hook:{hook.name}" is documented as hook:<name>
        found |= {
            f"{prefix}<name>"
            for prefix in re.findall(r"""\.phase\(\s*f["']([a-z-]+:)\{[a-z_.]*name\}["']""", text)
        }
    return found


# --------------------------------------------------------------------------------------------
# Tables


def test_every_error_code_has_a_row_in_the_code_table() -> None:
    rows = _table_names(_section(DOC, 6))
    missing = sorted(set(errors.CODES) - rows)
    assert not missing, f"error codes missing from the table in section 6: {missing}"
    unknown = sorted(rows - set(errors.CODES))
    assert not unknown, f"section 6 lists codes the code does not have: {unknown}"


def test_every_emitted_event_type_is_documented() -> None:
    emitted = _emitted_event_types()
    assert emitted == {"accepted", "rejected", "phase", "progress", "error", "done", "plan"}
    rows = _table_names(_section(DOC, 5))
    missing = sorted(emitted - rows)
    assert not missing, f"event types missing from section 5's tables: {missing}"


def test_every_progress_field_is_documented() -> None:
    rows = _table_names(_section(DOC, 5))
    missing = sorted(_progress_fields() - rows)
    assert not missing, f"progress fields missing from section 5.5: {missing}"


def test_every_phase_the_code_announces_is_documented() -> None:
    names = _phase_names_in_code()
    assert {"migrating", "hook:<name>"} <= names  # the search itself works
    rows = _table_names(_section(DOC, 5))
    missing = sorted(names - rows)
    assert not missing, f"phase names missing from section 5.4: {missing}"


def test_every_task_has_a_heading() -> None:
    headings = re.findall(r"^### .*$", _section(DOC, 3), flags=re.MULTILINE)
    missing = [k.value for k in TaskKind if not any(f"`{k.value}`" in h for h in headings)]
    assert not missing, f"tasks without a heading in section 3: {missing}"


def test_every_result_name_is_in_the_results_table() -> None:
    names = {k.result_name for k in TaskKind} | {"unknown"}
    rows = re.findall(r"^\| `[^`]+` \| `([^`]+)` \|", _section(DOC, 4), flags=re.MULTILINE)
    rows += re.findall(r"^\| unreadable message \| `([^`]+)` \|", _section(DOC, 4), re.MULTILINE)
    missing = sorted(names - set(rows))
    assert not missing, f"result names missing from the table in section 4.1: {missing}"


# --------------------------------------------------------------------------------------------
# Examples


def test_the_document_has_examples_of_every_kind() -> None:
    kinds = {b.kind for b in YAML_BLOCKS}
    assert {"task", "result", "event", "presence"} <= kinds
    assert any(b.marker == INVALID for b in YAML_BLOCKS)
    assert any(b.marker == REJECTION for b in YAML_BLOCKS)


def test_markers_are_only_used_where_they_mean_something() -> None:
    for block in YAML_BLOCKS:
        if block.marker == INVALID:
            assert block.kind == "task", f"{block}: only task examples can be marked invalid"
        if block.marker == REJECTION:
            assert block.kind == "result", f"{block}: a rejection must be a result"


@pytest.mark.parametrize("block", [b for b in YAML_BLOCKS if b.kind == "task"], ids=str)
def test_task_examples_parse_or_are_marked_invalid(block: Block) -> None:
    payload = block.text.encode("utf-8")
    if block.marker == INVALID:
        with pytest.raises(TaskRejected):
            parse_task(payload)
    else:
        msg = parse_task(payload)
        assert msg.subtasks


def _rejection_pairs() -> list[tuple[Block, Block]]:
    pairs: list[tuple[Block, Block]] = []
    previous: Block | None = None
    for block in YAML_BLOCKS:
        if block.marker == REJECTION:
            message = f"{block}: {REJECTION} must follow an example marked {INVALID}"
            assert previous is not None, message
            assert previous.marker == INVALID, message
            pairs.append((previous, block))
        previous = block
    return pairs


@pytest.mark.parametrize("pair", _rejection_pairs(), ids=lambda p: str(p[1]))
def test_rejection_examples_are_the_real_replies(pair: tuple[Block, Block]) -> None:
    invalid, reply = pair
    with pytest.raises(TaskRejected) as info:
        parse_task(invalid.text.encode("utf-8"))
    assert render_result(parse_error_result(info.value)).decode() == reply.text


def _load_one(block: Block) -> dict[str, Any]:
    # safe_load raises ComposerError ("expected a single document") on a second document.
    doc = yaml.safe_load(block.text)
    assert isinstance(doc, dict), f"{block}: not a map"
    framing = f"{block}: not framed like the agent's output (---, body, ...)"
    assert block.text.startswith("---\n"), framing
    assert block.text.endswith("\n...\n"), framing
    return doc


def _entry(raw: Mapping[str, Any]) -> ResultEntry:
    known = {"vm-name", "status", "details", "code", "time-measurement"}
    return ResultEntry(
        vm_name=raw["vm-name"],
        status=raw["status"],
        details=raw.get("details"),
        code=raw.get("code"),
        time_measurement=raw.get("time-measurement"),
        extra={k: v for k, v in raw.items() if k not in known},
    )


def _result_message(doc: Mapping[str, Any]) -> ResultMessage:
    body = {k: v for k, v in doc.items() if k not in {"result", "id"}}
    if "list" in body:
        header = {k: v for k, v in body.items() if k != "list"}
        entries = [_entry(e) for e in body["list"]]
        return ResultMessage(result=doc["result"], entries=entries, id=doc.get("id"), header=header)
    return ResultMessage(result=doc["result"], entries=[_entry(body)], id=doc.get("id"), flat=True)


RESULT_NAMES = {k.result_name for k in TaskKind} | {"unknown"}


@pytest.mark.parametrize("block", [b for b in YAML_BLOCKS if b.kind == "result"], ids=str)
def test_result_examples_are_real_renderings(block: Block) -> None:
    doc = _load_one(block)
    assert doc["result"] in RESULT_NAMES, f"{block}: unknown result name {doc['result']!r}"
    entries = doc.get("list", [doc])
    for entry in entries:
        assert entry["status"] in {"success", "error"}
        if entry["status"] == "error":
            assert entry.get("code") in errors.CODES, f"{block}: error entry without a known code"
    assert render_result(_result_message(doc)).decode() == block.text


@pytest.mark.parametrize(
    "block", [b for b in YAML_BLOCKS if b.kind in {"event", "presence"}], ids=str
)
def test_event_and_presence_examples_are_real_renderings(block: Block) -> None:
    doc = _load_one(block)
    if block.kind == "event":
        assert doc["event"] in _emitted_event_types(), f"{block}: unknown event {doc['event']!r}"
        assert list(doc)[:2] in (["event", "id"], ["event", "host"])
        if "code" in doc:
            assert doc["code"] in errors.CODES
    else:
        # Every key the agent publishes, in its order (app.Agent._status_payload).
        assert list(doc) == ["state", "host", "version", "hypervisor", "since", "tasks", "journal"]
        assert doc["state"] in {"online", "draining", "offline"}
        assert doc["journal"] in {"ok", "failing", "off"}
    assert render_event(doc).decode() == block.text


def test_other_yaml_blocks_load() -> None:
    for block in YAML_BLOCKS:
        if block.kind == "other":
            assert yaml.safe_load(block.text) is not None, f"{block}: empty"
