"""The command line's grammar: every command, its options and their checks (argparse).

:mod:`asyncmigfra.cli` runs what this parses. The connection options (``--broker``,
``--mqtt-protocol``, TLS, credentials, ``--json``, ``--topic-prefix``, ``--wait``) are accepted
both before and after the command name (``asyncmigfra --broker b status`` and
``asyncmigfra status --broker b``): people type them in either place. They are declared with
``SUPPRESS`` defaults on both parsers, so the value given in either place survives, and
:data:`CONN_DEFAULTS` fills in the real defaults afterwards.
"""

from __future__ import annotations

import argparse
from typing import Any

from asyncmigfra import __version__
from asyncmigfra.console.exits import EPILOG as _EPILOG
from asyncmigfra.model import HISTORY_LIMIT_MAX
from asyncmigfra.wire.parsing import (
    MAX_MIGRATE_DISKS,
    valid_disk_target,
    valid_task_id,
    valid_vm_name,
)

__all__ = ["CONN_DEFAULTS", "build_parser"]


#: Defaults of the connection options (declared with SUPPRESS, see the module docstring).
CONN_DEFAULTS: dict[str, Any] = {
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

_MIGRATION_TYPES = ("live", "warm", "post-copy", "offline", "auto")


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def _task_id(text: str) -> str:
    """A task id as the agent takes it (so a typo is a usage error, not a refused task)."""
    if not text or not valid_task_id(text):
        raise argparse.ArgumentTypeError(
            "not a task id (at most 256 characters, no control characters)"
        )
    return text


def _vm_name(text: str) -> str:
    if not valid_vm_name(text):
        raise argparse.ArgumentTypeError(
            "not a VM name (1-200 characters, no control characters, no '/')"
        )
    return text


def _since(text: str) -> str:
    from asyncmigfra.console.history import since_argument  # noqa: PLC0415

    try:
        return since_argument(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _history_limit(text: str) -> int:
    value = _positive_int(text)
    if value > HISTORY_LIMIT_MAX:
        raise argparse.ArgumentTypeError(f"at most {HISTORY_LIMIT_MAX}: {text!r}")
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


def _disk_list(text: str) -> tuple[str, ...]:
    """``vda,vdb`` -> ("vda", "vdb"): target devs for ``migrate-disks``, checked as the agent
    checks them (so a typo is a usage error, not a rejected task)."""
    disks = tuple(part.strip() for part in text.split(","))
    bad = [d for d in disks if not valid_disk_target(d)]
    if bad:
        raise argparse.ArgumentTypeError(
            f"not a disk target: {bad[0]!r} (a-z then a-z or 0-9, at most 32: vda,vdb)"
        )
    if len(disks) > MAX_MIGRATE_DISKS:
        raise argparse.ArgumentTypeError(f"at most {MAX_MIGRATE_DISKS} disks, got {len(disks)}")
    twice = sorted({d for d in disks if disks.count(d) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"disk named twice: {twice[0]!r}")
    return disks


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


_PLAN_HELP = (
    "predict a migration (plan VM --to B) or an evacuation (plan evacuate HOST --to B ...):"
    " mode, convergence, duration, downtime and blockers; nothing is changed"
)


def _plan_command(pl: argparse.ArgumentParser) -> None:
    pl.add_argument(
        "target",
        nargs="+",
        metavar="VM | evacuate HOST",
        help="a VM to plan a migration for, or 'evacuate HOST' for an evacuation",
    )
    pl.add_argument(
        "--from", dest="source", metavar="A", help="a VM's host (default: the agent that has it)"
    )
    pl.add_argument(
        "--to",
        dest="destinations",
        action="append",
        required=True,
        metavar="B",
        help="the destination (an evacuation: repeat for more)",
    )
    _migration_type(pl)
    pl.add_argument("--max-downtime", type=_positive_int, metavar="MS", help="downtime limit")
    pl.add_argument("--bandwidth", type=_positive_int, metavar="MIBS", help="MiB/s cap")
    pl.add_argument("--completion-timeout", type=_positive_float, metavar="S", help="time limit")
    pl.add_argument(
        "--timeout-action",
        choices=["abort", "post-copy", "suspend"],
        help="what happens at the completion timeout (default: the agent's)",
    )
    pl.add_argument("--auto-converge", action="store_true", help="let QEMU throttle the guest")
    pl.add_argument("--copy-storage", choices=["none", "all", "inc"], help="copy non-shared disks")
    pl.add_argument("--migrate-disks", type=_disk_list, metavar="DEVS", help="disks to copy")
    pl.add_argument(
        "--copy-storage-synchronous-writes", action="store_true", help="synchronous disk writes"
    )
    pl.add_argument("--mode", choices=["auto", "compact", "scatter"], help="evacuation placement")
    pl.add_argument("--max-parallel", type=_positive_int, metavar="N", help="evacuation: at once")
    pl.add_argument(
        "--schedule",
        choices=["placement", "predicted"],
        help="evacuation: predicted shows the waves it would run in",
    )
    _addressed(pl, host=False)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``asyncmigfra`` and all its commands."""
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
        "--copy-storage",
        choices=["none", "all", "inc"],
        help="copy the VM's non-shared disks: all (whole images) or inc (the top layer; the"
        " destination has the backing images); default: the agent's (none)",
    )
    mig.add_argument(
        "--migrate-disks",
        type=_disk_list,
        metavar="DEVS",
        help="the disks to copy, by target dev (vda,vdb; default: every writable,"
        " non-shared disk); needs a storage copy",
    )
    mig.add_argument(
        "--copy-storage-synchronous-writes",
        action="store_true",
        help="the guest's disk writes go to both hosts at once, so a busy disk converges;"
        " needs a storage copy",
    )
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

    t = client("tune", "change a running migration: bandwidth, downtime, post-copy, finish now")
    t.add_argument(
        "target", metavar="ID", type=_task_id, help="the id of the migrate or evacuate task"
    )
    t.add_argument(
        "--vm", metavar="NAME", type=_vm_name, help="only this VM of an evacuation or a swap"
    )
    t.add_argument(
        "--bandwidth", type=_non_negative_int, metavar="MIBS", help="MiB/s cap; 0: unlimited"
    )
    t.add_argument("--max-downtime", type=_positive_int, metavar="MS", help="downtime target")
    now = t.add_mutually_exclusive_group()
    now.add_argument(
        "--post-copy",
        action="store_true",
        help="switch to post-copy now (a migration started with --post-copy only)",
    )
    now.add_argument(
        "--force-complete",
        action="store_true",
        help="pause the guest on the source so the copy finishes now",
    )
    _addressed(t)

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
    ev.add_argument(
        "--schedule",
        choices=["placement", "predicted"],
        help="predicted: in waves planned from each guest's dirty rate and the links",
    )
    _migration_type(ev, offline=False)
    ev.add_argument(
        "--follow", action="store_true", help="one live bar per VM, Ctrl-C offers to cancel"
    )
    _addressed(ev, host=False)

    _plan_command(client("plan", _PLAN_HELP))

    stat = client("status", "agents and their presence; with HOST its tasks and domains")
    stat.add_argument("host", nargs="?", metavar="HOST")
    _addressed(stat, host=False)

    hist = client("history", "what agents did, newest first: duration, downtime, destination, code")
    hist.add_argument(
        "host", nargs="?", metavar="HOST", help="this agent (default: every online one)"
    )
    hist.add_argument("--vm", metavar="NAME", type=_vm_name, help="only this VM")
    hist.add_argument(
        "--since",
        type=_since,
        metavar="T",
        help="only what began since T: ISO 8601 (2026-12-07T10:00Z) or an age (30m, 12h, 7d)",
    )
    hist.add_argument(
        "--limit", type=_history_limit, metavar="N", help="entries at most, 1-1000 (default 100)"
    )
    _addressed(hist, host=False)

    fol = client(
        "follow",
        "the live view of a running task started elsewhere (Ctrl-C leaves; run it again to"
        " re-attach); a finished task's outcome",
    )
    fol.add_argument("target", metavar="ID", type=_task_id, help="the task's id")
    fol.add_argument(
        "follow_host", nargs="?", metavar="HOST", help="its agent (default: ask every online one)"
    )
    fol.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="S",
        help="give up (exit 4) without a result after S seconds",
    )

    w = client("watch", "a live stream of the cluster's events, results and presence (Ctrl-C ends)")
    w.add_argument("--host", metavar="NAME", help="only this agent")
    w.add_argument("--vm", metavar="VM", help="only events and results about this VM")
    w.add_argument(
        "--id", dest="task_id", metavar="ID", help="only events and results of this task"
    )
    return p
