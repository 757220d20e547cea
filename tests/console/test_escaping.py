"""Untrusted text never reaches a terminal raw (asyncmigfra.terminal).

The escaping function itself (examples, and properties with hypothesis), then every printing
path of the client commands fed hostile wire values, in a pipe and at a (fake) terminal, and
a check that no module of the console package writes anything except through the escaping
choke points. The real-terminal check is tests/console/test_hostile_terminal.py; with a real
broker, tests/console/test_hostile_broker.py.
"""

from __future__ import annotations

import ast
import asyncio
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
from console_support import FAKE_LINE, FORBIDDEN, hostile, raw_controls
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from asyncmigfra import cli
from asyncmigfra.console import commands
from asyncmigfra.console.connection import Connection
from asyncmigfra.console.exits import OFFLINE, CliError
from asyncmigfra.console.follow import MigrationView, _Display
from asyncmigfra.console.output import Out
from asyncmigfra.terminal import (
    BIDI_CONTROLS,
    json_safe,
    ljust,
    safe,
    safe_text,
    shown,
)

CONSOLE = Path(commands.__file__).parent

# ------------------------------------------------------------------------------ the function


def unescape(text: str) -> str:
    """The reading of :func:`safe`'s convention (the test's own decoder)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if ch != "\\" or not nxt:
            out.append(ch)
            i += 1
        elif nxt == "\\":
            out.append("\\")
            i += 2
        elif nxt in "nrt":
            out.append({"n": "\n", "r": "\r", "t": "\t"}[nxt])
            i += 2
        elif nxt in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[nxt]
            out.append(chr(int(text[i + 2 : i + 2 + n], 16)))
            i += 2 + n
        else:
            out.append("\\")
            i += 1
    return "".join(out)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("web-1", "web-1"),
        ("", ""),
        ("müller 東京 🙂", "müller 東京 🙂"),
        ("[bold red]x[/] [link=https://e/]y[/link]", "[bold red]x[/] [link=https://e/]y[/link]"),
        (":smile:", ":smile:"),
        ("\x1b[2J", "\\x1b[2J"),
        ("\x1b]52;c;cHduZWQ=\x07", "\\x1b]52;c;cHduZWQ=\\x07"),
        ("fake\rOK", "fake\\rOK"),
        ("a\nb\tc", "a\\nb\\tc"),
        ("\x00\x08\x7f", "\\x00\\x08\\x7f"),
        ("\x85\x9b2J", "\\x85\\x9b2J"),
        ("exe\u202etxt.", "exe\\u202etxt."),
        ("\u2066\u2067\u2068\u2069", "\\u2066\\u2067\\u2068\\u2069"),
        ("\u200e\u200f\u061c", "\\u200e\\u200f\\u061c"),
        ("a\u2028b\u2029", "a\\u2028b\\u2029"),
        ("zero\u200bwidth\ufeff", "zero\\u200bwidth\\ufeff"),
        ("no\xa0break", "no\\xa0break"),
        ("\ud800", "\\ud800"),
        ("tag\U000e0041", "tag\\U000e0041"),
        # Backslashes: doubled only where they would read as an escape.
        ("C:\\data\\vm.img", "C:\\data\\vm.img"),
        ("C:\\temp", "C:\\\\temp"),
        ("a\\x1bb", "a\\\\x1bb"),
        ("\\n", "\\\\n"),
        ("\\\\", "\\\\\\"),
        ("\\\x1b", "\\\\\\x1b"),
        ("end\\", "end\\"),
    ],
)  # fmt: skip
def test_safe_examples(raw, expected):
    assert safe(raw) == expected
    assert unescape(expected) == raw


def test_safe_of_non_strings():
    assert safe(3) == "3"
    assert safe(None) == "None"
    assert safe(["a\x1b"]) == "['a\\\\x1b']"  # str() of a list is its repr; escaped again


def test_every_bidi_control_is_escaped():
    for ch in BIDI_CONTROLS:
        assert not shown(ch)
        assert safe(ch) == f"\\u{ord(ch):04x}"


_INTERESTING = st.sampled_from(sorted(FORBIDDEN) + list("\\\\\\nrtxuU0a9f ") + ["\U000e0001"])
_ANY_TEXT = st.text(st.one_of(st.characters(exclude_categories=()), _INTERESTING))


@given(_ANY_TEXT)
@example(hostile("x"))
def test_safe_output_has_no_forbidden_character_and_reads_back(text):
    out = safe(text)
    assert not FORBIDDEN & set(out)
    assert all(shown(c) for c in out)
    assert out.isprintable()
    assert unescape(out) == text
    out.encode("utf-8")  # a lone surrogate would have raised


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E)))
def test_printable_ascii_passes_through(text):
    out = safe(text)
    if "\\" not in text:
        assert out == text
    else:  # only doubled backslashes are added
        assert out.replace("\\\\", "\\") == text


@given(st.text(st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))))
def test_printable_text_passes_through(text):
    if "\\" not in text and text.isprintable():
        assert safe(text) == text


@given(_ANY_TEXT, st.integers(0, 40))
def test_ljust_pads_by_the_escaped_width(text, width):
    padded = ljust(text, width)
    assert padded.startswith(text)
    assert len(safe(padded)) == max(width, len(safe(text)))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | _ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)


@given(_JSON)
@example({"id": hostile("id"), hostile("key"): [hostile("v")]})
def test_json_safe_is_the_same_json_and_terminal_safe(obj):
    text = json_safe(json.dumps(obj, ensure_ascii=False))
    assert json.loads(text) == obj
    assert not FORBIDDEN & set(text)
    assert all(shown(c) for c in text)


def test_json_safe_keeps_readable_text():
    assert json_safe(json.dumps({"b": "ü 東京"}, ensure_ascii=False)) == '{"b": "ü 東京"}'
    assert json_safe('"\u202e\x9b\U000e0001"') == '"\\u202e\\u009b\\udb40\\udc01"'


def test_safe_text_is_never_markup():
    t = safe_text("[bold red]x[/bold red]\x1b", style="bold")
    assert t.plain == "[bold red]x[/bold red]\\x1b"
    assert not t.spans or all(s.style == "bold" for s in t.spans)
    assert str(t.style) == "bold"


# ------------------------------------------------------------------------------ every path


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(params=["pipe", "terminal"])
def mode(request, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "4000")  # no wrapping: a value stays on one line
    monkeypatch.delenv("NO_COLOR", raising=False)
    return str(request.param)


def _out(mode: str) -> tuple[Out, io.StringIO, io.StringIO]:
    stream = _Tty() if mode == "terminal" else io.StringIO()
    err = io.StringIO()
    out = Out(stream=stream, err=err)
    assert out.tty == (mode == "terminal")
    return out, stream, err


def _clean(text: str, mode: str, *shown_values: str) -> str:
    """Assert ``text`` (what the CLI wrote) holds no raw control and shows each value
    escaped; returns it without rich's own codes."""
    tty = mode == "terminal"
    assert raw_controls(text, tty=tty) == [], text
    for value in shown_values:
        assert safe(value) in text, (safe(value), text)
    return text


