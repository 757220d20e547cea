"""Configured pre/post hooks (``hooks:`` in the configuration): commands and MQTT requests.

A hook runs at one or more points of a task (:data:`HOOK_POINTS`). :meth:`HookRunner.run`
runs every configured hook of a point in the configured order, each as a ``phase`` event
``hook:<name>`` timed under the tag ``hook-<name>``. A hook that fails with policy ``fail``
raises :class:`asyncmigfra.errors.HookFailed` (the hooks after it do not run); with policy
``warn`` the failure is logged and returned, and the next hook runs.

**Command hooks** run in a session (and process group) of their own, stdin ``/dev/null``,
with the task's data in ``ASYNCMIGFRA_*`` environment variables. Only the last 4 KiB of
stdout and of stderr are kept. On a timeout or a cancellation the whole process group gets
SIGTERM, then SIGKILL 2 s later, so nothing the hook started outlives it.

**MQTT hooks** publish a JSON request with a fresh ``request-id`` and wait for the answer
with that id on the response topic (``status: success`` or ``status: error``), through the
same :class:`asyncmigfra.hooks.MessageBus` as the pscom hook.

Built-in hooks (``builtin: reduce-memory``) are only looked up here (:meth:`HookRunner.builtin`);
the migration engine implements them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog

from asyncmigfra.errors import HookFailed
from asyncmigfra.hooks import HookContext, MessageBus
from asyncmigfra.parsing import load_yaml
from asyncmigfra.settings import HOOK_POINTS, MIGRATE_HOOK_POINTS, HookSettings

__all__ = ["HOOK_POINTS", "HookCall", "HookRunner", "hook_environment", "hook_request"]

log = structlog.stdlib.get_logger(__name__)

#: Bytes of stdout and of stderr kept per command (the end of each).
OUTPUT_TAIL_BYTES = 4096
#: s between SIGTERM and SIGKILL to a command's process group.
KILL_GRACE = 2.0
#: s to read the rest of a command's output after it exited (a child it left behind may keep
#: the pipes open; the hook's result does not wait for it).
DRAIN_GRACE = 0.5
#: Bytes of an MQTT answer that are parsed; a longer one is a bad response.
MAX_RESPONSE_BYTES = 64 * 1024
#: Characters of a reason (an error line, the answer's details) kept in the failure text.
MAX_REASON_CHARS = 500

#: Environment variables the runner sets; inherited ones of these names are dropped first.
_ENV_NAMES = (
    "ASYNCMIGFRA_HOOK",
    "ASYNCMIGFRA_POINT",
    "ASYNCMIGFRA_TASK",
    "ASYNCMIGFRA_TASK_ID",
    "ASYNCMIGFRA_VM_NAME",
    "ASYNCMIGFRA_SOURCE",
    "ASYNCMIGFRA_DESTINATION",
    "ASYNCMIGFRA_HOST",
    "ASYNCMIGFRA_OUTCOME",
    "ASYNCMIGFRA_DETAILS",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class HookCall:
    """The task's data given to a hook."""

    #: One of :data:`HOOK_POINTS`.
    point: str
    #: The wire task name: ``migrate vm``, ``start vm``, ``stop vm``.
    task: str
    task_id: str | None
    vm_name: str
    #: The agent's host name.
    source: str
    #: Migrations only.
    destination: str | None = None
    #: After-points: ``success`` or ``error``.
    outcome: str | None = None
    #: After-points with outcome ``error``: the error text.
    details: str | None = None


class _Failure(Exception):
    """One hook failed; ``str()`` is the reason."""


def _host(hook: HookSettings, call: HookCall) -> str:
    """The host a hook is about: the destination for ``on: destination`` at migrate points."""
    if hook.on == "destination" and call.point in MIGRATE_HOOK_POINTS:
        if call.destination is None:
            raise _Failure("on: destination, but the task has no destination")
        return call.destination
    return call.source


def _text(value: str) -> str:
    """Environment values cannot hold NUL."""
    return value.replace("\0", "\\0")


def hook_environment(hook: HookSettings, call: HookCall) -> dict[str, str]:
    """The ``ASYNCMIGFRA_*`` variables a command hook gets (on top of the agent's own)."""
    env = {
        "ASYNCMIGFRA_HOOK": hook.name,
        "ASYNCMIGFRA_POINT": call.point,
        "ASYNCMIGFRA_TASK": call.task,
        "ASYNCMIGFRA_TASK_ID": call.task_id or "",
        "ASYNCMIGFRA_VM_NAME": call.vm_name,
        "ASYNCMIGFRA_SOURCE": call.source,
        "ASYNCMIGFRA_HOST": _host(hook, call),
    }
    if call.destination is not None:
        env["ASYNCMIGFRA_DESTINATION"] = call.destination
    if call.outcome is not None:
        env["ASYNCMIGFRA_OUTCOME"] = call.outcome
    if call.details is not None:
        env["ASYNCMIGFRA_DETAILS"] = call.details
    return {key: _text(value) for key, value in env.items()}


