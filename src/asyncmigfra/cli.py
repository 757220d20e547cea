"""Command line: the agent, the demo, and the client commands people use to drive agents.

``asyncmigfra agent`` runs an agent; ``asyncmigfra demo`` shows one live migration (and
``demo --serve`` keeps two fake hosts running to try the client commands on). The client
commands (``send``, ``migrate``, ``start``, ``stop``, ``suspend``, ``resume``, ``repin``,
``cancel``, ``evacuate``, ``status``, ``history``, ``follow``, ``watch``) are implemented in
:mod:`asyncmigfra.console`; this module runs what the parser read.

The grammar (every command and option) is :mod:`asyncmigfra.console.arguments`.

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

from asyncmigfra.console.arguments import CONN_DEFAULTS, build_parser
from asyncmigfra.errors import ConfigError, StartupError

__all__ = ["main"]


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
    for key, default in CONN_DEFAULTS.items():
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


def _migration_params(args: argparse.Namespace) -> dict[str, object]:
    """The migration's ``parameter`` keys as ``migrate`` and ``plan`` take them."""
    return {
        "migration-type": args.migration_type,
        "max-downtime": args.max_downtime,
        "bandwidth": args.bandwidth,
        "completion-timeout": args.completion_timeout,
        "timeout-action": args.timeout_action,
        "auto-converge": args.auto_converge,
        "copy-storage": args.copy_storage,
        "migrate-disks": args.migrate_disks,
        "copy-storage-synchronous-writes": args.copy_storage_synchronous_writes,
    }


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
        params = _migration_params(args)
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
    if cmd == "tune":
        return _tune_call(args, conn, out, common)
    if cmd == "evacuate":
        evac: dict[str, object] = {
            "migration-type": args.migration_type,
            "mode": args.mode,
            "max-parallel": args.max_parallel,
            "schedule": args.schedule,
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
    if cmd == "plan":
        return _plan_call(args, conn, out, common)
    if cmd == "status":
        return lambda: c.status(conn, out, host=args.host, **common)
    if cmd == "history":
        from asyncmigfra.console.history import history  # noqa: PLC0415

        return lambda: history(
            conn, out, host=args.host, vm=args.vm, since=args.since, count=args.limit, **common
        )
    if cmd == "follow":
        from asyncmigfra.console.attach import follow  # noqa: PLC0415

        return lambda: follow(
            conn, out, task_id=args.target, host=args.follow_host, limit=args.timeout
        )
    if cmd == "watch":
        return lambda: c.watch(conn, out, host=args.host, vm=args.vm, task_id=args.task_id)
    raise AssertionError(cmd)  # pragma: no cover - argparse restricts the choices


def _tune_call(
    args: argparse.Namespace, conn: Any, out: Any, common: dict[str, Any]
) -> Callable[[], Coroutine[Any, Any, int]]:
    """``tune``: at least one change, checked before anything is sent."""
    from asyncmigfra.console import commands as c  # noqa: PLC0415
    from asyncmigfra.console.exits import USAGE, CliError  # noqa: PLC0415

    changes = (args.bandwidth, args.max_downtime)
    if all(v is None for v in changes) and not (args.post_copy or args.force_complete):
        raise CliError(
            USAGE,
            "tune: say what to change: --bandwidth, --max-downtime, --post-copy or"
            " --force-complete",
        )
    return lambda: c.tune(
        conn,
        out,
        target=args.target,
        host=args.host,
        vm=args.vm,
        bandwidth=args.bandwidth,
        max_downtime=args.max_downtime,
        post_copy=args.post_copy,
        force_complete=args.force_complete,
        **common,
    )


def _plan_call(
    args: argparse.Namespace, conn: Any, out: Any, common: dict[str, Any]
) -> Callable[[], Coroutine[Any, Any, int]]:
    """``plan VM --to B`` or ``plan evacuate HOST --to B ...``."""
    from asyncmigfra.console import planning  # noqa: PLC0415
    from asyncmigfra.console.exits import USAGE, CliError  # noqa: PLC0415

    params = _migration_params(args)
    target = list(args.target)
    if len(target) == 2 and target[0] == "evacuate":
        if args.source is not None:
            raise CliError(USAGE, "plan evacuate: the host is HOST, not --from")
        evac = {
            **params,
            "mode": args.mode,
            "max-parallel": args.max_parallel,
            "schedule": args.schedule,
        }
        return lambda: planning.plan_evacuation(
            conn, out, host=target[1], destinations=args.destinations, params=evac, **common
        )
    if len(target) != 1:
        raise CliError(USAGE, "plan: give one VM, or 'evacuate HOST'")
    if len(args.destinations) != 1:
        raise CliError(USAGE, "plan VM: give one --to")
    if args.mode is not None or args.max_parallel is not None or args.schedule is not None:
        raise CliError(
            USAGE,
            "plan VM: --mode, --max-parallel and --schedule are for 'plan evacuate HOST'",
        )
    return lambda: planning.plan_migration(
        conn,
        out,
        vm=target[0],
        source=args.source,
        destination=args.destinations[0],
        params=params,
        **common,
    )


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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "agent":
        return _agent(args)
    if args.command == "demo":
        return _demo(args)
    for key, value in CONN_DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    if args.command is None:
        parser.print_help()
        return 2
    return _client(args, sys.argv[1:] if argv is None else argv)
