"""Issue 16: ``copy-storage``, ``migrate-disks`` and ``copy-storage-synchronous-writes`` in
the ``parameter:`` of ``migrate vm`` and ``evacuate node``: valid forms, and each invalid one
with its ``bad conversion`` text."""

from __future__ import annotations

import pytest

from asyncmigfra.errors import TaskRejected
from asyncmigfra.model import EvacuateSpec, MigrateSpec, MigrationParams
from asyncmigfra.wire.parsing import MAX_MIGRATE_DISKS, parse_task, valid_disk_target
from asyncmigfra.wire.parsing.fastpath import _compose_fast
from asyncmigfra.wire.parsing.nodes import _compose_slow

BAD = "Exception while parsing message: yaml-cpp: error at line {}, column {}: bad conversion ({})"
DISK_EXPECTED = "expected a disk target such as vda (a-z then a-z or 0-9, at most 32 characters)"
ONLY_WITH_COPY = "expected only with copy-storage all or inc (copy-storage is none)"


def migrate(parameter: str) -> str:
    return "task: migrate vm\nid: m1\nvm-name: vm1\ndestination: node2\nparameter:\n" + "".join(
        f"  {line}\n" for line in parameter.splitlines()
    )


def params(parameter: str) -> MigrationParams:
    spec = parse_task(migrate(parameter).encode()).subtasks[0]
    assert isinstance(spec, MigrateSpec)
    return spec.parameter


def rejected(payload: str) -> TaskRejected:
    with pytest.raises(TaskRejected) as info:
        parse_task(payload.encode())
    return info.value


def test_absent_keys_leave_the_agent_defaults() -> None:
    p = params("migration-type: live")
    assert (p.copy_storage, p.migrate_disks, p.synchronous_writes) == (None, None, None)


@pytest.mark.parametrize(
    ("parameter", "expected"),
    [
        pytest.param("copy-storage: none", ("none", None, None), id="none"),
        pytest.param("copy-storage: all", ("all", None, None), id="all"),
        pytest.param("copy-storage: inc", ("inc", None, None), id="inc"),
        pytest.param(
            "copy-storage: all\nmigrate-disks: [vda, sdb, xvdc1]",
            ("all", ("vda", "sdb", "xvdc1"), None),
            id="all-with-disks-flow",
        ),
        pytest.param(
            "copy-storage: inc\nmigrate-disks:\n  - vdb\n  - vda",
            ("inc", ("vdb", "vda"), None),
            id="inc-with-disks-block-order-kept",
        ),
        pytest.param(
            "copy-storage: all\nmigrate-disks: []",
            ("all", (), None),
            id="empty-list-libvirt-default",
        ),
        pytest.param(
            "copy-storage: none\nmigrate-disks: []", ("none", (), None), id="none-empty-list-ok"
        ),
        pytest.param(
            "copy-storage: all\ncopy-storage-synchronous-writes: yes",
            ("all", None, True),
            id="synchronous-writes",
        ),
        pytest.param(
            "copy-storage: none\ncopy-storage-synchronous-writes: false",
            ("none", None, False),
            id="none-without-synchronous-writes-ok",
        ),
        # Without copy-storage, the agent's migration.copy-storage decides; the migration
        # checks the combination (plan_migration), the parser cannot.
        pytest.param("migrate-disks: [vda]", (None, ("vda",), None), id="disks-config-copy"),
        pytest.param(
            "copy-storage-synchronous-writes: on", (None, None, True), id="sync-config-copy"
        ),
        pytest.param(
            f"copy-storage: all\nmigrate-disks: [{', '.join(f'd{i}' for i in range(64))}]",
            ("all", tuple(f"d{i}" for i in range(64)), None),
            id="64-disks",
        ),
        pytest.param(
            "copy-storage: all\nmigrate-disks: ['a" + "b" * 31 + "']",
            ("all", ("a" + "b" * 31,), None),
            id="32-characters-quoted",
        ),
    ],
)
def test_valid_storage_parameters(parameter: str, expected: tuple[object, ...]) -> None:
    p = params(parameter)
    assert (p.copy_storage, p.migrate_disks, p.synchronous_writes) == expected


