"""``asyncmigfra demo``: two agents on fake hosts, a VM started, live-migrated and stopped.

Everything goes through a real MQTT broker exactly as a scheduler would use it: an embedded
amqtt broker in this process (MQTT 3.1.1 only; a core dependency, so a plain ``pip install``
runs the demo) unless ``--broker HOST[:PORT]`` names one. The two agents (``host-a``,
``host-b``) share one simulated cluster (the ``fake`` hypervisor), so the VM really leaves
host-a and runs on host-b afterwards.

A broker that cannot be reached (or refuses us) ends the demo at once with
:class:`DemoError`, which the CLI prints as one line and exit code 2, as the client commands
do: a probe connects before any agent starts, because an agent would keep reconnecting.

``asyncmigfra demo --serve`` runs the same two agents with a few VMs and no scenario, until
SIGINT/SIGTERM: a cluster to try the client commands on (``status``, ``migrate --follow``,
``watch``), and what the terminal tests drive. ``--topic-prefix`` lets several such clusters
share one broker without seeing each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Any

from asyncmigfra.app import Agent
from asyncmigfra.logs import configure_logging
from asyncmigfra.progresstext import ShownPercent, progress_parts
from asyncmigfra.settings import (
    HypervisorSettings,
    LoggingSettings,
    Settings,
    default_settings,
)
from asyncmigfra.terminal import fit, safe
from asyncmigfra.transport.mqtt import ToolClient, TransportError

__all__ = ["SERVE_DOMAINS", "DemoError", "run_demo", "run_serve"]

VM = "demo-vm"
#: ms, the demo migration's ``max-downtime``.
MAX_DOWNTIME = 300
GIB = 1024 * 1024  # KiB
#: s the agents get to come online on the broker.
READY_TIMEOUT = 10.0
#: s the demo waits for each task's result.
RESULT_TIMEOUT = 20.0
#: What ``--mqtt-protocol 5`` without ``--broker`` is told.
EMBEDDED_V5 = (
    "the embedded broker (amqtt) speaks only MQTT 3.1.1: drop --mqtt-protocol 5,"
    " or name an MQTT 5 broker with --broker HOST[:PORT]"
)


class DemoError(Exception):
    """Ends the demo before or instead of its scenario: the CLI prints the one-line message
    (escaped) and exits 2, like a client command that cannot reach the broker."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def embedded_broker(port: int | None = None) -> AsyncIterator[tuple[str, int]]:
    """An amqtt broker on loopback ``port`` (default: a free one), in this event loop (MQTT
    3.1.1 only). :class:`DemoError` when it cannot listen there."""
    import logging  # noqa: PLC0415

    from amqtt.broker import Broker  # noqa: PLC0415
    from amqtt.errors import BrokerError  # noqa: PLC0415

    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.ERROR)
    port = port or _free_port()
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    amqtt_log = logging.getLogger("amqtt")
    amqtt_log.setLevel(logging.CRITICAL)  # a port in use is our one line, not its traceback
    try:
        await broker.start()
    except BrokerError as exc:
        raise DemoError(f"cannot listen on 127.0.0.1:{port}: {exc.__cause__ or exc}") from None
    finally:
        amqtt_log.setLevel(logging.ERROR)
    try:
        yield "127.0.0.1", port
    finally:
        await broker.shutdown()


async def _broker(
    stack: contextlib.AsyncExitStack,
    broker: tuple[str, int] | None,
    *,
    port: int | None,
    protocol: str | None,
) -> tuple[str, int, str]:
    """(host, port, protocol) of the broker the demo uses: the embedded one (started on
    ``stack``), else ``broker`` after a probe connection succeeded (MQTT 5 unless
    ``protocol`` says otherwise)."""
    if broker is None:
        if protocol == "5":
            raise DemoError(EMBEDDED_V5)
        host, listening = await stack.enter_async_context(embedded_broker(port))
        return host, listening, "3.1.1"
    host, port = broker
    protocol = protocol or "5"
    started = time.monotonic()
    client = ToolClient(
        host, port, client_id=f"demo-probe-{uuid.uuid4().hex[:6]}", protocol=protocol
    )
    try:
        async with client:
            pass
    except TransportError as exc:
        reason = str(exc) or f"timed out after {time.monotonic() - started:.0f} s"
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise DemoError(f"cannot reach the MQTT broker at {where}: {reason}") from None
    return host, port, protocol


