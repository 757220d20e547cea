"""How a client command reaches the broker and which topics it uses.

Everything here is resolved *before* connecting, so a bad ``--broker`` or an unreadable
password file is a usage error (exit 2) with a clear message rather than a confusing
connection failure later.

Topics follow the agent's defaults (docs/protocol.md §1.1): ``<prefix>/<host>/task``,
``.../result``, ``.../event`` and ``.../status``, with ``--topic-prefix`` defaulting to
``fast/migfra``.
"""

from __future__ import annotations

import os
import shlex
import ssl
import uuid
from dataclasses import dataclass, field
from typing import Final, Literal

from asyncmigfra.console.exits import USAGE, CliError

__all__ = [
    "DEFAULT_PREFIX",
    "PASSWORD_ENV",
    "Connection",
    "parse_broker",
    "read_password",
    "tls_context",
]

DEFAULT_PREFIX: Final = "fast/migfra"
#: Read when no ``--password-file`` is given: keeps the secret out of ``ps`` and shell history.
PASSWORD_ENV: Final = "ASYNCMIGFRA_MQTT_PASSWORD"  # noqa: S105 - a variable name

TopicKind = Literal["task", "result", "event", "status"]


def parse_broker(text: str, *, tls: bool = False) -> tuple[str, int]:
    """``HOST[:PORT]`` (IPv6 as ``[::1]:1883``) -> (host, port).

    The default port is 1883, or 8883 with TLS, as ``mosquitto_pub`` does.
    """
    default = 8883 if tls else 1883
    text = text.strip()
    if not text:
        raise CliError(USAGE, "--broker: empty")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise CliError(USAGE, f"--broker: cannot read {text!r} (use [ADDR]:PORT for IPv6)")
        port_text = rest[1:]
    elif text.count(":") > 1:  # a bare IPv6 address
        host, port_text = text, ""
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise CliError(USAGE, f"--broker: no host in {text!r}")
    if not port_text:
        return host, default
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise CliError(USAGE, f"--broker: bad port {port_text!r}")
    return host, int(port_text)


def read_password(path: str | None) -> str | None:
    """The password from ``--password-file`` (first line), else ``$ASYNCMIGFRA_MQTT_PASSWORD``."""
    if path is None:
        return os.environ.get(PASSWORD_ENV) or None
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().rstrip("\r\n")
    except OSError as exc:
        raise CliError(USAGE, f"--password-file: {exc}") from None


def tls_context(
    *, ca: str | None, cert: str | None, key: str | None, insecure: bool
) -> ssl.SSLContext:
    """A client TLS context: verify the broker (``--tls-ca`` or the system CAs), optionally
    present a client certificate. ``--tls-insecure`` skips the *hostname* check only, like
    the agent's ``communicator.tls.insecure`` and ``mosquitto_pub --insecure``."""
    try:
        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise CliError(USAGE, f"TLS setup: {exc}") from None
    if insecure:
        ctx.check_hostname = False
    return ctx


@dataclass(frozen=True, slots=True)
class Connection:
    """Everything needed to connect and to name an agent's topics."""

    host: str = "localhost"
    port: int = 1883
    protocol: Literal["5", "3.1.1"] = "5"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: ssl.SSLContext | None = None
    prefix: str = DEFAULT_PREFIX
    #: s: how long ``status`` gathers retained presence, and how long a command waits for
    #: an agent's retained status before calling it absent.
    wait: float = 0.5
    #: The connection options as the user gave them (``--broker b --topic-prefix p``...):
    #: every command a hint suggests carries them, so it can be pasted as it is.
    options: tuple[str, ...] = ()
    #: The whole command line as the user gave it (after the program name), for hints that
    #: repeat it with one option more; empty when not known.
    command_line: tuple[str, ...] = ()

    def command(self, *words: str) -> str:
        """``asyncmigfra <words> <connection options>``, quoted for a POSIX shell."""
        return shlex.join(["asyncmigfra", *words, *self.options])

    def again_with(self, option: str) -> str:
        """The user's command line with ``option`` added (a hint to paste), or, when it is
        not known, ``add <option>``."""
        if not self.command_line:
            return f"add {option}"
        return "run: " + shlex.join(["asyncmigfra", *self.command_line, option])

    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def topic(self, host: str, kind: TopicKind) -> str:
        return f"{self.prefix}/{host}/{kind}"

    def split(self, topic: str) -> tuple[str, str] | None:
        """``<prefix>/<host>/<kind>`` -> (host, kind), or ``None`` for foreign topics."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        host, sep, kind = topic[len(head) :].rpartition("/")
        if not sep or not host or "/" in host:
            return None
        return host, kind

    @staticmethod
    def client_id() -> str:
        """Unique per run: two people running the CLI must not kick each other off."""
        return f"asyncmigfra-cli-{uuid.uuid4().hex[:10]}"
