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

The command's environment is the agent's without its secrets (:func:`hook_base_environment`):
no variable named in :data:`SECRET_VARIABLES`, none holding the MQTT password (so neither
``communicator.password-env``'s variable nor a copy of it), none of the ``ASYNCMIGFRA_*``
names the runner sets itself.

**MQTT hooks** publish a JSON request with a fresh ``request-id`` and wait for the answer
with that id on the response topic (``status: success`` or ``status: error``), through the
same :class:`asyncmigfra.peers.MessageBus` as the pscom hook (:func:`asyncmigfra.peers.request`).

**Command hooks on the destination** (``on: destination``) are run by the destination's agent:
the request goes to ``<prefix>/<dest>/hook/<source>`` and the answer comes back on
``<prefix>/<source>/hook-response/<dest>`` (:class:`asyncmigfra.peers.PeerTopics`: the sender
is the last level, which the broker's ACL pins to its user name). The serving agent takes the
source from the topic, checks every field (:func:`parse_peer_request`) and runs only a hook
of its own configuration (:func:`asyncmigfra.peers.serve`).

Built-in hooks (``builtin: reduce-memory``) are only looked up here (:meth:`HookRunner.builtin`);
the migration engine implements them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog

from asyncmigfra import peers
from asyncmigfra.errors import HookFailed
from asyncmigfra.hooks import HookContext
from asyncmigfra.parsing import load_yaml
from asyncmigfra.peers import (
    JunkLog,
    MessageBus,
    PeerRefusal,
    PeerTopics,
    clean_text,
    flat_map,
    safe_text,
    shown,
    sibling_topic,
    valid_peer_vm_name,
    valid_task_id,
)
from asyncmigfra.settings import HOOK_POINTS, MIGRATE_HOOK_POINTS, HookSettings, Settings

__all__ = [
    "HOOK_POINTS",
    "SECRET_VARIABLES",
    "HookCall",
    "HookRunner",
    "PeerHookRequest",
    "hook_base_environment",
    "hook_environment",
    "hook_request",
    "hook_topics",
    "parse_peer_request",
]

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

#: Variables never passed on to a command: the MQTT password of the agent and of its tools
#: (``asyncmigfra`` console commands read ``ASYNCMIGFRA_MQTT_PASSWORD``).
SECRET_VARIABLES: Final = ("ASYNCMIGFRA_MQTT_PASSWORD",)

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


@dataclass(frozen=True, slots=True)
class _Hidden:
    """What a command must not see: variables by name, and any variable with a secret value."""

    names: frozenset[str] = frozenset(SECRET_VARIABLES)
    values: frozenset[str] = frozenset()


def hook_base_environment(
    environ: Mapping[str, str],
    *,
    secret_names: Iterable[str] = (),
    secret_values: Iterable[str] = (),
) -> dict[str, str]:
    """The agent's environment as a command gets it, before the ``ASYNCMIGFRA_*`` task data:
    without :data:`SECRET_VARIABLES`, ``secret_names``, any variable whose value is one of
    ``secret_values`` (the MQTT password, however it came: ``password-env`` names a variable
    that holds it) and the runner's own names."""
    names = {*SECRET_VARIABLES, *secret_names, *_ENV_NAMES}
    values = {value for value in secret_values if value}
    return {
        key: value for key, value in environ.items() if key not in names and value not in values
    }


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


async def _run_command(hook: HookSettings, call: HookCall, hidden: _Hidden = _Hidden()) -> None:
    command = hook.command
    assert command is not None
    argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
    env = hook_base_environment(os.environ, secret_names=hidden.names, secret_values=hidden.values)
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
        text = _clip(safe_text(str(details), 4 * MAX_REASON_CHARS))
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
    exact: bool = False,
) -> None:
    """Publish ``request`` and wait (``limit`` s) for the answer with its ``request-id``
    (``exact``: only on ``response_topic`` itself, the asked agent's answer topic)."""

    def read(topic: str, raw: bytes, request_id: str) -> tuple[str, str] | None:
        if exact and topic != response_topic:
            _ANSWER_JUNK(
                "hook.answer_ignored", reason="not from the agent asked", topic=shown(topic)
            )
            return None
        return _answer(raw, request_id)

    try:
        status, details = await peers.request(
            bus, request, to=request_topic, answers=response_topic, qos=qos, limit=limit, read=read
        )
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
# source's agent asks it over MQTT on ``<prefix>/<dest>/hook/<source>`` (the sibling ``hook`` of
# the task topic, the sender as the last level), and the destination's agent runs the hook *of
# that name from its own configuration* and answers on ``<prefix>/<source>/hook-response/<dest>``.
# No command travels over the wire; the broker's ACL pins the last level to the sender's user.

#: s added to a hook's timeout for the round trip to the destination's agent.
PEER_MARGIN = 2.0
#: Hook requests of other agents run at once at most this many at a time ...
PEER_CONCURRENCY = 8
#: ... and at most this many of one agent (a source's migrations to one destination at once
#: are bounded by its ``migration.max-outgoing``, 2 by default, each with its own hooks).
PEER_CONCURRENCY_PER_SOURCE = 4
#: Bytes of a hook request of another agent; a longer one is junk.
MAX_PEER_REQUEST_BYTES = 16 * 1024
#: Keys of such a request.
MAX_PEER_KEYS = 32
#: Characters of its ``details`` (the migration's error at ``after-migrate``).
MAX_PEER_DETAILS = 2000
#: Characters of any other value.
MAX_PEER_VALUE = 256
#: A hook's name (the settings' rule).
_HOOK_NAME: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


def hook_topic_of(task_topic: str) -> str:
    """``fast/migfra/<host>/task`` -> ``fast/migfra/<host>/hook`` (the prefix of this agent's
    hook requests, ``.../hook/<source>``)."""
    return sibling_topic(task_topic, "hook")


def hook_topics(task_topic: str, hostname: str) -> PeerTopics | None:
    """This agent's hook topics (``None``: ``hostname`` is not one level of the task topic)."""
    return PeerTopics.of(task_topic, hostname, "hook")


def _on_peer(hook: HookSettings, call: HookCall) -> bool:
    return (
        hook.command is not None
        and hook.on == "destination"
        and call.point in MIGRATE_HOOK_POINTS
        and call.destination is not None
        and call.destination != call.source
    )


_ANSWER_JUNK = JunkLog()


@dataclass(frozen=True, slots=True)
class PeerHookRequest:
    """Another agent's request to run one of this agent's ``on: destination`` command hooks,
    checked (:func:`parse_peer_request`); the source is the topic's sender."""

    request_id: str
    hook: str
    point: str
    task_id: str | None
    vm_name: str
    outcome: str | None = None
    details: str | None = None


def parse_peer_request(
    raw: bytes, sender: str, hostname: str, *, peers: Collection[str] | None = None
) -> PeerHookRequest:
    """A hook request of agent ``sender`` (the topic's last level) to this agent
    (``hostname``), checked like a task's fields: a flat JSON object of at most
    :data:`MAX_PEER_REQUEST_BYTES` bytes whose values are strings; ``request-id`` 1-64
    letters and digits; ``hook`` a hook name; ``point`` a migrate point; ``task`` (if given)
    ``migrate vm``; ``id`` (if given) a task id; ``vm-name`` a VM name as in tasks (no
    control or bidirectional characters, no ``/``, at most 200 characters); ``source`` (if
    given) the sender; ``destination`` (and ``host``, if given) this agent; ``outcome`` only
    at ``after-migrate``, ``success`` or ``error``; ``details`` text without control
    characters of at most :data:`MAX_PEER_DETAILS` characters. ``peers``: the only senders
    served (``None``: any).

    Raises:
        PeerRefusal: the request is not run (answerable when its ``request-id`` is readable).
    """
    document = flat_map(raw, MAX_PEER_REQUEST_BYTES, max_keys=MAX_PEER_KEYS)
    rid = str(document["request-id"])
    if peers is not None and sender not in peers:
        raise PeerRefusal(rid, f"{sender} is not a peer of this agent")
    for key, value in document.items():
        limit = MAX_PEER_DETAILS if key == "details" else MAX_PEER_VALUE
        if not (isinstance(value, str) and len(value) <= limit):
            raise PeerRefusal(
                rid, f"values must be text of at most {limit} characters, {shown(key)} is not"
            )

    def text(key: str) -> str | None:
        value = document.get(key)
        assert value is None or isinstance(value, str)
        return value

    name, point, vm = text("hook"), text("point"), text("vm-name")
    if name is None or _HOOK_NAME.fullmatch(name) is None:
        raise PeerRefusal(rid, f"hook must be a hook name, got {shown(name)}")
    if point not in MIGRATE_HOOK_POINTS:
        raise PeerRefusal(rid, f"point must be one of {', '.join(MIGRATE_HOOK_POINTS)}")
    if text("task") not in (None, "migrate vm"):
        raise PeerRefusal(rid, f"task must be 'migrate vm', got {shown(text('task'))}")
    task_id = text("id")
    if task_id is not None and not valid_task_id(task_id):
        raise PeerRefusal(rid, f"id is not a valid task id: {shown(task_id)}")
    if not valid_peer_vm_name(vm):
        raise PeerRefusal(rid, f"vm-name is not a valid VM name: {shown(vm)}")
    if text("source") not in (None, sender):
        # The topic is the proof (the broker pins it to the sender's user name).
        raise PeerRefusal(rid, f"source {shown(text('source'))} is not the sender {sender}")
    if text("destination") != hostname or text("host") not in (None, hostname):
        raise PeerRefusal(rid, f"this is {hostname}, not {shown(text('destination'))}")
    outcome = text("outcome")
    if outcome is not None and (point != "after-migrate" or outcome not in ("success", "error")):
        raise PeerRefusal(
            rid, f"outcome must be success or error after-migrate, got {shown(outcome)}"
        )
    details = text("details")
    if details is not None and not clean_text(details, MAX_PEER_DETAILS):
        raise PeerRefusal(rid, "details must be text without control characters")
    assert name is not None
    assert vm is not None
    return PeerHookRequest(
        request_id=rid,
        hook=name,
        point=point,
        task_id=task_id,
        vm_name=vm,
        outcome=outcome,
        details=details,
    )


def _peer_request_of(hook: HookSettings, call: HookCall, request_id: str) -> dict[str, str]:
    """What this agent sends to the destination's agent: :func:`hook_request`, with the
    details escaped and clipped so that the request passes :func:`parse_peer_request`."""
    request = hook_request(hook, call, request_id)
    if "details" in request:
        request["details"] = safe_text(request["details"], MAX_PEER_DETAILS)
    return request


# --- the runner --------------------------------------------------------------------------------


class HookRunner:
    """Runs the configured hooks of one agent (one instance serves every task).

    ``secret_names`` and ``secret_values`` are kept from every command's environment on top
    of :data:`SECRET_VARIABLES` (:func:`hook_base_environment`; :meth:`from_settings` passes
    the MQTT password). ``peers``: the only agents whose hook requests are served (``None``:
    every agent the broker lets publish on this agent's hook topic).
    """

    def __init__(
        self,
        hooks: Sequence[HookSettings],
        *,
        bus: MessageBus | None,
        hostname: str | None = None,
        task_topic: str | None = None,
        secret_names: Iterable[str] = (),
        secret_values: Iterable[str] = (),
        peers: Collection[str] | None = None,
    ) -> None:
        self._hooks = tuple(hooks)
        self._bus = bus
        self._hostname = hostname
        #: This agent's hook topics (``None``: it neither asks nor serves other agents).
        self._topics = (
            hook_topics(task_topic, hostname)
            if task_topic is not None and hostname is not None
            else None
        )
        self._task_topic = task_topic
        self._hidden = _Hidden(
            names=frozenset({*SECRET_VARIABLES, *secret_names}),
            values=frozenset(value for value in secret_values if value),
        )
        self._peers = frozenset(peers) if peers is not None else None
        #: sender -> its requests running now; (sender, request id) of those.
        self._per_source: dict[str, int] = {}
        self._running: set[tuple[str, str]] = set()
        self._junk = JunkLog()

    @classmethod
    def from_settings(cls, settings: Settings, *, bus: MessageBus | None) -> HookRunner:
        """The runner of an agent with ``settings``: its hooks, its name and topics, and its
        MQTT password kept from every command (also when ``password-env`` names it)."""
        password = settings.mqtt.password
        return cls(
            settings.hooks,
            bus=bus,
            hostname=settings.hostname,
            task_topic=settings.mqtt.task_topic,
            secret_values=(password,) if password else (),
        )

    @property
    def serves_peers(self) -> bool:
        """Whether other agents may ask this one to run a hook (an ``on: destination``
        command hook is configured)."""
        return self._task_topic is not None and any(
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
                        await _run_command(hook, call, self._hidden)
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
        if self._bus is None or self._task_topic is None or self._hostname is None:
            raise _Failure("on: destination needs the agent's MQTT connection")
        topics = self._topics
        peer = topics.request_to(call.destination) if topics is not None else None
        answers = topics.answers_from(call.destination) if topics is not None else None
        if peer is None or answers is None:
            raise _Failure(
                f"cannot tell {shown(call.destination)}'s hook topic: {self._hostname!r} is not "
                f"one level of this agent's {hook_topic_of(self._task_topic)!r}, or that is no "
                "agent name"
            )
        request_id = uuid.uuid4().hex
        await _exchange(
            self._bus,
            peer,
            answers,
            1,
            _peer_request_of(hook, call, request_id),
            limit=hook.timeout + PEER_MARGIN,
            exact=True,
        )

    async def serve(self) -> None:
        """Answer other agents' requests for ``on: destination`` command hooks until
        cancelled. Each runs the hook of that name from *this* agent's configuration."""
        if not self.serves_peers:
            return
        assert self._bus is not None
        if self._topics is None:
            log.error(
                "hook.not_serving",
                hostname=self._hostname,
                reason="the host name is not exactly one level of the task topic",
            )
            return
        await peers.serve(
            self._bus,
            self._topics,
            self._serve_one,
            qos=1,
            event="hook",
            junk=self._junk,
            slots=PEER_CONCURRENCY,
        )

    async def _serve_one(self, sender: str, raw: bytes) -> dict[str, str] | None:
        """The answer to ``sender``'s request ``raw``, once its hook ran (``None``: none)."""
        assert self._hostname is not None
        status, details = "success", ""
        try:
            request = parse_peer_request(raw, sender, self._hostname, peers=self._peers)
        except PeerRefusal as refusal:
            self._junk("hook.request_refused", reason=refusal.reason, sender=sender)
            if refusal.request_id is None:
                return None
            rid, status, details = refusal.request_id, "error", refusal.reason
        else:
            rid = request.request_id
            key = (sender, rid)
            if key in self._running:
                return None  # a QoS 1 duplicate of a request that runs: its answer comes
            if self._per_source.get(sender, 0) >= PEER_CONCURRENCY_PER_SOURCE:
                status = "error"
                details = f"{PEER_CONCURRENCY_PER_SOURCE} hooks of {sender} run here already"
            else:
                self._running.add(key)
                self._per_source[sender] = self._per_source.get(sender, 0) + 1
                try:
                    await self._run_for_peer(sender, request)
                except _Failure as exc:
                    status, details = "error", str(exc)
                finally:
                    self._running.discard(key)
                    self._per_source[sender] -= 1
                    if not self._per_source[sender]:
                        del self._per_source[sender]
        answer = {"request-id": rid, "status": status}
        if details:
            answer["details"] = f"on {self._hostname}: {details}"
        return answer

    async def _run_for_peer(self, sender: str, request: PeerHookRequest) -> None:
        """Run this agent's own hook of the requested name for ``sender``."""
        for hook in self._hooks:
            if (
                hook.name == request.hook
                and hook.command is not None
                and hook.on == "destination"
                and request.point in hook.when
            ):
                break
        else:
            raise _Failure(
                f"no command hook {request.hook!r} with on: destination for {request.point}"
            )
        call = HookCall(
            point=request.point,
            task="migrate vm",
            task_id=request.task_id,
            vm_name=request.vm_name,
            source=sender,
            destination=self._hostname,
            outcome=request.outcome,
            details=request.details,
        )
        log.info("hook.peer_request", hook=hook.name, source=sender, vm=request.vm_name)
        await _run_command(hook, call, self._hidden)
