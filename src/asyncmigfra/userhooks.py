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
from typing import Any

import structlog

from asyncmigfra.errors import HookFailed
from asyncmigfra.hooks import HookContext, MessageBus, json_map, peer_topic, sibling_topic
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
#: s a cancelled task waits for its command's start to finish, so it can stop what started.
SPAWN_LIMIT = 5.0
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


async def _stop_spawned(
    spawn: asyncio.Future[tuple[asyncio.SubprocessTransport, Any]], capture: _Capture
) -> None:
    """Cancelled while the command was being started: let the start finish, then stop the
    whole group. asyncio's own clean-up of a cancelled start (Python 3.11) kills only the
    leader and then waits until every process holding the output pipes has exited, which a
    background child of the hook can make last as long as that child runs."""
    done, _ = await asyncio.wait({spawn}, timeout=SPAWN_LIMIT)
    if not done:
        # Hangs starting: hand it to asyncio's own clean-up rather than leave it unowned.
        log.warning("hook.start_abandoned", limit=SPAWN_LIMIT)
        spawn.cancel()
        return
    if spawn.cancelled() or spawn.exception() is not None:
        return  # it never started: nothing of it runs that we could stop
    transport, _ = spawn.result()
    try:
        await _stop_group(transport, capture)
    finally:
        transport.close()


