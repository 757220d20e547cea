"""The :class:`HookRunner`: runs the configured hooks of a point, and serves other agents'
requests for ``on: destination`` command hooks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Iterable, Sequence

import structlog

from asyncmigfra.errors import HookFailed
from asyncmigfra.peers import exchange
from asyncmigfra.peers.bus import JunkLog, MessageBus, shown
from asyncmigfra.peers.pscom import HookContext
from asyncmigfra.peers.userhooks.call import HookCall, _Failure
from asyncmigfra.peers.userhooks.commands import _run_command
from asyncmigfra.peers.userhooks.environment import SECRET_VARIABLES, _Hidden
from asyncmigfra.peers.userhooks.remote import (
    PEER_CONCURRENCY,
    PEER_CONCURRENCY_PER_SOURCE,
    PEER_MARGIN,
    PeerHookRequest,
    _exchange,
    _on_peer,
    _peer_request_of,
    _run_mqtt,
    hook_topic_of,
    hook_topics,
    parse_peer_request,
)
from asyncmigfra.settings import HOOK_POINTS, HookSettings, Settings

log = structlog.stdlib.get_logger("asyncmigfra.userhooks")


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
        await exchange.serve(
            self._bus,
            self._topics,
            self._serve_one,
            qos=1,
            event="hook",
            junk=self._junk,
            slots=PEER_CONCURRENCY,
            hostname=self._hostname,
        )

    async def _serve_one(self, sender: str, raw: bytes) -> dict[str, str] | None:
        """The answer to ``sender``'s request ``raw``, once its hook ran (``None``: none;
        junk: :class:`~asyncmigfra.peers.bus.PeerRefusal`)."""
        assert self._hostname is not None
        status, details = "success", ""
        request = parse_peer_request(raw, sender, self._hostname, peers=self._peers)
        key = (sender, request.request_id)
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
        return exchange.answer_of(request.request_id, status, details, hostname=self._hostname)

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
