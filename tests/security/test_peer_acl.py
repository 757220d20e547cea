"""Messages between agents and to the MPI processes under the example ACL (hostile review).

A real mosquitto runs with ``config/mosquitto.example.conf`` and ``config/mosquitto.acl.example``
as shipped, except that its two commented pscom lines for the agents are uncommented (as an
operator who uses the pscom hook does), with TLS, client certificates and a password per user:
three agents (``peer-node1..3``), ``scheduler``, ``monitor`` and the MPI processes of one VM
(user ``peer-vm1``). Real agents run in this event loop. What the tests show:

* neither another agent's credentials nor the read-only ``monitor`` can hold a lane, ask for a
  hook, answer a hook or lane request, or acknowledge a pscom ``suspend`` in another's name:
  the broker drops each such publish (its log says so) and nothing happens on the agent;
* what another agent may send in its own name is checked by the agent: a JSON ``source``
  naming someone else, a hostile ``vm-name``, a release of someone else's hold change nothing;
* the legitimate paths work: a lane hold between two agents (``hold_peer_lane`` over the
  agent's own transport), a destination hook request and its answer, and the VM's processes'
  acknowledgements.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from certs import Pki, make_pki
from test_tls_acl import QUIET, ROOT, SecureBroker, listening, need, secure_broker_running

from asyncmigfra.errors import HookFailed
from asyncmigfra.peers.lanes import hold_peer_lane
from asyncmigfra.peers.pscom import PscomHook
from asyncmigfra.settings import Settings, settings_from_text
from harness import running_agent

pytestmark = pytest.mark.broker

NODE1, NODE2, NODE3 = "peer-node1", "peer-node2", "peer-node3"
VM_USER = "peer-vm1"
USERS = (NODE1, NODE2, NODE3, "scheduler", "monitor", VM_USER)


def hostile(where: Path) -> str:
    """The hostile review's VM name."""
    return f"../../etc/cron.d/x\n$(touch {where / 'pwned'})"


def acl_with_pscom() -> str:
    """The example ACL with its commented pscom lines for the agents uncommented, and its
    commented VM-user block filled in for ``VM_USER``, as its comments tell an operator."""
    lines = (ROOT / "config" / "mosquitto.acl.example").read_text().splitlines()
    out = [
        line[1:]
        if line.startswith("#pattern ") and " fast/pscom/" in line
        else line[1:].replace("<vm>", VM_USER)
        if line.startswith(("#user <vm>", "#topic deny ")) and line.endswith("<vm>")
        else line
        for line in lines
    ]
    assert sum(a != b for a, b in zip(lines, out, strict=True)) == 9, "the example changed"
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def peer_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    need("openssl", "TLS tests make their certificates with it")
    return make_pki(tmp_path_factory.mktemp("peer-pki"), USERS)


@pytest.fixture(scope="module")
def broker(peer_pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    directory = tmp_path_factory.mktemp("peer-broker")
    with secure_broker_running(peer_pki, directory, USERS, acl_with_pscom()) as sb:
        yield sb


def agent_settings(sb: SecureBroker, name: str, extra: str = "") -> Settings:
    """An agent's configuration as an operator writes it (docs/security.md)."""
    pair = sb.pki.clients[name]
    secret = sb.directory / f"{name}-{uuid.uuid4().hex[:6]}.password"
    secret.write_text(sb.passwords[name] + "\n")
    secret.chmod(0o600)
    text = (
        "communicator:\n"
        "  host: 127.0.0.1\n"
        f"  port: {sb.port}\n"
        "  username: <hostname>\n"
        f"  password-file: {secret.name}\n"
        "  reconnect-min-delay: 0.05\n"
        "  reconnect-max-delay: 0.5\n"
        "  tls:\n"
        f"    ca-file: {sb.pki.ca}\n"
        f"    cert-file: {pair.cert}\n"
        f"    key-file: {pair.key}\n"
        "hypervisor:\n"
        "  type: dummy\n"
        "agent:\n"
        "  state-dir: none\n"
        "shutdown:\n"
        "  grace-period: 5\n"
        "pscom-handler:\n"
        "  timeout: 1\n" + extra
    )
    return settings_from_text(text, hostname=name, base_dir=sb.directory, source="agent.yaml")


def lane_request(op: str, hold_id: str, vm: str = "web-1", **extra: str) -> bytes:
    doc = {"op": op, "request-id": uuid.uuid4().hex, "hold-id": hold_id, "vm-name": vm} | extra
    return json.dumps(doc).encode()


def client(sb: SecureBroker, user: str) -> tuple[Any, str]:
    client_id = f"{user}-{uuid.uuid4().hex[:6]}"
    return sb.client(user, client_id=client_id), client_id


async def settle(predicate: Any = None, timeout: float = 5.0) -> None:
    """Wait (bounded) for ``predicate``, then :data:`QUIET` s for what must not come."""
    if predicate is not None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)
    await asyncio.sleep(QUIET)