@pytest.mark.parametrize(
    ("parameter", "problem"),
    [
        pytest.param(
            "copy-storage: full",
            "parameter.copy-storage: expected one of none, all, inc, found 'full'",
            id="copy-storage-word",
        ),
        pytest.param(
            "copy-storage: ALL",
            "parameter.copy-storage: expected one of none, all, inc, found 'ALL'",
            id="copy-storage-case",
        ),
        pytest.param(
            "copy-storage: [all]",
            "parameter.copy-storage: expected one of none, all, inc, found a sequence",
            id="copy-storage-list",
        ),
        pytest.param(
            "copy-storage: ~",
            "parameter.copy-storage: expected one of none, all, inc, found null",
            id="copy-storage-null",
        ),
        pytest.param(
            "copy-storage: none\nmigrate-disks: [vda]",
            f"parameter.migrate-disks: {ONLY_WITH_COPY}, found a sequence",
            id="disks-without-copy",
        ),
        pytest.param(
            "copy-storage: none\ncopy-storage-synchronous-writes: true",
            f"parameter.copy-storage-synchronous-writes: {ONLY_WITH_COPY}, found 'true'",
            id="synchronous-writes-without-copy",
        ),
        pytest.param(
            "copy-storage: all\nmigrate-disks: vda",
            "parameter.migrate-disks: expected a sequence of disk targets such as [vda, vdb], "
            "found 'vda'",
            id="disks-scalar",
        ),
        pytest.param(
            "copy-storage: all\nmigrate-disks: {vda: 1}",
            "parameter.migrate-disks: expected a sequence of disk targets such as [vda, vdb], "
            "found a map",
            id="disks-map",
        ),
        pytest.param(
            "copy-storage: all\nmigrate-disks: ~",
            "parameter.migrate-disks: expected a sequence of disk targets such as [vda, vdb], "
            "found null",
            id="disks-null",
        ),
        pytest.param(
            "copy-storage: all\nmigrate-disks: [vda, VDB]",
            f"parameter.migrate-disks[1]: {DISK_EXPECTED}, found 'VDB'",
            id="disk-upper-case",
        ),
        pytest.param(
            "copy-storage: all\nmigrate-disks: [1vda]",
            f"parameter.migrate-disks[0]: {DISK_EXPECTED}, found '1vda'",
            id="disk-leading-digit",
        ),
        pytest.param(
            "copy-storage: all\nmigrate-disks: ['']",
            f"parameter.migrate-disks[0]: {DISK_EXPECTED}, found ''",
            id="disk-empty",
        ),
        pytest.param(
            "copy-storage: all\nmigrate-disks: ['vd a']",
            f"parameter.migrate-disks[0]: {DISK_EXPECTED}, found 'vd a'",
            id="disk-space",
        ),
        pytest.param(
            "copy-storage: all\nmigrate-disks: ['../vda']",
            f"parameter.migrate-disks[0]: {DISK_EXPECTED}, found '../vda'",
            id="disk-path",
        ),
        pytest.param(
            "copy-storage: all\nmigrate-disks: [vda, ~]",
            f"parameter.migrate-disks[1]: {DISK_EXPECTED}, found null",
            id="disk-null",
        ),
        pytest.param(
            "copy-storage: all\nmigrate-disks: [[vda]]",
            f"parameter.migrate-disks[0]: {DISK_EXPECTED}, found a sequence",
            id="disk-nested",
        ),
        pytest.param(
            "copy-storage: all\nmigrate-disks: ['a" + "b" * 32 + "']",
            f"parameter.migrate-disks[0]: {DISK_EXPECTED}, found 'a" + "b" * 32 + "'",
            id="disk-33-characters",
        ),
        pytest.param(
            "copy-storage: all\nmigrate-disks: [vda, vdb, vda]",
            "parameter.migrate-disks[2]: expected each disk once (also item 0), found 'vda'",
            id="disk-duplicate",
        ),
        pytest.param(
            f"copy-storage: all\nmigrate-disks: [{', '.join(f'd{i}' for i in range(65))}]",
            "parameter.migrate-disks: expected at most 64 disk targets (65 given), "
            "found a sequence",
            id="65-disks",
        ),
        pytest.param(
            "copy-storage: all\ncopy-storage-synchronous-writes: sometimes",
            "parameter.copy-storage-synchronous-writes: expected a boolean (true/false, yes/no, "
            "on/off, y/n), found 'sometimes'",
            id="synchronous-writes-word",
        ),
    ],
)
def test_invalid_storage_parameters(parameter: str, problem: str) -> None:
    exc = rejected(migrate(parameter))
    assert exc.code == "invalid-message"
    assert exc.details == BAD.format(1, 1, problem)
    assert exc.task_id == "m1"


