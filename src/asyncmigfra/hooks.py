"""Steps around a task that talk to the world outside the hypervisor: the pscom hook.

**pscom hook** (spec 1.10): before a migration the MPI processes in the guest are told to
``suspend`` and after it to ``resume``, over MQTT, and the agent waits for one answer per
process. The differences from the original are on purpose (spec 9):

* one deadline per round (``pscom-handler.timeout``, default 10 s per process) instead of
  10 s per answer serially;
* a ``resume`` is sent on every path once a ``suspend`` went out: after a suspend that timed
  out part-way, after a failed migration and after a cancel (shielded and bounded);
* the response subscription lives only as long as one round and is always removed.

The engine reaches MQTT only through :class:`MessageBus`, implemented by the transport
(``MqttTransport.subscription``/``send``); aiomqtt stays in ``mqtt.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, Protocol

import structlog

from asyncmigfra.errors import HookFailed, NotSupported
from asyncmigfra.settings import PscomSettings

__all__ = [
    "HookContext",
    "MessageBus",
    "PscomHook",
    "count_processes",
    "json_map",
    "peer_topic",
    "sibling_topic",
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
    the host name is not exactly one level of it, or ``peer`` is no plain topic level, so a
    peer's name can never widen a topic)."""
    levels = own_topic.split("/")
    if levels.count(hostname) != 1 or not peer or any(char in peer for char in "+#/\0"):
        return None
    return "/".join(peer if level == hostname else level for level in levels)


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


class PscomHook:
    """Suspend and resume the MPI processes of one VM (``procs`` answers per round)."""

    def __init__(self, bus: MessageBus, settings: PscomSettings, vm_name: str, procs: int) -> None:
        self.bus = bus
        self.settings = settings
        self.vm_name = vm_name
        self.procs = procs
        self.request_topic = settings.request_topic.replace("<vm_name>", vm_name)
        self.response_topic = settings.response_topic.replace("<vm_name>", vm_name)
        # The original waited 10 s per answer, one after another, without any overall bound
        # (a count of 4294967295 meant forever). One deadline, capped.
        self.deadline = settings.timeout or min(
            PSCOM_SECONDS_PER_PROCESS * procs, PSCOM_MAX_DEFAULT_DEADLINE
        )

    async def _round(self, word: str) -> None:
        """Publish ``word`` and wait for ``procs`` answers (their content is ignored, as in
        the original) within one deadline."""
        answers = 0
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.deadline):
                # QoS 0 for the response subscription, as the original.
                async with self.bus.subscription(self.response_topic, 0) as queue:
                    await self.bus.send(self.request_topic, word.encode(), self.settings.qos)
                    while answers < self.procs:
                        await queue.get()
                        answers += 1
        except TimeoutError:
            raise HookFailed(
                f"pscom {word}: {answers} of {self.procs} processes answered within "
                f"{self.deadline:g} s"
            ) from None
        except Exception as exc:
            raise HookFailed(f"pscom {word}: {exc}") from exc
        log.info(
            "pscom.done",
            word=word,
            answers=answers,
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
    count from the last line of its output (spec 1.10). Any failure is ``hook-failed``."""
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
