"""Steps around a task that talk to the world outside the hypervisor: the pscom hook.

**pscom hook** (protocol §3.6): before a migration the MPI processes in the guest are told to
``suspend`` and after it to ``resume``, over MQTT, and the agent waits for one answer per
process. The differences from the original are on purpose (§9.4):

* one deadline per round (``pscom-handler.timeout``, default 10 s per process) instead of
  10 s per answer serially;
* a ``resume`` is sent on every path once a ``suspend`` went out: after a suspend that timed
  out part-way, after a failed migration and after a cancel (shielded and bounded);
* the response subscription lives only as long as one round and is always removed.

Only well-formed answers count (:func:`pscom_answer`): each process once per round, from its
own level of the response topic, with the answer that belongs to the round's word (what
ParaStation's pscom publishes, ``<pid> : ALLOWED`` after a ``suspend`` and
``<pid> : COMPLETED`` after a ``resume``, or the words ``suspended``/``resumed``). Anything
else on the response topic is ignored and logged once.

**Messages between agents** (destination hooks in :mod:`asyncmigfra.userhooks`, lane holds in
:mod:`asyncmigfra.peerlanes`) carry their sender as the *last level* of their topic
(:class:`PeerTopics`), which the broker's ACL pins to the sender's MQTT user name
(``config/mosquitto.acl.example``): MQTT itself does not tell a subscriber who published. The
helpers here check what such a message may hold (:func:`valid_agent_name`,
:func:`valid_peer_vm_name`, :func:`valid_peer_id`, ...) and log junk once (:class:`JunkLog`).

The engine reaches MQTT only through :class:`MessageBus`, implemented by the transport
(``MqttTransport.subscription``/``send``); aiomqtt stays in ``mqtt.py``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog

from asyncmigfra.errors import HookFailed, NotSupported
from asyncmigfra.parsing import valid_vm_name
from asyncmigfra.settings import PscomSettings

__all__ = [
    "HookContext",
    "JunkLog",
    "MessageBus",
    "PeerRefusal",
    "PeerTopics",
    "PscomHook",
    "clean_text",
    "count_processes",
    "flat_map",
    "json_map",
    "peer_topic",
    "pscom_answer",
    "safe_text",
    "shown",
    "sibling_topic",
    "topic_matches",
    "valid_agent_name",
    "valid_peer_id",
    "valid_peer_vm_name",
    "valid_task_id",
]

log = structlog.stdlib.get_logger(__name__)

#: s the default deadline never exceeds (set ``pscom-handler.timeout`` for longer waits).
PSCOM_MAX_DEFAULT_DEADLINE = 120.0
#: s the original waited for each answer; the default deadline is this times the count.
PSCOM_SECONDS_PER_PROCESS = 10.0

#: Resumes still running after their task was cancelled a second time (kept referenced).
_BACKGROUND: set[asyncio.Task[None]] = set()


def sibling_topic(task_topic: str, name: str) -> str:
    """``fast/migfra/<host>/task`` -> ``fast/migfra/<host>/<name>`` (an agent's own topic for
    requests from other agents: ``hook``, ``lane``)."""
    head, slash, _ = task_topic.rpartition("/")
    return f"{head}/{name}" if slash else f"{task_topic}/{name}"


def peer_topic(own_topic: str, hostname: str, peer: str) -> str | None:
    """Another agent's topic: ``own_topic`` with its host-name level replaced (``None`` when
    the host name is not exactly one level of it, or ``peer`` is no agent name, so a peer's
    name can never widen a topic or add a level)."""
    levels = own_topic.split("/")
    if levels.count(hostname) != 1 or not valid_agent_name(peer):
        return None
    return "/".join(peer if level == hostname else level for level in levels)


# --- what messages from other agents may hold -----------------------------------------------------

#: Characters no name, id or text from another agent may hold: C0 and C1 controls, DEL, line
#: and paragraph separators and the bidirectional controls (U+202A-U+202E, U+2066-U+2069 and
#: the marks), as for task fields (``parsing``).
_UNSAFE_CHARS: Final = "\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNSAFE: Final = re.compile(f"[{_UNSAFE_CHARS}]")
#: Agent names as a topic level: the rule of the agent's own ``hostname`` (settings), so
#: never ``+``, ``#``, ``/``, NUL or an empty level.
_AGENT_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")
#: Request and hold ids: plain ASCII letters and digits (this agent sends 32 hex digits).
_PEER_ID: Final = re.compile(r"[A-Za-z0-9]{1,64}")
#: Longest task ``id`` (the task parser's limit).
MAX_TASK_ID: Final = 256


def valid_agent_name(name: object) -> bool:
    """Whether ``name`` can be an agent's name, and so one level of a peer topic."""
    return isinstance(name, str) and _AGENT_NAME.fullmatch(name) is not None


