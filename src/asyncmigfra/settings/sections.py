"""The sections that need more than the generic converter: password, topics, hooks, agent.

``_settings`` builds a whole :class:`~asyncmigfra.settings.model.Settings` from a checked tree.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from asyncmigfra.errors import ConfigError
from asyncmigfra.settings.model import (
    HOOK_POINTS,
    HOOK_TOPIC_PLACEHOLDERS,
    MIGRATE_HOOK_POINTS,
    AgentSettings,
    HookSettings,
    HypervisorSettings,
    LimitsSettings,
    LoggingSettings,
    MetricsSettings,
    MigrationDefaults,
    MqttHookSettings,
    MqttSettings,
    PscomSettings,
    Settings,
    ShutdownSettings,
)
from asyncmigfra.settings.schema import (
    _COMMUNICATOR_EXTRA,
    _HOOK_EXTRA,
    _HOOK_KINDS,
    _HOOK_NAME_MAX,
    _HOOK_NAME_RE,
    _INT_RE,
    _MAX_TOPIC_BYTES,
    _PASSWORD_KEYS,
    _PLACEHOLDER_RE,
    _REDUCE_MEMORY_DEFAULT_PERCENT,
    _REDUCE_MEMORY_MIN_MIB,
    _as_map,
    _Context,
    _did_you_mean,
    _existing_file,
    _join,
    _num,
    _section,
    _show,
    _wire_name,
)
from asyncmigfra.streamoptions import StreamOptions, conflicts
from asyncmigfra.values import parse_number


def _password(extras: Mapping[str, object], ctx: _Context) -> str | None:
    """Resolve the MQTT password from exactly one of its three sources; never echo it."""
    given = [key for key in _PASSWORD_KEYS if extras.get(key) is not None]
    if len(given) > 1:
        raise ConfigError(
            f"set only one of {', '.join(_PASSWORD_KEYS)} (got {', '.join(given)})",
            path="communicator",
        )
    if not given:
        return None
    key = given[0]
    path = f"communicator.{key}"
    value = extras[key]
    if key == "password":
        if not isinstance(value, str):
            raise ConfigError("expected a string", path=path)
        return value
    if not isinstance(value, str):
        raise ConfigError(f"expected a string, got {_show(value)}", path=path)
    if key == "password-env":
        secret = os.environ.get(value)
        if secret is None:
            raise ConfigError(f"environment variable {value!r} is not set", path=path)
        if not secret:
            raise ConfigError(f"environment variable {value!r} is empty", path=path)
        return secret
    name = _existing_file(value, path, ctx)
    try:
        secret = Path(name).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {name}: {type(exc).__name__}", path=path) from None
    if not secret:
        raise ConfigError(f"{name} is empty", path=path)
    return secret


# --- topics ------------------------------------------------------------------------------------


def _sibling_topic(task_topic: str, leaf: str) -> str:
    """``a/b/task`` -> ``a/b/<leaf>``; a topic without ``/`` gets ``/<leaf>`` appended."""
    head, slash, _ = task_topic.rpartition("/")
    return f"{head}/{leaf}" if slash else f"{task_topic}/{leaf}"


def _check_topic_name(topic: str, path: str) -> None:
    """A topic the agent publishes to or subscribes to exactly: no wildcards."""
    if not topic:
        raise ConfigError("must not be empty", path=path)
    if "+" in topic or "#" in topic:
        raise ConfigError(f"must not contain the wildcards '+' or '#': {topic!r}", path=path)
    if "\0" in topic:
        raise ConfigError("must not contain NUL", path=path)
    if len(topic.encode("utf-8")) > _MAX_TOPIC_BYTES:
        raise ConfigError("is longer than MQTT allows (65535 bytes)", path=path)


def _check_topic_filter(topic: str, path: str) -> None:
    """A subscription filter: ``+`` and ``#`` only as whole levels, ``#`` only last."""
    if not topic:
        raise ConfigError("must not be empty", path=path)
    levels = topic.split("/")
    for index, level in enumerate(levels):
        if ("+" in level or "#" in level) and level not in {"+", "#"}:
            raise ConfigError(f"a wildcard must fill a whole level: {topic!r}", path=path)
        if level == "#" and index != len(levels) - 1:
            raise ConfigError(f"'#' must be the last level: {topic!r}", path=path)
    if "\0" in topic:
        raise ConfigError("must not contain NUL", path=path)


