"""Command line: the agent, the demo, and the client commands people use to drive agents.

``asyncmigfra agent`` runs an agent; ``asyncmigfra demo`` shows one live migration (and
``demo --serve`` keeps two fake hosts running to try the client commands on). The client
commands (``send``, ``migrate``, ``start``, ``stop``, ``suspend``, ``resume``, ``repin``,
``cancel``, ``evacuate``, ``status``, ``watch``) are implemented in :mod:`asyncmigfra.console`; this
module only parses arguments.

The connection options (``--broker``, ``--mqtt-protocol``, TLS, credentials, ``--json``,
``--topic-prefix``, ``--wait``) are accepted both before and after the command name
(``asyncmigfra --broker b status`` and ``asyncmigfra status --broker b``): people type them
in either place. They are declared with ``SUPPRESS`` defaults on both parsers, so the value
given in either place survives, and the real defaults are filled in afterwards.

Exit codes: see :data:`asyncmigfra.console.exits.EPILOG` (``--help`` shows them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from asyncmigfra import __version__
from asyncmigfra.console.exits import EPILOG as _EPILOG
from asyncmigfra.errors import ConfigError, StartupError

__all__ = ["main"]


#: Defaults of the connection options (declared with SUPPRESS, see the module docstring).
_CONN_DEFAULTS: dict[str, Any] = {
    "broker": None,
    "mqtt_protocol": "5",
    "tls": False,
    "tls_ca": None,
    "tls_cert": None,
    "tls_key": None,
    "tls_insecure": False,
    "username": None,
    "password_file": None,
    "json": False,
    "topic_prefix": "fast/migfra",
    "wait": 0.5,
}

_MIGRATION_TYPES = ("live", "warm", "post-copy", "offline")


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return value


#: Host CPUs a CPU list may name (libvirt's own limit is far lower on real hosts).
_MAX_CPU = 4096


def _cpu_list(text: str) -> tuple[int, ...]:
    """``0,2-3`` -> (0, 2, 3): the host CPUs one vCPU may run on."""
    cpus: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            lo = int(first)
            hi = int(last) if dash else lo
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a CPU list: {text!r} (use numbers and ranges: 0,2-3)"
            ) from None
        if lo < 0 or hi < lo or hi >= _MAX_CPU:
            raise argparse.ArgumentTypeError(
                f"not a CPU list: {text!r} (a range is low-high, CPUs 0-{_MAX_CPU - 1})"
            )
        cpus.extend(range(lo, hi + 1))
    return tuple(cpus)


def _connection_options(p: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    g = p.add_argument_group("connection and output")
    g.add_argument(
        "--broker",
        metavar="HOST[:PORT]",
        default=s,
        help="MQTT broker (default localhost:1883, or :8883 with TLS)",
    )
    g.add_argument(
        "--mqtt-protocol", choices=["5", "3.1.1"], default=s, help="MQTT version (default 5)"
    )
    g.add_argument("--tls", action="store_true", default=s, help="connect with TLS")
    g.add_argument("--tls-ca", metavar="FILE", default=s, help="CA bundle (implies --tls)")
    g.add_argument("--tls-cert", metavar="FILE", default=s, help="client certificate (PEM)")
    g.add_argument("--tls-key", metavar="FILE", default=s, help="client key (PEM)")
    g.add_argument(
        "--tls-insecure",
        action="store_true",
        default=s,
        help="do not check the broker's host name (implies --tls)",
    )
    g.add_argument("--username", default=s, help="MQTT user name")
    g.add_argument(
        "--password-file",
        metavar="FILE",
        default=s,
        help="first line is the MQTT password (else $ASYNCMIGFRA_MQTT_PASSWORD)",
    )
    g.add_argument(
        "--topic-prefix",
        metavar="PREFIX",
        default=s,
        help="topics are PREFIX/<host>/{task,result,event,status} (default fast/migfra)",
    )
    g.add_argument(
        "--wait",
        type=_positive_float,
        metavar="S",
        default=s,
        help="how long to wait for retained agent status: the status table, and before"
        " calling an agent absent (default 0.5 s)",
    )
    g.add_argument("--json", action="store_true", default=s, help="JSON lines on stdout")


def _addressed(p: argparse.ArgumentParser, *, host: bool = True) -> None:
    """Options of commands that send a task to one agent."""
    if host:
        p.add_argument("--host", required=True, metavar="NAME", help="the agent's <hostname>")
    p.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="S",
        help="give up (exit 4) without a result after S seconds (default: wait while the"
        " agent is online)",
    )
    p.add_argument(
        "--force",
        "--send-offline",
        dest="force",
        action="store_true",
        help="send even if the agent is offline or unknown (its session queues the task)",
    )


def _migration_type(p: argparse.ArgumentParser, *, offline: bool = True) -> None:
    g = p.add_mutually_exclusive_group()
    for kind in _MIGRATION_TYPES:
        if kind == "offline" and not offline:
            continue
        g.add_argument(
            f"--{kind}",
            dest="migration_type",
            action="store_const",
            const=kind,
            help=f"migration-type: {kind} (default: the agent's configured type)",
        )


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="asyncmigfra",
        description="Start, stop and live-migrate VMs on MQTT command (migfra-compatible).",
        epilog=_EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("--version", action="version", version=f"asyncmigfra {__version__}")
    _connection_options(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name, help=help_text, description=help_text, epilog=_EPILOG, formatter_class=fmt
        )
        _connection_options(sp)
        return sp

    agent = sub.add_parser("agent", help="run the agent on this host")
    agent.add_argument("-c", "--config", help="config file (YAML; the original migfra.conf works)")
    agent.add_argument("--hostname", help="agent name, replaces <hostname> (default: host name)")
    agent.add_argument(
        "--log-format", choices=["auto", "json", "console"], help="override logging.format"
    )
    agent.add_argument("--state-dir", help="override agent.state-dir (journal directory, or none)")
    agent.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="override logging.level"
    )

    demo = sub.add_parser(
        "demo",
        help="two fake hosts, one live migration, in under 30 s",
        description="Two agents on fake hosts and one live migration through a real MQTT"
        " broker: an embedded one (amqtt, on 127.0.0.1; it speaks MQTT 3.1.1 only) unless"
        " --broker names one. A broker that cannot be reached ends the demo with one line and"
        " exit 2.",
    )
    demo.add_argument(
        "--broker",
        default=argparse.SUPPRESS,
        metavar="HOST[:PORT]",
        help="an MQTT broker to use (default: the embedded one, MQTT 3.1.1)",
    )
    demo.add_argument(
        "--port",
        type=_port,
        metavar="N",
        help="the embedded broker listens on 127.0.0.1:N (default: a free port)",
    )
    demo.add_argument(
        "--mqtt-protocol",
        choices=["5", "3.1.1"],
        default=argparse.SUPPRESS,
        help="MQTT version for --broker (default 5); the embedded broker speaks only 3.1.1",
    )
    demo.add_argument("--quiet", action="store_true", help="print only the results")
    demo.add_argument(
        "--serve",
        action="store_true",
        help="no scenario: keep agents host-a and host-b (fake hypervisor) running until"
        " killed, to try the client commands on",
    )
    demo.add_argument(
        "--topic-prefix",
        default=argparse.SUPPRESS,
        metavar="PREFIX",
        help="with --serve: the agents' topic prefix (default fast/migfra)",
    )

    send = client("send", "publish a task file and print its result")
    send.add_argument("file", metavar="FILE", help="a YAML task (examples/tasks/), - for stdin")
    send.add_argument(
        "--new-id",
        action="store_true",
        help="send it with a fresh id (the file's own id is replaced in what is sent): an"
        " agent runs a task with the same id and content only once, and answers a repeat"
        " with the remembered result",
    )
    _addressed(send)

    mig = client("migrate", "migrate a VM, optionally with a live progress view")
    mig.add_argument("vm", metavar="VM")
    mig.add_argument(
        "--from",
        dest="source",
        metavar="A",
        help="source host (default: the one online agent that has the VM)",
    )
    mig.add_argument("--to", dest="destination", required=True, metavar="B", help="destination")
    _migration_type(mig)
    mig.add_argument("--max-downtime", type=_positive_int, metavar="MS", help="downtime limit")
    mig.add_argument("--bandwidth", type=_positive_int, metavar="MIBS", help="MiB/s cap")
    mig.add_argument(
        "--completion-timeout", type=_positive_float, metavar="S", help="job time limit"
    )
    mig.add_argument(
        "--timeout-action",
        choices=["abort", "post-copy", "suspend"],
        help="what happens at the completion timeout (default: the agent's)",
    )
    mig.add_argument("--auto-converge", action="store_true", help="let QEMU throttle the guest")
    mig.add_argument(
        "--swap-with",
        metavar="VM2",
        help="swap: VM2 (running on B) comes to A while VM goes to B (parameter swap-with)",
    )
    mig.add_argument(
        "--follow",
        action="store_true",
        help="live progress, Ctrl-C offers to cancel, a summary with the real downtime",
    )
    _addressed(mig, host=False)

    st = client("start", "start VMs on a host")
    st.add_argument("vms", nargs="*", metavar="VM")
    st.add_argument("--xml", action="append", default=[], metavar="FILE", help="domain XML")
    st.add_argument("--no-probe", action="store_true", help="do not wait for SSH in the guest")
    _addressed(st)

    sp = client("stop", "stop VMs on a host")
    sp.add_argument("vms", nargs="+", metavar="VM")
    sp.add_argument("--force", dest="power_off", action="store_true", help="destroy at once")
    sp.add_argument(
        "--force-after-timeout",
        action="store_true",
        help="destroy when the graceful shutdown times out",
    )
    sp.add_argument("--undefine", action="store_true", help="undefine after stopping")
    sp.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="S",
        help="give up (exit 4) without a result after S seconds",
    )
    sp.add_argument("--host", required=True, metavar="NAME", help="the agent's <hostname>")
    sp.add_argument(
        "--send-offline",
        dest="force",
        action="store_true",
        help="send even if the agent is offline or unknown (--force is the task's own here)",
    )

    for name, verb in (("suspend", "pause"), ("resume", "unpause")):
        s = client(name, f"{verb} VMs on a host")
        s.add_argument("vms", nargs="+", metavar="VM")
        _addressed(s)

    rp = client("repin", "pin the vCPUs of a VM to host CPUs")
    rp.add_argument("vm", metavar="VM")
    rp.add_argument(
        "cpus",
        nargs="+",
        type=_cpu_list,
        metavar="CPUS",
        help="one per vCPU, in order: the host CPUs it may run on (0,2-3); vCPUs beyond"
        " the list keep their pinning",
    )
    rp.add_argument("--follow", action="store_true", help="show the task's events as they come")
    _addressed(rp)

    c = client("cancel", "cancel a queued or running task")
    c.add_argument("target", metavar="ID", help="the id of the task to cancel")
    _addressed(c)

    ev = client("evacuate", "migrate every active VM of a host away")
    ev.add_argument("evac_host", metavar="HOST")
    ev.add_argument(
        "--to",
        dest="destinations",
        action="append",
        required=True,
        metavar="B",
        help="a destination (repeat for more; round-robin)",
    )
    ev.add_argument("--mode", choices=["auto", "compact", "scatter"], help="placement mode")
    ev.add_argument("--max-parallel", type=_positive_int, metavar="N", help="at once")
    _migration_type(ev, offline=False)
    ev.add_argument(
        "--follow", action="store_true", help="one live bar per VM, Ctrl-C offers to cancel"
    )
    _addressed(ev, host=False)

    stat = client("status", "agents and their presence; with HOST its tasks and domains")
    stat.add_argument("host", nargs="?", metavar="HOST")
    _addressed(stat, host=False)

    w = client("watch", "a live stream of the cluster's events, results and presence (Ctrl-C ends)")
    w.add_argument("--host", metavar="NAME", help="only this agent")
    w.add_argument("--vm", metavar="VM", help="only events and results about this VM")
    w.add_argument(
        "--id", dest="task_id", metavar="ID", help="only events and results of this task"
    )
    return p


# ------------------------------------------------------------------------------ agent, demo


def _agent(args: argparse.Namespace) -> int:
    from dataclasses import replace  # noqa: PLC0415 - keep --version fast

    from asyncmigfra.app import Agent  # noqa: PLC0415
    from asyncmigfra.logs import configure_logging  # noqa: PLC0415
    from asyncmigfra.settings import load_settings  # noqa: PLC0415

    try:
        settings = load_settings(args.config, hostname=args.hostname)
    except ConfigError as exc:
        print(f"asyncmigfra: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.state_dir:
        settings = replace(settings, agent=replace(settings.agent, state_dir=args.state_dir))
    logging = settings.logging
    if args.log_format:
        logging = replace(logging, format=args.log_format)
    if args.log_level:
        logging = replace(logging, level=args.log_level)
    configure_logging(logging)

    async def run() -> int:
        # Built inside the running loop: a hypervisor back-end may need it.
        return await Agent(settings, install_signal_handlers=True).run()

    try:
        return asyncio.run(run())
    except ConfigError as exc:  # a back-end checks its options when it is built
        print(f"asyncmigfra: configuration error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:  # journal locked or unusable, client id in use
        print(f"asyncmigfra: cannot run: {exc}", file=sys.stderr)
        return 2


def _demo_broker(args: argparse.Namespace) -> tuple[str, int] | None:
    """``--broker`` of the demo as (host, port), ``None`` for the embedded broker."""
    from asyncmigfra.console.connection import parse_broker  # noqa: PLC0415
    from asyncmigfra.console.exits import USAGE, CliError  # noqa: PLC0415

    if getattr(args, "broker", None) is None:
        return None
    if args.port is not None:
        raise CliError(USAGE, "--port is the embedded broker's; with --broker give HOST:PORT")
    return parse_broker(args.broker)


def _demo(args: argparse.Namespace) -> int:
    """The demo; its options are read before the connection defaults are filled in, so that
    an explicit ``--mqtt-protocol 5`` is told apart from the default."""
    from asyncmigfra.console.exits import BROKER, CliError  # noqa: PLC0415
    from asyncmigfra.demo import DemoError, run_demo, run_serve  # noqa: PLC0415
    from asyncmigfra.terminal import safe  # noqa: PLC0415

    protocol = getattr(args, "mqtt_protocol", None)
    try:
        broker = _demo_broker(args)
        if args.serve:
            prefix = getattr(args, "topic_prefix", None) or "fast/migfra"
            return asyncio.run(
                run_serve(broker=broker, prefix=prefix, port=args.port, protocol=protocol)
            )
        return asyncio.run(
            run_demo(broker=broker, quiet=args.quiet, port=args.port, protocol=protocol)
        )
    except CliError as exc:
        print(f"asyncmigfra: {safe(exc.message)}", file=sys.stderr)
        return exc.code
    except DemoError as exc:  # the broker's words, a host name: escaped
        print(f"asyncmigfra: {safe(str(exc))}", file=sys.stderr)
        return BROKER


# ------------------------------------------------------------------------------ clients


def _given_options(args: argparse.Namespace) -> tuple[str, ...]:
    """The connection options the user gave, as options again (for the commands that hints
    suggest: they must reach the same broker, as the same user, under the same prefix)."""
    words: list[str] = []
    for key, default in _CONN_DEFAULTS.items():
        value = getattr(args, key)
        if key == "json" or value == default:
            continue
        option = "--" + key.replace("_", "-")
        if value is True:
            words.append(option)
        else:
            words.extend([option, f"{value:g}" if isinstance(value, float) else str(value)])
    return tuple(words)


def _connection(args: argparse.Namespace, argv: Sequence[str] = ()) -> Any:
    from asyncmigfra.console.connection import (  # noqa: PLC0415
        Connection,
        parse_broker,
        read_password,
        tls_context,
    )

    use_tls = bool(args.tls or args.tls_ca or args.tls_cert or args.tls_insecure)
    host, port = parse_broker(args.broker or "localhost", tls=use_tls)
    tls = None
    if use_tls:
        tls = tls_context(
            ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, insecure=args.tls_insecure
        )
    prefix = args.topic_prefix.strip("/")
    if not prefix or "+" in prefix or "#" in prefix:
        from asyncmigfra.console.exits import USAGE, CliError  # noqa: PLC0415

        raise CliError(USAGE, f"--topic-prefix: not a topic prefix: {args.topic_prefix!r}")
    return Connection(
        host=host,
        port=port,
        protocol=args.mqtt_protocol,
        username=args.username,
        password=read_password(args.password_file),
        tls=tls,
        prefix=prefix,
        wait=args.wait,
        options=_given_options(args),
        command_line=tuple(argv),
    )


def _client_call(args: argparse.Namespace) -> Callable[[], Coroutine[Any, Any, int]]:
    """The coroutine function for the client command in ``args`` (built before the loop runs
    so that usage errors never open a connection)."""
    from asyncmigfra.console import commands as c  # noqa: PLC0415
    from asyncmigfra.console.output import Out  # noqa: PLC0415
    from asyncmigfra.console.taskfile import prepare  # noqa: PLC0415

    conn = _connection(args, getattr(args, "argv", ()))
    out = Out(json_mode=args.json)
    cmd = args.command
    common: dict[str, Any] = {
        "limit": getattr(args, "timeout", None),
        "force": getattr(args, "force", False),
    }
    if cmd == "send":
        name = "stdin" if args.file == "-" else args.file
        task = prepare(c.read_task_file(args.file), name=name, new_id=args.new_id)
        again = conn.command("send", args.file, "--host", args.host, "--new-id")
        return lambda: c.send(conn, out, task=task, host=args.host, again=again, **common)
    if cmd == "migrate":
        params: dict[str, object] = {
            "migration-type": args.migration_type,
            "max-downtime": args.max_downtime,
            "bandwidth": args.bandwidth,
            "completion-timeout": args.completion_timeout,
            "timeout-action": args.timeout_action,
            "auto-converge": args.auto_converge,
        }
        return lambda: c.migrate(
            conn,
            out,
            vm=args.vm,
            source=args.source,
            destination=args.destination,
            params=params,
            follow=args.follow,
            swap_with=args.swap_with,
            **common,
        )
    if cmd == "start":
        return lambda: c.start(
            conn,
            out,
            vms=args.vms,
            xmls=c.read_xml_files(args.xml),
            probe=not args.no_probe,
            host=args.host,
            **common,
        )
    if cmd == "stop":
        flags = {
            "force": args.power_off,
            "force_after_timeout": args.force_after_timeout,
            "undefine": args.undefine,
        }
        return lambda: c.stop(conn, out, vms=args.vms, host=args.host, flags=flags, **common)
    if cmd in {"suspend", "resume"}:
        return lambda: c.suspend_resume(
            conn, out, task=f"{cmd} vm", vms=args.vms, host=args.host, **common
        )
    if cmd == "repin":
        return lambda: c.repin(
            conn,
            out,
            vm=args.vm,
            vcpu_map=args.cpus,
            host=args.host,
            follow=args.follow,
            **common,
        )
    if cmd == "cancel":
        return lambda: c.cancel(conn, out, target=args.target, host=args.host, **common)
    if cmd == "evacuate":
        evac: dict[str, object] = {
            "migration-type": args.migration_type,
            "mode": args.mode,
            "max-parallel": args.max_parallel,
        }
        return lambda: c.evacuate(
            conn,
            out,
            host=args.evac_host,
            destinations=args.destinations,
            params=evac,
            follow=args.follow,
            **common,
        )
    if cmd == "status":
        return lambda: c.status(conn, out, host=args.host, **common)
    if cmd == "watch":
        return lambda: c.watch(conn, out, host=args.host, vm=args.vm, task_id=args.task_id)
    raise AssertionError(cmd)  # pragma: no cover - argparse restricts the choices


def _client(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    from asyncmigfra.console.exits import INTERRUPTED, CliError  # noqa: PLC0415
    from asyncmigfra.terminal import safe  # noqa: PLC0415

    args.argv = tuple(argv)  # the command line, for hints that repeat it
    try:
        call = _client_call(args)
        return asyncio.run(call())
    except CliError as exc:  # the message may quote wire values: escaped, as all output
        print(f"asyncmigfra: {safe(exc.message)}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:  # Ctrl-C before or after the session caught it
        print("asyncmigfra: interrupted", file=sys.stderr)
        return INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; a closed stdout (``| head``) ends any command quietly with
    :data:`~asyncmigfra.console.exits.CLOSED_PIPE`."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    except BrokenPipeError:
        return _closed_pipe()
    except BaseExceptionGroup as group:  # raised in a task of the command's TaskGroup
        if group.split(BrokenPipeError)[1] is not None:
            raise
        return _closed_pipe()
    return code


def _closed_pipe() -> int:
    """The reader of stdout went away: nothing more to say to anyone. stdout now writes to
    /dev/null, so that the interpreter's final flush of what is left in its buffer does not
    fail again (the pattern the Python docs recommend, signal module: "Note on SIGPIPE")."""
    from asyncmigfra.console.exits import CLOSED_PIPE  # noqa: PLC0415

    with contextlib.suppress(OSError, ValueError):  # stdout closed or replaced
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return CLOSED_PIPE


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "agent":
        return _agent(args)
    if args.command == "demo":
        return _demo(args)
    for key, value in _CONN_DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    if args.command is None:
        parser.print_help()
        return 2
    return _client(args, sys.argv[1:] if argv is None else argv)
