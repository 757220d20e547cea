"""Command line: ``asyncmigfra agent``, ``asyncmigfra demo`` and ``--version``.

Exit codes: 0 success, 1 a task or command failed, 2 bad configuration or usage,
3 the shutdown hung and the last-resort timer ended the process.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from asyncmigfra import __version__
from asyncmigfra.errors import ConfigError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="asyncmigfra",
        description="Start, stop and live-migrate VMs on MQTT command (migfra-compatible).",
    )
    p.add_argument("--version", action="version", version=f"asyncmigfra {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

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

    demo = sub.add_parser("demo", help="two fake hosts, one live migration, in under 30 s")
    demo.add_argument("--broker", help="HOST[:PORT] of an MQTT broker (default: an embedded one)")
    demo.add_argument("--quiet", action="store_true", help="print only the results")
    return p


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


def _demo(args: argparse.Namespace) -> int:
    from asyncmigfra.demo import run_demo  # noqa: PLC0415

    return asyncio.run(run_demo(broker=args.broker, quiet=args.quiet))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "agent":
        return _agent(args)
    if args.command == "demo":
        return _demo(args)
    _parser().print_help()
    return 2