# --- sections ----------------------------------------------------------------------------------


def _mqtt(raw: object, ctx: _Context) -> MqttSettings:
    """``communicator``: fill what the original required from the host name, then check."""
    kwargs, extras = _section(MqttSettings, raw, "communicator", ctx, extra=_COMMUNICATOR_EXTRA)
    if "type" in extras and extras["type"] != "mqtt":
        raise ConfigError(
            f"expected 'mqtt' (the only communicator), got {_show(extras['type'])}",
            path="communicator.type",
        )
    name = ctx.hostname
    kwargs.setdefault("client_id", f"fast-migfra-{name}")
    kwargs.setdefault("task_topic", f"fast/migfra/{name}/task")
    kwargs.setdefault("result_topic", f"fast/migfra/{name}/result")
    kwargs.setdefault("event_topic", _sibling_topic(kwargs["task_topic"], "event"))
    kwargs.setdefault("status_topic", _sibling_topic(kwargs["task_topic"], "status"))
    settings = MqttSettings(**kwargs, password=_password(extras, ctx))

    def where(attr: str) -> str:
        return f"communicator.{_wire_name(MqttSettings, attr)}"

    for attr in ("host", "client_id"):
        if not getattr(settings, attr).strip():
            raise ConfigError("must not be empty", path=where(attr))
    seen: dict[str, str] = {}
    for attr in ("task_topic", "result_topic", "event_topic", "status_topic"):
        topic: str = getattr(settings, attr)
        _check_topic_name(topic, where(attr))
        if topic in seen:
            raise ConfigError(
                f"must differ from {_wire_name(MqttSettings, seen[topic])} ({topic!r})",
                path=where(attr),
            )
        seen[topic] = attr
    if settings.reconnect_max_delay < settings.reconnect_min_delay:
        raise ConfigError(
            f"must be at least reconnect-min-delay ({_num(settings.reconnect_min_delay)})",
            path=where("reconnect_max_delay"),
        )
    if settings.password is not None and settings.username is None and settings.protocol != "5":
        raise ConfigError(
            "required when a password is set and the protocol is 3.1.1",
            path="communicator.username",
        )
    return settings


def _hypervisor(raw: object) -> HypervisorSettings:
    """``hypervisor``: only the shape is checked; the back-end's factory checks its options."""
    mapping = _as_map(raw, "hypervisor")
    if not mapping:
        return HypervisorSettings()
    if "type" not in mapping:
        raise ConfigError(
            "missing: name the back-end (libvirt, dummy, fake, ...)", path="hypervisor.type"
        )
    kind = mapping["type"]
    if not isinstance(kind, str) or not kind.strip():
        raise ConfigError(f"expected a back-end name, got {_show(kind)}", path="hypervisor.type")
    options = {key: value for key, value in mapping.items() if key != "type"}
    defaults = HypervisorSettings()
    named: dict[str, str] = {}
    for key in ("driver", "transport"):
        value = options.get(key, getattr(defaults, key))
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(
                f"expected a non-empty string, got {_show(value)}", path=f"hypervisor.{key}"
            )
        named[key] = value
    return HypervisorSettings(type=kind, options=options, **named)


def _pscom(raw: object, ctx: _Context) -> PscomSettings:
    """``pscom-handler``: the request topic is published to, the response topic subscribed."""
    kwargs, _ = _section(PscomSettings, raw, "pscom-handler", ctx)
    settings = PscomSettings(**kwargs)
    _check_topic_name(settings.request_topic, "pscom-handler.request-topic")
    _check_topic_filter(settings.response_topic, "pscom-handler.response-topic")
    return settings