# --------------------------------------------------------------------------------------------
# Lane holds


async def test_nobody_can_hold_renew_release_or_answer_in_another_agents_name(broker):
    sb = broker
    lanes = f"fast/migfra/{NODE1}/lane"
    node2, node2_id = client(sb, NODE2)
    mon, mon_id = client(sb, "monitor")
    async with (
        running_agent(agent_settings(sb, NODE1)) as agent1,
        running_agent(agent_settings(sb, NODE3)) as agent3,
        listening(mon, "fast/migfra/#") as monitor,
        listening(node2, f"fast/migfra/{NODE2}/lane-response/+") as forger,
    ):
        # Forged holds: in the monitor's own name, in another agent's name (both dropped by
        # the broker), and in node2's own name with node3 in the JSON (refused by the agent).
        await monitor.client.publish(f"{lanes}/monitor", lane_request("hold", "m1"), qos=1)
        await monitor.client.publish(f"{lanes}/{NODE3}", lane_request("hold", "m2"), qos=1)
        await forger.client.publish(f"{lanes}/{NODE3}", lane_request("hold", "f1"), qos=1)
        await forger.client.publish(
            f"{lanes}/{NODE2}", lane_request("hold", "f2", source=NODE3), qos=1
        )
        await settle(lambda: forger.received)
        assert agent1.lanes.holds == {}
        (refusal,) = [json.loads(m.payload) for m in forger.received]
        assert refusal["status"] == "error"
        assert refusal["details"] == f"on {NODE1}: source '{NODE3}' is not the sender {NODE2}"
        assert len(sb.denied_publishes(mon_id)) == 2
        assert len(sb.denied_publishes(node2_id)) == 1

        # A real hold of node3's, over its own transport.
        async with hold_peer_lane(
            agent3.transport,
            task_topic=agent3.settings.mqtt.task_topic,
            hostname=NODE3,
            peer=NODE1,
            vm_name="web-1",
            mode="required",
            answer_within=5,
        ) as uncoordinated:
            assert uncoordinated is None
            ((holder, hold_id),) = agent1.lanes.holds
            assert holder == NODE3
            # The monitor sees the request (and so the hold id); node2 tries to end the hold.
            assert any(hold_id.encode() in m.payload for m in monitor.received)
            before = len(forger.received)
            await forger.client.publish(f"{lanes}/{NODE2}", lane_request("release", hold_id))
            await forger.client.publish(f"{lanes}/{NODE2}", lane_request("renew", hold_id))
            await forger.client.publish(
                f"{lanes}/{NODE2}", lane_request("release", hold_id, source=NODE3)
            )
            await monitor.client.publish(f"{lanes}/monitor", lane_request("release", hold_id))
            await settle(lambda: len(forger.received) >= before + 3)
            assert agent1.lanes.holds == {(NODE3, hold_id): "web-1"}, "the hold is node3's"
            statuses = [json.loads(m.payload)["status"] for m in forger.received[before:]]
            assert statuses == ["released", "error", "error"]  # its own (no) hold; refusals
            # A forged answer to node3 is dropped by the broker.
            forged = json.dumps({"request-id": "x", "status": "released"}).encode()
            await forger.client.publish(f"fast/migfra/{NODE3}/lane-response/{NODE1}", forged)
            await monitor.client.publish(f"fast/migfra/{NODE3}/lane-response/{NODE1}", forged)
            await settle()
            assert len(sb.denied_publishes(node2_id)) == 2
            assert len(sb.denied_publishes(mon_id)) == 4
        await settle(lambda: not agent1.lanes.holds)


async def test_nobody_can_reserve_a_destinations_nic_in_another_agents_name(broker):
    sb = broker
    inbound = f"fast/migfra/{NODE1}/inbound"
    node2, node2_id = client(sb, NODE2)
    mon, mon_id = client(sb, "monitor")

    def reserve(rid: str, **extra: str) -> bytes:
        doc = {"op": "reserve", "request-id": uuid.uuid4().hex, "reservation-id": rid}
        return json.dumps(doc | {"rate": "1000000000"} | extra).encode()

    async with (
        running_agent(agent_settings(sb, NODE1)) as agent1,
        listening(mon, "fast/migfra/#") as monitor,
        listening(node2, f"fast/migfra/{NODE2}/inbound-response/+") as forger,
    ):
        # In the monitor's own name and in another agent's name: dropped by the broker; in
        # node2's own name with node3 in the JSON: refused by the agent.
        await monitor.client.publish(f"{inbound}/monitor", reserve("m1"), qos=1)
        await forger.client.publish(f"{inbound}/{NODE3}", reserve("f1"), qos=1)
        await forger.client.publish(f"{inbound}/{NODE2}", reserve("f2", source=NODE3), qos=1)
        await settle(lambda: forger.received)
        assert agent1.inbound.reservations == {}
        (refusal,) = [json.loads(m.payload) for m in forger.received]
        assert refusal["status"] == "error"
        assert refusal["details"] == f"on {NODE1}: source '{NODE3}' is not the sender {NODE2}"
        assert len(sb.denied_publishes(mon_id)) == 1
        assert len(sb.denied_publishes(node2_id)) == 1
        # In its own name, node2 reserves for itself only (the agent knows no NIC here: the
        # rate asked is granted).
        await forger.client.publish(f"{inbound}/{NODE2}", reserve("own"), qos=1)
        await settle(lambda: len(forger.received) >= 2)
        assert agent1.inbound.reservations == {(NODE2, "own"): 1e9}
        assert json.loads(forger.received[1].payload)["status"] == "reserved"


