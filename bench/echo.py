"""A bare aiomqtt echo client: the floor of what the agent's MQTT stack costs per task.

``python -m bench.echo --port P --host NAME [--no-events] [--event-qos Q] [--await-each]
[--durable DIR]`` subscribes to
``fast/migfra/NAME/task`` at QoS 2 (as the agent does) and answers each task with a canned
``accepted`` and ``done`` event (QoS 1 unless ``--event-qos``) and a canned result (QoS 1), the
agent's packet pattern for a ``start vm`` on the ``dummy`` hypervisor, without parsing, journal
or dispatch: the task's id is cut from its first line (the load generator puts it there).
By default every publish is handed to aiomqtt in order and awaited in its own task
(pipelined), so the echo never waits for one acknowledgement before the next task: the
stronger reference. With ``--await-each`` it awaits each publish (its acknowledgement at QoS
1) before the next and before reading the next task, as the plainest aiomqtt program does;
that is most likely how the issue's reference echo (1.63 ms, 911 tasks/s) was written. It
says ``online`` on the retained status topic once subscribed, as the agent does.

With ``--durable DIR`` each task is first written to a file in DIR and ``fdatasync``-ed (in a
thread, the loop free meanwhile) before any of its answer: the floor of the agent's promise
(``accepted`` only once the task is durable) on this disk, with none of the agent's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
from pathlib import Path

import aiomqtt

PROTOCOL = os.environ.get("BENCH_MQTT_PROTOCOL", "5")

#: What the agent sends for a ``start vm`` of one VM, with a fixed time (the same sizes).
_ACCEPTED = (
    '---\nevent: accepted\nid: {id}\nhost: {host}\ntime: "2026-01-01T00:00:00.000Z"\n'
    "task: start vm\nvm-names:\n  - vm-1\n...\n"
)
_DONE = (
    '---\nevent: done\nid: {id}\nhost: {host}\ntime: "2026-01-01T00:00:00.000Z"\n'
    "vm-name: vm-1\nstatus: success\nduration: 7.5e-05\n...\n"
)
_RESULT = "---\nresult: vm started\nlist:\n  - vm-name: vm-1\n    status: success\nid: {id}\n...\n"


class DurableLog:
    """Append a record and ``fdatasync`` it: one durable write, as the journal's per task."""

    def __init__(self, directory: Path) -> None:
        self._fd = os.open(directory / "echo.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def append(self, record: bytes) -> None:
        os.write(self._fd, record)
        os.fdatasync(self._fd)


async def serve(
    port: int,
    host: str,
    *,
    events: bool,
    event_qos: int,
    await_each: bool = False,
    durable: Path | None = None,
) -> None:
    log = DurableLog(durable) if durable is not None else None
    prefix = f"fast/migfra/{host}"
    protocol = aiomqtt.ProtocolVersion.V5 if PROTOCOL == "5" else aiomqtt.ProtocolVersion.V311
    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=f"echo-{host}",
        protocol=protocol,
        max_inflight_messages=1000,
        # As the agent: without it every QoS 1/2 exchange can stall on delayed ACKs.
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    ) as client:
        client.pending_calls_threshold = 1_000_000
        await client.subscribe(f"{prefix}/task", qos=2)
        await client.publish(f"{prefix}/status", b"state: online\n", qos=1, retain=True)

        async def answer_after_write(payload: bytes, answer: list[tuple[str, str, int]]) -> None:
            assert log is not None
            await asyncio.to_thread(log.append, payload)
            for topic, text, qos in answer:
                tg.create_task(client.publish(topic, text.encode(), qos=qos))

        async with asyncio.TaskGroup() as tg:
            async for message in client.messages:
                payload = message.payload
                assert isinstance(payload, bytes)
                tid = payload[4 : payload.index(b"\n")].decode()
                answer = []
                if events:
                    answer.append((f"{prefix}/event", _ACCEPTED, event_qos))
                    answer.append((f"{prefix}/event", _DONE, event_qos))
                answer.append((f"{prefix}/result", _RESULT, 1))
                if log is not None:
                    filled = [(t, text.format(id=tid, host=host), q) for t, text, q in answer]
                    if await_each:
                        await asyncio.to_thread(log.append, payload)
                        for topic, body, qos in filled:
                            await client.publish(topic, body.encode(), qos=qos)
                    else:
                        tg.create_task(answer_after_write(payload, filled))
                    continue
                for topic, text, qos in answer:
                    body = text.format(id=tid, host=host).encode()
                    if await_each:
                        await client.publish(topic, body, qos=qos)
                    else:
                        tg.create_task(client.publish(topic, body, qos=qos))


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.echo")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--no-events", action="store_true")
    p.add_argument("--event-qos", type=int, default=1, choices=(0, 1, 2))
    p.add_argument("--await-each", action="store_true", help="await each publish in turn")
    p.add_argument("--durable", type=Path, help="fdatasync each task to a file here first")
    args = p.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        events = not args.no_events
        asyncio.run(
            serve(
                args.port,
                args.host,
                events=events,
                event_qos=args.event_qos,
                await_each=args.await_each,
                durable=args.durable,
            )
        )


if __name__ == "__main__":
    main()
