"""``tune migration``: change the running migrations of a task (protocol §3.11).

Answered at once, like ``cancel`` and ``status``: it takes no lane, no slot and no place in
the queue, is neither journaled nor deduplicated, and is answered while the agent drains.
The target is found by its id, as ``cancel`` finds it; its running migration jobs are
reached only through the :class:`~asyncmigfra.migration.steering.MigrationSteering` the
engine registers on the run while each job runs (an evacuation's moves, a swap's halves, a
``migrate vm``), never through the hypervisor's job.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from asyncmigfra.errors import InvalidTask, TaskError, VmNotFound, WrongState
from asyncmigfra.migration.steering import MigrationSteering, Tuning
from asyncmigfra.model import (
    MigrateSpec,
    ResultEntry,
    TaskKind,
    TaskMessage,
    TuneSpec,
)
from asyncmigfra.tasks.dispatching.base import _DispatcherBase
from asyncmigfra.tasks.dispatching.jobs import Reply, _audit, _Job, _Run
from asyncmigfra.tasks.outcomes import entry_for

log = structlog.stdlib.get_logger("asyncmigfra.dispatching")

#: The tasks whose migrations can be tuned.
_TUNABLE = frozenset({TaskKind.MIGRATE, TaskKind.EVACUATE})


class _Tuning(_DispatcherBase):
    """The answer to ``tune migration``."""

    async def _answer_tune(self, msg: TaskMessage, reply: Reply | None) -> None:
        received = time.monotonic()
        spec = msg.subtasks[0]
        assert isinstance(spec, TuneSpec)
        self._events.accepted(msg.id, task=msg.kind.value, vm_names=[])
        try:
            entries = await self._tune(spec)
        except Exception as exc:  # noqa: BLE001 - the outcome boundary: a bug is an entry
            entries = [entry_for("n/a", exc, logger=log, task_id=msg.id)]
        _audit(msg, entries, time.monotonic() - received)
        self._deliver(self._result(msg, entries), reply, None)

    async def _tune(self, spec: TuneSpec) -> list[ResultEntry]:
        jobs = list(self._by_id.get(spec.target, []))
        if not jobs:
            return [entry_for("n/a", WrongState(f"task '{spec.target}' is not queued or running"))]
        migrations = [job for job in jobs if job.msg.kind in _TUNABLE]
        if not migrations:
            kind = jobs[0].msg.kind.value
            return [
                entry_for(
                    "n/a",
                    InvalidTask(
                        f"task '{spec.target}' is a '{kind}' task: tune migration changes the"
                        " running migrations of a 'migrate vm' or 'evacuate node' task"
                    ),
                )
            ]
        targets = _targets(spec, migrations)
        tuning = Tuning(
            bandwidth=spec.bandwidth,
            max_downtime=spec.max_downtime,
            post_copy=spec.post_copy,
            force_complete=spec.force_complete,
        )
        return list(await asyncio.gather(*(_tune_one(vm, t, tuning) for vm, t in targets)))


async def _tune_one(
    vm_name: str, target: MigrationSteering | TaskError, tuning: Tuning
) -> ResultEntry:
    if isinstance(target, TaskError):
        return entry_for(vm_name, target)
    try:
        applied = await target.tune(tuning)
    except Exception as exc:  # noqa: BLE001 - the outcome boundary: a bug is an entry
        return entry_for(vm_name, exc, logger=log)
    return ResultEntry(vm_name=vm_name, status="success", extra=applied)


def _targets(spec: TuneSpec, jobs: list[_Job]) -> list[tuple[str, MigrationSteering | TaskError]]:
    """The running migrations of ``jobs`` to change (``vm-name`` narrows them to one), or,
    for each VM that cannot be changed now, why."""
    runs = [run for job in jobs for run in job.runs if run.state != "done"]
    running: dict[str, MigrationSteering] = {}
    for run in runs:
        running.update((vm, s) for vm, s in run.steering.items() if s.running)
    vm = spec.vm_name
    if vm is None:
        if running:
            return list(running.items())
        if not runs:  # every subtask finished; the result is on its way
            return [("n/a", WrongState(f"task '{spec.target}' is not queued or running"))]
        return [(run.spec.result_name, _not_started(run, None)) for run in runs]
    if vm in running:
        return [(vm, running[vm])]
    for run in runs:
        names = _vm_names(run)
        if names is None or vm in names:
            return [(vm, _not_started(run, vm))]
    return [(vm, VmNotFound(f"task '{spec.target}' migrates no running or queued VM named '{vm}'"))]


def _vm_names(run: _Run) -> tuple[str, ...] | None:
    """The VMs a run migrates (``None``: not known before it runs, an evacuation's)."""
    spec = run.spec
    if not isinstance(spec, MigrateSpec):
        return None
    partner = spec.parameter.swap_with
    return (spec.vm_name, partner.vm_name) if partner is not None else (spec.vm_name,)


def _not_started(run: _Run, vm_name: str | None) -> WrongState:
    """Why a VM (or, without ``vm_name``, a subtask) of the target cannot be changed now."""
    phase = run.ctx.current_phase if run.ctx is not None else None
    where = " (queued)" if run.state == "queued" else (f" (phase: {phase})" if phase else "")
    if not isinstance(run.spec, MigrateSpec):  # an evacuation: its VMs move one by one
        if run.state == "queued":
            return WrongState(f"the evacuation has not started yet{where}; tune it once it runs")
        if vm_name is None:
            return WrongState(
                f"no migration of the evacuation runs now{where}; tune it once one runs"
            )
        return WrongState(
            f"no migration of {vm_name} runs now in the evacuation (not started, or over);"
            " tune it while it runs"
        )
    name = vm_name or run.spec.vm_name
    return WrongState(f"the migration of {name} has not started yet{where}; tune it once it runs")