def valid_peer_vm_name(name: object) -> bool:
    """A VM name from another agent: the task parser's rule (1-200 characters, no ``/``, no
    leading ``-`` or ``.``) and none of the control or bidirectional characters."""
    return isinstance(name, str) and valid_vm_name(name) and _UNSAFE.search(name) is None


def valid_peer_id(value: object) -> bool:
    """A request or hold id: 1-64 ASCII letters and digits."""
    return isinstance(value, str) and _PEER_ID.fullmatch(value) is not None


def valid_task_id(value: object) -> bool:
    """A task id carried along (``id``): at most 256 characters, no control characters."""
    return isinstance(value, str) and len(value) <= MAX_TASK_ID and _UNSAFE.search(value) is None


def safe_text(text: str, limit: int) -> str:
    """``text`` with control and bidirectional characters shown as ``\\uXXXX`` escapes,
    clipped to ``limit`` characters: what another agent said, fit to be put into a result,
    a log line or an environment variable."""
    text = _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def shown(value: object, limit: int = 80) -> str:
    """A value from the wire for a log line or a refusal: quoted, escaped, clipped."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clean_text(value: object, limit: int) -> bool:
    """Whether ``value`` is text of at most ``limit`` characters without control characters."""
    return isinstance(value, str) and len(value) <= limit and _UNSAFE.search(value) is None


class PeerRefusal(Exception):
    """A message from another agent that is not acted on. ``request_id`` is set when the
    message can be answered (with ``error`` and :attr:`reason`)."""

    def __init__(self, request_id: str | None, reason: str) -> None:
        super().__init__(reason)
        self.request_id = request_id
        self.reason = reason


def flat_map(raw: bytes, limit: int, *, max_keys: int) -> dict[str, object]:
    """``raw`` as a JSON object of at most ``limit`` bytes and ``max_keys`` keys whose values
    are scalars, or :class:`PeerRefusal` (answerable when its ``request-id`` is readable)."""
    document = json_map(raw, limit)
    if document is None:
        raise PeerRefusal(None, f"not a JSON object of at most {limit} bytes")
    request_id = document.get("request-id")
    rid = request_id if valid_peer_id(request_id) else None
    if rid is None:
        raise PeerRefusal(
            None, f"request-id must be 1-64 letters and digits, got {shown(request_id)}"
        )
    if len(document) > max_keys:
        raise PeerRefusal(rid, f"more than {max_keys} keys")
    for key, value in document.items():
        if isinstance(value, dict | list):
            raise PeerRefusal(rid, f"values must be scalars, {shown(key)} is not")
    return document


@dataclass(frozen=True, slots=True)
class PeerTopics:
    """The topics of one kind of message between agents (``hook``, ``lane``).

    Every message carries its **sender as the last level**, so the broker's ACL can pin that
    level to the sender's user name (``pattern write fast/migfra/+/<kind>/%u``):

    * a request of agent S to agent D: ``<prefix>/D/<kind>/S``; D subscribes to
      ``<prefix>/D/<kind>/+`` and takes S from the topic;
    * D's answer: ``<prefix>/S/<kind>-response/D``; S subscribes to exactly that topic, so it
      hears only the agent it asked.

    ``<prefix>/<host>`` is the agent's task topic without its last level, the host level
    replaced. The kind level tells requests from answers, and the sender is a single level
    that can hold no ``/``, so no agent name (not even ``response`` or ``hook-response``) can
    make one kind of topic look like another; a user name with a ``/`` could only ever reach
    a level deeper, where nobody listens.
    """

    hostname: str
    kind: str
    #: The levels of ``<prefix>/<host>``, and where the host level is.
    levels: tuple[str, ...]
    index: int

    @classmethod
    def of(cls, task_topic: str, hostname: str, kind: str) -> PeerTopics | None:
        """``None`` when ``hostname`` is no agent name or not exactly one level of the
        task topic's prefix (then this agent can neither ask nor serve)."""
        head = sibling_topic(task_topic, kind).split("/")[:-1]
        if not valid_agent_name(hostname) or head.count(hostname) != 1:
            return None
        return cls(hostname, kind, tuple(head), head.index(hostname))

    def _at(self, host: str, *tail: str) -> str:
        levels = list(self.levels)
        levels[self.index] = host
        return "/".join([*levels, *tail])

    def is_peer(self, peer: str) -> bool:
        """Whether ``peer`` can be another agent's name (not this one's)."""
        return valid_agent_name(peer) and peer != self.hostname

    @property
    def requests(self) -> str:
        """What this agent subscribes to for requests from others."""
        return self._at(self.hostname, self.kind, "+")

    def request_to(self, peer: str) -> str | None:
        """Where this agent sends a request to ``peer``."""
        return self._at(peer, self.kind, self.hostname) if self.is_peer(peer) else None

    def answers_from(self, peer: str) -> str | None:
        """Where ``peer`` answers this agent (what this agent subscribes to while it asks)."""
        return (
            self._at(self.hostname, f"{self.kind}-response", peer) if self.is_peer(peer) else None
        )

    def answer_to(self, peer: str) -> str | None:
        """Where this agent answers ``peer``'s request."""
        return (
            self._at(peer, f"{self.kind}-response", self.hostname) if self.is_peer(peer) else None
        )

    def sender(self, topic: str) -> str | None:
        """The sender of a request that arrived on ``topic``: its last level, when the topic
        is exactly a request to this agent from another agent; else ``None``."""
        prefix = self._at(self.hostname, self.kind, "")
        if not topic.startswith(prefix):
            return None
        sender = topic[len(prefix) :]
        return sender if self.is_peer(sender) else None


