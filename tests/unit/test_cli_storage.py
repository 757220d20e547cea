"""Issue 16 in the CLI: ``migrate --copy-storage``, ``--migrate-disks``,
``--copy-storage-synchronous-writes``: the options, their checks (usage errors before any
connection) and the ``parameter:`` the agent reads back."""

from __future__ import annotations

import socket

import pytest

from asyncmigfra import cli
from asyncmigfra.console.arguments import build_parser
from asyncmigfra.console.exits import USAGE
from asyncmigfra.console.output import event_fields
from asyncmigfra.console.tasks import migrate_task
from asyncmigfra.model import MigrateSpec
from asyncmigfra.wire.parsing import parse_task

GIB = 1024**3


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_options_parse() -> None:
    args = build_parser().parse_args(
        ["migrate", "v", "--to", "b", "--copy-storage", "inc", "--migrate-disks", "vda, vdb",
         "--copy-storage-synchronous-writes"]
    )  # fmt: skip
    assert (args.copy_storage, args.migrate_disks, args.copy_storage_synchronous_writes) == (
        "inc",
        ("vda", "vdb"),
        True,
    )
    plain = build_parser().parse_args(["migrate", "v", "--to", "b"])
    assert (plain.copy_storage, plain.migrate_disks, plain.copy_storage_synchronous_writes) == (
        None,
        None,
        False,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--copy-storage", "full"], "invalid choice: 'full'"),
        (["--migrate-disks", "vda,VDB"], "not a disk target: 'VDB'"),
        (["--migrate-disks", "vda,,vdb"], "not a disk target: ''"),
        (["--migrate-disks", "vda,vda"], "disk named twice: 'vda'"),
        (["--migrate-disks", ",".join(f"d{i}" for i in range(65))], "at most 64 disks, got 65"),
    ],
)
def test_bad_options_are_usage_errors(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["migrate", "v", "--to", "b", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["--migrate-disks", "vda"], "--migrate-disks"),
        (["--copy-storage-synchronous-writes"], "--copy-storage-synchronous-writes"),
    ],
)
def test_disks_or_sync_with_copy_storage_none_is_a_usage_error(
    argv: list[str], key: str, capsys
) -> None:
    # Refused before any connection is made (the broker port is closed).
    port = _closed_port()
    code = cli.main(["migrate", "v", "--from", "a", "--to", "b", "--copy-storage", "none",
                     *argv, "--broker", f"127.0.0.1:{port}"])  # fmt: skip
    assert code == USAGE
    assert f"{key} needs --copy-storage all or inc, not none" in capsys.readouterr().err


def test_the_agent_reads_back_what_the_cli_sends() -> None:
    params: dict[str, object] = {
        "migration-type": "live",
        "copy-storage": "all",
        "migrate-disks": ("vda", "vdb"),
        "copy-storage-synchronous-writes": True,
    }
    payload = migrate_task("m-1", "v", "b", params)
    assert b'  migrate-disks: ["vda", "vdb"]\n' in payload
    (spec,) = parse_task(payload).subtasks
    assert isinstance(spec, MigrateSpec)
    p = spec.parameter
    assert (p.copy_storage, p.migrate_disks, p.synchronous_writes) == ("all", ("vda", "vdb"), True)
    # Options not given are left out: the agent's defaults apply.
    bare = migrate_task("m-2", "v", "b", {"copy-storage": None, "migrate-disks": None,
                                          "copy-storage-synchronous-writes": False})  # fmt: skip
    assert b"parameter" not in bare


def test_watch_lines_show_the_disks() -> None:
    doc = {
        "event": "progress",
        "phase": "migrating",
        "iteration": 0,
        "percent": 12.5,
        "memory-total": 0,
        "disk-total": 4 * GIB,
        "disk-processed": GIB,
        "disk-remaining": 3 * GIB,
        "data-remaining": 3 * GIB,
    }
    assert event_fields(doc).startswith("migrating  12.5 %  pass 0  disk 1.0/4.0 GiB  remaining")
    assert "disk" not in event_fields({**doc, "disk-total": 0})