def test_hostile_disk_names_are_echoed_escaped_and_cut() -> None:
    exc = rejected(
        migrate('copy-storage: all\nmigrate-disks: ["vd\\e[31ma", "' + "x" * 5000 + '"]')
    )
    assert "\x1b" not in exc.details
    assert "found 'vd\\u001b[31ma'" in exc.details
    exc = rejected(migrate('copy-storage: all\nmigrate-disks: [vda, "' + "x" * 5000 + '"]'))
    assert len(exc.details) < 400


def test_a_huge_list_is_refused_by_its_length_not_read_item_by_item() -> None:
    items = ", ".join(["'../../etc'"] * 10_000)
    exc = rejected(migrate(f"copy-storage: all\nmigrate-disks: [{items}]"))
    assert "expected at most 64 disk targets (10000 given)" in exc.details


def test_evacuate_takes_the_same_keys() -> None:
    msg = parse_task(
        b"task: evacuate node\ndestinations: [b]\nparameter:\n  copy-storage: inc\n"
        b"  migrate-disks: [vda]\n  copy-storage-synchronous-writes: true\n"
    )
    spec = msg.subtasks[0]
    assert isinstance(spec, EvacuateSpec)
    assert spec.parameter == MigrationParams(
        copy_storage="inc", migrate_disks=("vda",), synchronous_writes=True
    )
    exc = rejected(
        "task: evacuate node\nid: e\ndestinations: [b]\nparameter:\n  copy-storage: none\n"
        "  migrate-disks: [vda]\n"
    )
    assert exc.details == BAD.format(
        1, 1, f"parameter.migrate-disks: {ONLY_WITH_COPY}, found a sequence"
    )


@pytest.mark.parametrize(
    "text",
    [
        migrate("copy-storage: all\nmigrate-disks: [vda, vdb]\ncopy-storage-synchronous-writes: y"),
        migrate("copy-storage: inc\nmigrate-disks:\n  - vda\n  - 'vdb'\n  - \"sdc\""),
        migrate("copy-storage: none\nmigrate-disks: []"),
    ],
)
def test_the_fast_path_reads_the_new_keys_like_ruamel(text: str) -> None:
    fast = _compose_fast(text, 10_000, 100)
    assert fast is not None, "the block subset schedulers send stays on the fast path"
    assert fast == _compose_slow(text, 10_000, 100)


def test_valid_disk_target() -> None:
    assert MAX_MIGRATE_DISKS == 64
    assert all(valid_disk_target(n) for n in ("vda", "sdb", "hdc", "xvda", "vdaa", "nvme0n1"))
    assert not any(
        valid_disk_target(n) for n in ("", "Vda", "0a", "vd-a", "vd_a", "vda ", "a" * 33, "vdé")
    )
