"""One broker connection for one command, with a single inbox.

Why a single inbox: a command waits for several things at once — its result, the task's
events, the agent's presence (it may go offline mid-task), a lost broker connection and the
user's Ctrl-C. Funnelling them all into one ``asyncio.Queue`` (fed by a pump task and the
SIGINT handler) turns every wait into a plain ``await inbox.get()`` loop with one deadline,
instead of racing futures and cancelling the losers.

Ctrl-C is caught with ``loop.add_signal_handler`` rather than ``KeyboardInterrupt`` so that it
arrives as a message *between* awaits: the command decides what it means (stop watching,
offer to cancel a migration, or leave with a hint), and the MQTT connection is always closed
cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from asyncmigfra.console.connection import Connection
from asyncmigfra.console.exits import BROKER, INTERRUPTED, OFFLINE, TIMEOUT, CliError
from asyncmigfra.transport.mqtt import ToolClient, TransportError
from asyncmigfra.wire.parsing import load_yaml

__all__ = [
    "Interrupt",
    "Lost",
    "Message",
    "Session",
    "open_session",
]

#: s: how long a result may still arrive after the agent's presence turned ``offline``.
#: Results are published before the ``offline`` status on the same session, so this only
#: covers broker-side reordering between topics.
OFFLINE_GRACE = 2.0


@dataclass(frozen=True, slots=True)
class Message:
    """A readable map published by an agent: ``kind`` is ``result``, ``event`` or ``status``."""

    kind: str
    host: str
    doc: dict[str, Any]
    raw: bytes
    #: Delivered because we subscribed (a stored state), not because it just happened.
    retained: bool = False

    @property
    def id(self) -> str | None:
        value = self.doc.get("id")
        return None if value is None else str(value)


@dataclass(frozen=True, slots=True)
class Interrupt:
    """The user pressed Ctrl-C (``count`` presses so far)."""

    count: int


@dataclass(frozen=True, slots=True)
class Lost:
    """The broker connection broke; nothing more will arrive."""

    error: str


Item = Message | Interrupt | Lost


@dataclass
class Session:
    """A connected client: subscribe, publish tasks, and read :attr:`inbox`."""

    conn: Connection
    client: ToolClient
    inbox: asyncio.Queue[Item] = field(default_factory=asyncio.Queue)
    #: Latest presence map per host (also for hosts not subscribed individually).
    presence: dict[str, dict[str, Any]] = field(default_factory=dict)
    interrupts: int = 0
    _stash: deque[Item] = field(default_factory=deque)

    # ------------------------------------------------------------------ plumbing

    async def _pump(self) -> None:
        try:
            async for msg in self.client.messages():
                where = self.conn.split(msg.topic)
                if where is None:
                    continue
                host, kind = where
                if kind == "status" and not msg.payload:
                    continue  # a cleared retained message
                doc = load_yaml(msg.payload)
                if not isinstance(doc, dict):
                    continue
                if kind == "status":
                    self.presence[host] = doc
                self.inbox.put_nowait(Message(kind, host, doc, msg.payload, msg.retain))
        except TransportError as exc:
            self.inbox.put_nowait(Lost(str(exc)))

    def _on_sigint(self) -> None:
        self.interrupts += 1
        self.inbox.put_nowait(Interrupt(self.interrupts))

    def lost(self, item: Lost) -> CliError:
        return CliError(
            BROKER, f"lost the connection to the MQTT broker at {self.conn.where}: {item.error}"
        )

    def push_back(self, item: Item) -> None:
        """Return ``item`` to the front of the inbox (a prompt met something it does not
        handle itself)."""
        self._stash.append(item)

    async def get(self) -> Item:
        """The next inbox item."""
        if self._stash:
            return self._stash.popleft()
        return await self.inbox.get()

    async def next(self, deadline: float | None) -> Item | None:
        """The next inbox item, or ``None`` once ``deadline`` (loop time) passed."""
        if self._stash:
            return self._stash.popleft()
        if deadline is None:
            return await self.inbox.get()
        try:
            async with asyncio.timeout_at(deadline):
                return await self.inbox.get()
        except TimeoutError:
            return None

    # ------------------------------------------------------------------ operations

    async def subscribe_host(self, host: str, *, events: bool = True) -> None:
        """Subscribe to ``host``'s result, event and status topics (before publishing!)."""
        await self._subscribe(self.conn.topic(host, "result"))
        if events:
            await self._subscribe(self.conn.topic(host, "event"))
        await self._subscribe(self.conn.topic(host, "status"))

    async def _subscribe(self, topic: str) -> None:
        try:
            await self.client.subscribe(topic, qos=1)
        except TransportError as exc:
            raise self.lost(Lost(str(exc))) from None

    async def subscribe(self, topic: str) -> None:
        await self._subscribe(topic)

    async def publish_task(self, host: str, payload: bytes) -> None:
        try:
            await self.client.publish(self.conn.topic(host, "task"), payload, qos=2)
        except TransportError as exc:
            raise self.lost(Lost(str(exc))) from None

    async def check_online(self, host: str, *, force: bool) -> dict[str, Any] | None:
        """Wait up to ``conn.wait`` for ``host``'s retained presence and insist it is online.

        ``draining`` is accepted: the agent answers every task then (``busy``), which is a
        clearer outcome than refusing here. ``--force`` sends to an offline or unknown agent
        anyway: its persistent session queues the task until it returns (protocol §1.3).
        """
        deadline = asyncio.get_running_loop().time() + self.conn.wait
        while host not in self.presence:
            item = await self.next(deadline)
            if item is None:
                break
            if isinstance(item, Lost):
                raise self.lost(item)
            if isinstance(item, Interrupt):
                raise CliError(INTERRUPTED, "interrupted")
        doc = self.presence.get(host)
        if force:
            return doc
        anyway = self.conn.again_with("--send-offline")
        if doc is None:
            raise CliError(
                OFFLINE,
                f"no agent named {host!r}: nothing retained on {self.conn.topic(host, 'status')}"
                f"; check the name with: {self.conn.command('status')}"
                f"; to send anyway (its session keeps the task), {anyway}",
            )
        if doc.get("state") == "offline":
            raise CliError(
                OFFLINE,
                f"host {host!r} is offline (its retained status says so; the agent last started"
                f" {doc.get('since', '?')}); to queue the task for when it returns, {anyway}",
            )
        return doc

    async def wait_result(
        self,
        host: str,
        task_id: str,
        *,
        limit: float | None,
        on_item: Callable[[Message], None] | None = None,
        on_interrupt: Callable[[Interrupt], Awaitable[None]] | None = None,
        cancellable: bool = True,
    ) -> Message:
        """Read the inbox until ``host`` publishes the result for ``task_id``.

        Every other message goes to ``on_item`` (events, other results). Ctrl-C goes to
        ``on_interrupt`` when given (it may raise to leave), else it ends the wait. Ends with a
        :class:`CliError` on Ctrl-C (130), a lost broker (2), the agent going offline without
        answering (3) or after ``limit`` seconds (4); the message says how to cancel the task
        when it is ``cancellable`` (not a ``status`` or a ``cancel``).
        """
        cancel = self.cancel_command(task_id, host)
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        offline_at: float | None = None
        while True:
            until = deadline
            if offline_at is not None:
                until = min(offline_at + OFFLINE_GRACE, until or float("inf"))
            item = await self.next(until)
            if item is None:
                if offline_at is not None and (deadline is None or loop.time() < deadline):
                    raise CliError(
                        OFFLINE,
                        f"host {host!r} went offline before answering task {task_id!r};"
                        " it runs when the agent returns (its session keeps the task)",
                    )
                raise CliError(
                    TIMEOUT,
                    f"no result for task {task_id!r} from {host!r} within {limit or 0:g} s"
                    + (f"; it may still run (cancel it with: {cancel})" if cancellable else ""),
                )
            if isinstance(item, Lost):
                raise self.lost(item)
            if isinstance(item, Interrupt) and on_interrupt is not None:
                await on_interrupt(item)
                continue
            if isinstance(item, Interrupt):
                raise CliError(
                    INTERRUPTED,
                    f"interrupted: task {task_id!r} keeps running on {host!r}"
                    f" (cancel it with: {cancel})"
                    if cancellable
                    else f"interrupted before {host!r} answered task {task_id!r}",
                )
            if item.kind == "result" and item.host == host and item.id == task_id:
                return item
            if item.kind == "status" and item.host == host and not item.retained:
                # A change while we wait (a retained copy is the state we already checked,
                # and with --force an offline agent is expected to come back).
                state = item.doc.get("state")
                offline_at = loop.time() if state == "offline" else None
            if on_item is not None:
                on_item(item)

    def cancel_command(self, task_id: str, host: str) -> str:
        """The command that cancels ``task_id`` on ``host``, with every connection option the
        user gave (a hint to paste as it is)."""
        return self.conn.command("cancel", task_id, "--host", host)

    async def gather_presence(self) -> dict[str, dict[str, Any]]:
        """All retained presence messages seen within ``conn.wait`` (``status`` without HOST)."""
        await self._subscribe(self.conn.topic("+", "status"))
        deadline = asyncio.get_running_loop().time() + self.conn.wait
        while (item := await self.next(deadline)) is not None:
            if isinstance(item, Lost):
                raise self.lost(item)
            if isinstance(item, Interrupt):
                break
        return dict(self.presence)