async def _online(agents: list[Agent], where: str) -> str | None:
    """Wait until every agent is online; else what went wrong (the caller stops them)."""
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            for a in agents:
                await a.ready.wait()
    except TimeoutError:
        return (
            f"the agents did not come online within {READY_TIMEOUT:g} s"
            f" on the MQTT broker at {where}"
        )
    return None


async def _stop(agents: list[Agent], runs: list[asyncio.Task[int]]) -> list[int]:
    """Stop the agents gracefully and wait for them, also when the demo itself failed (its
    output pipe closed, say): cancelled, they would log warnings about their torn session."""
    for a in agents:
        a.request_stop()
    return [await r for r in runs]


def agent_settings(
    name: str,
    host: str,
    port: int,
    *,
    protocol: str,
    options: Mapping[str, object],
    prefix: str = "fast/migfra",
    state_dir: str = "none",
) -> Settings:
    base = default_settings(hostname=name)
    mqtt = replace(
        base.mqtt,
        host=host,
        port=port,
        protocol=protocol,  # type: ignore[arg-type]
        client_id=f"asyncmigfra-demo-{name}-{uuid.uuid4().hex[:6]}",
        reconnect_min_delay=0.1,
        reconnect_max_delay=1.0,
        task_topic=f"{prefix}/{name}/task",
        result_topic=f"{prefix}/{name}/result",
        event_topic=f"{prefix}/{name}/event",
        status_topic=f"{prefix}/{name}/status",
    )
    return replace(
        base,
        mqtt=mqtt,
        hypervisor=HypervisorSettings(type="fake", options=dict(options)),
        agent=replace(base.agent, progress_interval=0.25, state_dir=state_dir),
        logging=LoggingSettings(level="warning"),
        shutdown=replace(base.shutdown, grace_period=5.0),
    )


#: The VMs ``--serve`` defines on host-a: a typical live migration (web-1: 2 GiB, a few
#: seconds), a small one, a big busy one that takes minutes at a low ``--bandwidth`` (to try
#: Ctrl-C / cancel on), and a shut-off one to start.
SERVE_DOMAINS: tuple[Mapping[str, object], ...] = (
    {"name": "web-1", "vcpus": 2, "memory": 2 * GIB, "state": "running", "dirty-rate": 50},
    {"name": "web-2", "vcpus": 1, "memory": 1 * GIB, "state": "running", "dirty-rate": 10},
    {"name": "db-1", "vcpus": 4, "memory": 16 * GIB, "state": "running", "dirty-rate": 40},
    {"name": "batch-1", "vcpus": 1, "memory": 1 * GIB, "state": "shutoff"},
)


async def run_serve(
    *,
    broker: tuple[str, int] | None = None,
    prefix: str = "fast/migfra",
    port: int | None = None,
    protocol: str | None = None,
) -> int:
    """Run agents host-a (with :data:`SERVE_DOMAINS`) and host-b until SIGINT or SIGTERM.

    ``broker``: (host, port) of an MQTT broker, else an embedded one on loopback ``port``
    (default: a free port). Prints where they are and how to reach them, then ``ready`` once
    both are online (a line scripts and tests can wait for). Exit 0 after both agents shut
    down gracefully; :class:`DemoError` when the broker cannot be reached.
    """
    configure_logging(LoggingSettings(level="warning", format="console"))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with contextlib.AsyncExitStack() as stack:
            host, port, protocol = await _broker(stack, broker, port=port, protocol=protocol)
            # Journals for the run (so `asyncmigfra history` has something to show), gone
            # with it.
            state = stack.enter_context(tempfile.TemporaryDirectory(prefix="asyncmigfra-demo-"))
            spec = {"cpus": 16, "memory": 64 * GIB}
            common = {"bandwidth": 1000, "time-scale": 1.0}
            opts_a = {
                "host": "host-a",
                "peers": {"host-b": spec},
                "domains": [dict(d) for d in SERVE_DOMAINS],
                **spec,
                **common,
            }
            opts_b = {"host": "host-b", "peers": {"host-a": spec}, **spec, **common}
            shared: dict[str, object] = {}
            agents = [
                Agent(
                    agent_settings(
                        name,
                        host,
                        port,
                        protocol=protocol,
                        options=opts,
                        prefix=prefix,
                        state_dir=f"{state}/{name}",
                    ),
                    shared=shared,
                )
                for name, opts in (("host-a", opts_a), ("host-b", opts_b))
            ]
            async with asyncio.TaskGroup() as tg:
                runs = [
                    tg.create_task(a.run(), name=f"demo.serve[{a.settings.hostname}]")
                    for a in agents
                ]
                try:
                    failed = await _online(agents, f"{host}:{port}")
                    if failed is None:
                        _serve_banner(host, port, protocol, prefix)
                        await stop.wait()
                finally:
                    codes = await _stop(agents, runs)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if failed is not None:
        raise DemoError(failed)
    return 0 if not any(codes) else 1