# --------------------------------------------------------------------------------------------
# Destination hooks


def fence_hook(tmp_path: Path) -> tuple[str, Path]:
    record = tmp_path / "fence.log"
    script = tmp_path / "fence.sh"
    script.write_text(
        f'#!/bin/sh\nprintf "%s|%s\\n" "$ASYNCMIGFRA_SOURCE" "$ASYNCMIGFRA_VM_NAME" >> {record}\n'
    )
    script.chmod(0o755)
    hooks = (
        "hooks:\n"
        "  - name: fence\n"
        "    when: [before-migrate]\n"
        "    on: destination\n"
        "    timeout: 5\n"
        f"    command: [{script}]\n"
    )
    return hooks, record


def hook_request(vm: str = "web-1", **extra: str) -> bytes:
    doc = {
        "request-id": uuid.uuid4().hex,
        "hook": "fence",
        "point": "before-migrate",
        "task": "migrate vm",
        "vm-name": vm,
        "destination": NODE1,
    } | extra
    return json.dumps(doc).encode()


async def test_nobody_can_ask_for_or_answer_a_hook_in_another_agents_name(broker, tmp_path):
    sb = broker
    hooks, record = fence_hook(tmp_path)
    requests = f"fast/migfra/{NODE1}/hook"
    node2, node2_id = client(sb, NODE2)
    node3, node3_id = client(sb, NODE3)
    mon, mon_id = client(sb, "monitor")
    async with (
        running_agent(agent_settings(sb, NODE1, hooks)),
        listening(mon, "fast/migfra/#") as monitor,
        listening(node2, f"fast/migfra/{NODE2}/hook-response/+") as asker,
        listening(node3, f"fast/migfra/{NODE3}/hook-response/+") as victim,
    ):
        # Requests in someone else's name: dropped by the broker, nothing runs.
        await monitor.client.publish(f"{requests}/monitor", hook_request())
        await monitor.client.publish(f"{requests}/{NODE3}", hook_request())
        await asker.client.publish(f"{requests}/{NODE3}", hook_request())
        # In its own name but saying node3, or the hostile review's VM name: refused.
        await asker.client.publish(f"{requests}/{NODE2}", hook_request(source=NODE3))
        await asker.client.publish(f"{requests}/{NODE2}", hook_request(hostile(tmp_path)))
        # The legitimate request.
        await asker.client.publish(f"{requests}/{NODE2}", hook_request("web-2"))
        await settle(lambda: len(asker.received) >= 3)
        answers = [json.loads(m.payload) for m in asker.received]
        assert [a["status"] for a in answers] == ["error", "error", "success"]
        assert answers[0]["details"] == f"on {NODE1}: source '{NODE3}' is not the sender {NODE2}"
        assert answers[1]["details"].startswith(f"on {NODE1}: vm-name is not a valid VM name")
        assert record.read_text() == f"{NODE2}|web-2\n", "only the legitimate request ran"
        assert not (tmp_path / "pwned").exists()
        assert len(sb.denied_publishes(mon_id)) == 2
        assert len(sb.denied_publishes(node2_id)) == 1

        # Forged answers to node3, as if node1 had answered: dropped by the broker.
        forged = json.dumps({"request-id": "x", "status": "success"}).encode()
        await asker.client.publish(f"fast/migfra/{NODE3}/hook-response/{NODE1}", forged)
        await monitor.client.publish(f"fast/migfra/{NODE3}/hook-response/{NODE1}", forged)
        # Control: node1's real answer to node3's request arrives there.
        await victim.client.publish(f"{requests}/{NODE3}", hook_request("web-3"))
        await settle(lambda: victim.received)
        assert [json.loads(m.payload)["status"] for m in victim.received] == ["success"]
        assert [m.topic for m in victim.received] == [f"fast/migfra/{NODE3}/hook-response/{NODE1}"]
        assert len(sb.denied_publishes(node2_id)) == 2
        assert len(sb.denied_publishes(mon_id)) == 3
        assert sb.denied_publishes(node3_id) == []