def test_rich_markup_in_wire_strings_is_not_interpreted(monkeypatch):
    monkeypatch.setenv("COLUMNS", "4000")
    out, stream, _ = _out("terminal")
    out.line("[bold red]x[/bold red] [link=https://evil.example/]y[/link] :smile:")
    out.table(  # (the title wraps at the table's width: a wide column keeps it on one line)
        ["A" * 50], [["[bold red]cell[/]"]], title="[link=https://evil.example/]t[/link]"
    )
    text = stream.getvalue()
    assert "[bold red]x[/bold red] [link=https://evil.example/]y[/link] :smile:" in text
    assert "[bold red]cell[/]" in text
    assert "[link=https://evil.example/]t[/link]" in text
    assert "\x1b]8;" not in text  # no hyperlink
    assert "\x1b[1;31m" not in text  # no bold red
    assert "😄" not in text


def test_out_primitives(mode):
    out, stream, err = _out(mode)
    value = hostile("line")
    out.line(value, "bold")
    out.line(f"vm {value} on host-a")
    out.note(hostile("note"))
    out.error(hostile("error"))
    out.prompt(hostile("prompt"))
    text = _clean(stream.getvalue(), mode, value)
    assert len(text.strip("\n").splitlines()) == 2  # the value's own LF broke no line
    errors = _clean(err.getvalue(), "pipe", hostile("note"), hostile("error"), hostile("prompt"))
    assert errors.count("\n") == 3


def test_raw_result_yaml_keeps_its_lines_and_escapes_inside_them(mode):
    out, stream, _ = _out(mode)
    payload = (
        '---\nresult: vm stopped\nid: "\\e[2J"\nlist:\n'
        "  - vm-name: a\u202eb\t\x1b[2J\x9b\r\n"
        "# a comment\x07 with a CR\r\n...\n"
    ).encode()  # raw ESC, BEL, C1 and CR could not even be parsed; printed, they are escaped
    out.raw(payload)
    text = _clean(stream.getvalue(), "pipe")
    assert text.splitlines() == [
        "---",
        "result: vm stopped",
        'id: "\\e[2J"',
        "list:",
        "  - vm-name: a\\u202eb\\t\\x1b[2J\\x9b\\r",
        "# a comment\\x07 with a CR\\r",
        "...",
    ]


