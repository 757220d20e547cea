"""Helpers for the console tests: a ``demo --serve`` cluster as a process, the CLI as a
process, and a tmux terminal to look at what a person would see."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "asyncmigfra"]


def env() -> dict[str, str]:
    e = dict(os.environ, PYTHONUNBUFFERED="1", LANG="C.UTF-8", LC_ALL="C.UTF-8")
    e.pop("NO_COLOR", None)
    return e


@dataclass
class Served:
    """Agents host-a and host-b (``demo --serve``) under a topic prefix of their own."""

    port: int
    prefix: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def conn(self) -> list[str]:
        return ["--broker", f"127.0.0.1:{self.port}", "--topic-prefix", self.prefix]

    def start(self) -> None:
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(
                [*CLI, "demo", "--serve", *self.conn],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env(),
            )
        deadline = time.monotonic() + 20
        while "ready" not in self.log.read_text().splitlines():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"demo --serve did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def cli(
        self, *args: str, stdin: bytes | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run ``asyncmigfra <args> --broker ... --topic-prefix ...`` to completion."""
        out = subprocess.run(
            [*CLI, *args, *self.conn],
            input=stdin,
            capture_output=True,
            timeout=timeout,
            check=False,
            env=env(),
        )
        return subprocess.CompletedProcess(
            out.args, out.returncode, out.stdout.decode(), out.stderr.decode()
        )

    def command(self, *args: str) -> str:
        """The shell command line for a terminal."""
        import shlex  # noqa: PLC0415

        return shlex.join([*CLI, *args, *self.conn])


def hint_after(marker: str, text: str) -> str:
    """The command a message suggests: what follows ``marker`` up to the end of its line
    (or a closing parenthesis that ends the line)."""
    line = next(ln for ln in text.splitlines() if marker in ln)
    command = line.split(marker, 1)[1].strip()
    return command.removesuffix(")") if command.count(")") > command.count("(") else command


def paste(command: str, *, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command line as a person would paste it into a shell: split as a POSIX shell
    does, with ``asyncmigfra`` as this interpreter's ``-m asyncmigfra``; nothing added."""
    import shlex  # noqa: PLC0415

    words = shlex.split(command)
    assert words[0] == "asyncmigfra", command
    out = subprocess.run(
        [*CLI, *words[1:]], capture_output=True, timeout=timeout, check=False, env=env()
    )
    return subprocess.CompletedProcess(
        out.args, out.returncode, out.stdout.decode(), out.stderr.decode()
    )


@contextlib.contextmanager
def served_cluster(port: int, tmp: Path) -> Iterator[Served]:
    s = Served(port=port, prefix=f"t{uuid.uuid4().hex[:8]}/migfra", log=tmp / "serve.log")
    s.start()
    try:
        yield s
    finally:
        code = s.stop()
    assert code == 0, s.log.read_text()


@dataclass
class Terminal:
    """A 160x40 tmux pane on a private tmux server, running one command in bash."""

    socket: str = field(default_factory=lambda: f"amf-{uuid.uuid4().hex[:8]}")
    width: int = 160
    height: int = 40
    started: bool = False
    #: The tmux configuration file (read when the private server starts).
    config: str = "/dev/null"

    def _tmux(self, *args: str) -> str:
        out = subprocess.run(
            ["tmux", "-u", "-L", self.socket, "-f", self.config, *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
            env=env(),
        )
        return out.stdout

    def run(self, command: str) -> None:
        """Start ``command``; when it ends the pane shows ``[exit N]`` and stays."""
        script = f'{command}; echo "[exit $?]"; sleep 600'
        self._tmux(
            "new-session", "-d", "-s", "main", "-x", str(self.width), "-y", str(self.height),
            "bash", "--norc", "--noprofile", "-c", script,
        )  # fmt: skip
        self.started = True

    def screen(self, *, joined: bool = False) -> str:
        """The visible screen; ``joined``: lines the terminal wrapped are joined again."""
        return self._tmux("capture-pane", "-p", *(["-J"] if joined else []), "-t", "main")

    def buffers(self) -> str:
        """tmux's paste buffers (``set-clipboard on`` makes an OSC 52 from the pane one)."""
        return self._tmux("list-buffers", "-F", "#{buffer_sample}")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "main", *keys)

    def wait_for(
        self,
        what: str | Callable[[str], bool],
        timeout: float = 15,
        *,
        every: Callable[[str], None] | None = None,
    ) -> str:
        """Poll the screen until ``what`` (a regex, or a predicate) matches; ``every`` sees
        each snapshot (to record how the screen changed over time)."""
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if every is not None:
                every(screen)
            ok = what(screen) if callable(what) else re.search(what, screen) is not None
            if ok:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what!r}; the screen was:\n{screen}")

    def close(self) -> None:
        if self.started:
            subprocess.run(
                ["tmux", "-L", self.socket, "kill-server"], capture_output=True, check=False
            )


