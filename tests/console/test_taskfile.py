"""``send FILE`` without a broker: the id is placed so that no line of the file moves, a
YAML error is reported at the file's own line and column, and what is not a task stays
here."""

from __future__ import annotations

import pytest

from asyncmigfra.console.exits import USAGE, CliError
from asyncmigfra.console.taskfile import prepare
from asyncmigfra.errors import TaskRejected
from asyncmigfra.wire.parsing import parse_task


def test_a_file_with_an_id_is_sent_as_it_is():
    payload = b"# comment\n---\ntask: status\nid: 0012\n...\n"
    task = prepare(payload)
    assert (task.payload, task.id, task.added, task.task) == (payload, "0012", False, "status")


@pytest.mark.parametrize(
    "text",
    [
        "task: status\n",
        "task: status",  # no line break at the end
        "# a comment\n---\ntask: stop vm\nlist:\n  - vm-name: a\n    force: yes\n...\n",
        '%YAML 1.2\n--- # c\ntask: status\nid: ""\n',
        "task: status\nid:\nx: 1\n",
        "{task: status}\n",
        "{task: status,\n vm-name: a}\n",
        "{}\n",
        "  task: stop vm\n  list: [{vm-name: a}]\n",
        "task: start vm\nvm-configurations:\n  - vm-name: a\n    memory: 010\n",
        "task: start vm\nvm-configurations:\n  - xml: |\n      <domain/>\n\n# end\n",
        "task: status\nid: |\n  two\n  lines\nx: 1\n",
        "task: status\n...\n--- [\n",  # garbage after the first document is never read
    ],
)
def test_an_id_is_added_without_moving_a_line(text):
    task = prepare(text.encode())
    assert task.added
    assert task.id.startswith("send-")
    assert agent_id(task.payload) == task.id
    sent = task.payload.decode().splitlines()
    mine = text.splitlines()
    # Every line of the map is where it was: unchanged, the one that now holds the id, or
    # (a replaced multi-line id) blank. Only what follows the map (``...``) moves down.
    end = mine.index("...") if "..." in mine else len(mine)
    for n, line in enumerate(mine[:end]):
        assert sent[n] in {line, ""} or task.id in sent[n], (n, sent, mine)
    assert sent[len(sent) - len(mine) + end :] == mine[end:]
    assert sum(task.id in line for line in sent) == 1
    if "memory: 010" in text:  # yaml-cpp's octal keeps its meaning
        assert parse_task(task.payload).subtasks[0].memory == 8  # type: ignore[attr-defined]


def agent_id(payload: bytes) -> str | None:
    try:
        return parse_task(payload).id
    except TaskRejected as exc:
        return exc.task_id


def test_new_id_replaces_the_files_own_in_place():
    text = "task: status   # a status\nid: status-1  # mine\n"
    task = prepare(text.encode(), new_id=True)
    assert task.added
    assert task.id != "status-1"
    assert task.payload.decode() == f'task: status   # a status\nid: "{task.id}"  # mine\n'


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("task: [unclosed\n", "line 2, column 1"),
        ("task: status\nvm-name: a: b\n", "line 2, column 11"),
        ("# c\n\ntask: migrate vm\n  vm-name: x\n", "line 4, column 10"),
        ("task: status\nx: \x01\n", "line 2, column 4"),
    ],
)
def test_a_yaml_error_is_reported_at_the_files_own_place(text, where):
    with pytest.raises(CliError) as err:
        prepare(text.encode(), name="t.yaml")
    assert err.value.code == USAGE
    assert err.value.message.startswith(f"t.yaml: {where}: not valid YAML: ")
    assert err.value.message.endswith("; nothing was sent")


@pytest.mark.parametrize(
    ("text", "found"),
    [(b"- a\n- b\n", "a YAML sequence"), (b"[1, 2]\n", "a YAML sequence"),
     (b"just text\n", "a YAML scalar"), (b"", "no YAML document"),
     (b"# only a comment\n", "no YAML document")],
)  # fmt: skip
def test_what_is_not_a_map_is_not_sent(text, found):
    with pytest.raises(CliError) as err:
        prepare(text, name="t.yaml")
    assert err.value.code == USAGE
    assert "t.yaml: not a task: a task is a YAML map with a 'task:' key" in err.value.message
    assert f"this file holds {found}; nothing was sent" in err.value.message


def test_not_utf8_is_a_usage_error():
    with pytest.raises(CliError) as err:
        prepare(b"task: status\nvm-name: \xff\n", name="t.yaml")
    assert (err.value.code, err.value.message) == (
        USAGE,
        "t.yaml: not UTF-8 (byte 22); nothing was sent",
    )


def test_a_task_the_agent_rejects_is_still_sent_with_an_id():
    """Not a syntax error: the agent answers ``result: unknown`` with the id and its own
    words (an unknown task, a bad field), which is worth showing."""
    task = prepare(b"task: dance vm\n")
    with pytest.raises(TaskRejected) as err:
        parse_task(task.payload)
    assert err.value.task_id == task.id