def _serve_banner(host: str, port: int, protocol: str, prefix: str) -> None:
    opts = f"--broker {host}:{port}"
    if protocol != "5":
        opts += f" --mqtt-protocol {protocol}"
    if prefix != "fast/migfra":
        opts += f" --topic-prefix {prefix}"
    vms = ", ".join(
        f"{d['name']} ({int(str(d['memory'])) // GIB} GiB, {d['state']})" for d in SERVE_DOMAINS
    )
    print(
        f"agents host-a and host-b (fake hypervisor) on {host}:{port} (MQTT {protocol}),"
        f" topics {prefix}/<host>/...\n"
        f"VMs on host-a: {vms}\n"
        f"try: asyncmigfra {opts} status\n"
        f"     asyncmigfra {opts} migrate web-1 --from host-a --to host-b --live --follow\n"
        f"     asyncmigfra {opts} watch\n"
        "SIGINT or SIGTERM stops them.\nready",
        flush=True,
    )


def _bar(percent: float, width: int = 12) -> str:
    filled = int(width * min(100.0, max(0.0, percent)) / 100)
    return "#" * filled + "-" * (width - filled)


class _Console:
    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet

    """The demo's output: its own lines with values from the broker (a foreign broker with
    ``--broker``), each escaped as the CLI escapes them (``asyncmigfra.terminal``)."""

    def say(self, text: str) -> None:
        if not self.quiet:
            print(_shown(text), flush=True)

    def result(self, text: str) -> None:
        print(_shown(text), flush=True)


def _shown(text: str) -> str:
    """Each line escaped: the demo's own line breaks stay, nothing from the wire acts."""
    return "\n".join(safe(line) for line in text.split("\n"))


async def run_demo(
    *,
    broker: tuple[str, int] | None = None,
    quiet: bool = False,
    port: int | None = None,
    protocol: str | None = None,
) -> int:
    """The scenario: 0 when every task succeeded, 1 when one failed; :class:`DemoError`
    when the broker cannot be reached or stops answering."""
    configure_logging(LoggingSettings(level="warning", format="console"))
    started = time.monotonic()
    out = _Console(quiet=quiet)
    async with contextlib.AsyncExitStack() as stack:
        host, port, protocol = await _broker(stack, broker, port=port, protocol=protocol)
        if broker is None:
            out.say(f"embedded MQTT broker (amqtt, MQTT 3.1.1) on {host}:{port}")
        else:
            out.say(f"using MQTT broker {host}:{port} (MQTT {protocol})")
        code = await _scenario(host, port, protocol, out)
    out.say(f"demo finished in {time.monotonic() - started:.1f} s")
    return code


async def _scenario(host: str, port: int, protocol: str, out: _Console) -> int:
    shared: dict[str, object] = {}
    host_spec = {"cpus": 16, "memory": 64 * GIB}
    opts_a = {
        "host": "host-a",
        "peers": {"host-b": host_spec},
        "bandwidth": 1000,
        "time-scale": 1.0,
        "domains": [
            {"name": VM, "vcpus": 2, "memory": 2 * GIB, "state": "shutoff", "dirty-rate": 120}
        ],
    }
    opts_b = {
        "host": "host-b",
        "peers": {"host-a": host_spec},
        "bandwidth": 1000,
        "time-scale": 1.0,
    }
    agents = [
        Agent(
            agent_settings("host-a", host, port, protocol=protocol, options=opts_a), shared=shared
        ),
        Agent(
            agent_settings("host-b", host, port, protocol=protocol, options=opts_b), shared=shared
        ),
    ]
    ok = False
    async with asyncio.TaskGroup() as tg:
        runs = [tg.create_task(a.run(), name=f"demo.agent[{a.settings.hostname}]") for a in agents]
        failed = await _online(agents, f"{host}:{port}")
        try:
            if failed is None:
                out.say(
                    "agents host-a and host-b are online (fake hypervisor, one simulated cluster)"
                )
                ok = await _drive(host, port, protocol, out)
        except* TransportError as group:
            failed = f"lost the MQTT broker at {host}:{port}: {group.exceptions[0]}"
        except* TimeoutError:
            failed = f"no result within {RESULT_TIMEOUT:g} s from the agents at {host}:{port}"
        finally:
            codes = await _stop(agents, runs)
    if failed is not None:
        raise DemoError(failed)
    return 0 if ok and not any(codes) else 1


