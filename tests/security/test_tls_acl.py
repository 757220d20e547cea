"""MQTT over TLS with client certificates, passwords and an ACL (issue item 6).

A real mosquitto runs with ``config/mosquitto.example.conf`` (only paths, the port and the log
settings replaced) and ``config/mosquitto.acl.example`` unchanged, on a TLS listener on a free
loopback port, with a throwaway PKI (``certs.py``) and a password file made with
``mosquitto_passwd``. The agent runs in this event loop with settings loaded from YAML text,
as the CLI loads them (``communicator.tls``, ``username: <hostname>``, ``password-file`` or
``password-env``). What the tests show:

* a scheduler with a certificate and its password gets results from the agent;
* without a certificate, with a certificate of another CA, trusting another CA, with a wrong
  or no password, or over plain TCP, nobody connects;
* an authenticated stranger (``intruder``) can neither command the agent (the broker drops
  its task: no result, no event, and a monitor reading every task topic never sees it) nor
  read anything the agent publishes;
* the agent's own credentials cannot publish into another agent's topics;
* the agent answers MQTT 5 response topics only below its own prefix, and survives the
  broker refusing the others;
* the password appears neither in the agent's log (debug level) nor in ``repr(settings)``,
  also when the broker refuses it;
* ``agent.allow-xml-start: false`` refuses ``start vm`` from XML with ``not-supported``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import getpass
import io
import json
import logging
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from certs import Pki, make_pki

from asyncmigfra.app import Agent
from asyncmigfra.logs import configure_logging
from asyncmigfra.settings import LoggingSettings, Settings, settings_from_text
from asyncmigfra.transport.mqtt import Incoming, ToolClient, TransportError
from harness import Scheduler, agent_and_scheduler, leaked_sockets, running_agent

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]

#: Agent host names; with the ACL's patterns they are also the agents' MQTT user names.
AGENT = "sec-node1"
OTHER_AGENT = "sec-node2"
USERS = (AGENT, OTHER_AGENT, "scheduler", "monitor", "intruder")
#: s to wait for something that must *not* arrive, after a control message that must has.
QUIET = 0.5


def need(tool: str, why: str) -> str:
    """Like ``conftest.need`` (which cannot be imported by name: there are several conftest
    modules): skip without ``tool``, but fail in CI, where a skip would hide a missing part."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is required in CI ({why}) but is not installed")
        pytest.skip(f"{tool} not installed ({why})")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.01)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@dataclass
class SecureBroker:
    port: int
    pki: Pki
    passwords: dict[str, str]
    directory: Path
    log: Path

    def tls(self, cert: str | None, *, ca: Path | None = None) -> ssl.SSLContext:
        """A client TLS context: trusts ``ca`` (default: the cluster CA), presents ``cert``."""
        ctx = ssl.create_default_context(cafile=str(ca or self.pki.ca))
        if cert == "rogue":
            ctx.load_cert_chain(self.pki.rogue_client.cert, self.pki.rogue_client.key)
        elif cert is not None:
            pair = self.pki.clients[cert]
            ctx.load_cert_chain(pair.cert, pair.key)
        return ctx

    def client(self, user: str, *, cert: str | None = None, **kw: Any) -> ToolClient:
        """A client with ``user``'s certificate and password unless told otherwise."""
        return ToolClient(
            "127.0.0.1",
            self.port,
            client_id=kw.pop("client_id", f"{user}-{uuid.uuid4().hex[:6]}"),
            username=kw.pop("username", user),
            password=kw.pop("password", self.passwords.get(user)),
            tls=kw.pop("tls", None) or self.tls(cert or user),
            timeout=kw.pop("timeout", 5),
            **kw,
        )

    def denied_publishes(self, client_id: str) -> list[str]:
        """The broker's own record of publishes its ACL dropped (``log_type all``)."""
        text = self.log.read_text(errors="replace")
        return [line for line in text.splitlines() if f"Denied PUBLISH from {client_id} " in line]


def derive_config(example: str, values: dict[str, str]) -> str:
    """The example with the value of each directive in ``values`` replaced.

    A directive that occurs more than once (``log_type``) keeps one line. Every directive
    named must be in the example: so the test breaks if the example loses one.
    """
    out: list[str] = []
    seen: set[str] = set()
    for line in example.splitlines():
        words = line.split(None, 1)
        name = words[0] if words and not words[0].startswith("#") else None
        if name in values:
            if name not in seen:
                out.append(f"{name} {values[name]}")
                seen.add(name)
            continue
        out.append(line)
    missing = set(values) - seen
    assert not missing, f"not in config/mosquitto.example.conf: {missing}"
    return "\n".join(out) + "\n"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    need("openssl", "TLS tests make their certificates with it")
    return make_pki(tmp_path_factory.mktemp("pki"), USERS)


