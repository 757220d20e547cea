"""Hooks answered over MQTT: MQTT hooks (a request with a fresh ``request-id``, the answer
with that id on the response topic) and command hooks ``on: destination`` (the request to the
destination's agent, checked there by :func:`parse_peer_request`)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final

from asyncmigfra.peers import exchange
from asyncmigfra.peers.bus import (
    JunkLog,
    MessageBus,
    PeerRefusal,
    PeerTopics,
    check_source,
    clean_text,
    read_request,
    safe_text,
    shown,
    sibling_topic,
    valid_peer_vm_name,
    valid_task_id,
)
from asyncmigfra.peers.userhooks.call import MAX_REASON_CHARS, HookCall, _clip, _Failure, _host
from asyncmigfra.settings import MIGRATE_HOOK_POINTS, HookSettings
from asyncmigfra.wire.parsing import load_yaml

#: Bytes of an MQTT answer that are parsed; a longer one is a bad response.
MAX_RESPONSE_BYTES = 64 * 1024


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
        status, details = await exchange.request(
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
    document, rid = read_request(
        raw, sender, limit=MAX_PEER_REQUEST_BYTES, max_keys=MAX_PEER_KEYS, peers=peers
    )
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
    check_source(document, sender, rid)
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