def _hook_when(raw: object, path: str) -> tuple[str, ...]:
    """``when``: one point or a non-empty list of them, duplicates dropped, order kept."""
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise ConfigError(
            f"expected one or a list of {', '.join(HOOK_POINTS)}, got {_show(raw)}", path=path
        )
    points: list[str] = []
    for index, item in enumerate(items):
        where = f"{path}[{index}]" if isinstance(raw, list) else path
        point = item.strip().lower() if isinstance(item, str) else item
        if point not in HOOK_POINTS:
            hint = _did_you_mean(point, HOOK_POINTS) if isinstance(point, str) else ""
            raise ConfigError(
                f"expected one of {', '.join(HOOK_POINTS)}, got {_show(item)}{hint}", path=where
            )
        assert isinstance(point, str)
        if point not in points:
            points.append(point)
    return tuple(points)


def _hook_command(raw: object, path: str) -> tuple[str, ...] | str:
    """``command``: a non-empty argv list (integers become text) or a shell command line."""
    if isinstance(raw, str):
        if not raw.strip():
            raise ConfigError("must not be empty", path=path)
        if "\0" in raw:
            raise ConfigError("must not contain NUL", path=path)
        return raw
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            f"expected a non-empty list (argv) or a string (run with /bin/sh -c), got {_show(raw)}",
            path=path,
        )
    argv: list[str] = []
    for index, item in enumerate(raw):
        where = f"{path}[{index}]"
        word = str(item) if isinstance(item, int) and not isinstance(item, bool) else item
        if not isinstance(word, str):
            raise ConfigError(f"expected a string, got {_show(item)}", path=where)
        if "\0" in word:
            raise ConfigError("must not contain NUL", path=where)
        argv.append(word)
    if not argv[0].strip():
        raise ConfigError("the program name must not be empty", path=f"{path}[0]")
    return tuple(argv)


def _check_hook_placeholders(topic: str, path: str) -> None:
    """Only ``<host>``, ``<vm_name>`` and ``<hook>`` are replaced: any other ``<...>`` is a
    typo that would otherwise end up in the topic literally."""
    for match in _PLACEHOLDER_RE.finditer(topic):
        word = match.group(0)
        if word not in HOOK_TOPIC_PLACEHOLDERS:
            hint = _did_you_mean(word, HOOK_TOPIC_PLACEHOLDERS) or (
                f" (known: {', '.join(HOOK_TOPIC_PLACEHOLDERS)})"
            )
            raise ConfigError(f"unknown placeholder {word!r}{hint}", path=path)


def _hook_mqtt(raw: object, path: str, ctx: _Context) -> MqttHookSettings:
    """``mqtt``: both topics are required; the request topic is published to exactly."""
    kwargs, _ = _section(MqttHookSettings, raw, path, ctx)
    for attr in ("request_topic", "response_topic"):
        if attr not in kwargs:
            raise ConfigError("missing", path=_join(path, _wire_name(MqttHookSettings, attr)))
    settings = MqttHookSettings(**kwargs)
    request_path = _join(path, "request-topic")
    response_path = _join(path, "response-topic")
    _check_topic_name(settings.request_topic, request_path)
    _check_topic_filter(settings.response_topic, response_path)
    _check_hook_placeholders(settings.request_topic, request_path)
    _check_hook_placeholders(settings.response_topic, response_path)
    return settings


