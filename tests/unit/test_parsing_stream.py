"""Issue 17: the migration stream keys of ``parameter:`` (``progress-timeout``,
``compression``, ``compression-level``, ``xbzrle-cache``, ``zerocopy``, ``postcopy-bandwidth``,
``auto-converge-initial``/``-increment``, ``tls-destination``) and ``task: tune migration``:
valid forms, and each invalid one with its ``bad conversion`` text."""

from __future__ import annotations

import pytest

from asyncmigfra.errors import TaskRejected
from asyncmigfra.model import EvacuateSpec, MigrateSpec, MigrationParams, TaskKind, TuneSpec
from asyncmigfra.wire.parsing import parse_task
from asyncmigfra.wire.parsing.fastpath import _compose_fast
from asyncmigfra.wire.parsing.nodes import _compose_slow

BAD = "Exception while parsing message: yaml-cpp: error at line 1, column 1: bad conversion ({})"


def migrate(parameter: str) -> str:
    return "task: migrate vm\nid: m1\nvm-name: vm1\ndestination: node2\nparameter:\n" + "".join(
        f"  {line}\n" for line in parameter.splitlines()
    )


def params(parameter: str) -> MigrationParams:
    spec = parse_task(migrate(parameter).encode()).subtasks[0]
    assert isinstance(spec, MigrateSpec)
    return spec.parameter


def rejected(payload: str) -> str:
    with pytest.raises(TaskRejected) as info:
        parse_task(payload.encode())
    assert info.value.code == "invalid-message"
    return info.value.details


def test_absent_keys_leave_the_agent_defaults() -> None:
    p = params("migration-type: live")
    assert p.progress_timeout is None
    assert p.compression is None
    assert (p.compression_level, p.xbzrle_cache, p.zerocopy) == (None, None, None)
    assert (p.postcopy_bandwidth, p.auto_converge_initial, p.auto_converge_increment) == (
        None,
        None,
        None,
    )
    assert p.tls_destination is None


@pytest.mark.parametrize(
    ("parameter", "field", "value"),
    [
        ("progress-timeout: 5", "progress_timeout", 5.0),
        ("progress-timeout: 2.5", "progress_timeout", 2.5),
        ("progress-timeout: 0", "progress_timeout", 0.0),
        ("compression: []", "compression", ()),
        ("compression: [xbzrle]", "compression", ("xbzrle",)),
        ("compression:\n  - zstd\nparallel-connections: 4", "compression", ("zstd",)),
        ("compression: [zlib]\nparallel-connections: 2", "compression", ("zlib",)),
        (
            "compression: [zstd]\ncompression-level: 20\nparallel-connections: 2",
            "compression_level",
            20,
        ),
        (
            "compression: [zlib]\ncompression-level: 0\nparallel-connections: 2",
            "compression_level",
            0,
        ),
        ("compression: [xbzrle]\nxbzrle-cache: 256", "xbzrle_cache", 256),
        ("compression: [xbzrle]\nxbzrle-cache: 1", "xbzrle_cache", 1),
        ("zerocopy: true\nparallel-connections: 4", "zerocopy", True),
        ("zerocopy: false\ntls: true", "zerocopy", False),
        ("postcopy-bandwidth: 500", "postcopy_bandwidth", 500),
        ("auto-converge: true\nauto-converge-initial: 1", "auto_converge_initial", 1),
        ("auto-converge: true\nauto-converge-increment: 99", "auto_converge_increment", 99),
        ("tls: true\ntls-destination: b.example.org", "tls_destination", "b.example.org"),
        # Keys the task leaves out are the agent's to fill: not judged here.
        ("compression: [zstd]", "compression", ("zstd",)),
        ("zerocopy: true", "zerocopy", True),
        ("auto-converge-initial: 30", "auto_converge_initial", 30),
        ("tls-destination: b", "tls_destination", "b"),
        ("compression-level: 5", "compression_level", 5),
    ],
)
def test_valid_values(parameter: str, field: str, value: object) -> None:
    assert getattr(params(parameter), field) == value


def test_evacuate_takes_the_keys_too() -> None:
    text = (
        "task: evacuate node\ndestinations: [b]\nparameter:\n  progress-timeout: 30\n"
        "  compression: [zstd]\n  parallel-connections: 4\n"
    )
    spec = parse_task(text.encode()).subtasks[0]
    assert isinstance(spec, EvacuateSpec)
    assert (spec.parameter.progress_timeout, spec.parameter.compression) == (30.0, ("zstd",))


