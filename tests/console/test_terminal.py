"""What a person sees: the CLI in a real terminal (a 160x40 tmux pane), against agents on
the fake hypervisor (``demo --serve`` as a process) and a real mosquitto.

The screen is read with ``tmux capture-pane`` while the command runs, so these tests check
the rendered terminal (rich's live region redrawn in place), not a byte stream.
"""

from __future__ import annotations

import json
import re

import pytest
from console_support import Served, Terminal, exit_code

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

_PERCENT = re.compile(r"(\d{1,3}\.\d) %")
_BAR_LINE = re.compile(
    r"[━╸╺─ -]{20,}\s+(\d{1,3}\.\d) % pass (\d+) +(?:ETA \S+(?: s)? +)?elapsed ([\d.]+) s"
)


def test_migrate_follow_shows_the_bar_advancing_and_a_summary(served: Served, terminal: Terminal):
    terminal.run(
        served.command(
            "migrate", "web-1", "--from", "host-a", "--to", "host-b", "--live",
            "--max-downtime", "300", "--bandwidth", "500", "--follow",
        )
    )  # fmt: skip
    seen: list[float] = []

    def record(screen: str) -> None:
        for m in _BAR_LINE.finditer(screen):
            pct = float(m.group(1))
            if not seen or seen[-1] != pct:
                seen.append(pct)

    screen = terminal.wait_for(lambda s: exit_code(s) is not None, 30, every=record)
    assert exit_code(screen) == 0, screen
    assert len({p for p in seen if p < 100}) >= 2, f"the bar never moved: {seen}\n{screen}"
    assert seen == sorted(seen), seen
    assert seen[-1] == 100.0
    assert "Migrating web-1 from host-a to host-b  (live, id migrate-" in screen
    assert re.search(r"remaining 0 B of 2\.0 GiB\s+rate 500 MiB/s", screen), screen
    assert "phase completed" in screen
    assert "web-1 migrated from host-a to host-b" in screen
    assert re.search(r"total time\s+\d+\.\d\d s\s+\(agent: migrate [\d.]+ s, overall", screen)
    assert re.search(r"^  downtime\s+[\d.]+ ms$", screen, re.MULTILINE), screen
    assert re.search(r"passes\s+\d+", screen)
    assert re.search(r"actions\s+", screen)


_SWAP_BAR = re.compile(
    r"^(web-[12]) +-> (host-[ab]) +[━╸╺─ -]{6,}\s+(\d{1,3}\.\d) % pass \d+ ",
    re.MULTILINE,
)


def test_migrate_swap_with_follow_shows_one_bar_per_vm(served: Served, terminal: Terminal):
    assert served.cli("migrate", "web-2", "--from", "host-a", "--to", "host-b").returncode == 0
    terminal.run(
        served.command(
            "migrate", "web-1", "--from", "host-a", "--to", "host-b", "--swap-with", "web-2",
            "--live", "--bandwidth", "500", "--follow",
        )
    )  # fmt: skip
    seen: dict[str, list[float]] = {"web-1": [], "web-2": []}
    routes: set[tuple[str, str]] = set()

    def record(screen: str) -> None:
        bars = _SWAP_BAR.findall(screen)
        assert len({vm for vm, _, _ in bars}) == len(bars), screen  # one bar per VM
        for vm, route, pct in bars:
            routes.add((vm, route))
            if not seen[vm] or seen[vm][-1] != float(pct):
                seen[vm].append(float(pct))

    screen = terminal.wait_for(lambda s: exit_code(s) is not None, 30, every=record)
    assert exit_code(screen) == 0, screen
    assert routes == {("web-1", "host-b"), ("web-2", "host-a")}
    for vm, pcts in seen.items():
        assert len({p for p in pcts if p < 100}) >= 2, f"{vm}'s bar never moved: {seen}"
        assert pcts == sorted(pcts), seen
        assert pcts[-1] == 100.0
    assert "Swapping web-1 (host-a -> host-b) with web-2 (host-b -> host-a)  (live, id" in screen
    assert "web-1 migrated from host-a to host-b" in screen
    assert "web-2 migrated from host-b to host-a" in screen
    assert re.search(r"order\s+parallel", screen)
    assert re.search(r"passes\s+web-1 \d+, web-2 \d+", screen)


