"""Forged wire strings in a real terminal (a tmux pane): shown escaped, and the terminal is
not taken over.

Each string (:func:`console_support.attack`) would, printed raw, reverse the text after it,
write the clipboard with OSC 52, clear the screen and paint a fake "migrated" line at the top.
tmux runs with ``set-clipboard on``, so an OSC 52 that got through would create a tmux paste
buffer. The first test prints one raw to show that each of these checks would catch it; the
others run ``status``, ``status HOST``, ``watch``, ``migrate --follow`` and ``stop`` against a
forged agent (retained status, events, results) and a forged retained status, and check that
the marker printed before the command is still on the screen (not cleared), the fake line
appears only right after its visible ``\\x1b[H`` (not painted), no U+202E is on the screen
and no paste buffer was made.
"""

from __future__ import annotations

import re
import shlex
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from console_support import (
    CLI,
    FAKE_LINE,
    Terminal,
    agent_yaml,
    attack,
    exit_code,
    forge,
    forged_agent,
    forged_reply,
    forged_status,
    need_tmux,
)

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

MARK = "MARK-BEFORE-THE-COMMAND"
#: The fake line somewhere other than right after its visible (escaped) ``ESC [H``: ours, or
#: the YAML escape in the text of a raw result.
_PAINTED = re.compile(r"(?<!\\x1b\[H)(?<!\\u001b\[H)" + re.escape(FAKE_LINE))


@pytest.fixture
def term(tmp_path: Path) -> Iterator[Terminal]:
    need_tmux()
    conf = tmp_path / "tmux.conf"
    conf.write_text("set -g set-clipboard on\n")
    t = Terminal(config=str(conf), width=220, height=100)
    try:
        yield t
    finally:
        t.close()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}/migfra"


def _command(mosquitto, prefix: str, *args: str) -> str:
    conn = ["--broker", f"127.0.0.1:{mosquitto.port}", "--topic-prefix", prefix]
    return shlex.join([*CLI, *args, *conn])


def _not_taken_over(term: Terminal, screen: str) -> None:
    assert MARK in screen, f"the screen was cleared:\n{screen}"
    assert _PAINTED.search(screen) is None, f"a fake line was painted:\n{screen}"
    assert "\u202e" not in screen, screen
    assert term.buffers() == "", "an OSC 52 reached the terminal (tmux made a paste buffer)"
    assert "\\u202e" in screen  # the escapes are shown instead
    assert "\\x1b]52;c;cHduZWQ=\\x07" in screen
    assert "\\x1b[2J\\x1b[H" + FAKE_LINE in screen


def test_a_raw_attack_would_take_the_terminal_over(term: Terminal):
    """The checks below see an attack that gets through (printed raw with printf)."""
    term.run(f"echo {MARK}; printf %s {shlex.quote(attack('raw'))}")
    screen = term.wait_for(lambda s: exit_code(s) is not None)
    assert MARK not in screen
    assert _PAINTED.search(screen) is not None
    assert "pwned" in term.buffers()


def test_status_board_and_host_view(term: Terminal, mosquitto, prefix: str):
    forge(
        mosquitto.port,
        f"{prefix}/evil2/status",
        forged_status(lambda t: attack(f"2{t}"), state=attack("state")),
        retain=True,
    )
    try:
        with forged_agent(
            mosquitto.port, prefix, "evil", forged_status(attack), forged_reply(attack)
        ):
            term.run(
                f"echo {MARK}; {_command(mosquitto, prefix, 'status')};"
                f" {_command(mosquitto, prefix, 'status', 'evil')}"
            )
            screen = term.wait_for(lambda s: exit_code(s) is not None, 30)
    finally:
        forge(mosquitto.port, f"{prefix}/evil2/status", b"", retain=True)
    assert exit_code(screen) == 1, screen  # the forged result lists an error
    _not_taken_over(term, screen)
    assert f"Agents on 127.0.0.1:{mosquitto.port} ({prefix}/+/status)" in screen
    for tag in ("host", "version", "hypervisor", "since", "2host", "state", "tid", "dvm", "ecode"):
        assert f"<{tag}>" in screen, tag
    assert "Domains (1)" in screen
    assert "Tasks (1)" in screen


def test_watch(term: Terminal, mosquitto, prefix: str):
    term.run(f"echo {MARK}; {_command(mosquitto, prefix, 'watch')}")
    term.wait_for(r"watching .*\(Ctrl-C ends\)")
    events = {
        "accepted": {"task": attack("task"), "vm-names": [attack("names")]},
        "phase": {"phase": attack("phase")},
        "progress": {"phase": attack("pphase"), "percent": 5.0, "action": attack("action")},
        "error": {"code": attack("code"), "details": attack("details")},
        "done": {"status": attack("status")},
    }
    for kind, fields in events.items():
        doc = {"event": kind, "id": attack("id"), "host": attack("host"), "vm-name": "vm1",
               "time": "2026-01-01T00:00:00.000Z", **fields}  # fmt: skip
        forge(mosquitto.port, f"{prefix}/evil/event", agent_yaml(doc))
    term.wait_for(re.escape("<status>"))
    screen = term.screen(joined=True)
    term.keys("C-c")
    assert exit_code(term.wait_for(lambda s: exit_code(s) is not None)) == 0
    _not_taken_over(term, screen)
    lines = [ln for ln in screen.splitlines() if "<id>" in ln]
    assert len(lines) == len(events), screen  # one line per event: no LF, CR or cursor move
    for line, (kind, fields) in zip(lines, events.items(), strict=True):
        assert re.match(r"\d\d:\d\d:\d\d\.\d{3}  <host>", line), line
        assert f"  vm1           {kind}" in line
        for field in fields.values():
            value = field[0] if isinstance(field, list) else field
            if isinstance(value, str):
                tag = value[: value.index(">") + 1]
                assert tag in line, (tag, line)


def test_migrate_follow_and_a_result(term: Terminal, mosquitto, prefix: str):
    with forged_agent(mosquitto.port, prefix, "evil", forged_status(attack), forged_reply(attack)):
        migrate = _command(mosquitto, prefix, "migrate", "vm1", "--from", "evil", "--to", "b",
                           "--follow")  # fmt: skip
        stop = _command(mosquitto, prefix, "stop", "vm1", "--host", "evil")
        term.run(f"echo {MARK}; {migrate}; {stop}")
        screen = term.wait_for(lambda s: exit_code(s) is not None, 30)
    assert exit_code(screen) == 1, screen
    _not_taken_over(term, screen)
    assert "Migrating vm1 from evil to b" in screen
    # 1 of 2 GiB remaining: 50 % (the view's percent never overstates, whatever the event says)
    assert re.search(r"50\.0 % pass 2 ETA \S+ elapsed [\d.]+ s phase <pphase>", screen), screen
    assert "actions: <action>" in screen
    assert "vm1 was NOT migrated: <code>" in screen
    assert "  retries      <retries>" in screen
    assert "# forged\\u202eevil\\tcomment\\r" in screen  # the raw result of the stop