@pytest.mark.parametrize(
    ("parameter", "expected"),
    [
        (
            "progress-timeout: -1",
            "parameter.progress-timeout: expected a number of seconds (0: off), found '-1'",
        ),
        (
            "progress-timeout: 1e3",
            "parameter.progress-timeout: expected a number of seconds (0: off), found '1e3'",
        ),
        (
            "progress-timeout: .inf",
            "parameter.progress-timeout: expected a number of seconds (0: off), found '.inf'",
        ),
        (
            "compression: zstd",
            "parameter.compression: expected a sequence of xbzrle, zlib, zstd (a list: [zstd]),"
            " found 'zstd'",
        ),
        (
            "compression: [lz4]",
            "parameter.compression[0]: expected one of xbzrle, zlib, zstd, found 'lz4'",
        ),
        (
            "compression: [xbzrle, xbzrle]",
            "parameter.compression[1]: expected each method once, found 'xbzrle'",
        ),
        (
            "compression: [zlib, zstd]\nparallel-connections: 2",
            "parameter.compression: takes one of zlib and zstd: multifd compresses with one"
            " method, found a sequence",
        ),
        (
            "compression: [zstd]\nparallel-connections: 1",
            "parameter.compression: zstd needs parallel-connections >= 2: QEMU compresses with"
            " zlib and zstd only on multifd connections (parallel-connections is 1), found a"
            " sequence",
        ),
        (
            "compression: [xbzrle]\nparallel-connections: 4",
            "parameter.compression: xbzrle does not work with parallel-connections >= 2: multifd"
            " connections send pages without it (libvirt 9.4 and later refuse the"
            " combination), found a sequence",
        ),
        (
            "compression: [xbzrle]\ncompression-level: 3",
            "parameter.compression-level: needs compression zlib or zstd, found '3'",
        ),
        (
            "compression: [zlib]\nparallel-connections: 2\ncompression-level: 10",
            "parameter.compression-level: zlib takes levels 0 to 9 (compression-level is 10),"
            " found '10'",
        ),
        (
            "compression-level: 21",
            "parameter.compression-level: expected an unsigned integer up to 20, found '21'",
        ),
        (
            "compression: []\nxbzrle-cache: 64",
            "parameter.xbzrle-cache: needs xbzrle in compression, found '64'",
        ),
        (
            "xbzrle-cache: 0",
            "parameter.xbzrle-cache: expected an integer from 1 to 1048576, found '0'",
        ),
        (
            "xbzrle-cache: 96",
            "parameter.xbzrle-cache: must be a power of two in MiB (QEMU's rule), not 96,"
            " found '96'",
        ),
        (
            "zerocopy: true\nparallel-connections: 1",
            "parameter.zerocopy: needs parallel-connections >= 2: QEMU sends zero-copy only on"
            " multifd connections, found 'true'",
        ),
        (
            "zerocopy: true\ntls: true",
            "parameter.zerocopy: does not work with tls: QEMU 7.2 sends zero-copy only on plain"
            " (non-TLS) multifd connections, found 'true'",
        ),
        (
            "zerocopy: true\ncompressed: true",
            "parameter.zerocopy: does not work with compression (compression or compressed):"
            " zero-copy sends the guest's pages as they are, found 'true'",
        ),
        (
            "zerocopy: true\nparallel-connections: 2\ncompression: [zstd]",
            "parameter.zerocopy: does not work with compression (compression or compressed):"
            " zero-copy sends the guest's pages as they are, found 'true'",
        ),
        ("zerocopy: maybe", "parameter.zerocopy: expected a boolean"),
        (
            "postcopy-bandwidth: -5",
            "parameter.postcopy-bandwidth: expected an unsigned integer up to"
            " 18446744073709551615, found '-5'",
        ),
        (
            "auto-converge-initial: 0",
            "parameter.auto-converge-initial: expected an integer from 1 to 99, found '0'",
        ),
        (
            "auto-converge-increment: 100",
            "parameter.auto-converge-increment: expected an integer from 1 to 99, found '100'",
        ),
        (
            "auto-converge: false\nauto-converge-initial: 20",
            "parameter.auto-converge-initial: needs auto-converge: true (libvirt tunes only a"
            " throttle that is on), found '20'",
        ),
        (
            "tls: false\ntls-destination: b",
            "parameter.tls-destination: needs tls: true, found 'b'",
        ),
        (
            "tls-destination: 'b/../x'",
            "parameter.tls-destination: expected a host name or IP address, found 'b/../x'",
        ),
    ],
)
def test_invalid_values(parameter: str, expected: str) -> None:
    details = rejected(migrate(parameter))
    if expected.endswith("expected a boolean"):
        assert "parameter.zerocopy: expected a boolean" in details
    else:
        assert details == BAD.format(expected)


