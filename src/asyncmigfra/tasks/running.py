"""Run one subtask against the hypervisor and turn what happens into a result entry.

Errors become outcomes here (kopf's ``execute_handler_once``), through the one boundary
:func:`asyncmigfra.tasks.outcomes.entry_for`: every :class:`~asyncmigfra.errors.TaskError` becomes
``status: error`` with its ``code``; any other exception is a bug, logged with its traceback
and reported as ``hypervisor-error`` so one broken operation never takes the agent down.
Cancellation is not swallowed here: the dispatcher, which asked for it, turns it into
``code: cancelled`` (:func:`asyncmigfra.tasks.outcomes.absorb_cancel`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace

import structlog

from asyncmigfra.errors import HookFailed, InvalidTask, MigrationFailed, NotSupported, TaskError
from asyncmigfra.hypervisor.base import AdoptsMigrations, DomainState, Hypervisor, domain_named
from asyncmigfra.migration.engine import follow_adopted, migrate
from asyncmigfra.migration.forecast import Forecaster
from asyncmigfra.migration.steering import MigrationSteering
from asyncmigfra.migration.swap import swap
from asyncmigfra.model import (
    MigrateSpec,
    RepinSpec,
    ResultEntry,
    ResumeSpec,
    StartSpec,
    StopSpec,
    Subtask,
    SuspendSpec,
)
from asyncmigfra.peers.bus import MessageBus
from asyncmigfra.peers.userhooks import HookCall, HookRunner
from asyncmigfra.settings import Settings
from asyncmigfra.tasks.hostpolicy import HostPolicy
from asyncmigfra.tasks.outcomes import Outcome, entry_for
from asyncmigfra.timing import TimeMeasurement
from asyncmigfra.wire.events import Events

__all__ = ["SubtaskContext", "reconcile_subtask", "run_subtask"]

#: Domain XML at least this long is checked in a worker thread (the loop never waits on it).
_THREAD_XML_CHARS = 32 * 1024

log = structlog.stdlib.get_logger(__name__)


@dataclass(slots=True, kw_only=True)
class SubtaskContext:
    """What an operation may report while it runs (implements ``OpContext``)."""

    task_id: str | None
    vm_name: str
    events: Events
    timer: TimeMeasurement
    started: float = field(default_factory=time.monotonic)
    current_phase: str | None = None
    #: What the operation records for its entry (``destination``, ``retries``, notes ...).
    outcome: Outcome = field(default_factory=Outcome)
    #: The broker connection for hooks (pscom, MQTT hooks); ``None``: no hooks over MQTT.
    bus: MessageBus | None = None
    #: Appended to every time-measurement tag (``-<vm>`` in a swap's halves).
    suffix: str = ""
    #: The configured ``hooks:`` (``None``: none configured).
    hooks: HookRunner | None = None
    #: The task's own context, for a companion (its phases show in ``status`` too).
    parent: SubtaskContext | None = None
    #: VM name -> the steering of its running migration job (``tune migration``), shared by
    #: every context of one subtask (an evacuation's moves, a swap's halves).
    steering: dict[str, MigrationSteering] = field(default_factory=dict)
    #: The agent's predictions (``migration-type: auto``, ``plan`` events); ``None``: none.
    forecaster: Forecaster | None = None

    def phase(self, name: str) -> None:
        self.current_phase = name
        if self.parent is not None:
            self.parent.current_phase = name
        self.events.phase(self.task_id, self.vm_name, name)

    def measure(self, tag: str) -> AbstractContextManager[None]:
        return self.timer.measure(self._tag(tag))

    def record(self, tag: str, seconds: float) -> None:
        self.timer.record(self._tag(tag), seconds)

    def _tag(self, tag: str) -> str:
        if not self.suffix or tag.endswith(self.suffix):
            return tag
        return tag + self.suffix

    @contextlib.contextmanager
    def steerable(self, steering: MigrationSteering) -> Iterator[None]:
        """``steering`` is this context's VM's running migration while the block runs."""
        self.steering[self.vm_name] = steering
        try:
            yield
        finally:
            if self.steering.get(self.vm_name) is steering:
                del self.steering[self.vm_name]

    def companion(self, vm_name: str) -> SubtaskContext:
        """A context for one VM of a task that moves two (a swap's halves): events under that
        VM's name, tags suffixed ``-<vm>`` (the original's swap tags), its own ``outcome``, the
        same timer and broker connection."""
        return SubtaskContext(
            task_id=self.task_id,
            vm_name=vm_name,
            events=self.events,
            timer=self.timer,
            bus=self.bus,
            suffix=f"-{vm_name}",
            hooks=self.hooks,
            parent=self,
            steering=self.steering,
            forecaster=self.forecaster,
        )

    def progress(self, fields: dict[str, object]) -> None:
        self.events.progress(self.task_id, self.vm_name, fields)

    def plan(self, fields: dict[str, object]) -> None:
        self.events.plan(self.task_id, self.vm_name, fields)


async def run_subtask(
    spec: Subtask,
    ctx: SubtaskContext,
    *,
    hypervisor: Hypervisor,
    settings: Settings,
    vm_name: str | None = None,
) -> ResultEntry:
    """Run a single-VM subtask (``vm_name`` overrides the spec's, for regex stops)."""
    name = vm_name if vm_name is not None else spec.result_name
    try:
        with ctx.timer.measure("overall"):
            await _operate(spec, ctx, hypervisor=hypervisor, settings=settings, vm_name=name)
    except Exception as exc:  # noqa: BLE001 - the outcome boundary: a bug is an entry
        if isinstance(exc, TaskError):
            log.info("task.failed", code=exc.code, details=str(exc))
        return entry_for(name, exc, ctx.outcome, ctx.timer, logger=log)
    return entry_for(name, None, ctx.outcome, ctx.timer)


async def _operate(
    spec: Subtask,
    ctx: SubtaskContext,
    *,
    hypervisor: Hypervisor,
    settings: Settings,
    vm_name: str,
) -> None:
    policy = HostPolicy.from_settings(settings)
    policy.check_subtask(spec)  # driver and transport: the configuration decides
    match spec:
        case StartSpec():
            if spec.name_error:
                raise InvalidTask(spec.name_error)
            if spec.xml is not None and not settings.agent.allow_xml_start:
                raise NotSupported(
                    "start from XML is disabled on this agent (agent.allow-xml-start: false)"
                )
            if spec.transient and spec.xml is None:
                raise InvalidTask(
                    "XML description is missing which is required to create a transient domain."
                )
            pools = await hypervisor.storage_paths() if policy.needs_pool_paths(spec) else ()
            if spec.xml is not None and len(spec.xml) >= _THREAD_XML_CHARS:
                await asyncio.to_thread(policy.check_start, spec, pools)  # off the loop
            else:
                policy.check_start(spec, pools)  # host devices and the domain XML
            await _hooks(ctx, _call("before-start", "start vm", ctx, vm_name, settings))
            await hypervisor.start(spec, ctx)
        case StopSpec():
            if not vm_name:
                raise InvalidTask("Neither vm-name or regex is defined in stop task.")
            call = _call("after-stop", "stop vm", ctx, vm_name, settings)
            try:
                await hypervisor.stop(
                    vm_name,
                    ctx,
                    force=spec.force,
                    undefine=spec.undefine,
                    force_after_timeout=spec.force_after_timeout,
                )
            except TaskError as exc:
                failed = replace(call, outcome="error", details=str(exc))
                try:
                    await _hooks(ctx, failed)
                except HookFailed as hook_exc:  # the stop's own error is what is reported
                    log.error("hook.failed_after_failure", error=str(hook_exc))  # noqa: TRY400
                raise
            await _hooks(ctx, replace(call, outcome="success"))
        case SuspendSpec():
            await hypervisor.suspend(vm_name, ctx)
        case ResumeSpec():
            await hypervisor.resume(vm_name, ctx)
        case RepinSpec():
            await hypervisor.repin(vm_name, spec.vcpu_map, ctx)
        case MigrateSpec() if spec.parameter.swap_with is not None:
            await swap(spec, ctx, hypervisor=hypervisor, settings=settings, bus=ctx.bus)
        case MigrateSpec():
            await migrate(spec, ctx, hypervisor=hypervisor, settings=settings, bus=ctx.bus)
        case _:  # pragma: no cover - the dispatcher routes the others
            raise NotSupported(f"{type(spec).__name__} cannot run as a single-VM subtask")


def _call(point: str, task: str, ctx: SubtaskContext, vm_name: str, settings: Settings) -> HookCall:
    return HookCall(
        point=point, task=task, task_id=ctx.task_id, vm_name=vm_name, source=settings.hostname
    )


async def _hooks(ctx: SubtaskContext, call: HookCall) -> None:
    """Run the configured hooks of ``call.point``; ``warn`` failures go into ``details``."""
    if ctx.hooks is None or not ctx.hooks.wants(call.point):
        return
    warnings = await ctx.hooks.run(call, ctx)
    ctx.outcome.note(*warnings)


#: The state each operation leaves a VM in: when a recovered subtask finds it there, the work
#: was done before the agent stopped.
_TARGET_STATE: dict[type[Subtask], tuple[DomainState | None, ...]] = {
    StartSpec: (DomainState.RUNNING,),
    StopSpec: (DomainState.SHUTOFF, None),
    SuspendSpec: (DomainState.PAUSED,),
    ResumeSpec: (DomainState.RUNNING,),
}


async def reconcile_subtask(
    spec: Subtask,
    ctx: SubtaskContext,
    *,
    hypervisor: Hypervisor,
    settings: Settings,
    vm_name: str | None = None,
) -> ResultEntry:
    """Finish a subtask that was running when the agent stopped, without doing it twice.

    A migration whose job still runs is adopted and followed to its end; one whose VM left
    this host finished while the agent was away; one whose VM is still here without a job
    never happened or failed, so it runs now. Lifecycle operations check whether the VM is
    already in the state they produce and run only if it is not (they are idempotent that
    way). Repin simply runs again.
    """
    name = vm_name if vm_name is not None else spec.result_name
    log.info("task.reconciling", kind=type(spec).__name__)
    ctx.phase("reconciling")
    try:
        with ctx.timer.measure("overall"):
            state = await _state_of(hypervisor, name)
            if isinstance(spec, MigrateSpec) and spec.parameter.swap_with is not None:
                entry = await _reconcile_swap(
                    spec, ctx, state, hypervisor=hypervisor, settings=settings
                )
                if entry is not None:
                    return entry
            elif isinstance(spec, MigrateSpec):
                job = (
                    await hypervisor.adopt_migration(name, destination=spec.destination)
                    if isinstance(hypervisor, AdoptsMigrations) and state is not None
                    else None
                )
                if job is not None:
                    await follow_adopted(spec, job, ctx, hypervisor=hypervisor, settings=settings)
                    return _success(name, ctx, note="adopted after an agent restart")
                if state is None:
                    ctx.outcome.destination = spec.destination
                    return _success(
                        name, ctx, note="the VM left this host while the agent was restarting"
                    )
            elif type(spec) in _TARGET_STATE and state in _TARGET_STATE[type(spec)]:
                return _success(name, ctx, note="already done before the agent restarted")
    except TaskError as exc:
        return entry_for(name, exc, timer=ctx.timer)
    return await run_subtask(spec, ctx, hypervisor=hypervisor, settings=settings, vm_name=name)


async def _reconcile_swap(
    spec: MigrateSpec,
    ctx: SubtaskContext,
    state: DomainState | None,
    *,
    hypervisor: Hypervisor,
    settings: Settings,
) -> ResultEntry | None:
    """A swap the agent was running when it stopped. Its own VM's job, if it still runs, is
    followed to its end first; then the swap is done when the two VMs have traded places, runs
    again (``None``) when neither moved, and is otherwise reported as interrupted, saying where
    each VM is. Nothing is moved back on a guess."""
    assert spec.parameter.swap_with is not None
    partner = spec.parameter.swap_with.vm_name
    job = (
        await hypervisor.adopt_migration(spec.vm_name, destination=spec.destination)
        if isinstance(hypervisor, AdoptsMigrations) and state is not None
        else None
    )
    if job is not None:
        own = replace(spec, parameter=replace(spec.parameter, swap_with=None))
        with contextlib.suppress(TaskError):  # where the VM ended up is checked below
            await follow_adopted(own, job, ctx, hypervisor=hypervisor, settings=settings)
        state = await _state_of(hypervisor, spec.vm_name)
    partner_here = await _state_of(hypervisor, partner) is not None
    if state is not None and not partner_here:
        return None  # neither moved: the swap runs now
    if state is None and partner_here:
        ctx.outcome.destination = spec.destination
        ctx.outcome.swap_with = {
            "vm-name": partner,
            "status": "success",
            "destination": settings.hostname,
        }
        return _success(spec.vm_name, ctx, note="the swap finished while the agent was restarting")
    where = "here" if state is not None else f"on {spec.destination}"
    where_partner = "here" if partner_here else f"still on {spec.destination}"
    raise MigrationFailed(
        f"the swap was interrupted by an agent restart: {spec.vm_name} is {where}, "
        f"{partner} is {where_partner}; nothing was moved back"
    )


async def _state_of(hypervisor: Hypervisor, vm_name: str) -> DomainState | None:
    dom = await domain_named(hypervisor, vm_name)
    return dom.state if dom is not None else None


def _success(name: str, ctx: SubtaskContext, *, note: str) -> ResultEntry:
    return entry_for(name, None, ctx.outcome, ctx.timer, details=note)