async def _drive(host: str, port: int, protocol: str, out: _Console) -> bool:
    from asyncmigfra.wire.parsing import load_yaml  # noqa: PLC0415

    client = ToolClient(
        host, port, client_id=f"demo-client-{uuid.uuid4().hex[:6]}", protocol=protocol
    )
    async with client:
        await client.subscribe("fast/migfra/+/result", qos=1)
        await client.subscribe("fast/migfra/+/event", qos=0)
        results: dict[str, dict[str, Any]] = {}
        shown: dict[str, ShownPercent] = {}
        waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}

        async def pump() -> None:
            async for msg in client.messages():
                doc = load_yaml(msg.payload)
                if not isinstance(doc, dict):
                    continue
                if msg.topic.endswith("/result"):
                    tid = str(doc.get("id", ""))
                    doc["__raw__"] = msg.payload.decode()
                    results[tid] = doc
                    fut = waiters.pop(tid, None)
                    if fut is not None and not fut.done():
                        fut.set_result(doc)
                elif doc.get("event") == "progress":
                    # The CLI's words and percent (asyncmigfra.progresstext), 80 columns.
                    pct = shown.setdefault(str(doc.get("id")), ShownPercent()).feed(doc)
                    head = f"  [{doc.get('host')}] {doc.get('vm-name')} {_bar(pct)} "
                    parts = progress_parts(doc, pct, maximum=MAX_DOWNTIME, phase=False)
                    out.say(head + fit(parts, 80 - len(safe(head))))
                elif doc.get("event") in {"phase", "error"}:
                    extra = doc.get("phase") or f"{doc.get('code')}: {doc.get('details')}"
                    out.say(
                        f"  [{doc.get('host')}] {doc.get('vm-name', '')} {doc['event']}: {extra}"
                    )

        async def call(target: str, body: str, label: str) -> dict[str, Any]:
            tid = f"demo-{uuid.uuid4().hex[:8]}"
            fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            waiters[tid] = fut
            out.say(f"\n>>> {label} (id {tid}) -> fast/migfra/{target}/task")
            await client.publish(f"fast/migfra/{target}/task", f"id: {tid}\n{body}".encode(), qos=2)
            async with asyncio.timeout(RESULT_TIMEOUT):
                doc = await fut
            out.result(_summarise(doc))
            return doc

        async with asyncio.TaskGroup() as tg:
            pumper = tg.create_task(pump(), name="demo.pump")
            try:
                r1 = await call(
                    "host-a",
                    f"task: start vm\nvm-configurations:\n  - vm-name: {VM}\n"
                    "    probe-with-ssh: false\n    time-measurement: true\n",
                    f"start {VM} on host-a",
                )
                r2 = await call(
                    "host-a",
                    f"task: migrate vm\nvm-name: {VM}\ndestination: host-b\n"
                    "time-measurement: true\nparameter:\n  migration-type: live\n"
                    f"  max-downtime: {MAX_DOWNTIME}\n",
                    f"live-migrate {VM} host-a -> host-b",
                )
                r3 = await call("host-b", "task: status\n", "status of host-b")
                r4 = await call(
                    "host-b",
                    f"task: stop vm\nlist:\n  - vm-name: {VM}\n    force: true\n",
                    f"stop {VM} on host-b",
                )
            finally:
                pumper.cancel()
    ok = all(_ok(r) for r in (r1, r2, r4)) and any(
        e.get("vm-name") == VM and e.get("state") == "running" for e in r3.get("list") or []
    )
    out.result("\nRESULT: " + ("all tasks succeeded" if ok else "something failed"))
    return ok


def _ok(doc: Mapping[str, Any]) -> bool:
    if "list" in doc:
        return all(e.get("status") == "success" for e in doc["list"] or [])
    return doc.get("status") == "success"


def _summarise(doc: Mapping[str, Any]) -> str:
    return "<<< result:\n" + str(doc.get("__raw__", doc)).strip()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(asyncio.run(run_demo()))