@contextlib.asynccontextmanager
async def open_session(conn: Connection) -> AsyncIterator[Session]:
    """Connect (exit 2 with the broker's address and the reason when that fails), start the
    pump, route Ctrl-C into the inbox; on exit disconnect cleanly."""
    client = ToolClient(
        conn.host,
        conn.port,
        client_id=Connection.client_id(),
        protocol=conn.protocol,
        username=conn.username,
        password=conn.password,
        tls=conn.tls,
    )
    started = time.monotonic()
    try:
        await client.__aenter__()
    except TransportError as exc:
        reason = str(exc) or f"timed out after {time.monotonic() - started:.0f} s"
        raise CliError(BROKER, f"cannot reach the MQTT broker at {conn.where}: {reason}") from None
    session = Session(conn=conn, client=client)
    loop = asyncio.get_running_loop()
    handled = False
    try:
        loop.add_signal_handler(signal.SIGINT, session._on_sigint)
        handled = True
    except (NotImplementedError, RuntimeError):  # not the main thread
        pass
    pump = asyncio.create_task(session._pump(), name="asyncmigfra.console.pump")
    try:
        yield session
    finally:
        if handled:
            loop.remove_signal_handler(signal.SIGINT)
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        with contextlib.suppress(TransportError):
            await client.__aexit__(None, None, None)