def hook_request(hook: HookSettings, call: HookCall, request_id: str) -> dict[str, str]:
    """The map an MQTT hook publishes (JSON); keys without a value are left out."""
    fields: dict[str, str | None] = {
        "request-id": request_id,
        "hook": hook.name,
        "point": call.point,
        "task": call.task,
        "id": call.task_id,
        "vm-name": call.vm_name,
        "source": call.source,
        "destination": call.destination,
        "host": _host(hook, call),
        "outcome": call.outcome,
        "details": call.details,
    }
    return {key: value for key, value in fields.items() if value is not None}


def _clip(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


# --- commands ----------------------------------------------------------------------------------


class _Capture(asyncio.SubprocessProtocol):
    """Keeps the tail of stdout and stderr; tells when the process exited and the pipes closed."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.tails: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        self.exited: asyncio.Future[None] = loop.create_future()
        self.drained: asyncio.Future[None] = loop.create_future()
        self._open = {1, 2}

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        tail = self.tails.get(fd)
        if tail is None:
            return
        tail += data
        if len(tail) > OUTPUT_TAIL_BYTES:
            del tail[:-OUTPUT_TAIL_BYTES]

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._open.discard(fd)
        if not self._open and not self.drained.done():
            self.drained.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def last_line(self) -> str:
        """The last non-empty line of stderr, else of stdout."""
        for fd in (2, 1):
            lines = self.tails[fd].decode(errors="replace").splitlines()
            for line in reversed(lines):
                if line.strip():
                    return _clip(line)
        return ""


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the whole group is gone already
    except PermissionError:  # pragma: no cover - a member changed its user (setuid)
        log.warning("hook.kill_refused", pgid=pgid, signal=sig.name)


async def _stop_group(transport: asyncio.SubprocessTransport, capture: _Capture) -> None:
    """SIGTERM to the command's process group, SIGKILL after :data:`KILL_GRACE` s, reap.

    The SIGKILL is sent even if this is cancelled while waiting (it is synchronous); the
    event loop's child watcher reaps the process in any case.
    """
    pgid = transport.get_pid()
    try:
        if not capture.exited.done():
            _signal_group(pgid, signal.SIGTERM)
            try:
                async with asyncio.timeout(KILL_GRACE):
                    await asyncio.shield(capture.exited)
            except TimeoutError:
                pass
    finally:
        # Also hits children that survived the SIGTERM (or ignore it) after the leader exited.
        _signal_group(pgid, signal.SIGKILL)
    await asyncio.shield(capture.exited)


async def _run_command(hook: HookSettings, call: HookCall) -> None:
    command = hook.command
    assert command is not None
    argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
    env = {key: value for key, value in os.environ.items() if key not in _ENV_NAMES}
    env.update(hook_environment(hook, call))
    loop = asyncio.get_running_loop()
    capture = _Capture(loop)
    try:
        transport, _ = await loop.subprocess_exec(
            lambda: capture,
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        raise _Failure(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    except ValueError as exc:  # pragma: no cover - e.g. a NUL the settings loader let through
        raise _Failure(f"cannot run {argv[0]}: {exc}") from None
    try:
        try:
            async with asyncio.timeout(hook.timeout):
                await asyncio.shield(capture.exited)
        except TimeoutError:
            await _stop_group(transport, capture)
            raise _Failure(f"no answer within {hook.timeout:g} s") from None
        except BaseException:
            # Cancelled: the command must not outlive the task.
            await _stop_group(transport, capture)
            raise
        try:
            async with asyncio.timeout(DRAIN_GRACE):
                await asyncio.shield(capture.drained)
        except TimeoutError:
            log.info("hook.output_left_open", hook=hook.name, pid=transport.get_pid())
    finally:
        transport.close()
    status = transport.get_returncode()
    if status == 0:
        return
    if status is not None and status < 0:
        try:
            what = f"killed by {signal.Signals(-status).name}"
        except ValueError:
            what = f"killed by signal {-status}"
    else:
        what = f"exit status {status}"
    line = capture.last_line()
    raise _Failure(f"{what}: {line}" if line else what)


# --- MQTT --------------------------------------------------------------------------------------


def _fill(topic: str, values: Mapping[str, str]) -> str:
    for placeholder, value in values.items():
        if placeholder in topic:
            if any(char in value for char in "+#\0"):
                raise _Failure(f"{value!r} cannot be put into a topic ({placeholder})")
            topic = topic.replace(placeholder, value)
    return topic


def _answer(payload: bytes, request_id: str) -> tuple[str, str] | None:
    """``(status, details)`` of an answer to ``request_id``; ``None``: an answer to another
    request. Raises ``_Failure`` for an answer nobody can read."""
    if len(payload) > MAX_RESPONSE_BYTES:
        raise _Failure(f"bad response: {len(payload)} bytes (at most {MAX_RESPONSE_BYTES})")
    try:
        document: object = json.loads(payload)
    except (ValueError, RecursionError):
        # JSON is the simplest answer; YAML (a superset) is accepted too.
        document = load_yaml(payload)
    if not isinstance(document, dict):
        raise _Failure(f"bad response: not a map: {_clip(repr(payload[:200]))}")
    if "request-id" not in document:
        raise _Failure("bad response: no request-id")
    if document["request-id"] != request_id:
        return None
    status = document.get("status")
    if status not in {"success", "error"}:
        shown = (
            _clip(repr(status))
            if isinstance(status, str | int | float | bool | None)
            else "a collection"
        )
        raise _Failure(f"bad response: status must be success or error, got {shown}")
    details = document.get("details")
    if details is None:
        text = ""
    elif isinstance(details, str | int | float | bool):
        text = _clip(str(details))
    else:
        raise _Failure("bad response: details must be text")
    return str(status), text


async def _run_mqtt(hook: HookSettings, call: HookCall, bus: MessageBus | None) -> None:
    settings = hook.mqtt
    assert settings is not None
    if bus is None:
        raise _Failure("needs the agent's MQTT connection")
    values = {"<host>": _host(hook, call), "<vm_name>": call.vm_name, "<hook>": hook.name}
    request_topic = _fill(settings.request_topic, values)
    response_topic = _fill(settings.response_topic, values)
    request_id = uuid.uuid4().hex
    payload = json.dumps(hook_request(hook, call, request_id)).encode()
    try:
        async with asyncio.timeout(hook.timeout):
            async with bus.subscription(response_topic, settings.qos) as queue:
                await bus.send(request_topic, payload, settings.qos)
                status, details = await _wait_answer(queue, request_id)
    except TimeoutError:
        raise _Failure(f"no answer within {hook.timeout:g} s") from None
    except _Failure:
        raise
    except Exception as exc:
        # A broker problem (TransportError, ...) is this hook's failure.
        raise _Failure(f"MQTT: {exc}") from exc
    if status != "success":
        raise _Failure(f"answered error: {details}" if details else "answered error")


async def _wait_answer(queue: asyncio.Queue[tuple[str, bytes]], request_id: str) -> tuple[str, str]:
    """The first answer to ``request_id`` on ``queue``; answers to other requests are skipped."""
    while True:
        _, raw = await queue.get()
        answer = _answer(raw, request_id)
        if answer is not None:
            return answer


# --- the runner --------------------------------------------------------------------------------


class HookRunner:
    """Runs the configured hooks of one agent (one instance serves every task)."""

    def __init__(self, hooks: Sequence[HookSettings], *, bus: MessageBus | None) -> None:
        self._hooks = tuple(hooks)
        self._bus = bus

    def _check_point(self, point: str) -> None:
        if point not in HOOK_POINTS:
            raise ValueError(f"unknown hook point {point!r} (known: {', '.join(HOOK_POINTS)})")

    def wants(self, point: str) -> bool:
        """Whether any hook (not counting built-ins) runs at ``point``."""
        self._check_point(point)
        return any(hook.builtin is None and point in hook.when for hook in self._hooks)

    def builtin(self, name: str) -> HookSettings | None:
        """The configured built-in hook ``name`` (``reduce-memory``), if any."""
        return next((hook for hook in self._hooks if hook.builtin == name), None)

    async def run(self, call: HookCall, ctx: HookContext) -> list[str]:
        """Run the hooks of ``call.point`` in order; return the failures of ``warn`` hooks.

        Raises:
            HookFailed: a hook with policy ``fail`` failed (the later ones did not run).
        """
        self._check_point(call.point)
        warnings: list[str] = []
        for hook in self._hooks:
            if hook.builtin is not None or call.point not in hook.when:
                continue
            ctx.phase(f"hook:{hook.name}")
            started = time.monotonic()
            try:
                with ctx.measure(f"hook-{hook.name}"):
                    if hook.command is not None:
                        await _run_command(hook, call)
                    else:
                        await _run_mqtt(hook, call, self._bus)
            except _Failure as exc:
                text = f"hook {hook.name} ({call.point}) failed: {exc}"
                log.warning(
                    "hook.failed",
                    hook=hook.name,
                    point=call.point,
                    vm=call.vm_name,
                    policy=hook.policy,
                    error=text,
                )
                if hook.policy == "fail":
                    raise HookFailed(text) from None
                warnings.append(text)
                continue
            log.info(
                "hook.done",
                hook=hook.name,
                point=call.point,
                vm=call.vm_name,
                seconds=round(time.monotonic() - started, 3),
            )
        return warnings
