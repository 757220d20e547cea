"""Post-copy recovery (migration/recovery.py) with the fake back-end's ``postcopy-break``:
a post-copy whose connection breaks after the switch is resumed until it works, within the
window; a cancel meanwhile is ignored; past the window the result says where the guest is."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

import pytest
from engine_stub import RecordingContext

import asyncmigfra.migration.recovery as recovery
from asyncmigfra.errors import HypervisorError, TaskTimeout
from asyncmigfra.hypervisor.base import DomainState, RecoversPostCopy
from asyncmigfra.hypervisor.fake import FakeHypervisor, create
from asyncmigfra.hypervisor.fake.postcopy import FakePostCopyRecovery
from asyncmigfra.migration.engine import migrate
from asyncmigfra.model import MigrateSpec, MigrationParams
from asyncmigfra.settings import Settings

#: Simulated time runs this many times faster.
SCALE = 20.0


@dataclass
class Context(RecordingContext):
    vm_name: str = "hot"


def agent(shared: dict[str, object], *, break_for: float) -> FakeHypervisor:
    """Host ``a`` with a guest that dirties memory faster than the link copies it, so the
    policy switches to post-copy at once; its next migration breaks in post-copy and the
    destination stays unreachable for ``break_for`` real seconds."""
    hv = create(
        {
            "time-scale": SCALE,
            "bandwidth": 100,
            "postcopy-break-for": break_for * SCALE,
            "domains": [{"name": "hot", "memory": 262144, "dirty-rate": 2000}],
            "peers": {"b": None},
        },
        hostname="a",
        shared=shared,
    )
    hv.inject("postcopy-break")
    return hv


def settings(window: float) -> Settings:
    s = Settings(hostname="a")
    return replace(
        s,
        agent=replace(s.agent, progress_interval=0.02),
        migration=replace(s.migration, postcopy_recovery_window=window),
    )


SPEC = MigrateSpec(
    vm_name="hot",
    destination="b",
    parameter=MigrationParams(migration_type="post-copy", max_downtime=100),
)


@pytest.fixture(autouse=True)
def _quick_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery, "PROBE_FIRST_DELAY", 0.1)
    monkeypatch.setattr(recovery, "PROBE_MAX_DELAY", 0.1)


@pytest.fixture
def attempts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The outcome of every resume attempt, in order (``ok`` or the error's class)."""
    seen: list[str] = []
    original = FakePostCopyRecovery.resume_post_copy

    async def counted(self: FakePostCopyRecovery) -> Any:
        try:
            result = await original(self)
        except Exception as exc:
            seen.append(type(exc).__name__)
            raise
        seen.append("ok")
        return result

    monkeypatch.setattr(FakePostCopyRecovery, "resume_post_copy", counted)
    return seen


def where(hv: FakeHypervisor) -> dict[str, DomainState]:
    return {
        name: host.domains["hot"].state
        for name, host in hv.cluster.hosts.items()
        if "hot" in host.domains
    }


async def run(hv: FakeHypervisor, ctx: Context, window: float) -> Any:
    async with asyncio.timeout(20):
        return await migrate(SPEC, ctx, hypervisor=hv, settings=settings(window))


def test_the_fake_can_recover_post_copy() -> None:
    assert isinstance(create({}, hostname="x", shared={}), RecoversPostCopy)


async def test_a_broken_post_copy_is_resumed_on_the_third_attempt(attempts: list[str]) -> None:
    # Unreachable for 0.15 s: attempts at 0, 0.1 and 0.2 s after the break.
    hv = agent({}, break_for=0.15)
    ctx = Context()
    result = await run(hv, ctx, window=30)
    assert result.post_copy is True
    assert attempts == ["ConnectionFailed", "ConnectionFailed", "ok"]
    assert ctx.outcome.recovered is True
    assert ctx.outcome.recovery_time is not None
    assert 0.15 <= ctx.outcome.recovery_time < 5
    assert ctx.outcome.destination == "b"
    assert ctx.outcome.keys()["recovered"] is True
    assert "post-copy-recovery" in ctx.phases
    assert ctx.phases.index("post-copy") < ctx.phases.index("post-copy-recovery")
    assert ctx.actions().count("recovering") == 3  # the start, then before each retry
    assert ctx.events[-1]["phase"] == "completed"
    assert where(hv) == {"b": DomainState.RUNNING}


async def test_past_the_window_the_result_says_where_the_guest_is(attempts: list[str]) -> None:
    hv = agent({}, break_for=60)
    ctx = Context()
    with pytest.raises(TaskTimeout) as caught:
        await run(hv, ctx, window=0.35)
    text = str(caught.value)
    assert text.startswith("post-copy failed and was not recovered: post-copy recovery window")
    assert "window of 0.35 s over after 4 attempts" in text
    assert "No route to host" in text
    assert "paused (post-copy failed) on a and running (post-copy failed) on b" in text
    assert "send the migrate task again" in text
    assert ctx.outcome.recovered is False
    assert ctx.outcome.keys()["recovered"] is False
    assert where(hv) == {"a": DomainState.PAUSED}
    assert len(attempts) == 4

    # The link is back: the same task sent again resumes the migration it finds broken.
    hv.host.domains["hot"].broken.reachable_at = 0.0  # type: ignore[union-attr]
    again = Context()
    result = await run(hv, again, window=30)
    assert result.post_copy is True
    assert again.outcome.recovered is True
    assert again.phases == ["post-copy-recovery"]  # no pre-checks, hooks or new job
    assert where(hv) == {"b": DomainState.RUNNING}


async def test_a_cancel_during_recovery_is_ignored_and_noted(attempts: list[str]) -> None:
    hv = agent({}, break_for=0.3)
    ctx = Context()
    task = asyncio.create_task(run(hv, ctx, window=30))
    async with asyncio.timeout(10):
        while "post-copy-recovery" not in ctx.phases:
            await asyncio.sleep(0.01)
    task.cancel()
    result = await task
    assert result.post_copy is True
    assert ctx.outcome.recovered is True
    assert ctx.outcome.details == recovery.CANCEL_NOTE
    assert where(hv) == {"b": DomainState.RUNNING}
    assert attempts[-1] == "ok"


async def test_without_a_window_the_broken_post_copy_fails_at_once(attempts: list[str]) -> None:
    hv = agent({}, break_for=0.1)
    ctx = Context()
    with pytest.raises(HypervisorError, match=r"post-copy failed: the guest is paused on the"):
        await run(hv, ctx, window=0)
    assert attempts == []
    assert ctx.outcome.recovered is None
    assert "post-copy-recovery" not in ctx.phases
    assert where(hv) == {"a": DomainState.PAUSED}
