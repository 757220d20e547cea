#!/usr/bin/env python3
"""A minimal asyncmigfra client: send one migration, print its progress until the result.

This is what a scheduler does, in about a hundred lines, using only aiomqtt and PyYAML
(``pip install aiomqtt pyyaml``), so you can copy it into your own code. The rules it
follows are the protocol's checklist (docs/protocol.md section 10):

1. subscribe to the source host's ``result`` and ``event`` topics *before* publishing;
2. give the task a unique ``id`` and publish it with QoS 2 to ``<prefix>/<source>/task``;
3. keep only messages with that id: ``progress`` (and other) events while it runs, then
   exactly one result (results are at-least-once: stop at the first);
4. read every payload with ``yaml.safe_load``: agents publish one YAML document each.

A migration's events and result come from the *source* agent.

Usage::

    python examples/client.py web-1 --from host-a --to host-b \\
        [--broker localhost:1883] [--type live] [--prefix fast/migfra] [--mqtt-protocol 5]

Exit code 0 when the VM was migrated, 1 when the agent reported an error, 2 when the broker
could not be reached or no result came within --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

import aiomqtt  # noqa: TID251 - a user's client, not part of the package
import yaml

MIB = 1024 * 1024


def describe(event: dict) -> str:
    """One line per event."""
    kind = event.get("event")
    if kind == "progress":
        line = f"{event.get('percent', 0):5.1f} %  pass {event.get('iteration', 0)}"
        if "data-remaining" in event:
            line += f"  remaining {event['data-remaining'] / MIB:.1f} MiB"
        if "transfer-rate" in event:
            line += f"  rate {event['transfer-rate'] / MIB:.1f} MiB/s"
        if "dirty-rate" in event:
            line += f"  dirty {event['dirty-rate'] / MIB:.1f} MiB/s"
        if "expected-downtime" in event:
            line += f"  expected downtime {event['expected-downtime']} ms"
        if "action" in event:
            line += f"  action: {event['action']}"
        if "downtime" in event:
            line += f"  downtime {event['downtime']} ms"
        return f"progress  {line}"
    if kind == "phase":
        return f"phase     {event.get('phase')}"
    if kind in ("error", "rejected"):
        return f"{kind:<9} {event.get('code')}: {event.get('details')}"
    if kind == "done":
        return f"done      {event.get('status')} in {event.get('duration')} s"
    return f"{kind:<9} {event.get('task', '')}"


async def migrate(args: argparse.Namespace) -> int:
    host, _, port = args.broker.partition(":")
    source = f"{args.prefix}/{args.source}"
    task_id = f"client-{uuid.uuid4().hex[:8]}"
    task = {
        "task": "migrate vm",
        "id": task_id,
        "vm-name": args.vm,
        "destination": args.destination,
        "time-measurement": True,
        "parameter": {"migration-type": args.type},
    }
    version = (
        aiomqtt.ProtocolVersion.V5 if args.mqtt_protocol == "5" else aiomqtt.ProtocolVersion.V311
    )
    async with aiomqtt.Client(host, int(port or 1883), protocol=version) as client:
        await client.subscribe(f"{source}/result", qos=1)
        await client.subscribe(f"{source}/event", qos=1)
        await client.publish(f"{source}/task", yaml.safe_dump(task, sort_keys=False), qos=2)
        print(f"sent {task_id}: migrate {args.vm} from {args.source} to {args.destination}")
        async for message in client.messages:
            doc = yaml.safe_load(message.payload)
            if not isinstance(doc, dict) or str(doc.get("id")) != task_id:
                continue  # another task's message
            if message.topic.matches(f"{source}/event"):
                print(describe(doc), flush=True)
                continue
            print("result:")
            print(message.payload.decode().rstrip())
            return 0 if doc.get("status") == "success" else 1
    return 2  # pragma: no cover - the loop only ends with the connection


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("vm")
    p.add_argument("--from", dest="source", required=True, help="source host (its agent)")
    p.add_argument("--to", dest="destination", required=True, help="destination host")
    p.add_argument("--type", default="live", choices=["live", "warm", "post-copy", "offline"])
    p.add_argument("--broker", default="localhost:1883", help="HOST[:PORT]")
    p.add_argument("--prefix", default="fast/migfra", help="topic prefix")
    p.add_argument("--mqtt-protocol", default="5", choices=["5", "3.1.1"])
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the result")
    args = p.parse_args()

    async def run() -> int:
        async with asyncio.timeout(args.timeout):
            return await migrate(args)

    try:
        return asyncio.run(run())
    except aiomqtt.MqttError as exc:
        print(f"MQTT error ({args.broker}): {exc}", file=sys.stderr)
    except TimeoutError:
        print(f"no result within {args.timeout} s", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
