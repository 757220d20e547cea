"""The ``fake`` back-end's options (the ``hypervisor:`` map) and its entry point, :func:`create`."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from asyncmigfra.errors import ConfigError
from asyncmigfra.hypervisor.base import DomainState
from asyncmigfra.hypervisor.fake.backend import FakeHypervisor
from asyncmigfra.hypervisor.fake.cluster import (
    _DEFAULT_CPUS,
    _DEFAULT_DOMAIN_MEMORY,
    _DEFAULT_HOST_MEMORY,
    _MIB,
    FakeCluster,
    FakeDomain,
)
from asyncmigfra.hypervisor.fake.faults import FAULT_OPS
from asyncmigfra.hypervisor.registry import (
    check_keys,
    opt_bool,
    opt_float,
    opt_int,
    opt_list,
    opt_map,
    opt_str,
)
from asyncmigfra.wire.parsing import MAX_MIGRATE_DISKS, valid_disk_target

_ALLOWED = frozenset(
    {
        "host",
        "cpus",
        "memory",
        "domains",
        "peers",
        "bandwidth",
        "nic-rate",
        "latency",
        "start-delay",
        "stop-delay",
        "start-timeout",
        "stop-timeout",
        "time-scale",
        "postcopy-break-for",
        "fail",
    }
)
_IGNORED = frozenset({"driver", "transport", "nodes"})
_DOMAIN_KEYS = frozenset(
    {
        "name",
        "vcpus",
        "memory",
        "state",
        "persistent",
        "dirty-rate",
        "stop-delay",
        "setup-time",
        "disks",
    }
)
_PEER_KEYS = frozenset({"cpus", "memory", "domains", "nic-rate"})
_CONFIG_STATES = {
    "running": DomainState.RUNNING,
    "paused": DomainState.PAUSED,
    "shutoff": DomainState.SHUTOFF,
}


@dataclass(frozen=True, slots=True)
class _HostConfig:
    name: str
    cpus: int | None
    memory: int | None
    domains: tuple[FakeDomain, ...]
    #: Bytes/s (``nic-rate`` is given in MiB/s); ``None``: not given.
    nic_rate: float | None = None


def _parse_domains(value: object, path: str, host_memory: int | None) -> tuple[FakeDomain, ...]:
    result: list[FakeDomain] = []
    seen: set[str] = set()
    for i, item in enumerate(opt_list(value, path)):
        item_path = f"{path}[{i}]"
        entry = opt_map(item, item_path)
        check_keys(entry, _DOMAIN_KEYS, path=item_path)
        if "name" not in entry:
            raise ConfigError("required key is missing", path=f"{item_path}.name")
        name = opt_str(entry["name"], f"{item_path}.name")
        if name in seen:
            raise ConfigError(f"domain {name!r} is listed twice", path=f"{item_path}.name")
        seen.add(name)
        state_word = str(entry.get("state", "running")).lower()
        if state_word not in _CONFIG_STATES:
            raise ConfigError(
                f"expected running, paused or shutoff, got {entry['state']!r}",
                path=f"{item_path}.state",
            )
        persistent = opt_bool(entry.get("persistent", True), f"{item_path}.persistent")
        state = _CONFIG_STATES[state_word]
        if state is DomainState.SHUTOFF and not persistent:
            raise ConfigError(
                "a transient domain cannot be shut off (it would not exist)",
                path=f"{item_path}.persistent",
            )
        stop_delay = entry.get("stop-delay")
        setup_time = entry.get("setup-time")
        disks = _parse_disks(entry["disks"], f"{item_path}.disks") if "disks" in entry else None
        result.append(
            FakeDomain(
                name,
                vcpus=opt_int(entry.get("vcpus", 1), f"{item_path}.vcpus", minimum=1),
                memory=opt_int(
                    entry.get("memory", _DEFAULT_DOMAIN_MEMORY), f"{item_path}.memory", minimum=1
                ),
                state=state,
                persistent=persistent,
                dirty_rate=round(
                    opt_float(entry.get("dirty-rate", 0), f"{item_path}.dirty-rate") * _MIB
                ),
                stop_delay=None
                if stop_delay is None
                else opt_float(stop_delay, f"{item_path}.stop-delay"),
                setup_time=None
                if setup_time is None
                else opt_float(setup_time, f"{item_path}.setup-time"),
                disks=disks,
            )
        )
    if host_memory is not None:
        used = sum(d.memory for d in result if d.active)
        if used > host_memory:
            raise ConfigError(
                f"active domains need {used} KiB but the host has {host_memory} KiB", path=path
            )
    return tuple(result)


def _parse_disks(value: object, path: str) -> dict[str, int]:
    """``disks``: target dev -> size in MiB (``{}``: no local disk to copy)."""
    disks: dict[str, int] = {}
    entries = opt_map({} if value is None else value, path)
    if len(entries) > MAX_MIGRATE_DISKS:
        raise ConfigError(f"at most {MAX_MIGRATE_DISKS} disks, got {len(entries)}", path=path)
    for target, size in entries.items():
        if not valid_disk_target(target):
            raise ConfigError(
                "expected a disk target such as vda (a-z then a-z or 0-9, at most 32 characters)",
                path=f"{path}.{target}",
            )
        disks[target] = round(opt_float(size, f"{path}.{target}") * _MIB)
    return disks


def _parse_host(name: str, options: Mapping[str, object], path: str) -> _HostConfig:
    cpus = opt_int(options["cpus"], f"{path}.cpus", minimum=1) if "cpus" in options else None
    memory = (
        opt_int(options["memory"], f"{path}.memory", minimum=1) if "memory" in options else None
    )
    domains: tuple[FakeDomain, ...] = ()
    if "domains" in options:
        domains = _parse_domains(
            options["domains"], f"{path}.domains", memory or _DEFAULT_HOST_MEMORY
        )
    nic_rate = None
    if "nic-rate" in options:
        nic_rate = opt_float(options["nic-rate"], f"{path}.nic-rate", exclusive=True) * _MIB
    return _HostConfig(name=name, cpus=cpus, memory=memory, domains=domains, nic_rate=nic_rate)


def _parse_faults(value: object) -> dict[str, int | None]:
    faults: dict[str, int | None] = {}
    for op, count in opt_map(value, "hypervisor.fail").items():
        path = f"hypervisor.fail.{op}"
        if op not in FAULT_OPS:
            raise ConfigError(f"unknown operation (known: {', '.join(FAULT_OPS)})", path=path)
        if isinstance(count, str) and count.strip().lower() == "always":
            faults[op] = None
        else:
            faults[op] = opt_int(count, path)
    return faults


def create(
    options: Mapping[str, object], *, hostname: str, shared: MutableMapping[str, object]
) -> FakeHypervisor:
    """The ``fake`` entry point: validate every option, then build or join the cluster.

    All options are checked before the shared cluster is touched, so a bad config leaves
    no half-created hosts behind for the other agents of the process.
    """
    check_keys(options, _ALLOWED, ignored=_IGNORED)
    host_name = opt_str(options.get("host", hostname), "hypervisor.host")
    own = _parse_host(host_name, options, "hypervisor")
    peers: list[_HostConfig] = []
    if "peers" in options:
        for peer, peer_options in opt_map(options["peers"], "hypervisor.peers").items():
            path = f"hypervisor.peers.{peer}"
            if peer == host_name:
                raise ConfigError("is this agent's own host", path=path)
            peer_map = opt_map({} if peer_options is None else peer_options, path)
            check_keys(peer_map, _PEER_KEYS, path=path)
            peers.append(_parse_host(peer, peer_map, path))

    def number(key: str, default: float, *, positive: bool = False) -> float:
        if key not in options:
            return default
        return opt_float(options[key], f"hypervisor.{key}", exclusive=positive)

    hv_kwargs = {
        "bandwidth": number("bandwidth", 1000.0, positive=True),
        "latency": number("latency", 0.0),
        "start_delay": number("start-delay", 0.0),
        "stop_delay": number("stop-delay", 0.0),
        "start_timeout": number("start-timeout", 60.0, positive=True),
        "stop_timeout": number("stop-timeout", 60.0, positive=True),
        "time_scale": number("time-scale", 1.0, positive=True),
        "postcopy_break_for": number("postcopy-break-for", 2.0),
    }
    faults = _parse_faults(options["fail"]) if "fail" in options else {}

    cluster = FakeCluster.of(shared)
    host = cluster.add_host(
        host_name, cpus=own.cpus or _DEFAULT_CPUS, memory=own.memory or _DEFAULT_HOST_MEMORY
    )
    if own.cpus is not None:
        host.cpus = own.cpus
    if own.memory is not None:
        host.memory = own.memory
    if own.nic_rate is not None:
        host.nic_rate = own.nic_rate
    for dom in own.domains:
        host.domains.setdefault(dom.name, dom)
    for peer_config in peers:
        if peer_config.name not in cluster.hosts:
            peer_host = cluster.add_host(
                peer_config.name,
                cpus=peer_config.cpus or _DEFAULT_CPUS,
                memory=peer_config.memory or _DEFAULT_HOST_MEMORY,
                nic_rate=peer_config.nic_rate,
            )
            for dom in peer_config.domains:
                peer_host.domains[dom.name] = dom
    return FakeHypervisor(cluster=cluster, host=host, faults=faults, **hv_kwargs)