async def _run_command(hook: HookSettings, call: HookCall) -> None:
    command = hook.command
    assert command is not None
    argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
    env = {key: value for key, value in os.environ.items() if key not in _ENV_NAMES}
    env.update(hook_environment(hook, call))
    loop = asyncio.get_running_loop()
    capture = _Capture(loop)
    spawn = asyncio.ensure_future(
        loop.subprocess_exec(
            lambda: capture,
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
    )
    try:
        transport, _ = await asyncio.shield(spawn)
    except asyncio.CancelledError:
        await _stop_spawned(spawn, capture)
        raise
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
    request_id = uuid.uuid4().hex
    await _exchange(
        bus,
        _fill(settings.request_topic, values),
        _fill(settings.response_topic, values),
        settings.qos,
        hook_request(hook, call, request_id),
        limit=hook.timeout,
    )


async def _exchange(
    bus: MessageBus,
    request_topic: str,
    response_topic: str,
    qos: int,
    request: Mapping[str, str],
    *,
    limit: float,
) -> None:
    """Publish ``request`` and wait (``limit`` s) for the answer with its ``request-id``."""
    payload = json.dumps(request).encode()
    try:
        async with asyncio.timeout(limit):
            async with bus.subscription(response_topic, qos) as queue:
                await bus.send(request_topic, payload, qos)
                status, details = await _wait_answer(queue, request["request-id"])
    except TimeoutError:
        raise _Failure(f"no answer within {limit:g} s") from None
    except _Failure:
        raise
    except Exception as exc:
        # A broker problem (TransportError, ...) is this hook's failure.
        raise _Failure(f"MQTT: {exc}") from exc
    if status != "success":
        raise _Failure(f"answered error: {details}" if details else "answered error")


# --- command hooks on the destination's agent --------------------------------------------------
#
# A command hook with ``on: destination`` runs on the destination host, by its own agent: the
# source's agent asks it over MQTT on its hook topic (the task topic's sibling ``hook``), and the
# destination's agent runs the hook *of that name from its own configuration* and answers on the
# source's ``hook/response`` topic. No command travels over the wire.

#: s added to a hook's timeout for the round trip to the destination's agent.
PEER_MARGIN = 2.0
#: Hook requests of other agents run at once at most this many at a time.
PEER_CONCURRENCY = 8
_REQUEST_ID_MAX = 64


def hook_topic_of(task_topic: str) -> str:
    """``fast/migfra/<host>/task`` -> ``fast/migfra/<host>/hook``."""
    return sibling_topic(task_topic, "hook")


def _on_peer(hook: HookSettings, call: HookCall) -> bool:
    return (
        hook.command is not None
        and hook.on == "destination"
        and call.point in MIGRATE_HOOK_POINTS
        and call.destination is not None
        and call.destination != call.source
    )


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

    def __init__(
        self,
        hooks: Sequence[HookSettings],
        *,
        bus: MessageBus | None,
        hostname: str | None = None,
        task_topic: str | None = None,
    ) -> None:
        self._hooks = tuple(hooks)
        self._bus = bus
        self._hostname = hostname
        #: Where this agent answers other agents' hook requests (``None``: it does not).
        self._topic = hook_topic_of(task_topic) if task_topic is not None else None
        self._serving: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(PEER_CONCURRENCY)

    @property
    def serves_peers(self) -> bool:
        """Whether other agents may ask this one to run a hook (an ``on: destination``
        command hook is configured)."""
        return self._topic is not None and any(
            h.command is not None and h.on == "destination" for h in self._hooks
        )

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
                    if _on_peer(hook, call):
                        await self._run_on_peer(hook, call)
                    elif hook.command is not None:
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

    # ---- on: destination command hooks -------------------------------------------------------

    async def _run_on_peer(self, hook: HookSettings, call: HookCall) -> None:
        """Ask the destination's agent to run its hook of this name."""
        assert call.destination is not None
        if self._bus is None or self._topic is None or self._hostname is None:
            raise _Failure("on: destination needs the agent's MQTT connection")
        peer = peer_topic(self._topic, self._hostname, call.destination)
        if peer is None:
            raise _Failure(
                f"cannot tell {call.destination}'s hook topic: {self._hostname!r} is not one "
                f"level of this agent's {self._topic!r}"
            )
        request_id = uuid.uuid4().hex
        await _exchange(
            self._bus,
            peer,
            f"{self._topic}/response",
            1,
            hook_request(hook, call, request_id),
            limit=hook.timeout + PEER_MARGIN,
        )

    async def serve(self) -> None:
        """Answer other agents' requests for ``on: destination`` command hooks until
        cancelled. Each runs the hook of that name from *this* agent's configuration."""
        if not self.serves_peers:
            return
        assert self._bus is not None
        assert self._topic is not None
        try:
            while True:
                try:
                    async with self._bus.subscription(self._topic, 1) as queue:
                        log.info("hook.serving", topic=self._topic)
                        while True:
                            _, raw = await queue.get()
                            await self._slots.acquire()  # a flood waits, it does not pile up
                            task = asyncio.create_task(self._serve_one(raw))
                            self._serving.add(task)
                            task.add_done_callback(self._served)
                except Exception as exc:  # noqa: BLE001 - never take the agent down; retry
                    log.error("hook.serving_failed", error=str(exc))  # noqa: TRY400
                    await asyncio.sleep(1.0)
        finally:
            for task in list(self._serving):
                task.cancel()
            if self._serving:
                await asyncio.gather(*self._serving, return_exceptions=True)

    def _served(self, task: asyncio.Task[None]) -> None:
        self._serving.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("hook.serve_failed", error=str(task.exception()))

    async def _serve_one(self, raw: bytes) -> None:
        request = _peer_request(raw)
        if request is None:
            log.warning("hook.request_ignored", reason="unreadable", size=len(raw))
            return
        assert self._topic is not None
        assert self._hostname is not None
        assert self._bus is not None
        reply_to = peer_topic(self._topic, self._hostname, request["source"])
        if reply_to is None:
            log.warning("hook.request_ignored", reason="bad source", source=request["source"])
            return
        status, details = "success", ""
        try:
            hook, call = self._peer_call(request)
            log.info("hook.peer_request", hook=hook.name, source=call.source, vm=call.vm_name)
            await _run_command(hook, call)
        except _Failure as exc:
            status, details = "error", str(exc)
        answer = {"request-id": request["request-id"], "status": status}
        if details:
            answer["details"] = f"on {self._hostname}: {details}"
        await self._bus.send(f"{reply_to}/response", json.dumps(answer).encode(), 1)

    def _peer_call(self, request: Mapping[str, str]) -> tuple[HookSettings, HookCall]:
        name, point = request["hook"], request["point"]
        if request.get("destination") != self._hostname:
            raise _Failure(f"this is {self._hostname}, not {request.get('destination')}")
        for hook in self._hooks:
            if (
                hook.name == name
                and hook.command is not None
                and hook.on == "destination"
                and point in hook.when
            ):
                break
        else:
            raise _Failure(f"no command hook {name!r} with on: destination for {point}")
        call = HookCall(
            point=point,
            task=request.get("task", "migrate vm"),
            task_id=request.get("id"),
            vm_name=request["vm-name"],
            source=request["source"],
            destination=self._hostname,
            outcome=request.get("outcome"),
            details=request.get("details"),
        )
        return hook, call


def _peer_request(raw: bytes) -> dict[str, str] | None:
    """Another agent's hook request, checked: a flat map of short strings with the keys this
    needs, a known migrate point and a plain request id; ``None`` otherwise."""
    document = json_map(raw, MAX_RESPONSE_BYTES)
    if document is None or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in document.items()
    ):
        return None
    required = ("request-id", "hook", "point", "vm-name", "source")
    if any(not document.get(key) for key in required):
        return None
    rid = document["request-id"]
    if len(rid) > _REQUEST_ID_MAX or not rid.isalnum():
        return None
    if document["point"] not in MIGRATE_HOOK_POINTS:
        return None
    return document