def test_ctrl_c_offers_cancel_and_cancelling_keeps_the_vm_on_the_source(
    served: Served, terminal: Terminal
):
    # db-1: 16 GiB at 100 MiB/s, about three minutes: plenty of time to change one's mind.
    terminal.run(
        served.command(
            "migrate", "db-1", "--from", "host-a", "--to", "host-b", "--live",
            "--bandwidth", "100", "--follow",
        )
    )  # fmt: skip
    terminal.wait_for(r"\d\.\d % pass 1 ")
    terminal.keys("C-c")
    terminal.wait_for(re.escape("Cancel the migration? [y/N]"))
    terminal.keys("n", "Enter")
    screen = terminal.wait_for("not cancelled; following the migration again")
    assert exit_code(screen) is None
    # The live view comes back below the prompt.
    terminal.wait_for(
        lambda s: _PERCENT.search(s.split("following the migration again", 1)[1]) is not None
    )
    terminal.keys("C-c")
    terminal.wait_for(lambda s: s.count("Cancel the migration? [y/N]") == 2)
    terminal.keys("y", "Enter")
    screen = terminal.wait_for(lambda s: exit_code(s) is not None, 20)
    assert exit_code(screen) == 1, screen
    assert re.search(r"cancel sent \(task cancel-\w+\); waiting for the migration's result", screen)
    assert "db-1 was NOT migrated: cancelled: cancelled by task 'cancel-" in screen
    assert "db-1 stays on host-a" in screen
    assert "accepted by host-a (running)" in screen
    # Where is db-1 now? Still running on host-a, not on host-b.
    out = served.cli("status", "host-a", "--json")
    domains = {e["vm-name"]: e["state"] for e in json.loads(out.stdout)["list"]}
    assert domains["db-1"] == "running"
    out = served.cli("status", "host-b", "--json")
    assert "db-1" not in {e["vm-name"] for e in json.loads(out.stdout)["list"]}


def test_status_tables_in_a_terminal(served: Served, terminal: Terminal):
    terminal.run(served.command("status") + " && " + served.command("status", "host-a"))
    screen = terminal.wait_for(lambda s: exit_code(s) is not None)
    assert exit_code(screen) == 0, screen
    assert f"Agents on 127.0.0.1:{served.port} ({served.prefix}/+/status)" in screen
    rows = [ln for ln in screen.splitlines() if ln.startswith("│")]
    cells = [[c.strip() for c in ln.strip("│").split("│")] for ln in rows]
    assert cells[0][:4] == ["host-a", "online", "0.1.0", "fake"]
    assert cells[1][:4] == ["host-b", "online", "0.1.0", "fake"]
    assert re.search(r"host-a: online  asyncmigfra [\d.]+  hypervisor fake  up [\d.]+ s", screen)
    assert "Domains (4)" in screen
    assert ["db-1", "running", "4", "16.0 GiB"] in cells
    assert ["batch-1", "shutoff", "1", "1.0 GiB"] in cells


def test_watch_in_a_terminal_until_ctrl_c(served: Served, terminal: Terminal):
    terminal.run(served.command("watch"))
    terminal.wait_for(f"watching {re.escape(served.prefix)}/\\+/event \\(Ctrl-C ends\\)")
    moved = served.cli("migrate", "web-2", "--from", "host-a", "--to", "host-b", "--live")
    assert moved.returncode == 0
    assert served.cli("stop", "batch-1", "--host", "host-a").returncode == 1
    screen = terminal.wait_for(r"batch-1\s+done")
    lines = [ln.split() for ln in screen.splitlines() if re.match(r"\d\d:\d\d:\d\d\.\d{3} ", ln)]
    kinds = [(ln[1], ln[2], ln[3]) for ln in lines]
    assert ("host-a", "-", "accepted") in kinds
    assert ("host-a", "web-2", "phase") in kinds
    assert ("host-a", "web-2", "done") in kinds
    assert ("host-a", "batch-1", "error") in kinds
    progress = [ln for ln in screen.splitlines() if re.search(r"web-2\s+progress", ln)]
    assert len(progress) >= 3
    assert "completed 100.0 %" in progress[-1]
    assert any("wrong-state: Wrong domain state: 5" in ln for ln in screen.splitlines())
    terminal.keys("C-c")
    screen = terminal.wait_for(lambda s: exit_code(s) is not None)
    assert exit_code(screen) == 0
