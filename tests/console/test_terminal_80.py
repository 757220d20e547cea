"""The live views in a terminal of 80x24, the size a newcomer's terminal opens with: no
line wraps, an ETA, the downtime target with its maximum, one downtime line in the summary,
and ``evacuate --follow`` with one bar per VM (agents on the fake hypervisor, ``demo
--serve`` as a process, a real mosquitto, a real tmux pane read while the command runs).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from console_support import Served, Terminal, exit_code, need_tmux

pytestmark = [pytest.mark.e2e, pytest.mark.broker]


@pytest.fixture
def small() -> Iterator[Terminal]:
    need_tmux()
    t = Terminal(width=80, height=24)
    try:
        yield t
    finally:
        t.close()


def _wrapped(t: Terminal) -> list[str]:
    """Lines the terminal wrapped: ``capture-pane -J`` joins a wrapped line to its rest, so
    it comes out wider than the pane."""
    return [ln for ln in t.screen(joined=True).splitlines() if len(ln.rstrip()) > t.width]


def test_migrate_follow_fits_80_columns_with_eta_target_and_one_downtime(
    served: Served, small: Terminal
):
    small.run(
        served.command(
            "migrate", "web-1", "--from", "host-a", "--to", "host-b", "--live",
            "--max-downtime", "300", "--bandwidth", "500", "--follow",
        )
    )  # fmt: skip
    seen = {"eta": False, "target": False}
    wraps: list[str] = []

    def record(screen: str) -> None:
        seen["eta"] |= re.search(r"\d % pass \d+ ETA \d+(\.\d)? s elapsed", screen) is not None
        seen["target"] |= "downtime  target 30 ms -> max 300 ms" in screen
        wraps.extend(_wrapped(small))

    screen = small.wait_for(lambda s: exit_code(s) is not None, 30, every=record)
    assert exit_code(screen) == 0, screen
    assert seen == {"eta": True, "target": True}, screen
    assert wraps == [], wraps
    assert all(len(ln.rstrip()) <= 80 for ln in screen.splitlines())
    assert "web-1 migrated from host-a to host-b" in screen
    summary = screen.split("web-1 migrated from host-a to host-b", 1)[1]
    downtime = [ln for ln in summary.splitlines() if "downtime" in ln]
    assert len(downtime) == 1, summary
    assert re.fullmatch(r"  downtime     [\d.]+ ms", downtime[0].rstrip()), downtime


_EVAC_BAR = re.compile(r"^(web-1|web-2|db-1) +[━╸╺─ -]{6,}\s+(\d{1,3}\.\d) %", re.M)


def test_evacuate_follow_shows_one_bar_per_vm(served: Served, small: Terminal):
    small.run(served.command("evacuate", "host-a", "--to", "host-b", "--follow"))
    bars: dict[str, set[float]] = {}
    wraps: list[str] = []

    def record(screen: str) -> None:
        found = _EVAC_BAR.findall(screen)
        assert len({vm for vm, _ in found}) == len(found), screen  # one bar per VM
        for vm, pct in found:
            bars.setdefault(vm, set()).add(float(pct))
        wraps.extend(_wrapped(small))

    screen = small.wait_for(lambda s: exit_code(s) is not None, 90, every=record)
    assert exit_code(screen) == 0, screen
    assert set(bars) == {"web-1", "web-2", "db-1"}, screen
    # The big one (16 GiB) was seen moving, not just appearing at the end.
    assert len({p for p in bars["db-1"] if p < 100}) >= 2, bars
    assert wraps == [], wraps
    assert "host-a: 3 of 3 VMs migrated" in screen
    for vm in ("web-1", "web-2", "db-1"):
        assert f"{vm} migrated to host-b" in screen