def _hook_memory(raw: object, path: str) -> dict[str, Any]:
    """``memory``: ``"N%"`` of the current memory (1..100) or MiB as an integer (>= 16)."""
    if isinstance(raw, str) and raw.strip().endswith("%"):
        number = raw.strip()[:-1].strip()
        percent = parse_number(number)
        if percent is None:
            raise ConfigError(f"expected N% or MiB, got {_show(raw)}", path=path)
        if not 1 <= percent <= 100:
            raise ConfigError(f"must be between 1% and 100%, got {_num(percent)}%", path=path)
        return {"memory_percent": percent}
    if isinstance(raw, str) and _INT_RE.match(raw.strip()):
        raw = int(raw)
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise ConfigError(
            f"expected a percentage (50%) or MiB as an integer, got {_show(raw)}", path=path
        )
    if raw < _REDUCE_MEMORY_MIN_MIB:
        raise ConfigError(f"must be at least {_REDUCE_MEMORY_MIN_MIB} MiB, got {raw}", path=path)
    return {"memory_mib": raw}


def _hook(raw: object, path: str, ctx: _Context) -> HookSettings:
    """One ``hooks:`` entry."""
    kwargs, extras = _section(HookSettings, raw, path, ctx, extra=_HOOK_EXTRA)
    mapping = _as_map(raw, path)
    kinds = [key for key in _HOOK_KINDS if mapping.get(key) is not None]
    if len(kinds) != 1:
        got = ", ".join(kinds) if kinds else "none"
        raise ConfigError(f"set exactly one of {', '.join(_HOOK_KINDS)} (got {got})", path=path)
    name = kwargs.get("name")
    if name is None:
        raise ConfigError("missing", path=_join(path, "name"))
    if not _HOOK_NAME_RE.match(name) or len(name) > _HOOK_NAME_MAX:
        raise ConfigError(
            f"expected lower-case letters, digits and '-' (not first), at most "
            f"{_HOOK_NAME_MAX} characters, got {_show(name)}",
            path=_join(path, "name"),
        )
    when_path = _join(path, "when")
    if kinds[0] == "builtin":
        fixed = MIGRATE_HOOK_POINTS
        if extras.get("when") is not None:
            when = _hook_when(extras["when"], when_path)
            if set(when) != set(fixed):
                raise ConfigError(
                    f"{kwargs['builtin']} always runs at {' and '.join(fixed)}; leave `when` out",
                    path=when_path,
                )
        kwargs["when"] = fixed
        if kwargs.get("on") == "destination":
            raise ConfigError(
                f"{kwargs['builtin']} chooses its hosts itself; leave `on` out",
                path=_join(path, "on"),
            )
        memory = extras.get("memory")
        if memory is None:
            kwargs["memory_percent"] = _REDUCE_MEMORY_DEFAULT_PERCENT
        else:
            kwargs.update(_hook_memory(memory, _join(path, "memory")))
    else:
        if "memory" in extras:
            raise ConfigError("only for builtin: reduce-memory", path=_join(path, "memory"))
        if extras.get("when") is None:
            raise ConfigError(f"missing: one or more of {', '.join(HOOK_POINTS)}", path=when_path)
        kwargs["when"] = _hook_when(extras["when"], when_path)
        if kwargs.get("on") == "destination":
            others = [point for point in kwargs["when"] if point not in MIGRATE_HOOK_POINTS]
            if others:
                raise ConfigError(
                    f"destination applies to {' and '.join(MIGRATE_HOOK_POINTS)} only, not to "
                    f"{', '.join(others)} (configure a separate hook for those)",
                    path=_join(path, "on"),
                )
        if kinds[0] == "command":
            kwargs["command"] = _hook_command(extras["command"], _join(path, "command"))
        else:
            kwargs["mqtt"] = _hook_mqtt(extras["mqtt"], _join(path, "mqtt"), ctx)
    return HookSettings(**kwargs)


