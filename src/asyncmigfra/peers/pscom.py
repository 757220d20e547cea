"""The pscom hook: MPI processes in the guest told to suspend and resume around a migration.

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

The hook reaches MQTT only through :class:`asyncmigfra.peers.bus.MessageBus`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Final, Protocol

import structlog

from asyncmigfra.errors import HookFailed, NotSupported
from asyncmigfra.peers.bus import JunkLog, MessageBus, shown, wildcard_levels
from asyncmigfra.settings import PscomSettings

__all__ = [
    "HookContext",
    "PscomHook",
    "count_processes",
    "pscom_answer",
]

log = structlog.stdlib.get_logger(__name__)

#: s the default deadline never exceeds (set ``pscom-handler.timeout`` for longer waits).
PSCOM_MAX_DEFAULT_DEADLINE = 120.0
#: s the original waited for each answer; the default deadline is this times the count.
PSCOM_SECONDS_PER_PROCESS = 10.0

#: Resumes still running after their task was cancelled a second time (kept referenced).
_BACKGROUND: set[asyncio.Task[None]] = set()


class HookContext(Protocol):
    def phase(self, name: str) -> None: ...

    def measure(self, tag: str) -> AbstractContextManager[None]: ...


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
    where = wildcard_levels(response_filter, topic)
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
