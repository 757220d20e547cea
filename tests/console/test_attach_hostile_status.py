"""``follow``'s state so far comes from a ``status`` answer, which anyone who may publish on
the agent's result topic can forge: odd ``elapsed`` values, missing keys and strange types
make a view whose plain lines still fit 80 columns, and nothing raises."""

from __future__ import annotations

import pytest

from asyncmigfra.console.attach import _view
from asyncmigfra.console.follow import PLAIN_WIDTH

_PROGRESS = {"event": "progress", "id": "t1", "vm-name": "vm1", "phase": "migrating",
             "percent": 40.0, "iteration": 1, "memory-total": 1 << 30,
             "data-remaining": 1 << 29}  # fmt: skip


@pytest.mark.parametrize("elapsed", [1e308, -1e308, float("nan"), float("inf"), 10**400, "7", None])
@pytest.mark.parametrize("task", ["migrate vm", "evacuate node", "stop vm", None, ["x"]])
def test_a_forged_status_item_makes_a_bounded_view(elapsed: object, task: object):
    items = [{"id": "t1", "task": task, "vm-name": "vm1", "phase": "migrating",
              "elapsed": elapsed, "destination": {"a": 1}}]  # fmt: skip
    view = _view("host-a", "t1", items)
    assert 0.0 <= view.elapsed < 10 * 365 * 86400
    view.feed(_PROGRESS)
    for line in view.plain_lines(_PROGRESS):
        assert len(line) <= PLAIN_WIDTH, line
    assert view.header()
