"""Example-based tests of :func:`asyncmigfra.wire.parsing.parse_task`: migrate vm and its
parameters (spec 1.7, 1.10).

Each test names the section of ``spec/migfra-original.md`` (or ``spec/extensions.md``,
"ext") whose rule it checks.
"""

from __future__ import annotations

import pytest
from parsing_support import BAD, migrate, parse, reject

from asyncmigfra.model import MigrateSpec, MigrationParams, SwapWith


def migrate_params(parameter: str) -> MigrationParams:
    spec = parse(migrate(parameter=parameter)).subtasks[0]
    assert isinstance(spec, MigrateSpec)
    return spec.parameter


# --------------------------------------------------------------------------------------------
# 1.7 migrate vm + ext parameters


def test_spec_1_7_migrate_minimal_defaults() -> None:
    msg = parse(migrate())
    assert msg.subtasks == (MigrateSpec(vm_name="vm1", destination="node2"),)
    spec = msg.subtasks[0]
    assert isinstance(spec, MigrateSpec)
    assert spec.parameter == MigrationParams()
    # No migration-type: the agent's configured default applies (migration.migration-type,
    # itself "warm" like the original), so the parser leaves it unset.
    assert (spec.parameter.migration_type, spec.parameter.rdma_migration) == (None, False)


def test_spec_1_7_migrate_all_parameters() -> None:
    params = migrate_params(
        """\
migration-type: post-copy
rdma-migration: true
pscom-hook-procs: 4
transport: tcp
vcpu-map: [[1], [2]]
retry_counter: 3
swap-with:
  vm-name: vm2
  pscom-hook-procs: auto
  vcpu-map: [[3]]
max-downtime: 300
bandwidth: 0x400
auto-converge: true
compressed: false
parallel-connections: 4
completion-timeout: 12.5
timeout-action: suspend
persist: false
tls: yes"""
    )
    assert params == MigrationParams(
        migration_type="post-copy",
        rdma_migration=True,
        pscom_hook_procs=4,
        transport="tcp",
        vcpu_map=((1,), (2,)),
        retry_counter=3,
        swap_with=SwapWith(vm_name="vm2", pscom_hook_procs="auto", vcpu_map=((3,),)),
        max_downtime=300,
        bandwidth=1024,
        auto_converge=True,
        compressed=False,
        parallel_connections=4,
        completion_timeout=12.5,
        timeout_action="suspend",
        persist=False,
        tls=True,
    )


@pytest.mark.parametrize(
    ("parameter", "value"),
    [
        pytest.param("retry_counter: 2", 2, id="underscore"),
        pytest.param("retry-counter: 5", 5, id="dash"),
        pytest.param("retry_counter: 2\nretry-counter: 5", 5, id="dash-wins"),
        pytest.param("retry-counter: 5\nretry_counter: 2", 5, id="dash-wins-either-order"),
    ],
)
def test_ext_retry_counter_either_spelling(parameter: str, value: int) -> None:
    assert migrate_params(parameter).retry_counter == value


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        pytest.param("4", 4, id="int"),
        pytest.param("'4'", 4, id="quoted"),
        pytest.param("0", 0, id="zero"),
        pytest.param("auto", "auto", id="auto"),
        pytest.param("010", 10, id="decimal-not-octal"),
    ],
)
def test_spec_1_10_pscom_hook_procs(raw: str, value: int | str) -> None:
    assert migrate_params(f"pscom-hook-procs: {raw}").pscom_hook_procs == value


@pytest.mark.parametrize(
    ("parameter", "problem"),
    [
        pytest.param(
            "migration-type: hot",
            "parameter.migration-type: expected one of live, warm, offline, post-copy, auto,"
            " found 'hot'",
            id="migration-type",
        ),
        pytest.param(
            "pscom-hook-procs: many",
            "parameter.pscom-hook-procs: expected a process count or 'auto', found 'many'",
            id="pscom-word",
        ),
        pytest.param(
            "pscom-hook-procs: -2",
            "parameter.pscom-hook-procs: expected a process count or 'auto', found '-2'",
            id="pscom-negative",
        ),
        pytest.param(
            "pscom-hook-procs: AUTO",
            "parameter.pscom-hook-procs: expected a process count or 'auto', found 'AUTO'",
            id="pscom-case",
        ),
        pytest.param(
            "timeout-action: retry",
            "parameter.timeout-action: expected one of abort, post-copy, suspend, found 'retry'",
            id="timeout-action",
        ),
        pytest.param(
            "parallel-connections: 0",
            "parameter.parallel-connections: expected an integer from 1 to 4294967295, found '0'",
            id="parallel-connections-zero",
        ),
        pytest.param(
            "completion-timeout: 0",
            "parameter.completion-timeout: expected a positive number of seconds, found '0'",
            id="completion-timeout-zero",
        ),
        pytest.param(
            "completion-timeout: -5",
            "parameter.completion-timeout: expected a positive number of seconds, found '-5'",
            id="completion-timeout-negative",
        ),
        pytest.param(
            "completion-timeout: .inf",
            "parameter.completion-timeout: expected a positive number of seconds, found '.inf'",
            id="completion-timeout-inf",
        ),
        pytest.param(
            "max-downtime: 1.5",
            "parameter.max-downtime: expected an unsigned integer up to 18446744073709551615, "
            "found '1.5'",
            id="max-downtime",
        ),
        pytest.param(
            "swap-with:\n  vm-name: b\n  vcpu-map: [1]",
            "parameter.swap-with.vcpu-map[0]: expected a sequence of sequences of CPU numbers, "
            "found '1'",
            id="swap-with-vcpu-map",
        ),
        pytest.param(
            "rdma-migration: 1",
            "parameter.rdma-migration: expected a boolean (true/false, yes/no, on/off, y/n), "
            "found '1'",
            id="rdma",
        ),
    ],
)
def test_ext_migrate_bad_parameters(parameter: str, problem: str) -> None:
    exc = reject(migrate(parameter=parameter))
    assert exc.details == BAD.format(1, 1, problem)
    assert exc.task_id == "m1"


def test_spec_1_7_parameter_must_be_a_map() -> None:
    exc = reject(migrate("parameter: live\n"))
    assert exc.details == BAD.format(1, 1, "parameter: expected a map, found 'live'")


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        pytest.param("120", 120.0, id="int"),
        pytest.param("0.5", 0.5, id="decimal"),
        pytest.param(".25", 0.25, id="leading-dot"),
        pytest.param("3.", 3.0, id="trailing-dot"),
    ],
)
def test_ext_completion_timeout_accepts_ints_and_decimals(raw: str, value: float) -> None:
    assert migrate_params(f"completion-timeout: {raw}").completion_timeout == value