def test_json_lines_stay_exact_json(mode):
    out, stream, _ = _out(mode)
    out.json = True
    doc = {"id": hostile("id"), "host": "h", hostile("key"): [hostile("v"), 1, None]}
    out.json_line(doc)
    text = stream.getvalue()
    assert text.endswith("\n")
    assert text.count("\n") == 1
    assert not FORBIDDEN & set(text[:-1])
    assert json.loads(text) == doc


def _agents() -> dict[str, dict[str, Any]]:
    return {
        hostile("topic-host"): {
            "state": hostile("state"),
            "host": hostile("host"),
            "version": hostile("version"),
            "hypervisor": hostile("hypervisor"),
            "since": hostile("since"),
            "tasks": [hostile("tasks")],
        },
        "good": {"state": "online", "host": "good", "version": "0.1.0", "hypervisor": "fake",
                 "since": "2026-01-01T00:00:00Z", "tasks": 0},
    }  # fmt: skip


def test_status_board(mode):
    out, stream, _ = _out(mode)
    commands._show_agents(out, Connection(), _agents())
    values = [hostile(t) for t in ("state", "host", "version", "hypervisor", "since")]
    text = _clean(stream.getvalue(), mode, *values)
    if mode == "pipe":
        lines = text.splitlines()
        assert len(lines) == 3  # header, two agents: no value added a row
        assert lines[2].split() == ["good", "online", "0.1.0", "fake", "0", "2026-01-01T00:00:00Z"]
    else:
        assert FAKE_LINE in text


def test_status_board_without_host_field_shows_the_topic_host(mode):
    out, stream, _ = _out(mode)
    commands._show_agents(out, Connection(), {hostile("topic"): {"state": "online"}})
    _clean(stream.getvalue(), mode, hostile("topic"))


def test_status_board_json(mode):
    out, stream, _ = _out(mode)
    out.json = True
    commands._show_agents(out, Connection(), _agents())
    text = stream.getvalue()
    assert not FORBIDDEN & set(text.replace("\n", ""))
    docs = [json.loads(ln) for ln in text.splitlines()]
    assert docs[0]["host"] == hostile("host")
    assert docs[0]["state"] == hostile("state")
    assert docs[1]["host"] == "good"


def _host_result() -> dict[str, Any]:
    h = hostile
    return {
        "result": "status",
        "host": h("host"),
        "state": h("state"),
        "version": h("version"),
        "hypervisor": h("hypervisor"),
        "uptime": 12.5,
        "tasks": [{"id": h("tid"), "task": h("task"), "vm-name": h("tvm"), "phase": h("phase"),
                   "elapsed": 1.0}],
        "list": [
            {"vm-name": h("dvm"), "status": "success", "state": h("dstate"), "vcpus": h("vcpus"),
             "memory": 1024},
            {"vm-name": h("evm"), "status": "error", "code": h("code"), "details": h("details")},
        ],
    }  # fmt: skip


def test_host_view(mode):
    out, stream, _ = _out(mode)
    commands._show_host(out, "evil", _host_result(), {"since": hostile("since")})
    tags = ["host", "state", "version", "hypervisor", "since", "tid", "task", "tvm", "phase",
            "dvm", "dstate", "vcpus", "code", "details"]  # fmt: skip
    _clean(stream.getvalue(), mode, *(hostile(t) for t in tags))


_EVENTS: list[dict[str, Any]] = [
    {"event": "accepted", "task": hostile("task"), "vm-names": [hostile("n1"), hostile("n2")]},
    {"event": "accepted", "task": "stop vm", "vm-names": hostile("names")},
    {"event": "phase", "phase": hostile("phase")},
    {"event": "progress", "phase": hostile("pphase"), "percent": 40.0, "iteration": hostile("it"),
     "data-remaining": hostile("rem"), "transfer-rate": 10, "expected-downtime": hostile("ed"),
     "max-downtime": hostile("md"), "downtime": hostile("dt"), "action": hostile("action")},
    {"event": "error", "code": hostile("code"), "details": hostile("details")},
    {"event": "rejected", "code": hostile("rcode"), "details": hostile("rdetails")},
    {"event": "done", "status": hostile("status"), "duration": 1.0},
    {"event": hostile("kind"), hostile("key"): hostile("value")},
]  # fmt: skip