async def test_the_scheduler_cannot_act_as_an_agent(broker, tmp_path):
    sb = broker
    hooks, record = fence_hook(tmp_path)
    sched, sched_id = client(sb, "scheduler")
    async with (
        running_agent(agent_settings(sb, NODE1, hooks)) as agent1,
        listening(sched, f"fast/migfra/{NODE1}/result") as scheduler,
    ):
        for kind, payload in (("hook", hook_request()), ("lane", lane_request("hold", "s1"))):
            await scheduler.client.publish(f"fast/migfra/{NODE1}/{kind}/scheduler", payload)
        await scheduler.client.publish("fast/pscom/peer-vm1/1/response", b"1 : ALLOWED")
        await scheduler.client.publish("fast/pscom/peer-vm1/any_proc/request", b"suspend")
        await settle()
        assert len(sb.denied_publishes(sched_id)) == 4
        assert agent1.lanes.holds == {}
        assert not record.exists()


async def test_a_vms_processes_cannot_act_as_an_agent(broker, tmp_path):
    """The processes in a guest log in as the VM's user: with the example's VM-user block they
    can hold no lane and ask for no hook in the VM's name."""
    sb = broker
    hooks, record = fence_hook(tmp_path)
    procs, procs_id = client(sb, VM_USER)
    async with (
        running_agent(agent_settings(sb, NODE1, hooks)) as agent1,
        listening(procs, f"fast/pscom/{VM_USER}/+/request") as guest,
    ):
        for kind, payload in (("hook", hook_request()), ("lane", lane_request("hold", "g1"))):
            await guest.client.publish(f"fast/migfra/{NODE1}/{kind}/{VM_USER}", payload, qos=1)
        for kind in ("hook-response", "lane-response"):
            await guest.client.publish(f"fast/migfra/{NODE1}/{kind}/{VM_USER}", b"{}", qos=1)
        await settle()
        assert len(sb.denied_publishes(procs_id)) == 4
        assert agent1.lanes.holds == {}
        assert not record.exists()


# --------------------------------------------------------------------------------------------
# pscom acknowledgements


@contextlib.asynccontextmanager
async def mpi_processes(sb: SecureBroker, vm: str, pids: list[int]) -> AsyncIterator[list[bytes]]:
    """The VM's MPI processes (user ``vm``): each answers every request as pscom does."""
    procs, _ = client(sb, VM_USER)
    requests: list[bytes] = []
    async with listening(procs, f"fast/pscom/{vm}/+/request") as listener:

        async def answer() -> None:
            seen = 0
            while True:
                await asyncio.sleep(0.01)
                for msg in listener.received[seen:]:
                    requests.append(msg.payload)
                    word = {b"suspend": "ALLOWED", b"resume": "COMPLETED"}[msg.payload]
                    for pid in pids:
                        body = f"{pid} : {word}".encode() + b"\0"
                        await listener.client.publish(f"fast/pscom/{vm}/{pid}/response", body)
                seen = len(listener.received)

        task = asyncio.create_task(answer())
        try:
            yield requests
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_nobody_but_the_vms_processes_can_acknowledge_a_suspend(broker):
    sb = broker
    node2, node2_id = client(sb, NODE2)
    mon, mon_id = client(sb, "monitor")
    vm_client, vm_id = client(sb, VM_USER)
    settings = agent_settings(sb, NODE1)
    async with (
        running_agent(settings) as agent1,
        listening(node2) as forger,
        listening(mon) as monitor,
        listening(vm_client) as other_vm,
    ):
        pscom = PscomHook(agent1.transport, settings.pscom, VM_USER, 2)
        round_ = asyncio.create_task(pscom._round("suspend"))
        await asyncio.sleep(0.2)  # subscribed, request sent, nobody answers it
        for who in (forger, monitor):
            for pid in (11, 12):
                ack = f"{pid} : ALLOWED".encode()
                await who.client.publish(f"fast/pscom/{VM_USER}/{pid}/response", ack)
        # The VM's own user cannot answer for another VM either.
        await other_vm.client.publish("fast/pscom/peer-vm2/13/response", b"13 : ALLOWED")
        with pytest.raises(HookFailed, match="0 of 2 processes answered within 1 s"):
            await round_
        assert len(sb.denied_publishes(node2_id)) == 2
        assert len(sb.denied_publishes(mon_id)) == 2
        assert len(sb.denied_publishes(vm_id)) == 1

        # The VM's processes answer: both rounds complete.
        async with mpi_processes(sb, VM_USER, [21, 22]) as requests:
            await asyncio.wait_for(pscom._round("suspend"), 5)
            await asyncio.wait_for(pscom._round("resume"), 5)
        assert requests == [b"suspend", b"resume"]