def exit_code(screen: str) -> int | None:
    m = re.search(r"\[exit (\d+)\]", screen)
    return None if m is None else int(m.group(1))


def need(tool: str, why: str) -> str:
    """Path of ``tool``; skip locally, fail in CI when it is missing (as tests/conftest.py)."""
    import pytest  # noqa: PLC0415

    path = shutil.which(tool) or (
        f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None
    )
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is required in CI ({why}) but is not installed")
        pytest.skip(f"{tool} not installed ({why})")
    return path


def need_tmux() -> None:
    need("tmux", "terminal tests")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(conf: Path, port: int) -> subprocess.Popen[bytes]:
    """A mosquitto with a configuration of the test's own (TLS, passwords)."""
    proc = subprocess.Popen(
        [need("mosquitto", "MQTT broker tests"), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise TimeoutError(f"mosquitto did not listen on {port}")


# ------------------------------------------------------------------------------ hostile wire

#: What a forged message tries to paint over the screen.
FAKE_LINE = "web-1 migrated from host-a to host-b"
#: An OSC 52 "set the clipboard to 'pwned'" (base64), BEL-terminated.
OSC52 = "\x1b]52;c;cHduZWQ=\x07"


def hostile(tag: str) -> str:
    """A wire string that, printed raw, clears the screen, homes the cursor and paints
    :data:`FAKE_LINE`, writes the clipboard (OSC 52), rings the bell, overwrites with a CR,
    moves the cursor up, sends a C1 CSI and a DEL, reverses the text that follows (U+202E,
    U+2066), breaks the line and a column (LF, TAB), asks rich for markup and a link, and
    carries a lone surrogate (which cannot even be encoded). ``tag`` names the field, so a
    test can see that each one was shown."""
    return (
        f"<{tag}>\x1b[2J\x1b[H{FAKE_LINE}{OSC52}\x07\rOK\x1b[3A\x9b2J\x7f"
        f"\u202e{tag}.txt\u2066\u200f[bold red]R[/bold red][link=https://evil.example/]L[/link]"
        f"\n\tX\ud800</{tag}>"
    )


#: Every character that must never reach a terminal raw (inside the CLI's own text, a line
#: break ends a line: checks allow "\n" where lines are expected).
FORBIDDEN = frozenset(
    [chr(c) for c in range(0x20)]
    + [chr(c) for c in range(0x7F, 0xA0)]
    + list("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029")
    + [chr(c) for c in range(0xD800, 0xE000)]
)

#: What rich itself writes at a terminal (styles, the live region's cursor moves): removed
#: before checking a terminal-mode output, and never produced by :func:`hostile` strings.
_RICH_OWN = re.compile(r"\x1b\[(?:\?25[lh]|[0-9;]*m|2K|1A)|\r(?=\x1b\[2K)")


def raw_controls(text: str, *, tty: bool = False) -> list[str]:
    """The forbidden characters in ``text`` (output of the CLI), line breaks excepted; at a
    terminal (``tty``) after removing rich's own escape sequences."""
    if tty:
        text = _RICH_OWN.sub("", text)
    return sorted({repr(c) for c in text if c in FORBIDDEN and c != "\n"})


def yaml_value(value: object) -> str:
    """``value`` as a YAML flow value, as an agent could send it: C0, DEL, C1 and surrogates
    as escapes (YAML forbids them raw), bidi controls and everything else raw."""
    text = json.dumps(value, ensure_ascii=False)
    return "".join(
        f"\\u{ord(c):04x}" if 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF else c
        for c in text
    )


def agent_yaml(doc: dict[str, object], *, extra: str = "") -> bytes:
    """A YAML document laid out as an agent publishes one (``key: value`` lines); ``extra``
    raw lines are added (a comment with a CR, say)."""
    lines = ["---", *(f"{yaml_value(k)}: {yaml_value(v)}" for k, v in doc.items())]
    return ("\n".join(lines) + "\n" + extra + "...\n").encode()


def forge(port: int, topic: str, payload: bytes, *, retain: bool = False) -> None:
    """Publish one message as anybody on the broker could."""
    from asyncmigfra.transport.mqtt import ToolClient  # noqa: PLC0415

    async def go() -> None:
        async with ToolClient("127.0.0.1", port, client_id=f"f-{uuid.uuid4().hex[:8]}") as c:
            await c.publish(topic, payload, qos=1, retain=retain)

    asyncio.run(go())


Reply = Callable[[dict[str, object]], list[tuple[str, bytes]]]


@dataclass
class ForgedAgent:
    """A fake agent ``host`` under ``prefix``: a retained ``status``, and for every task on
    its task topic the messages ``reply(task)`` returns, as ``(kind, payload)`` with kind
    ``event`` or ``result``. Runs its own event loop in a thread."""

    port: int
    prefix: str
    host: str
    status: bytes
    reply: Reply
    _thread: threading.Thread | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _main: asyncio.Task[None] | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def topic(self, kind: str) -> str:
        return f"{self.prefix}/{self.host}/{kind}"

    async def _run(self) -> None:
        from asyncmigfra.transport.mqtt import ToolClient  # noqa: PLC0415
        from asyncmigfra.wire.parsing import load_yaml  # noqa: PLC0415

        async with ToolClient("127.0.0.1", self.port, client_id=f"forged-{self.host}") as c:
            await c.subscribe(self.topic("task"), qos=2)
            await c.publish(self.topic("status"), self.status, qos=1, retain=True)
            self._ready.set()
            try:
                async for msg in c.messages():
                    task = load_yaml(msg.payload)
                    if not isinstance(task, dict):
                        continue
                    for kind, payload in self.reply(task):
                        await c.publish(self.topic(kind), payload, qos=1)
            finally:
                with contextlib.suppress(Exception):
                    await c.publish(self.topic("status"), b"", qos=1, retain=True)

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._main = loop.create_task(self._run())
            loop.run_until_complete(self._main)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # reported by start()/stop()
            self.error = exc
            self._ready.set()
        finally:
            loop.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._thread_main, daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self.error is not None:
            raise RuntimeError(f"the forged agent did not start: {self.error!r}")

    def stop(self) -> None:
        if self._loop is not None and self._main is not None:
            self._loop.call_soon_threadsafe(self._main.cancel)
        if self._thread is not None:
            self._thread.join(10)
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def forged_agent(
    port: int, prefix: str, host: str, status: bytes, reply: Reply
) -> Iterator[ForgedAgent]:
    agent = ForgedAgent(port, prefix, host, status, reply)
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


def attack(tag: str) -> str:
    """A shorter :func:`hostile` for a real terminal: reverses what follows (U+202E), writes
    the clipboard (OSC 52), moves up with a C1 CSI, returns with a CR, clears the screen,
    homes the cursor and paints :data:`FAKE_LINE` at the top."""
    return f"<{tag}>\u202e{tag}{OSC52}\x9b1A\r\x1b[2J\x1b[H{FAKE_LINE}"


#: Stand-in for a time stamp in forged events.
_WHEN = "2026-01-01T00:00:00.000Z"


def forged_reply(value: Callable[[str], str] = hostile) -> Reply:
    """What a forged agent answers to ``status``, ``history``, ``migrate vm`` and ``stop vm`` tasks:
    events and a result with the task's id, every free-text field ``value(<field>)``."""
    v = value

    def event(task_id: object, kind: str, **fields: object) -> tuple[str, bytes]:
        doc = {"event": kind, "id": task_id, "host": v("host"), "time": _WHEN, **fields}
        return "event", agent_yaml(doc)

    def reply(task: dict[str, object]) -> list[tuple[str, bytes]]:
        tid, kind = task.get("id"), task.get("task")
        if kind == "status":
            doc: dict[str, object] = {
                "result": "status", "id": tid, "host": v("host"), "state": "online",
                "version": v("version"), "hypervisor": v("hypervisor"), "uptime": 5.0,
                "tasks": [{"id": v("tid"), "task": v("task"), "vm-name": v("tvm"),
                           "phase": v("tphase"), "elapsed": 1.0}],
                "list": [
                    {"vm-name": v("dvm"), "status": "success", "state": v("dstate"),
                     "vcpus": 2, "memory": 1048576},
                    {"vm-name": v("evm"), "status": "error", "code": v("ecode"),
                     "details": v("edetails")},
                ],
            }  # fmt: skip
            return [("result", agent_yaml(doc))]
        if kind == "migrate vm":
            vm = task.get("vm-name")
            return [
                event(tid, "accepted", task=v("task"), **{"vm-names": [v("accepted")]}),
                event(tid, "phase", phase=v("phase"), **{"vm-name": vm}),
                event(tid, "progress", phase=v("pphase"), percent=40.0, iteration=2,
                      action=v("action"), **{"vm-name": vm, "memory-total": 2 << 30,
                                             "data-remaining": 1 << 30,
                                             "transfer-rate": 100 << 20}),
                event(tid, "error", code=v("ecode"), details=v("edetails"), **{"vm-name": vm}),
                ("result", agent_yaml({
                    "result": "vm migrated", "id": tid, "vm-name": vm, "status": "error",
                    "code": v("code"), "details": v("details"), "retries": v("retries"),
                    "time-measurement": {"overall": 1.0},
                })),
            ]  # fmt: skip
        if kind == "history":
            item = {
                "id": v("hid"),
                "task": v("htask"),
                "vm-name": v("hvm"),
                "status": "error",
                "code": v("hcode"),
                "details": v("hdetails"),
                "started": v("hstarted"),
                "duration": 1e308,
                "destination": v("hdest"),
                "downtime": v("hdown"),
            }
            bad = {
                "vm-name": "n/a",
                "status": "error",
                "code": v("acode"),
                "details": v("adetails"),
            }
            doc = {"result": "history", "id": tid, "host": v("host"), "list": [item, bad]}
            return [("result", agent_yaml(doc))]  # fmt: skip
        if kind == "stop vm":
            doc = {
                "result": "vm stopped", "id": tid,
                "list": [{"vm-name": v("vm"), "status": "error", "code": v("code"),
                          "details": v("details")}],
            }  # fmt: skip
            # Raw in the YAML text: a bidi override, a tab and a CR (as a line break).
            extra = "# forged\u202eevil\tcomment\r\n"
            return [
                event(tid, "error", code=v("ecode"), details=v("edetails"), **{"vm-name": v("vm")}),
                ("result", agent_yaml(doc, extra=extra)),
            ]
        return []

    return reply


def forged_status(value: Callable[[str], str] = hostile, *, state: str = "online") -> bytes:
    """A retained status as an agent publishes it, every field but ``state`` forged."""
    return agent_yaml(
        {
            "state": state,
            "host": value("host"),
            "version": value("version"),
            "hypervisor": value("hypervisor"),
            "since": value("since"),
            "tasks": 0,
        }
    )