@pytest.mark.parametrize("doc", _EVENTS, ids=lambda d: str(d["event"])[:9])
def test_watch_line(mode, doc):
    out, stream, _ = _out(mode)
    wire = {"id": hostile("id"), "host": hostile("host"), "vm-name": hostile("vm"),
            "time": hostile("time"), **doc}  # fmt: skip
    out.event("topic-host", wire)
    strings = [
        v
        for k, v in wire.items()
        if isinstance(v, str) and v.startswith("<") and k != "data-remaining"  # not a number: ?
    ]
    text = _clean(stream.getvalue(), mode, *strings)
    assert text.count("\n") == 1  # one event, one line


def test_watch_line_without_host_field_shows_the_topic_host(mode):
    out, stream, _ = _out(mode)
    out.event(hostile("topic"), {"event": "phase", "phase": "migrating"})
    _clean(stream.getvalue(), mode, hostile("topic"))


class _Presence:
    """A session whose agent answers ``check_online`` with a hostile presence."""

    def __init__(self, doc: dict[str, Any] | None) -> None:
        self.doc = doc

    async def check_online(self, host: str, *, force: bool) -> dict[str, Any] | None:
        return self.doc


@pytest.mark.parametrize("state", ["draining", hostile("state")])
def test_announce_note(state):
    out, _, err = _out("pipe")
    asyncio.run(commands._announce(_Presence({"state": state}), out, "h", force=True))  # type: ignore[arg-type]
    _clean(err.getvalue(), "pipe", state)


def _feed(view: MigrationView, vm: str | None = None) -> None:
    who = {} if vm is None else {"vm-name": vm}
    for doc in _EVENTS:
        view.feed({**doc, **who})
    view.feed({"event": "progress", "phase": "completed", "percent": 100.0, "downtime": 4.0,
               "action": hostile("action2"), **who})  # fmt: skip
    view.cancel_id = "cancel-1"
    view.cancel_answer = hostile("answer")


_RESULTS = [
    {"result": "vm migrated", "status": "error", "code": hostile("code"),
     "details": hostile("details"), "retries": hostile("retries"),
     "time-measurement": {hostile("tm"): 1.0, "overall": 2.0, "downtime": 0.01}},
    {"result": "vm migrated", "status": "success", "destination": hostile("dest"),
     "details": hostile("note"), "retries": 1},
]  # fmt: skip
_SWAP_RESULTS = [
    {"result": "vm migrated", "status": "error", "code": hostile("code"),
     "details": f"swap-with {hostile('vm2')}: {hostile('d2')}",
     "swap-with": {"vm-name": hostile("vm2"), "status": "error", "code": hostile("c2"),
                   "details": hostile("d2"), "order": hostile("order")}},
    {"result": "vm migrated", "status": "success", "destination": hostile("dest"),
     "swap-with": {"status": "success", "destination": hostile("dest2"), "order": "parallel"}},
    {"result": "vm migrated", "status": "error", "code": hostile("code"), "details": hostile("d")},
]  # fmt: skip


def _view(swap: bool) -> MigrationView:
    return MigrationView(
        vm=hostile("vm"), source=hostile("src"), destination=hostile("dst"),
        task_id=hostile("tid"), migration_type=hostile("type"),
        swap_with=hostile("vm2") if swap else None,
    )  # fmt: skip


@pytest.mark.parametrize("swap", [False, True], ids=["one-vm", "swap"])
def test_follow_plain_lines_and_summary(swap):
    out, stream, _ = _out("pipe")
    view = _view(swap)
    out.line(view.header())
    for doc in _EVENTS:
        event = {**doc, "vm-name": hostile("vm2") if swap else hostile("vm")}
        view.feed(event)
        out.line(view.plain(event))
    for result in _SWAP_RESULTS if swap else _RESULTS:
        for text, style in view.summary(result, 1.0):
            out.line(text, style)
    text = _clean(stream.getvalue(), "pipe", hostile("vm"), hostile("src"), hostile("tid"))
    for tag in ("code", "details", "phase", "action"):
        assert safe(hostile(tag)) in text
    n_summary = sum(len(view.summary(r, 1.0)) for r in (_SWAP_RESULTS if swap else _RESULTS))
    assert len(text.splitlines()) == 1 + len(_EVENTS) + n_summary


@pytest.mark.parametrize("swap", [False, True], ids=["one-vm", "swap"])
def test_follow_live_view_at_a_terminal(monkeypatch, swap):
    monkeypatch.setenv("COLUMNS", "4000")
    out, stream, _ = _out("terminal")
    view = _view(swap)
    display = _Display(out, view)
    display.start()
    try:
        _feed(view, hostile("vm2") if swap else None)
        display.event({})
        time.sleep(0.2)  # a refresh or two of the live region
    finally:
        display.stop()
    for result in _SWAP_RESULTS if swap else _RESULTS:
        for text, style in view.summary(result, 1.0):
            out.line(text, style)
    tags = ["vm", "src", "dst", "tid", "type", "answer", "action2", "code", "details"]
    text = _clean(stream.getvalue(), "terminal", *(hostile(t) for t in tags))
    if swap:
        assert safe(hostile("vm2")) in text


