"""``asyncmigfra follow ID`` in a real terminal (tmux): attach to a migration another client
started, leave with Ctrl-C without cancelling it, attach again, see it end (cancelled by a
third client); then its outcome from the history, and an unknown id refused."""

from __future__ import annotations

import json
import re
import shlex
import uuid

import pytest
from console_support import CLI, Served, Terminal, exit_code, forge, hint_after

from asyncmigfra.console.tasks import migrate_task

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

_BAR = re.compile(r"(\d{1,3}\.\d) % pass (\d+) ")


def _running_ids(served: Served) -> list[str]:
    out = served.cli("status", "host-a", "--json")
    assert out.returncode == 0, out.stderr
    return [str(t.get("id")) for t in json.loads(out.stdout).get("tasks", [])]


def test_follow_attaches_to_a_running_migration_and_reattaches(served: Served, terminal: Terminal):
    task_id = f"mig-{uuid.uuid4().hex[:8]}"
    # Started by "another client": published as a scheduler would, nobody follows it.
    # db-1: 16 GiB at 100 MiB/s, minutes: it runs for as long as the test needs.
    payload = migrate_task(task_id, "db-1", "host-b", {"migration-type": "live", "bandwidth": 100})
    forge(served.port, f"{served.prefix}/host-a/task", payload)

    # Without HOST: the agents' status finds the task on host-a.
    terminal.run(served.command("follow", task_id))
    seen: list[float] = []

    def record(screen: str) -> None:
        for m in _BAR.finditer(screen):
            if not seen or seen[-1] != float(m.group(1)):
                seen.append(float(m.group(1)))

    terminal.wait_for(rf"Migrating db-1 from host-a to host-b  \(attached, id {task_id}\)")
    terminal.wait_for(lambda s: len(seen) >= 2, 20, every=record)
    assert seen == sorted(seen), seen
    # Ctrl-C asks; a second Ctrl-C leaves without cancelling.
    terminal.keys("C-c")
    terminal.wait_for(re.escape("Cancel the migration? [y/N]"))
    terminal.keys("C-c")
    screen = terminal.wait_for(lambda s: exit_code(s) is not None)
    assert exit_code(screen) == 130, screen
    assert "left without cancelling" in screen
    assert task_id in _running_ids(served)
    # The hint to attach again names the host and carries the connection options.
    hint = hint_after("follow it again with:", terminal.screen(joined=True)).split(";")[0]
    assert hint.startswith(f"asyncmigfra follow {task_id} host-a --broker"), hint

    # Attach again as the hint says, in another terminal; cancel the migration from a third
    # client: the view follows it to its end and shows the summary.
    again = Terminal()
    try:
        again.run(shlex.join(CLI) + hint.removeprefix("asyncmigfra"))
        screen = again.wait_for(_BAR.pattern, 20)
        # The state so far (from the agent's status): the time since the task began, and
        # at the next progress event at the latest, how far it got.
        elapsed = float(re.search(r"elapsed ([\d.]+) s", screen).group(1))  # type: ignore[union-attr]
        assert elapsed >= 1.0, screen
        again.wait_for(lambda s: any(float(m[0]) >= seen[-1] for m in _BAR.findall(s)[:1]))
        cancelled = served.cli("cancel", task_id, "--host", "host-a")
        assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
        screen = again.wait_for(lambda s: exit_code(s) is not None, 30)
        assert exit_code(screen) == 1, screen
        assert "db-1 was NOT migrated: cancelled: cancelled by task" in screen
        assert "db-1 stays on host-a" in screen
    finally:
        again.close()

    # Once it has ended, follow shows its outcome from host-a's history.
    out = served.cli("follow", task_id)
    assert out.returncode == 1, out.stderr
    assert f"task {task_id} (migrate vm) finished on host-a:" in out.stdout
    assert "db-1 error  cancelled: cancelled by task" in out.stdout
    listed = served.cli("history", "host-a", "--json", "--vm", "db-1")
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [task_id]

    out = served.cli("follow", "no-such-task")
    assert out.returncode == 2
    assert "no agent has task 'no-such-task' queued or running" in out.stderr
    assert "asked host-a, host-b" in out.stderr
