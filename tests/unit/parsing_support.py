"""Helpers shared by the ``test_parsing*.py`` modules: parse a task text, expect a refusal, and
build a migrate or start task."""

from __future__ import annotations

import pytest

from asyncmigfra.errors import TaskRejected
from asyncmigfra.model import StartSpec, TaskMessage
from asyncmigfra.wire.parsing import parse_task

BAD = "Exception while parsing message: yaml-cpp: error at line {}, column {}: bad conversion ({})"


def parse(text: str, **limits: int) -> TaskMessage:
    return parse_task(text.encode(), **limits)


def reject(payload: str | bytes, **limits: int) -> TaskRejected:
    data = payload.encode() if isinstance(payload, str) else payload
    with pytest.raises(TaskRejected) as info:
        parse_task(data, **limits)
    return info.value


def migrate(extra: str = "", parameter: str = "") -> str:
    text = "task: migrate vm\nid: m1\nvm-name: vm1\ndestination: node2\n" + extra
    if parameter:
        text += "parameter:\n" + "".join(f"  {line}\n" for line in parameter.splitlines())
    return text


def start_item(item: str) -> StartSpec:
    text = "task: start vm\nvm-configurations:\n  - " + item.replace("\n", "\n    ") + "\n"
    spec = parse(text).subtasks[0]
    assert isinstance(spec, StartSpec)
    return spec
