"""The ``hypervisor:`` options of the ``libvirt`` back-end (:func:`parse_options`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from asyncmigfra.errors import ConfigError
from asyncmigfra.hypervisor.registry import (
    check_keys,
    opt_float,
    opt_int,
    opt_list,
    opt_map,
    opt_str,
)

_DEFAULT_TEMPLATE = "{driver}+{transport}://{host}/system"
_LXC_TEMPLATE = "{driver}+{transport}://{host}/"
_WORD_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True, slots=True, kw_only=True)
class HostAddress:
    """How to reach one host (``hosts:`` entry); ``None``: derive it from the template."""

    uri: str | None = None
    p2p_uri: str | None = None
    migrate_uri: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LibvirtConfig:
    """The validated ``hypervisor:`` options."""

    uri: str = "qemu:///system"
    driver: str = "qemu"
    transport: str = "ssh"
    #: ``None``: the driver's default template.
    destination_uri: str | None = None
    start_timeout: float = 60.0
    stop_timeout: float = 60.0
    nodes: tuple[str, ...] = ()
    keepalive_interval: int = 5
    keepalive_count: int = 3
    max_threads: int = 16
    hosts: Mapping[str, HostAddress] = field(default_factory=dict)


def default_local_uri(driver: str) -> str:
    """The original's local URI: ``<driver>:///system``, ``lxctools:///`` for lxctools."""
    return "lxctools:///" if driver == "lxctools" else f"{driver}:///system"


_ALLOWED: Final = frozenset(
    {
        "uri",
        "driver",
        "transport",
        "destination-uri",
        "start-timeout",
        "stop-timeout",
        "nodes",
        "keepalive-interval",
        "keepalive-count",
        "max-threads",
        "hosts",
    }
)
_HOST_KEYS: Final = frozenset({"uri", "p2p-uri", "migrate-uri"})


def _word(value: object, path: str) -> str:
    text = opt_str(value, path)
    if not _WORD_RE.match(text):
        raise ConfigError(f"expected a word such as qemu or ssh, got {value!r}", path=path)
    return text


def _template(value: object, path: str) -> str:
    text = opt_str(value, path)
    try:
        sample = text.format(driver="qemu", transport="ssh", host="node1")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"bad template {text!r} ({exc!r}); use {{driver}}, {{transport}} and {{host}}",
            path=path,
        ) from exc
    if "node1" not in sample:
        raise ConfigError(f"the template {text!r} must contain {{host}}", path=path)
    return text


def parse_options(options: Mapping[str, object]) -> LibvirtConfig:
    """Validate the ``hypervisor:`` map; errors name ``hypervisor.<key>``."""
    check_keys(options, _ALLOWED)
    driver = _word(options.get("driver", "qemu"), "hypervisor.driver")
    transport = _word(options.get("transport", "ssh"), "hypervisor.transport")
    uri = opt_str(options.get("uri", default_local_uri(driver)), "hypervisor.uri")
    template = (
        _template(options["destination-uri"], "hypervisor.destination-uri")
        if "destination-uri" in options
        else None
    )

    def seconds(key: str) -> float:
        return opt_float(options.get(key, 60.0), f"hypervisor.{key}", exclusive=True)

    nodes: list[str] = []
    if "nodes" in options and options["nodes"] is not None:
        for i, node in enumerate(opt_list(options["nodes"], "hypervisor.nodes")):
            nodes.append(opt_str(node, f"hypervisor.nodes[{i}]"))
    hosts: dict[str, HostAddress] = {}
    if "hosts" in options and options["hosts"] is not None:
        for host, entry in opt_map(options["hosts"], "hypervisor.hosts").items():
            path = f"hypervisor.hosts.{host}"
            mapping = opt_map({} if entry is None else entry, path)
            check_keys(mapping, _HOST_KEYS, path=path)
            hosts[host] = HostAddress(
                **{
                    key.replace("-", "_"): opt_str(mapping[key], f"{path}.{key}")
                    for key in _HOST_KEYS
                    if key in mapping
                }
            )
    return LibvirtConfig(
        uri=uri,
        driver=driver,
        transport=transport,
        destination_uri=template,
        start_timeout=seconds("start-timeout"),
        stop_timeout=seconds("stop-timeout"),
        nodes=tuple(nodes),
        keepalive_interval=opt_int(
            options.get("keepalive-interval", 5), "hypervisor.keepalive-interval"
        ),
        keepalive_count=opt_int(options.get("keepalive-count", 3), "hypervisor.keepalive-count"),
        max_threads=opt_int(options.get("max-threads", 16), "hypervisor.max-threads", minimum=2),
        hosts=hosts,
    )