@dataclass
class JunkLog:
    """Logs junk from the wire once: the first message of each kind at warning level, then
    only a count, in the next line of that kind at least ``window`` s later. A kind is the
    event, the sender and the reason's first word (the field or the check, never a value
    from the wire, so varying junk is one kind). Keeps at most ``limit`` kinds."""

    window: float = 60.0
    limit: int = 256
    _seen: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)

    def __call__(self, event: str, *, reason: str, sender: str = "", **fields: object) -> None:
        key = (event, sender, reason.split(" ", 1)[0])
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.window:
            entry[1] += 1
            return
        if entry is None and len(self._seen) >= self.limit:
            self._seen.clear()
        suppressed = int(entry[1]) if entry is not None else 0
        self._seen[key] = [now, 0]
        extra: dict[str, object] = {"suppressed": suppressed} if suppressed else {}
        if sender:
            extra["sender"] = sender
        log.warning(event, reason=reason, **extra, **fields)


def json_map(raw: bytes, limit: int) -> dict[Any, Any] | None:
    """``raw`` as a JSON object, or ``None`` when it is longer than ``limit`` bytes, not JSON
    or not an object (another agent's request or answer, checked further by the caller)."""
    if len(raw) > limit:
        return None
    try:
        document: object = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


class MessageBus(Protocol):
    """What hooks need from the broker connection."""

    def subscription(
        self, topic: str, qos: int
    ) -> AbstractAsyncContextManager[asyncio.Queue[tuple[str, bytes]]]:
        """Subscribe for the duration of the block; the queue gets ``(topic, payload)``."""
        ...

    async def send(self, topic: str, payload: bytes, qos: int) -> None:
        """Publish one message."""
        ...