def test_the_fast_and_the_slow_path_read_the_new_keys_alike() -> None:
    text = migrate("compression: [zstd]\nparallel-connections: 4\nprogress-timeout: 5")
    assert _compose_fast(text, 1000, 64) == _compose_slow(text, 1000, 64)


# ---------------------------------------------------------------------------- tune migration


def tune(body: str) -> TuneSpec:
    msg = parse_task(f"task: tune migration\nid: t1\n{body}".encode())
    assert msg.kind is TaskKind.TUNE
    assert msg.kind.result_name == "tuned"
    (spec,) = msg.subtasks
    assert isinstance(spec, TuneSpec)
    return spec


def test_tune_every_key() -> None:
    spec = tune("target: mig-1\nvm-name: vm2\nbandwidth: 100\nmax-downtime: 500\n")
    assert (spec.target, spec.vm_name, spec.bandwidth, spec.max_downtime) == (
        "mig-1",
        "vm2",
        100,
        500,
    )
    assert (spec.post_copy, spec.force_complete) == (False, False)
    assert spec.result_name == "n/a"
    assert spec.lane is None


@pytest.mark.parametrize(
    ("body", "field", "value"),
    [
        ("target: m\nbandwidth: 0", "bandwidth", 0),
        ("target: m\nmax-downtime: 1", "max_downtime", 1),
        ("target: m\npost-copy: true", "post_copy", True),
        ("target: m\npost-copy: yes", "post_copy", True),
        ("target: m\nforce-complete: true", "force_complete", True),
        ("target: '0012'\nbandwidth: 5", "target", "0012"),
    ],
)
def test_tune_valid(body: str, field: str, value: object) -> None:
    assert getattr(tune(body), field) == value


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "bandwidth: 5",
            "target: expected a task id, the key is missing",
        ),
        (
            "target: m",
            "bandwidth or max-downtime or post-copy or force-complete: expected at least one of"
            " them, the key is missing",
        ),
        (
            "target: m\npost-copy: false",
            "post-copy: expected true (leave the key out to ask for nothing), found 'false'",
        ),
        (
            "target: m\nforce-complete: no",
            "force-complete: expected true (leave the key out to ask for nothing), found 'no'",
        ),
        (
            "target: m\npost-copy: true\nforce-complete: true",
            "force-complete: expected only one of post-copy and force-complete: post-copy moves"
            " the guest to the destination now, force-complete pauses it on the source,"
            " found 'true'",
        ),
        (
            "target: m\nbandwidth: -1",
            "bandwidth: expected an unsigned integer up to 18446744073709551615, found '-1'",
        ),
        (
            "target: m\nbandwidth: 18446744073709551616",
            "bandwidth: expected an unsigned integer up to 18446744073709551615,"
            " found '18446744073709551616'",
        ),
        (
            "target: m\nmax-downtime: fast",
            "max-downtime: expected an unsigned integer up to 18446744073709551615, found 'fast'",
        ),
        (
            "target: m\nvm-name: ../x\nbandwidth: 1",
            "vm-name: expected a VM name (1-200 characters, no control or bidirectional"
            " characters, no '/'), found '../x'",
        ),
        (
            "target: [m]\nbandwidth: 1",
            "target: expected a task id, found a sequence",
        ),
    ],
)
def test_tune_invalid(body: str, expected: str) -> None:
    details = rejected(f"task: tune migration\nid: t1\n{body}\n")
    assert details == BAD.format(expected)


def test_tune_target_is_a_bounded_printable_id() -> None:
    details = rejected("task: tune migration\ntarget: " + "x" * 257 + "\nbandwidth: 1\n")
    assert "target: expected an id of at most 256 characters" in details
    details = rejected('task: tune migration\ntarget: "a\\u202eb"\nbandwidth: 1\n')
    assert "target: expected an id of at most 256 characters" in details
    assert "\u202e" not in details, "the bidirectional control is shown escaped"