@contextlib.contextmanager
def secure_broker_running(
    pki: Pki, directory: Path, users: Sequence[str], acl: str
) -> Iterator[SecureBroker]:
    """mosquitto with ``config/mosquitto.example.conf`` (paths, port and logging replaced),
    the ACL text ``acl`` and a random password for each of ``users``."""
    binary = need("mosquitto", "TLS/ACL tests")
    passwd = need("mosquitto_passwd", "the broker's password file")
    # Random passwords: a password found in a log cannot come from anywhere else.
    passwords = {user: f"pw-{secrets.token_urlsafe(18)}" for user in users}
    password_file = directory / "passwd"
    for i, user in enumerate(users):
        create = ["-c"] if i == 0 else []
        subprocess.run(
            [passwd, *create, "-b", str(password_file), user, passwords[user]],
            check=True,
            capture_output=True,
            timeout=30,
        )
    password_file.chmod(0o600)
    acl_file = directory / "acl"
    acl_file.write_text(acl)
    port = free_port()
    log = directory / "mosquitto.log"
    conf = derive_config(
        (ROOT / "config" / "mosquitto.example.conf").read_text(),
        {
            "listener": f"{port} 127.0.0.1",
            "cafile": str(pki.ca),
            "certfile": str(pki.server.cert),
            "keyfile": str(pki.server.key),
            "password_file": str(password_file),
            "acl_file": str(acl_file),
            "persistence_location": f"{directory}/",
            "log_dest": f"file {log}",
            # "all" includes the debug lines that record ACL denials.
            "log_type": "all",
            # Never drop privileges to a user that cannot read this directory.
            "user": getpass.getuser(),
        },
    )
    for directive in ("allow_anonymous false", "require_certificate true", "persistence true"):
        assert f"\n{directive}\n" in conf
    path = directory / "mosquitto.conf"
    path.write_text(conf)
    proc = subprocess.Popen(
        [binary, "-c", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port, proc)
        yield SecureBroker(port, pki, passwords, directory, log)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def secure_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    acl = (ROOT / "config" / "mosquitto.acl.example").read_text()
    with secure_broker_running(pki, tmp_path_factory.mktemp("secure-broker"), USERS, acl) as sb:
        yield sb


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """Everything the agent logs, at debug level, as JSON lines."""
    out = io.StringIO()
    configure_logging(LoggingSettings(format="json", level="debug"), stream=out, testing=True)
    yield out
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == "asyncmigfra":
            root.removeHandler(handler)
    root.setLevel(logging.WARNING)


def agent_config_text(sb: SecureBroker, password_source: str, *, ca: Path | None = None) -> str:
    """The agent's configuration as an operator writes it (see docs/security.md)."""
    pair = sb.pki.clients[AGENT]
    return (
        "communicator:\n"
        "  host: 127.0.0.1\n"
        f"  port: {sb.port}\n"
        "  username: <hostname>\n"
        f"  {password_source}\n"
        "  reconnect-min-delay: 0.05\n"
        "  reconnect-max-delay: 0.5\n"
        "  tls:\n"
        f"    ca-file: {ca or sb.pki.ca}\n"
        f"    cert-file: {pair.cert}\n"
        f"    key-file: {pair.key}\n"
        "hypervisor:\n"
        "  type: dummy\n"
        "agent:\n"
        "  state-dir: none\n"
        "shutdown:\n"
        "  grace-period: 5\n"
    )


def agent_settings_with_password(
    sb: SecureBroker,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
    password: str,
    *,
    ca: Path | None = None,
) -> Settings:
    if source == "file":
        secret = sb.directory / f"{AGENT}-{uuid.uuid4().hex[:6]}.password"
        secret.write_text(password + "\n")
        secret.chmod(0o600)
        line = f"password-file: {secret.name}"
    else:
        monkeypatch.setenv("ASYNCMIGFRA_TEST_MQTT_PASSWORD", password)
        line = "password-env: ASYNCMIGFRA_TEST_MQTT_PASSWORD"
    return settings_from_text(
        agent_config_text(sb, line, ca=ca),
        hostname=AGENT,
        base_dir=sb.directory,
        source="agent.yaml",
    )


@contextlib.asynccontextmanager
async def tls_scheduler(sb: SecureBroker, user: str = "scheduler") -> AsyncIterator[Scheduler]:
    """harness.Scheduler over TLS, subscribed to the agent's result, event and status."""
    client = sb.client(user)
    async with client:
        prefix = f"fast/migfra/{AGENT}"
        for suffix in ("result", "event", "status"):
            await client.subscribe(f"{prefix}/{suffix}", qos=1)
        sched = Scheduler(client=client, prefix=prefix)
        async with asyncio.TaskGroup() as tg:
            pump = tg.create_task(sched.pump(), name="test.tls-scheduler-pump")
            try:
                yield sched
            finally:
                pump.cancel()


@dataclass
class Listener:
    """A client that only collects what it receives."""

    client: ToolClient
    received: list[Incoming] = dataclasses.field(default_factory=list)

    async def pump(self) -> None:
        async for msg in self.client.messages():
            self.received.append(msg)

    def payloads(self, topic: str | None = None) -> list[bytes]:
        return [m.payload for m in self.received if topic is None or m.topic == topic]


@contextlib.asynccontextmanager
async def listening(client: ToolClient, *topics: str) -> AsyncIterator[Listener]:
    listener = Listener(client)
    async with client:
        for topic in topics:
            await client.subscribe(topic, qos=1)
        async with asyncio.TaskGroup() as tg:
            pump = tg.create_task(listener.pump(), name="test.listener-pump")
            try:
                yield listener
            finally:
                pump.cancel()


def assert_secret_absent(password: str, logs: io.StringIO, settings: Settings) -> None:
    text = logs.getvalue()
    assert text, "the agent logged nothing: the check below would prove nothing"
    assert password not in text
    assert password not in repr(settings)
    assert password not in repr(settings.mqtt)
    assert password not in str(settings)
    assert settings.mqtt.password == password  # it was loaded, just never shown


# --------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("source", ["file", "env"])
async def test_scheduler_with_credentials_gets_results_over_tls(
    secure_broker, logs, monkeypatch, source
):
    sb = secure_broker
    settings = agent_settings_with_password(sb, monkeypatch, source, sb.passwords[AGENT])
    assert settings.mqtt.username == AGENT
    assert settings.mqtt.tls is not None
    assert settings.mqtt.tls.insecure is False
    async with tls_scheduler(sb) as sched, running_agent(settings):
        r = await sched.call("task: start vm\nvm-configurations:\n  - vm-name: web-1\n")
        assert r["result"] == "vm started"
        assert r["list"] == [{"vm-name": "web-1", "status": "success"}]
        r = await sched.call("task: status\n")
        assert (r["result"], r["host"], r["state"]) == ("status", AGENT, "online")
        assert any(s["state"] == "online" for s in sched.statuses)
        assert sched.events_for(sched.results[0]["id"], "accepted")
    assert_secret_absent(sb.passwords[AGENT], logs, settings)
    # The log shows that a TLS connection with this identity was made.
    connected = [json.loads(line) for line in logs.getvalue().splitlines() if "connected" in line]
    assert any(entry.get("event") == "mqtt.connected" for entry in connected)


def refused_clients(sb: SecureBroker) -> dict[str, ToolClient]:
    """Clients that must not get in, each missing exactly one thing.

    With TLS 1.3 the broker's verdict on a client certificate comes after the client's side of
    the handshake; paho then waits for a CONNACK that never comes, so those attempts end in the
    client's timeout (3 s here, run concurrently) rather than in an error at once. The broker's
    log says why it closed them.
    """
    wrong = ssl.create_default_context(cafile=str(sb.pki.rogue_ca))
    wrong.load_cert_chain(sb.pki.clients["scheduler"].cert, sb.pki.clients["scheduler"].key)
    no_cert = ssl.create_default_context(cafile=str(sb.pki.ca))
    password = sb.passwords["scheduler"]
    return {
        "no client certificate": sb.client("scheduler", tls=no_cert, timeout=3),
        "certificate from another CA": sb.client("scheduler", cert="rogue", timeout=3),
        "client trusts another CA": sb.client("scheduler", tls=wrong, timeout=3),
        "wrong password": sb.client("scheduler", password="not-" + password),
        "another user's password": sb.client("scheduler", password=sb.passwords["intruder"]),
        "no user name or password": sb.client("scheduler", username=None, password=None),
        "unknown user": sb.client("mallory", cert="intruder", password=password),
        "plain TCP": ToolClient("127.0.0.1", sb.port, client_id="plain-tcp", timeout=3),
    }


async def attempt(client: ToolClient) -> TransportError | None:
    """Connect; ``None`` if that worked, else the error."""
    try:
        async with client:
            return None
    except TransportError as exc:
        return exc


async def test_clients_without_valid_credentials_cannot_connect(secure_broker):
    sb = secure_broker
    leaked_sockets()  # whatever earlier tests left is not this test's business
    # Control: the scheduler's own credentials work, so every refusal below is the broker's.
    assert await attempt(sb.client("scheduler")) is None
    clients = refused_clients(sb)
    errors = dict(zip(clients, await asyncio.gather(*map(attempt, clients.values())), strict=True))
    assert [what for what, error in errors.items() if error is None] == [], "got in"
    for what in ("wrong password", "another user's password", "no user name or password"):
        assert "Not authorized" in str(errors[what]), errors[what]
    assert "CERTIFICATE_VERIFY_FAILED" in str(errors["client trusts another CA"])
    log = sb.log.read_text(errors="replace")
    assert "peer did not return a certificate" in log
    assert "certificate verify failed" in log
    # paho does not close the socket of a failed TLS handshake; ToolClient does.
    del errors
    assert leaked_sockets() == []


async def test_intruder_can_neither_command_the_agent_nor_read_it(secure_broker, logs, monkeypatch):
    sb = secure_broker
    settings = agent_settings_with_password(sb, monkeypatch, "file", sb.passwords[AGENT])
    task_topic = f"fast/migfra/{AGENT}/task"
    intruder_id = f"intruder-{uuid.uuid4().hex[:6]}"
    async with (
        tls_scheduler(sb) as sched,
        listening(sb.client("monitor"), "fast/migfra/#") as monitor,
        running_agent(settings),
        listening(
            sb.client("intruder", client_id=intruder_id),
            "fast/migfra/#",
            f"fast/migfra/{AGENT}/result",
            f"fast/migfra/{AGENT}/event",
            f"fast/migfra/{AGENT}/status",
        ) as intruder,
    ):
        for body in ("id: intr-1\ntask: quit\n", "id: intr-2\ntask: stop vm\nlist: [{regex: .*}]"):
            # The broker accepts the packet and drops it (MQTT 5: PUBACK "not authorized").
            await intruder.client.publish(task_topic, body.encode(), qos=1)
        # Control: a task from the scheduler on the same topic, after the intruder's.
        r = await sched.call("task: status\n")
        assert r["state"] == "online"
        await asyncio.sleep(QUIET)

        assert len(sb.denied_publishes(intruder_id)) == 2
        tasks = monitor.payloads(task_topic)
        assert any(r["id"].encode() in p for p in tasks), "the monitor sees the scheduler's task"
        assert not any(b"intr-" in p for p in tasks), "the intruder's task reached the topic"
        assert not [x for x in sched.results if str(x.get("id", "")).startswith("intr-")]
        assert not [e for e in sched.events if str(e.get("id", "")).startswith("intr-")]
        assert intruder.received == [], "the intruder read something"
        # Still running (the `quit` never arrived): one more task is answered.
        r = await sched.call("task: suspend vm\nlist: [{vm-name: web-1}]\n")
        assert r["list"][0]["status"] == "success"
    assert_secret_absent(sb.passwords[AGENT], logs, settings)


async def test_agent_credentials_cannot_publish_outside_the_agents_topics(secure_broker):
    sb = secure_broker
    impostor_id = f"impostor-{uuid.uuid4().hex[:6]}"
    own = f"fast/migfra/{AGENT}"
    other = f"fast/migfra/{OTHER_AGENT}"
    async with (
        listening(sb.client("scheduler"), f"{own}/result", f"{other}/result") as sched,
        listening(sb.client("monitor"), "fast/migfra/#") as monitor,
        # The agent's user name, certificate and password, from another program.
        listening(sb.client(AGENT, client_id=impostor_id), f"{other}/task") as impostor,
    ):
        forged = b"---\nresult: vm migrated\nvm-name: db-1\nstatus: success\nid: forged\n...\n"
        await impostor.client.publish(f"{other}/result", forged, qos=1)
        await impostor.client.publish(f"{other}/event", b"event: done\n", qos=1)
        await impostor.client.publish(f"{other}/task", b"id: x\ntask: quit\n", qos=1)
        await impostor.client.publish("fast/migfra/x/status", b"state: offline\n", qos=1)
        # Reading another agent's tasks is not allowed either.
        await sched.client.publish(f"{other}/task", b"id: for-node2\ntask: status\n", qos=1)
        # Control: its own result topic is fine, and arrives after everything above.
        await impostor.client.publish(f"{own}/result", b"---\nresult: status\n...\n", qos=1)
        async with asyncio.timeout(5):
            while not sched.payloads(f"{own}/result"):
                await asyncio.sleep(0.02)
        await asyncio.sleep(QUIET)

        assert sched.payloads(f"{other}/result") == [], "a forged result reached the scheduler"
        assert monitor.payloads(f"{other}/task") == [b"id: for-node2\ntask: status\n"]
        assert monitor.payloads(f"{other}/event") == []
        assert monitor.payloads("fast/migfra/x/status") == []
        assert impostor.received == [], "the agent's credentials read another agent's task"
        assert len(sb.denied_publishes(impostor_id)) == 4


async def test_replies_only_below_the_agents_own_prefix(secure_broker, logs, monkeypatch):
    """MQTT 5 response topics: allowed below fast/migfra/<host>/reply/, dropped elsewhere."""
    sb = secure_broker
    settings = agent_settings_with_password(sb, monkeypatch, "env", sb.passwords[AGENT])
    allowed = f"fast/migfra/{AGENT}/reply/scheduler/1"
    elsewhere = f"fast/migfra/{OTHER_AGENT}/reply/scheduler/1"
    async with (
        tls_scheduler(sb) as sched,
        listening(sb.client("monitor"), "fast/migfra/#") as monitor,
        running_agent(settings),
    ):
        await sched.client.subscribe("fast/migfra/+/reply/#", qos=1)
        await sched.publish("id: r-ok\ntask: status\n", response_topic=allowed)
        await sched.publish("id: r-no\ntask: status\n", response_topic=elsewhere)
        await sched.result_for("r-ok")
        await sched.result_for("r-no")
        async with asyncio.timeout(5):
            while not monitor.payloads(allowed):
                await asyncio.sleep(0.02)
        await asyncio.sleep(QUIET)
        assert yaml.safe_load(monitor.payloads(allowed)[0])["id"] == "r-ok"
        assert monitor.payloads(elsewhere) == []
        # The refused copy did not disturb the agent.
        r = await sched.call("task: resume vm\nlist: [{vm-name: web-1}]\n")
        assert r["list"][0]["status"] == "success"
    assert_secret_absent(sb.passwords[AGENT], logs, settings)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong password", r"not authori[sz]ed"),
        ("broker not trusted", r"certificate verify failed"),
    ],
)
async def test_agent_that_cannot_connect_keeps_trying_and_never_logs_the_password(
    secure_broker, logs, monkeypatch, case, reason
):
    """Refused by the broker (wrong password), or refusing it (its certificate is not from
    the CA in ``tls.ca-file``): the agent logs why, retries, and shows no password."""
    sb = secure_broker
    if case == "wrong password":
        password = f"pw-{secrets.token_urlsafe(18)}"
        settings = agent_settings_with_password(sb, monkeypatch, "file", password)
    else:
        password = sb.passwords[AGENT]
        settings = agent_settings_with_password(
            sb, monkeypatch, "env", password, ca=sb.pki.rogue_ca
        )
    leaked_sockets()
    agent = Agent(settings)
    run = asyncio.create_task(agent.run(), name="test.refused-agent")
    try:
        async with asyncio.timeout(10):
            while logs.getvalue().count('"mqtt.reconnect_scheduled"') < 2:
                await asyncio.sleep(0.05)
        assert not agent.ready.is_set()
        assert not run.done(), "the agent gave up instead of retrying"
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
    # Each refused attempt's socket was closed by the agent, not left to the collector.
    assert leaked_sockets() == []
    text = logs.getvalue()
    assert re.search(reason, text, re.IGNORECASE), text[-2000:]
    assert_secret_absent(password, logs, settings)
    assert sb.passwords[AGENT] not in text


async def test_xml_start_refused_when_disabled(mosquitto):
    xml = "<domain type='qemu'><name>from-xml</name></domain>"
    async with agent_and_scheduler(
        mosquitto.port, agent={"allow_xml_start": False, "state_dir": "none"}
    ) as (_, sched):
        r = await sched.call(
            "task: start vm\nvm-configurations:\n"
            f'  - xml: "{xml}"\n    probe-with-ssh: false\n'
            "  - vm-name: plain\n"
        )
    assert r["result"] == "vm started"
    refused, plain = r["list"]
    assert refused["vm-name"] == "from-xml"
    assert (refused["status"], refused["code"]) == ("error", "not-supported")
    assert "allow-xml-start" in refused["details"]
    assert plain == {"vm-name": "plain", "status": "success"}, "only the XML item is refused"