class HookContext(Protocol):
    def phase(self, name: str) -> None: ...

    def measure(self, tag: str) -> AbstractContextManager[None]: ...


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` matches the subscription filter ``pattern`` (MQTT's rules)."""
    return _wildcard_levels(pattern, topic) is not None


def _wildcard_levels(pattern: str, topic: str) -> list[str] | None:
    """The levels of ``topic`` that ``pattern``'s wildcards matched, or ``None`` when it does
    not match (``#`` gives the rest of the topic as one item)."""
    wanted, levels = pattern.split("/"), topic.split("/")
    matched: list[str] = []
    for i, level in enumerate(wanted):
        if level == "#":
            matched.append("/".join(levels[i:]))
            return matched
        if i >= len(levels) or (level != "+" and level != levels[i]):
            return None
        if level == "+":
            matched.append(levels[i])
    return matched if len(wanted) == len(levels) else None


#: What the MPI processes answer to each word: ParaStation's pscom publishes
#: ``<pid> : ALLOWED`` once its non-migratable connections are down, and ``<pid> : COMPLETED``
#: once it resumed; the plain words are what simpler responders (and the tests) send.
PSCOM_ANSWERS: Final[Mapping[str, frozenset[str]]] = {
    "suspend": frozenset({"allowed", "suspended"}),
    "resume": frozenset({"completed", "resumed"}),
}
#: Bytes of a pscom answer that are looked at (pscom sends about 20).
MAX_PSCOM_ANSWER_BYTES: Final = 256
_PSCOM_ANSWER: Final = re.compile(r"(?:(?P<pid>[0-9]{1,10})\s*:\s*)?(?P<word>[A-Za-z]{1,32})")


def pscom_answer(word: str, response_filter: str, topic: str, payload: bytes) -> str:
    """Who answered ``word``: the process's level(s) of the response topic, else the pid in
    the answer, else ``""`` (a response topic without wildcards and an answer without a pid:
    nobody can tell processes apart), when ``payload`` on ``topic`` is a well-formed answer
    to ``word``.

    Raises:
        ValueError: it is not (the message says why); the caller ignores it.
    """
    where = _wildcard_levels(response_filter, topic)
    if where is None:
        raise ValueError(f"other topic: {shown(topic)} is not {response_filter}")
    if len(payload) > MAX_PSCOM_ANSWER_BYTES:
        raise ValueError(f"too long: {len(payload)} bytes (at most {MAX_PSCOM_ANSWER_BYTES})")
    # pscom sends its fixed-size buffer: the text, a NUL, and what the buffer held before.
    text = payload.split(b"\0", 1)[0].strip()
    match = _PSCOM_ANSWER.fullmatch(text.decode("ascii", "replace"))
    if match is None:
        raise ValueError(f"not an answer: {shown(text, 60)}")
    said = match.group("word").lower()
    if said not in PSCOM_ANSWERS[word]:
        raise ValueError(f"wrong answer: {shown(said)} is no answer to {word}")
    pid = match.group("pid")
    process = "/".join(where)
    if pid is not None and process.isascii() and process.isdigit() and int(process) != int(pid):
        raise ValueError(f"pid mismatch: {pid} answered on the topic of {shown(process)}")
    return process or pid or ""


class PscomHook:
    """Suspend and resume the MPI processes of one VM (``procs`` answers per round)."""

    def __init__(self, bus: MessageBus, settings: PscomSettings, vm_name: str, procs: int) -> None:
        self.bus = bus
        self.settings = settings
        self.vm_name = vm_name
        self.procs = procs
        if any(char in vm_name for char in "+#/\0"):
            # It would widen the response subscription to other VMs' processes.
            raise HookFailed(f"pscom: the VM name {shown(vm_name)} cannot be a topic level")
        self.request_topic = settings.request_topic.replace("<vm_name>", vm_name)
        self.response_topic = settings.response_topic.replace("<vm_name>", vm_name)
        # The original waited 10 s per answer, one after another, without any overall bound
        # (a count of 4294967295 meant forever). One deadline, capped.
        self.deadline = settings.timeout or min(
            PSCOM_SECONDS_PER_PROCESS * procs, PSCOM_MAX_DEFAULT_DEADLINE
        )

    async def _round(self, word: str) -> None:
        """Publish ``word`` and wait for ``procs`` well-formed answers to it
        (:func:`pscom_answer`), each process counted once, within one deadline. Anything
        else on the response topic is ignored and logged once."""
        answered: set[str] = set()
        ignored = 0
        junk = JunkLog()
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.deadline):
                # QoS 0 for the response subscription, as the original.
                async with self.bus.subscription(self.response_topic, 0) as queue:
                    await self.bus.send(self.request_topic, word.encode(), self.settings.qos)
                    while len(answered) < self.procs:
                        topic, payload = await queue.get()
                        try:
                            # Nothing tells answers without a process level or pid apart:
                            # each such answer counts.
                            process = (
                                pscom_answer(word, self.response_topic, topic, payload)
                                or f"#{len(answered)}"
                            )
                        except ValueError as exc:
                            why = str(exc)
                        else:
                            again = process in answered
                            why = f"again: {shown(process)} answered already" if again else ""
                        if why:
                            ignored += 1
                            junk("pscom.answer_ignored", reason=why, vm=self.vm_name, word=word)
                            continue
                        answered.add(process)
        except TimeoutError:
            also = f" ({ignored} other message{'s' * (ignored != 1)} ignored)" if ignored else ""
            raise HookFailed(
                f"pscom {word}: {len(answered)} of {self.procs} processes answered within "
                f"{self.deadline:g} s{also}"
            ) from None
        except Exception as exc:
            raise HookFailed(f"pscom {word}: {exc}") from exc
        log.info(
            "pscom.done",
            word=word,
            answers=len(answered),
            ignored=ignored,
            seconds=round(time.monotonic() - started, 3),
        )

    async def suspend(self, ctx: HookContext) -> None:
        """Suspend the processes. On any failure (cancellation included) ``resume`` is sent
        before the error propagates: some processes may already be suspended."""
        ctx.phase("pscom-suspend")
        try:
            with ctx.measure(f"pscom-suspend-{self.vm_name}"):
                await self._round("suspend")
        except BaseException:
            await self.resume_quietly(ctx)
            raise

    async def resume(self, ctx: HookContext) -> None:
        ctx.phase("pscom-resume")
        with ctx.measure(f"pscom-resume-{self.vm_name}"):
            await self._round("resume")

    async def resume_quietly(self, ctx: HookContext) -> None:
        """Resume on an error path: shielded from cancellation (bounded by the round's own
        deadline), failures only logged, the error being handled is what the task reports."""
        task = asyncio.ensure_future(self.resume(ctx))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # Cancelled again while resuming: the resume finishes in the background.
            _BACKGROUND.add(task)
            task.add_done_callback(_forget)
            raise
        except Exception as exc:  # noqa: BLE001 - the original error is what the task reports
            log.error("pscom.resume_failed", vm=self.vm_name, error=str(exc))  # noqa: TRY400


def _forget(task: asyncio.Task[None]) -> None:
    _BACKGROUND.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("pscom.resume_failed", error=str(task.exception()))


async def count_processes(settings: PscomSettings, vm_name: str) -> int:
    """``pscom-hook-procs: auto``: run ``auto-command`` in the guest over SSH and read the
    count from the last line of its output (protocol §3.6). Any failure is ``hook-failed``."""
    try:
        import asyncssh  # noqa: PLC0415 - optional extra
    except ImportError as exc:
        raise NotSupported(
            "pscom-hook-procs: auto needs asyncssh (install asyncmigfra[pscom])"
        ) from exc
    host = settings.ssh_host.replace("<vm_name>", vm_name)
    options: dict[str, object] = {"port": settings.ssh_port, "known_hosts": settings.known_hosts}
    if settings.ssh_user is not None:
        options["username"] = settings.ssh_user
    if settings.ssh_key_file is not None:
        options["client_keys"] = [settings.ssh_key_file]
    try:
        async with asyncio.timeout(settings.ssh_timeout):
            async with asyncssh.connect(host, **options) as conn:
                result = await conn.run(settings.auto_command, check=False)
    except TimeoutError:
        raise HookFailed(
            f"pscom-hook-procs auto: no answer from {host} within {settings.ssh_timeout:g} s"
        ) from None
    except (OSError, asyncssh.Error) as exc:
        raise HookFailed(f"pscom-hook-procs auto: SSH to {host} failed: {exc}") from exc
    out = result.stdout
    text = out.decode(errors="replace") if isinstance(out, bytes) else str(out or "")
    lines = text.strip().splitlines()
    try:
        count = int(lines[-1].strip())
    except (IndexError, ValueError):
        raise HookFailed(
            f"pscom-hook-procs auto: {host} printed no process count "
            f"(exit status {result.exit_status}): {text.strip()[:200]!r}"
        ) from None
    if count < 0:
        raise HookFailed(f"pscom-hook-procs auto: {host} printed a negative count {count}")
    log.info("pscom.counted", host=host, procs=count)
    return count
