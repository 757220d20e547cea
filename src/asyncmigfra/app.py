"""The composition root: build the parts, run them under one TaskGroup, shut down in order.

::

    Agent.run
    ├─ hypervisor.open()                     (back-end chosen by hypervisor.type)
    └─ TaskGroup
       ├─ asyncmigfra.mqtt        MqttTransport.run: connect, subscribe, reconnect forever
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
import datetime as dt
import os
import signal
import threading
from collections.abc import MutableMapping

import structlog

from asyncmigfra import __version__
from asyncmigfra.dispatching import Dispatcher, Reply
from asyncmigfra.errors import TaskRejected
from asyncmigfra.events import Events
from asyncmigfra.hypervisor.base import Hypervisor
from asyncmigfra.hypervisor.registry import load_factory
from asyncmigfra.model import ResultMessage
from asyncmigfra.mqtt import Incoming, MqttTransport, Outgoing
from asyncmigfra.parsing import parse_task
from asyncmigfra.publishing import EventPublisher, Publisher
from asyncmigfra.rendering import render_event, render_result
from asyncmigfra.settings import Settings

__all__ = ["Agent", "build_hypervisor"]

log = structlog.stdlib.get_logger(__name__)

#: Payloads at least this large are parsed in a worker thread (keeps the loop responsive).
_THREAD_PARSE_BYTES = 64 * 1024
#: s the publisher gets to flush at shutdown.
_FLUSH_TIMEOUT = 10.0


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
        self._state = "online"
        self._since = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        mqtt = settings.mqtt
        self.transport = MqttTransport(
            mqtt,
            subscriptions=[(mqtt.task_topic, 2)],
            will=Outgoing(mqtt.status_topic, self._status_payload("offline"), qos=1, retain=True),
            on_connected=self._on_connected,
        )
        self.publisher = Publisher(self.transport)
        self.events = Events(
            EventPublisher(self.publisher, topic=mqtt.event_topic),
            host=settings.hostname,
            progress_qos=mqtt.progress_qos,
        )
        self.dispatcher = Dispatcher(
            hypervisor=self.hypervisor,
            settings=settings,
            events=self.events,
            deliver=self._deliver,
            on_quit=self.request_stop,
        )
        self._intake: asyncio.Queue[Incoming] = asyncio.Queue()
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
            }
        )

    def _publish_status(self, state: str) -> None:
        self._state = state
        self.publisher.put_nowait(
            Outgoing(
                self.settings.mqtt.status_topic, self._status_payload(state), qos=1, retain=True
            )
        )

    async def _on_connected(self) -> None:
        # Presence goes out only once the task subscription is active (extensions.md).
        self._publish_status(self._state)
        self.ready.set()

    # ------------------------------------------------------------------ data path

    def _on_message(self, message: Incoming) -> None:
        self._intake.put_nowait(message)

    async def _intake_loop(self) -> None:
        limits = self.settings.limits
        while True:
            message = await self._intake.get()
            reply = None
            if message.response_topic:
                reply = Reply(message.response_topic, message.correlation_data)
            try:
                if len(message.payload) >= _THREAD_PARSE_BYTES:
                    task = await asyncio.to_thread(
                        parse_task,
                        message.payload,
                        max_size=limits.max_message_size,
                        max_nodes=limits.max_yaml_nodes,
                        max_depth=limits.max_yaml_depth,
                    )
                else:
                    task = parse_task(
                        message.payload,
                        max_size=limits.max_message_size,
                        max_nodes=limits.max_yaml_nodes,
                        max_depth=limits.max_yaml_depth,
                    )
            except TaskRejected as exc:
                log.info("task.rejected", code=exc.code, details=exc.details, task_id=exc.task_id)
                self.dispatcher.reject(exc, reply)
                continue
            if len(task.subtasks) > limits.max_subtasks:
                too_many = TaskRejected(
                    "invalid-message",
                    f"{len(task.subtasks)} subtasks exceed the limit of {limits.max_subtasks} "
                    "(limits.max-subtasks)",
                    task_id=task.id,
                )
                self.dispatcher.reject(too_many, reply)
                continue
            log.debug("task.received", task_id=task.id, task=task.kind.value)
            self.dispatcher.submit(task, payload=message.payload, reply=reply)

    def _deliver(self, result: ResultMessage, reply: Reply | None) -> None:
        payload = render_result(result)
        self.publisher.put_nowait(Outgoing(self.settings.mqtt.result_topic, payload, qos=1))
        if reply is not None and reply.response_topic:
            self.publisher.put_nowait(
                Outgoing(
                    reply.response_topic, payload, qos=1, correlation_data=reply.correlation_data
                )
            )

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        loop = asyncio.get_running_loop()
        if self._signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        await self.hypervisor.open()
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
                intake = tg.create_task(self._intake_loop(), name="asyncmigfra.intake")
                mqtt = tg.create_task(self.transport.run(self._on_message), name="asyncmigfra.mqtt")
                await self._stop.wait()
                self._arm_hard_exit()
                self._publish_status("draining")
                log.info("agent.draining", grace=self.settings.shutdown.grace_period)
                await self.dispatcher.drain(self.settings.shutdown.grace_period)
                self.dispatcher.close()
                await dispatcher
                intake.cancel()
                self._publish_status("offline")
                try:
                    async with asyncio.timeout(_FLUSH_TIMEOUT):
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
        log.info("agent.stopped")
        return 0

    def _arm_hard_exit(self) -> None:
        """Last resort: end the process if shutdown hangs (a stuck libvirt thread)."""
        if not self._signals:
            return
        limit = self.settings.shutdown.grace_period + self.settings.shutdown.hard_exit_after
        timer = threading.Timer(limit, lambda: os._exit(3))
        timer.daemon = True
        timer.start()
