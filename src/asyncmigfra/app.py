"""The composition root: build the parts, run them under one TaskGroup, shut down in order.

::

    Agent.run
    ├─ hypervisor.open()                     (back-end chosen by hypervisor.type)
    └─ TaskGroup
       ├─ asyncmigfra.transport.mqtt        MqttTransport.run: connect, subscribe, reconnect forever
       ├─ asyncmigfra.intake      parse each task payload in arrival order -> Dispatcher
       ├─ asyncmigfra.dispatcher  jobs -> subtasks (per-VM lanes, limits, cancel)
       └─ asyncmigfra.publisher   results and events -> broker (QoS 1, pipelined)

Shutdown (SIGTERM, SIGINT or ``task: quit``): retained status ``draining``, running work gets
``shutdown.grace-period`` to finish, what remains is cancelled (each still gets its result),
the publisher flushes, status ``offline`` is published, the connection closes, exit 0. A
second signal cancels running work at once; a last-resort timer ends the process if a thread
hangs past ``shutdown.hard-exit-after``.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import datetime as dt
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import MutableMapping
from typing import Any

import structlog

from asyncmigfra import __version__
from asyncmigfra.errors import StartupError, TaskRejected
from asyncmigfra.hypervisor.base import Hypervisor
from asyncmigfra.hypervisor.registry import load_factory
from asyncmigfra.logs import would_drop
from asyncmigfra.migration.forecast import Forecaster
from asyncmigfra.model import ResultMessage, TaskMessage
from asyncmigfra.peers.inbound import InboundServer
from asyncmigfra.peers.lanes import LaneServer
from asyncmigfra.peers.userhooks import HookRunner
from asyncmigfra.settings import Settings
from asyncmigfra.statedir import resolve_state_dir
from asyncmigfra.tasks.dispatching import Dispatcher, Reply
from asyncmigfra.tasks.history import history_rows
from asyncmigfra.tasks.journal import Journal, JournalRecord, journal_state
from asyncmigfra.tasks.linkrates import FixedCosts, LinkRates, ResidentOverheads
from asyncmigfra.transport.metrics.feed import Vitals
from asyncmigfra.transport.metrics.opening import open_metrics
from asyncmigfra.transport.mqtt import Incoming, MqttTransport, Outgoing
from asyncmigfra.transport.publishing import EventPublisher, Publisher
from asyncmigfra.wire.events import Events
from asyncmigfra.wire.parsing import parse_task
from asyncmigfra.wire.rendering import (
    QUERY_RESULTS,
    BoundedResult,
    render_bounded_result,
    render_event,
)

__all__ = ["Agent", "build_hypervisor"]

log = structlog.stdlib.get_logger(__name__)
_LOGGER = logging.getLogger(__name__)

#: Payloads at least this large are parsed in a worker thread (keeps the loop responsive).
_THREAD_PARSE_BYTES = 64 * 1024
#: s between checks whether the retained status needs a new running-task count.
_PRESENCE_INTERVAL = 2.0
#: s the publisher gets to flush at shutdown.
_FLUSH_TIMEOUT = 10.0


def _trim_heap() -> None:
    """``malloc_trim(0)`` where the C library has it (glibc); a no-op elsewhere."""
    trim = _MALLOC_TRIM
    if trim is not None:
        trim(0)


def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def build_hypervisor(settings: Settings, shared: MutableMapping[str, object]) -> Hypervisor:
    factory = load_factory(settings.hypervisor.type)
    return factory(settings.hypervisor.options, hostname=settings.hostname, shared=shared)


class Agent:
    """One agent: a hypervisor, a broker connection and the task machinery between them."""

    def __init__(
        self,
        settings: Settings,
        *,
        hypervisor: Hypervisor | None = None,
        shared: MutableMapping[str, object] | None = None,
        install_signal_handlers: bool = False,
    ) -> None:
        self.settings = settings
        self.hypervisor = hypervisor or build_hypervisor(
            settings, shared if shared is not None else {}
        )
        self._signals = install_signal_handlers
        self._stop = asyncio.Event()
        self._stop_count = 0
        #: Why the agent stops on its own (its client id is in use): raised after shutdown.
        self._fatal: StartupError | None = None
        self._state = "online"
        self._since = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        state_dir = resolve_state_dir(settings)
        self.journal = (
            Journal(
                state_dir,
                owner=settings.hostname,
                history_retention=settings.agent.history_retention,
                history_max_entries=settings.agent.history_max_entries,
            )
            if state_dir is not None
            else None
        )
        #: What this agent learned of its destinations' links (beside the journal).
        self.link_rates = LinkRates.in_state_dir(state_dir)
        #: ... and of its guests' hypervisor processes (what they keep resident beyond guest
        #: memory; migration/forecast.py).
        self.resident_overheads = ResidentOverheads.in_state_dir(state_dir)
        #: ... and of each destination's fixed cost per migration (migration/fixedcosts.py).
        self.fixed_costs = FixedCosts.in_state_dir(state_dir)
        self.forecaster = Forecaster(
            settings=settings,
            link_rates=self.link_rates,
            overheads=self.resident_overheads,
            fixed_costs=self.fixed_costs,
        )
        mqtt = settings.mqtt
        self.transport = MqttTransport(
            mqtt,
            subscriptions=[(mqtt.task_topic, 2)],
            will=Outgoing(mqtt.status_topic, self._status_payload("offline"), qos=1, retain=True),
            on_connected=self._on_connected,
            # What operations.md §2 has the broker let through (its message_size_limit).
            max_payload=settings.limits.max_message_size,
        )
        self.publisher = Publisher(self.transport)
        #: ``metrics.listen``: what the agent publishes also feeds its Prometheus series
        #: (events through the sink below, results in :meth:`_deliver`); ``None``: off.
        self.metrics = open_metrics(
            settings,
            # late-bound: the dispatcher is built below, with the events that feed the metrics
            route=lambda task_id, vm: self.dispatcher.migration_route(task_id, vm),  # noqa: PLW0108
            version=__version__,
        )
        sink = EventPublisher(self.publisher, topic=mqtt.event_topic)
        self.events = Events(
            self.metrics.tee(sink) if self.metrics is not None else sink,
            host=settings.hostname,
            progress_qos=mqtt.progress_qos,
            event_qos=mqtt.event_qos,
        )
        #: The configured hooks (``None``: none): run by the dispatcher's subtasks, and
        #: serving other agents' ``on: destination`` requests (:meth:`run`).
        self.hooks = (
            HookRunner.from_settings(settings, bus=self.transport) if settings.hooks else None
        )
        self.dispatcher = Dispatcher(
            hypervisor=self.hypervisor,
            settings=settings,
            events=self.events,
            deliver=self._deliver,
            on_quit=self.request_stop,
            journal=self.journal,
            bus=self.transport,
            hooks=self.hooks,
            forecaster=self.forecaster,
        )
        #: Holds of this agent's VM lanes for other agents' swaps.
        self.lanes = LaneServer(
            bus=self.transport,
            hostname=settings.hostname,
            task_topic=settings.mqtt.task_topic,
            keeper=self.dispatcher,
        )
        #: Shares of this host's inbound NIC reserved by other agents' evacuations.
        self.inbound = InboundServer(
            bus=self.transport,
            hostname=settings.hostname,
            task_topic=settings.mqtt.task_topic,
            hypervisor=self.hypervisor,
        )
        self._intake: asyncio.Queue[Incoming] = asyncio.Queue()
        #: Bytes of the payloads in ``_intake`` (bounded by ``limits.max-intake-bytes``).
        self._intake_bytes = 0
        #: The intake task waits for a message (none is being parsed): a small message
        #: that finds the queue empty is parsed at once by ``_on_message``.
        self._intake_idle = False
        #: Heap trims still due after large messages (the last one a tick after the burst,
        #: when the MQTT client's buffers are gone too).
        self._trims_due = 0
        self.ready = asyncio.Event()

    # ------------------------------------------------------------------ control

    def request_stop(self) -> None:
        """Begin a graceful shutdown; a second request cancels running work at once."""
        self._stop_count += 1
        if self._stop_count == 1:
            log.info("agent.stop_requested")
            self._stop.set()
        else:
            log.warning("agent.stop_forced")
            self.dispatcher.cancel_all("the agent is shutting down (second signal)")

    def _status_payload(self, state: str) -> bytes:
        return render_event(
            {
                "state": state,
                "host": self.settings.hostname,
                "version": __version__,
                "hypervisor": self.settings.hypervisor.type,
                "since": self._since,
                # Running subtasks, so a fleet view needs nothing but the retained topics.
                "tasks": self.dispatcher.running if hasattr(self, "dispatcher") else 0,
                "journal": journal_state(self.journal),
            }
        )

    def _publish_status(self, state: str) -> None:
        self._state = state
        self.publisher.put_nowait(
            Outgoing(
                self.settings.mqtt.status_topic, self._status_payload(state), qos=1, retain=True
            )
        )

    async def _presence_loop(self) -> None:
        """Re-publish the retained status when the number of running tasks or the journal's
        state changed (checked every ``_PRESENCE_INTERVAL`` s), so ``asyncmigfra status``
        shows it for every agent."""
        last = (self.dispatcher.running, journal_state(self.journal))
        while True:
            await asyncio.sleep(_PRESENCE_INTERVAL)
            if self._trims_due and self._intake.empty():
                # Large messages came and went: give their freed heap back to the system
                # (glibc keeps it; 200 1 MB messages left ~100 MB of RSS behind).
                self._trims_due -= 1
                await asyncio.to_thread(_trim_heap)
            now = (self.dispatcher.running, journal_state(self.journal))
            if now != last and self.transport.is_connected and self._state == "online":
                last = now
                self._publish_status("online")

    def _vitals(self) -> Vitals:
        return Vitals(
            broker_connected=self.transport.is_connected,
            queued=self.dispatcher.queued,
            running=self.dispatcher.running,
            backlog=self.publisher.backlog,
            journal=journal_state(self.journal),
        )

    async def _on_connected(self) -> None:
        # Presence goes out only once the task subscription is active (extensions.md).
        self._publish_status(self._state)
        self.ready.set()

    # ------------------------------------------------------------------ data path

    def _on_message(self, message: Incoming) -> None:
        size = len(message.payload)
        if size >= _THREAD_PARSE_BYTES:
            self._trims_due = 2
        budget = self.settings.limits.max_intake_bytes
        if self._intake_bytes + size > budget and self._intake_bytes > 0:
            # A flood of large messages: answered at once, unread, so what waits for the
            # parser (and the memory it takes) stays bounded.
            self._dispatch(
                message,
                TaskRejected(
                    "busy",
                    f"the agent has {self._intake_bytes} bytes of messages waiting to be read "
                    f"(limits.max-intake-bytes: {budget}); send the task again later",
                ),
            )
            return
        if size < _THREAD_PARSE_BYTES and self._intake_idle and self._intake.empty():
            # Nothing waits to be read before it: parsed and dispatched now, in order,
            # without waking the intake task (one loop iteration less per task).
            self._dispatch(message, self._parse(message.payload))
            return
        self._intake_bytes += size
        self._intake.put_nowait(message)

    async def _intake_loop(self) -> None:
        try:
            while True:
                self._intake_idle = True
                message = await self._intake.get()
                self._intake_idle = False
                self._intake_bytes -= len(message.payload)
                large = len(message.payload) >= _THREAD_PARSE_BYTES
                if large:
                    # Large payloads are parsed off the loop; order is kept (one at a time).
                    parsed = await asyncio.to_thread(self._parse, message.payload)
                else:
                    parsed = self._parse(message.payload)
                self._dispatch(message, parsed)
        finally:
            self._intake_idle = False  # stopped: what comes now waits in the queue

    def _answer_leftovers(self) -> None:
        """Answer messages that arrived after intake stopped (the dispatcher refuses them)."""
        while not self._intake.empty():
            message = self._intake.get_nowait()
            self._intake_bytes -= len(message.payload)
            self._dispatch(message, self._parse(message.payload))

    def _parse(self, payload: bytes) -> TaskMessage | TaskRejected:
        limits = self.settings.limits
        try:
            task = parse_task(
                payload,
                max_size=limits.max_message_size,
                max_nodes=limits.max_yaml_nodes,
                max_depth=limits.max_yaml_depth,
            )
        except TaskRejected as exc:
            # Kept as a value, so without its traceback: the parser's frames hold the whole
            # payload and its scalars, and form cycles that only a full collection frees
            # (200 refused 1 MB messages kept ~120 MiB alive for minutes).
            exc.__cause__ = exc.__context__ = None
            return exc.with_traceback(None)
        if len(task.subtasks) > limits.max_subtasks:
            return TaskRejected(
                "invalid-message",
                f"{len(task.subtasks)} subtasks exceed the limit of {limits.max_subtasks} "
                "(limits.max-subtasks)",
                task_id=task.id,
            )
        return task

    def _dispatch(self, message: Incoming, parsed: TaskMessage | TaskRejected) -> None:
        reply = None
        if message.response_topic:
            reply = Reply(message.response_topic, message.correlation_data)
        if isinstance(parsed, TaskRejected):
            log.info(
                "task.rejected", code=parsed.code, details=parsed.details, task_id=parsed.task_id
            )
            self.dispatcher.reject(parsed, reply)
            return
        if not would_drop(_LOGGER, logging.DEBUG):  # one a task: not built for nothing
            log.debug("task.received", task_id=parsed.id, task=parsed.kind.value)
        self.dispatcher.submit(parsed, payload=message.payload, reply=reply)

    def _deliver(
        self,
        result: ResultMessage,
        reply: Reply | None,
        key: str | None,
        /,
        *,
        rendered: BoundedResult | None = None,
    ) -> None:
        """Publish ``result`` (journaled under ``key``), within ``limits.max-message-size``:
        the one place where results become bytes (or were made so in a thread: ``rendered``)."""
        history = None
        if key is not None and self.journal is not None and self.journal.keeps_history:
            history = history_rows(key, result, time.time())
        if rendered is None:
            rendered = render_bounded_result(result, self.settings.limits.max_message_size)
        if rendered.left_out:
            # Said once per result: the bounded one is published like any other.
            (log.info if result.result in QUERY_RESULTS else log.warning)(
                "result.too_large",
                task_id=result.id,
                result=result.result,
                size=rendered.size,
                limit=self.settings.limits.max_message_size,
                entries=len(result.entries),
                left_out=rendered.left_out,
            )
        self._publish_result(rendered.payload, reply, key, history)
        if self.metrics is not None:
            self.metrics.feed.observe_result(result)

    def _publish_result(
        self,
        payload: bytes,
        reply: Reply | None,
        key: str | None,
        history: list[tuple[object, ...]] | None = None,
    ) -> None:
        """``history``: the result's history rows (none for a result published again)."""
        on_delivered = None
        if key is not None and self.journal is not None:
            journal = self.journal
            journal.finished(key, payload, history or ())

            def on_delivered() -> None:
                journal.delivered(key)

        self.publisher.put_nowait(
            Outgoing(self.settings.mqtt.result_topic, payload, qos=1), on_delivered=on_delivered
        )
        if reply is not None and reply.response_topic:
            self.publisher.put_nowait(
                Outgoing(
                    reply.response_topic, payload, qos=1, correlation_data=reply.correlation_data
                )
            )

    def _recover(self, records: list[JournalRecord]) -> None:
        """Pick up what a previous run left: owed results, tasks to run or reconcile."""
        for rec in records:
            reply = Reply(rec.response_topic, rec.correlation) if rec.response_topic else None
            if rec.state == "finished" and rec.result is not None:
                log.info("journal.result_republished", task_id=rec.task_id)
                self._publish_result(rec.result, reply, rec.key)
                continue
            parsed = self._parse(rec.payload)
            if isinstance(parsed, TaskRejected):  # pragma: no cover - it parsed before
                log.error("journal.unparsable", task_id=rec.task_id, details=parsed.details)
                continue
            log.info("journal.task_recovered", task_id=rec.task_id, state=rec.state)
            self.dispatcher.submit(
                parsed,
                payload=rec.payload,
                reply=reply,
                journal_key=rec.key,
                recovered=rec.state == "running",
            )

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        loop = asyncio.get_running_loop()
        if self._signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        # The journal first: an agent whose journal another agent holds touches nothing.
        records = await self.journal.open() if self.journal is not None else []
        self._warn_of_an_earlier_journal()
        await self.link_rates.open()  # after the journal's lock: the directory is ours
        await self.resident_overheads.open()
        await self.fixed_costs.open()
        username = self.settings.mqtt.username
        if username is not None and username != self.settings.hostname:
            log.warning(
                "agent.username_is_not_the_name",
                username=username,
                name=self.settings.hostname,
                hint="messages to other agents (swap lane holds, destination hooks) carry the "
                "agent's name as their sender, and the example ACL lets a user send only its "
                "own name: set communicator.username to the agent's name",
            )
        try:
            await self.hypervisor.open()
        except BaseException:
            if self.journal is not None:
                await self.journal.close()
            raise
        if self.metrics is not None:
            try:
                await self.metrics.start()
            except BaseException:
                await self.hypervisor.aclose()
                if self.journal is not None:
                    await self.journal.close()
                raise
        log.info(
            "agent.starting",
            host=self.settings.hostname,
            hypervisor=self.hypervisor.kind,
            task_topic=self.settings.mqtt.task_topic,
            version=__version__,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                publisher = tg.create_task(self.publisher.run(), name="asyncmigfra.publisher")
                dispatcher = tg.create_task(self.dispatcher.run(), name="asyncmigfra.dispatcher")
                await asyncio.sleep(0)  # let the dispatcher open its TaskGroup
                self._recover(records)
                intake = tg.create_task(self._intake_loop(), name="asyncmigfra.intake")
                presence = tg.create_task(self._presence_loop(), name="asyncmigfra.presence")
                mqtt = tg.create_task(self._connection(), name="asyncmigfra.mqtt")
                hooks = self.hooks
                serving = (
                    tg.create_task(hooks.serve(), name="asyncmigfra.hooks")
                    if hooks is not None and hooks.serves_peers
                    else None
                )
                lanes = tg.create_task(self.lanes.serve(), name="asyncmigfra.lanes")
                inbound = tg.create_task(self.inbound.serve(), name="asyncmigfra.inbound")
                sampler = (
                    tg.create_task(self.metrics.run(self._vitals), name="asyncmigfra.metrics")
                    if self.metrics is not None
                    else None
                )
                await self._stop.wait()
                self._arm_hard_exit()
                self._publish_status("draining")
                log.info("agent.draining", grace=self.settings.shutdown.grace_period)
                await self.dispatcher.drain(self.settings.shutdown.grace_period)
                self.dispatcher.close()
                await dispatcher
                intake.cancel()
                presence.cancel()
                if serving is not None:
                    serving.cancel()
                lanes.cancel()
                inbound.cancel()
                if sampler is not None:
                    sampler.cancel()
                await asyncio.wait({intake})
                self._answer_leftovers()
                self._publish_status("offline")
                try:
                    # Without a connection (given up: the client id is taken) nothing can
                    # flush; the journal keeps the results owed for the next run.
                    async with asyncio.timeout(_FLUSH_TIMEOUT if self._fatal is None else 0):
                        await self.publisher.wait_idle()
                except TimeoutError:
                    log.warning("agent.flush_incomplete", backlog=self.publisher.backlog)
                publisher.cancel()
                mqtt.cancel()
        finally:
            if self._signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            await self.hypervisor.aclose()
            if self.journal is not None:
                await self.journal.close()
            if self.metrics is not None:
                await self.metrics.stop()
        log.info("agent.stopped")
        if self._fatal is not None:
            raise self._fatal  # one line, exit 2 (cli)
        return 0

    async def _connection(self) -> None:
        """The broker connection. If it cannot go on (another client keeps taking over the
        client id), the agent shuts down as on SIGTERM, so running work still ends with a
        result, and then exits 2."""
        try:
            await self.transport.run(self._on_message)
        except StartupError as exc:
            self._fatal = exc
            log.error("agent.cannot_continue", reason=str(exc))  # noqa: TRY400 - said in one line
            self.request_stop()

    def _warn_of_an_earlier_journal(self) -> None:
        """Before identity came from the task topic, an agent was named by the machine: an
        agent whose name now differs from the machine's may have left its journal (and
        results it still owes) under the machine's name. Say so; moving it is the
        operator's call (docs/operations.md "Upgrading")."""
        settings = self.settings
        machine = socket.gethostname()
        if self.journal is None or settings.agent.state_dir.lower() != "auto":
            return
        if machine == settings.hostname:
            return
        earlier = resolve_state_dir(dataclasses.replace(settings, hostname=machine))
        if earlier is not None and (earlier / "journal.sqlite").exists():
            log.warning(
                "journal.earlier_location",
                path=str(earlier),
                now=str(self.journal.path.parent),
                hint=f"this agent is {settings.hostname!r} (from its configuration); a journal "
                f"named after the machine ({machine!r}) exists: if this agent used it before, "
                "stop the agent and move its files here",
            )

    def _arm_hard_exit(self) -> None:
        """Last resort: end the process if shutdown hangs (a stuck libvirt thread)."""
        if not self._signals:
            return
        limit = self.settings.shutdown.grace_period + self.settings.shutdown.hard_exit_after
        timer = threading.Timer(limit, lambda: os._exit(3))
        timer.daemon = True
        timer.start()
