"""Event records: the ``time`` field (extensions.md, Events)."""

from __future__ import annotations

import datetime as dt

import pytest

from asyncmigfra.wire import events

NEW_YEAR = 1767225600  # 2026-01-01T00:00:00Z, in s since the epoch


def test_the_time_is_utc_to_the_millisecond_across_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The text of the second is remembered: each call still gives its own time, also when
    the second changes (or the clock is set back)."""
    clock = [
        (NEW_YEAR * 10**9 - 100_000, "2025-12-31T23:59:59.999Z"),
        (NEW_YEAR * 10**9, "2026-01-01T00:00:00.000Z"),
        (NEW_YEAR * 10**9 + 7_999_999, "2026-01-01T00:00:00.007Z"),
        (NEW_YEAR * 10**9 + 10**9 + 123_456_789, "2026-01-01T00:00:01.123Z"),
        (NEW_YEAR * 10**9 - 100_000, "2025-12-31T23:59:59.999Z"),  # set back
    ]
    for ns, text in clock:
        monkeypatch.setattr(events.time, "time_ns", lambda ns=ns: ns)
        assert events._now() == text
        assert events._now() == text


def test_the_time_reads_as_the_clock_does() -> None:
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    stamp = dt.datetime.fromisoformat(events._now().replace("Z", "+00:00"))
    assert stamp.tzinfo == dt.UTC
    assert stamp >= before