_KEYS = st.sampled_from(
    ["event", "id", "host", "time", "vm-name", "vm-names", "task", "phase", "percent", "iteration",
     "data-remaining", "memory-remaining", "memory-total", "transfer-rate", "dirty-rate",
     "expected-downtime", "max-downtime", "downtime", "action", "code", "details", "status",
     "duration", "result", "destination", "retries", "time-measurement", "swap-with", "order",
     "state", "version", "hypervisor", "since", "tasks", "uptime", "list", "elapsed", "vcpus",
     "memory", "overall", "migrate"]
)  # fmt: skip
_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.just(10**400)
    | st.floats()
    | st.sampled_from(["progress", "phase", "accepted", "error", "rejected", "done", "success",
                      "completed", "retry-wait", "raise-downtime", "cancelled", "online"])
    | _ANY_TEXT
)  # fmt: skip
_WIRE = st.recursive(
    _SCALAR,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(_KEYS | _ANY_TEXT, inner, max_size=6)
    ),
    max_leaves=20,
)
_DOC = st.dictionaries(_KEYS | _ANY_TEXT, _WIRE, max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_DOC, min_size=1, max_size=4), _DOC, st.booleans())
def test_any_wire_document_renders_without_a_crash_or_a_raw_control(docs, result, swap):
    """Whatever an agent (or anybody) publishes: no traceback, nothing raw on the terminal."""
    out, stream, err = _out("pipe")
    tty, tty_stream, _ = _out("terminal")
    view = MigrationView(vm="v", source="a", destination="b", task_id="t",
                         swap_with="w" if swap else None)  # fmt: skip
    for doc in docs:
        out.event("h", doc)
        view.feed(doc)
        out.line(view.plain(doc))
    for text, style in view.summary(result, 1.0):
        out.line(text, style)
    commands._show_host(out, "h", result, docs[0])
    commands._show_agents(out, Connection(), {"h": docs[0]})
    tty.console.print(view)
    tty.event("h", docs[0])
    assert raw_controls(stream.getvalue()) == []
    assert raw_controls(err.getvalue()) == []
    assert raw_controls(tty_stream.getvalue(), tty=True) == []


def test_cli_prints_error_messages_escaped(monkeypatch, capsys):
    message = f"host 'evil' is offline (the agent last started {hostile('since')})"

    def failing(args: object) -> Any:
        async def go() -> int:
            raise CliError(OFFLINE, message)

        return go

    monkeypatch.setattr(cli, "_client_call", failing)
    assert cli.main(["status"]) == OFFLINE
    err = capsys.readouterr().err
    assert err == f"asyncmigfra: {safe(message)}\n"
    assert not FORBIDDEN & set(err[:-1])


# ------------------------------------------------------------------------------ no bypass

#: Modules of asyncmigfra.console that write for people: the only ones that may.
_WRITERS = {"output.py"}


def _bypasses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in {"print", "Text", "Console", "input"}:
                found.append(f"{f.id}() at line {node.lineno}")
            if isinstance(f, ast.Attribute) and f.attr in {"write", "print", "log", "writelines"}:
                found.append(f".{f.attr}() at line {node.lineno}")
        if isinstance(node, ast.Attribute) and node.attr in {"stdout", "stderr", "err", "stream"}:
            found.append(f".{node.attr} at line {node.lineno}")
        if isinstance(node, ast.ImportFrom) and node.module == "rich.text":
            found.append(f"from rich.text import at line {node.lineno}")
    return found


@pytest.mark.parametrize(
    "module", sorted(p.name for p in CONSOLE.glob("*.py") if p.name not in _WRITERS)
)
def test_no_module_writes_around_the_escaping(module):
    """Only Out (output.py) and asyncmigfra.terminal write to a stream or build rich text;
    everything else goes through them, so a new output path cannot skip the escaping."""
    tree = ast.parse((CONSOLE / module).read_text(), module)
    assert _bypasses(tree) == []


def test_the_bypass_check_sees_bypasses():
    code = (
        "import sys\nfrom rich.text import Text\nprint(x)\nsys.stdout.write(x)\n"
        "out.err.write(x)\nText(x)\nconsole.print(x)\n"
    )
    assert len(_bypasses(ast.parse(code))) >= 6