def _hooks(raw: object, ctx: _Context) -> tuple[HookSettings, ...]:
    """``hooks``: a list of hooks, unique by name, at most one of each builtin."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"expected a list of hooks, got {_show(raw)}", path="hooks")
    hooks: list[HookSettings] = []
    names: dict[str, int] = {}
    builtins: dict[str, int] = {}
    for index, item in enumerate(raw):
        path = f"hooks[{index}]"
        hook = _hook(item, path, ctx)
        if hook.name in names:
            raise ConfigError(
                f"{hook.name!r} is already the name of hooks[{names[hook.name]}]",
                path=f"{path}.name",
            )
        names[hook.name] = index
        if hook.builtin is not None:
            if hook.builtin in builtins:
                raise ConfigError(
                    f"{hook.builtin} is already configured by hooks[{builtins[hook.builtin]}]",
                    path=f"{path}.builtin",
                )
            builtins[hook.builtin] = index
        hooks.append(hook)
    return tuple(hooks)


def _settings(tree: Mapping[str, object], ctx: _Context) -> Settings:
    """Build every section; the tree's top-level keys are already checked."""

    def plain(cls: type, section: str) -> dict[str, Any]:
        return _section(cls, tree.get(section), section, ctx)[0]

    return Settings(
        hostname=ctx.hostname,
        mqtt=_mqtt(tree.get("communicator"), ctx),
        hypervisor=_hypervisor(tree.get("hypervisor")),
        pscom=_pscom(tree.get("pscom-handler"), ctx),
        limits=LimitsSettings(**plain(LimitsSettings, "limits")),
        agent=_agent(plain(AgentSettings, "agent")),
        migration=_migration(plain(MigrationDefaults, "migration")),
        logging=LoggingSettings(**plain(LoggingSettings, "logging")),
        shutdown=ShutdownSettings(**plain(ShutdownSettings, "shutdown")),
        hooks=_hooks(tree.get("hooks"), ctx),
        metrics=_metrics(plain(MetricsSettings, "metrics")),
    )


#: ``metrics.listen``: ``host:port``, the host a name, an IPv4 address or ``[IPv6]``.
_LISTEN_RE = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}")


def _metrics(kwargs: dict[str, Any]) -> MetricsSettings:
    """``metrics``: ``listen`` must be ``host:port`` with a port 1-65535."""
    listen = kwargs.get("listen")
    if listen is not None and (
        not _LISTEN_RE.fullmatch(listen) or not 0 < int(listen.rpartition(":")[2]) < 65536
    ):
        raise ConfigError(
            f"expected host:port (port 1-65535, an IPv6 address in brackets), got {_show(listen)}",
            path="metrics.listen",
        )
    return MetricsSettings(**kwargs)


def _migration(kwargs: dict[str, Any]) -> MigrationDefaults:
    """The ``migration:`` defaults; their stream options must go together
    (:mod:`asyncmigfra.streamoptions`)."""
    defaults = MigrationDefaults(**kwargs)
    found = conflicts(
        StreamOptions(
            parallel_connections=defaults.parallel_connections,
            compression=defaults.compression,
            compression_level=defaults.compression_level,
            xbzrle_cache=defaults.xbzrle_cache,
            zerocopy=defaults.zerocopy,
            tls=defaults.tls,
            compressed=defaults.compressed,
            auto_converge=defaults.auto_converge,
            auto_converge_initial=defaults.auto_converge_initial,
            auto_converge_increment=defaults.auto_converge_increment,
        )
    )
    if found:
        raise ConfigError(found[0].reason, path=f"migration.{found[0].key}")
    return defaults


def _agent(kwargs: dict[str, Any]) -> AgentSettings:
    for i, directory in enumerate(kwargs.get("xml_allowed_paths") or ()):
        if not directory.startswith("/") or "\0" in directory:
            raise ConfigError(
                f"expected an absolute directory, got {_show(directory)}",
                path=f"agent.xml-allowed-paths[{i}]",
            )
    for key in ("allowed_drivers", "allowed_transports"):
        for i, word in enumerate(kwargs.get(key) or ()):
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", word):
                raise ConfigError(
                    f"expected a driver or transport name, got {_show(word)}",
                    path=f"agent.{key.replace('_', '-')}[{i}]",
                )
    return AgentSettings(**kwargs)
