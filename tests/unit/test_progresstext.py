"""The words of progress shared by the CLI's live view and the demo: a percent that never
overstates, the ETA, the downtime target with its maximum, lines fitted to 80 columns."""

from __future__ import annotations

from asyncmigfra.console.evacuation import EvacuationView
from asyncmigfra.console.lanes import VmLane
from asyncmigfra.progresstext import (
    ShownPercent,
    action_text,
    disk_text,
    fmt_eta,
    fmt_part,
    fmt_size,
    in_disk_phase,
    pass_text,
    progress_parts,
    target_text,
)
from asyncmigfra.terminal import fit

GIB = 1 << 30
MIB = 1 << 20


def _sample(iteration: int, remaining: int, wire: float, **extra: object) -> dict[str, object]:
    return {
        "event": "progress",
        "phase": "migrating",
        "iteration": iteration,
        "percent": wire,
        "memory-total": 2 * GIB,
        "memory-remaining": remaining,
        "data-remaining": remaining,
        **extra,
    }


def test_a_migration_that_does_not_converge_is_not_shown_nearly_done():
    """The wire's 67.7 % (bytes sent over all passes) with 1.7 of 2.0 GiB left is 15 %."""
    shown = ShownPercent()
    assert shown.feed(_sample(1, GIB, 50.0)) == 50.0
    assert shown.feed(_sample(1, GIB + GIB // 2, 55.0)) == 50.0  # not less within a pass
    assert shown.feed(_sample(1, GIB // 10, 90.0)) == 95.0
    # Pass 2 starts with what the guest dirtied again: the percent says so.
    assert shown.feed(_sample(2, int(1.7 * GIB), 67.7)) == 15.0
    assert shown.feed(_sample(2, 0, 99.0)) == 99.9  # below 100 until completed
    assert shown.feed({"event": "progress", "phase": "completed", "iteration": 2}) == 100.0


def test_events_without_statistics_use_the_wire_percent_until_statistics_come():
    shown = ShownPercent()
    assert shown.feed({"event": "progress", "phase": "migrating", "percent": 0.0}) == 0.0
    assert shown.feed(_sample(1, GIB, 10.0)) == 50.0
    assert shown.feed({"event": "progress", "phase": "migrating", "percent": 1e300}) == 50.0


def test_storage_counts_with_memory():
    doc = _sample(1, 0, 50.0, **{"disk-total": 2 * GIB, "disk-remaining": 2 * GIB})
    assert ShownPercent().feed(doc) == 50.0


def test_eta_target_and_sizes():
    assert (fmt_eta(4.24), fmt_eta(185), fmt_eta(7380)) == ("ETA 4.2 s", "ETA 3m05s", "ETA 2h03m")
    assert [fmt_eta(None), fmt_eta("soon"), fmt_eta(-1)] == [None, None, None]
    assert target_text({"max-downtime": 30}, 300) == "target 30 ms -> max 300 ms"
    assert target_text({"max-downtime": 300}, 300) == "target 300 ms (max)"
    assert target_text({"max-downtime": 30}) == "target 30 ms"
    assert target_text({}) is None
    assert (fmt_size(int(1.7 * GIB)), fmt_size(851 * MIB), fmt_size(0)) == (
        "1.7 GiB",
        "851 MiB",
        "0 B",
    )


def test_a_progress_line_keeps_the_most_important_parts_within_the_width():
    doc = _sample(
        3, int(1.7 * GIB), 67.7, eta=75.0,
        **{"transfer-rate": 1000 * MIB, "dirty-rate": 990 * MIB, "expected-downtime": 1740.0,
           "max-downtime": 30, "action": "raise-downtime"},
    )  # fmt: skip
    parts = progress_parts(doc, 15.0, maximum=300)
    assert parts[:4] == ["migrating  15.0 %", "pass 3", "ETA 1m15s", "action raise-downtime"]
    assert "target 30 ms -> max 300 ms" in parts
    line = fit(parts, 60)
    assert len(line) <= 60
    assert line.startswith("migrating  15.0 %  pass 3  ETA 1m15s")
    assert fit(["x" * 100], 80) == "x" * 80


def test_evacuation_view_one_lane_per_vm_and_each_outcome():
    v = EvacuationView("host-a", ["host-b", "host-c"], "e1")
    v.feed({"event": "accepted", "id": "e1", "vm-names": []})
    v.feed({"event": "phase", "id": "e1", "vm-name": "n/a", "phase": "placement"})
    assert (v.phase, v.lanes) == ("placement", {})
    v.feed(_sample(1, GIB, 40.0) | {"vm-name": "a1"})
    v.feed(_sample(1, GIB // 2, 60.0) | {"vm-name": "a2"})
    v.feed({"event": "done", "vm-name": "a2", "status": "error"})
    v.feed({"event": "error", "vm-name": "a2", "code": "timeout", "details": "slow"})
    assert list(v.lanes) == ["a1", "a2"]
    assert (v.lanes["a1"].percent, v.lanes["a2"].percent) == (50.0, 75.0)
    assert v.lanes["a2"].phase == "failed"
    assert v.notes == ["a2: error: timeout: slow"]
    plain = v.plain(_sample(1, GIB, 40.0) | {"vm-name": "a1"})
    assert plain.split(None, 2)[2].startswith("a1  progress  migrating  50.0 %  pass 1")
    result = {
        "result": "node evacuated",
        "list": [
            {"vm-name": "a1", "status": "success", "destination": "host-c"},
            {"vm-name": "a2", "status": "error", "code": "timeout", "details": "slow"},
        ],
        "time-measurement": {"overall": 2.5},
    }
    lines = [t for t, _ in v.summary(result, 2.6)]
    assert lines == [
        "host-a: 1 of 2 VMs migrated",
        "a1 migrated to host-c",
        "a2 was NOT migrated: timeout: slow",
        "  total time   2.60 s  (agent: overall 2.500 s)",
    ]
    assert not v.ok(result)


def test_fit_counts_the_columns_escaped_text_takes() -> None:
    # A hostile phase of control characters: each shows as four columns once escaped.
    from asyncmigfra.terminal import safe  # noqa: PLC0415

    line = fit(["\x1b[2J" * 40, "rate 1 MiB/s"], 80)
    assert len(safe(line)) <= 80
    assert len(safe(line)) > 70
    assert fit(["ok", "\x07" * 100], 80) == "ok"


# --------------------------------------------------------------------------------------------
# issue 16: a storage copy's disks, then memory


def _disk_event(copied: int, wire: float, *, memory: int = 0, **extra: object) -> dict[str, object]:
    return {
        "event": "progress",
        "phase": "migrating",
        "iteration": 0 if memory == 0 else 1,
        "percent": wire,
        "memory-total": memory,
        "memory-processed": 0,
        "memory-remaining": memory,
        "disk-total": 4 * GIB,
        "disk-processed": copied,
        "disk-remaining": 4 * GIB - copied,
        "data-remaining": 4 * GIB - copied + memory,
        "transfer-rate": 1000 * MIB,
        **extra,
    }


def test_sizes_of_a_part_of_a_whole():
    assert fmt_part(int(1.2 * GIB), 4 * GIB) == "1.2/4.0 GiB"
    assert fmt_part(GIB // 2, 150 * GIB) == "0.5/150 GiB"
    assert fmt_part(10, 500) == "10/500 B"
    assert fmt_part(200 * MIB, 512 * MIB) == "200/512 MiB"
    # Whatever the wire says: never a traceback, never a negative amount.
    assert [fmt_part("x", 1), fmt_part(1, None), fmt_part(float("nan"), 1)] == ["?"] * 3
    assert fmt_part(-5, MIB) == "0.0/1.0 MiB"


def test_the_lines_say_disk_while_the_disks_are_copied_then_pass():
    disks = _disk_event(int(1.2 * GIB), 23.4, eta=5.0)
    assert in_disk_phase(disks)
    assert disk_text(disks) == "disk 1.2/4.0 GiB"
    assert pass_text(disks) == "disk 1.2/4.0 GiB"
    assert progress_parts(disks, 23.4)[:3] == ["migrating  23.4 %", "disk 1.2/4.0 GiB", "ETA 5.0 s"]
    memory = _disk_event(4 * GIB, 80.0, memory=GIB)
    assert not in_disk_phase(memory)
    assert pass_text(memory) == "pass 1"
    assert "remaining 1.0 GiB" in progress_parts(memory, 80.0)
    plain = _sample(1, GIB, 50.0)
    assert (in_disk_phase(plain), disk_text(plain), pass_text(plain)) == (False, None, "pass 1")


def test_the_shown_percent_runs_over_disks_and_memory_without_a_jump():
    """The disk phase shows the event's percent (memory counted as still to copy); memory
    then continues from there with the honest remaining of disks and memory."""
    shown = ShownPercent()
    values = [
        shown.feed(_disk_event(GIB, 20.0)),
        shown.feed(_disk_event(3 * GIB, 60.0)),
        shown.feed(_disk_event(4 * GIB, 80.0)),
        shown.feed(_disk_event(4 * GIB, 80.0, memory=GIB)),
        shown.feed(_disk_event(4 * GIB, 90.0, memory=GIB) | {"memory-remaining": GIB // 2}),
    ]
    assert values == [20.0, 60.0, 80.0, 80.0, 90.0]


def test_the_lane_shows_the_disks_in_place_of_the_pass():
    from asyncmigfra.console.lanes import VmLane  # noqa: PLC0415

    lane = VmLane("vm", "a", "b")
    assert lane.pass_text() == "pass 0"
    lane.feed(_disk_event(int(1.2 * GIB), 23.4))
    assert lane.pass_text() == "disk 1.2/4.0 GiB"
    assert lane.stats().startswith("disk 1.2/4.0 GiB copied, memory next")
    lane.feed(_disk_event(4 * GIB, 80.0, memory=GIB) | {"memory-remaining": GIB // 2})
    assert lane.pass_text() == "pass 1"
    assert lane.stats().startswith("remaining 512 MiB of 5.0 GiB")
    # A forged event: text where numbers belong shows "?" or nothing, never raw.
    lane.feed(_disk_event(0, 1.0) | {"disk-processed": "\x1b[2J", "iteration": "\x1b[1A"})
    assert lane.pass_text() == "pass 0"  # (an iteration that is no number reads as 0)
    assert "\x1b" not in lane.stats()


def test_actions_say_why_and_what_was_tuned():
    assert action_text({"phase": "migrating"}) is None
    assert action_text({"action": "raise-downtime"}) == "raise-downtime"
    assert action_text({"action": "abort", "reason": "progress-timeout"}) == (
        "abort (progress-timeout)"
    )
    assert action_text({"action": "suspend", "reason": "completion-timeout"}) == (
        "suspend (completion-timeout)"
    )
    tuned = {"action": "tuned", "bandwidth": 0, "max-downtime": 30, "post-copy": True}
    assert action_text(tuned) == "tuned bandwidth unlimited, post-copy"
    assert action_text({"action": "tuned", "bandwidth": 50}) == "tuned bandwidth 50 MiB/s"
    assert action_text({"action": "tuned", "force-complete": True}) == "tuned force-complete"
    assert action_text({"action": "tuned", "max-downtime": 500}) == "tuned"
    # Wire values are whatever was sent: a string bandwidth is no number, and no crash.
    assert action_text({"action": "tuned", "bandwidth": "lots"}) == "tuned"
    line = "  ".join(progress_parts({**_sample(2, GIB, 50.0), **tuned}, 50.0))
    assert "action tuned bandwidth unlimited, post-copy" in line


def test_the_lane_lists_tunes_and_limits_with_their_reason():
    lane = VmLane("v", "a", "b")
    lane.feed({**_sample(1, GIB, 10.0), "action": "tuned", "bandwidth": 20})
    lane.feed({**_sample(1, GIB, 11.0), "action": "abort", "reason": "progress-timeout"})
    assert lane.actions == ["tuned bandwidth 20 MiB/s", "abort (progress-timeout)"]
