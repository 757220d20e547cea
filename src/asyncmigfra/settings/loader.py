"""The configuration loader: YAML text or file in, a validated ``Settings`` out.

The original migfra.conf (``communicator``, ``hypervisor``, ``pscom-handler``) loads
unchanged; every new key is optional and documented in ``config/asyncmigfra.example.yaml``.
A bad or unknown key raises :class:`asyncmigfra.errors.ConfigError` naming its key path.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from asyncmigfra.errors import ConfigError
from asyncmigfra.settings.model import Settings
from asyncmigfra.settings.schema import (
    _HOSTNAME_PLACEHOLDER,
    _HOSTNAME_RE,
    _as_map,
    _check_keys,
    _Context,
    _show,
    _top_level_keys,
)
from asyncmigfra.settings.sections import _settings

# --- hostname ----------------------------------------------------------------------------------


def _check_hostname(name: str, origin: str) -> str:
    """The agent's name goes into topics and client ids: keep it to host-name characters."""
    if not _HOSTNAME_RE.match(name) or len(name) > 255:
        raise ConfigError(
            f"{origin} {_show(name)} cannot name this agent: use letters, digits, '.', '-' and"
            " '_' (it becomes part of MQTT topics)",
            path="hostname",
        )
    return name


def _name_from_topic(task_topic: object) -> str | None:
    """The host level of a task topic shaped ``<prefix>/<name>/task`` with a literal name
    (``fast/migfra/node-a/task`` gives ``node-a``); ``None`` for any other shape, or when
    that level is ``<hostname>`` or could not name an agent."""
    if not isinstance(task_topic, str):
        return None
    levels = task_topic.split("/")
    if len(levels) < 3 or levels[-1] != "task" or not any(levels[:-2]):
        return None
    name = levels[-2]
    if _HOSTNAME_PLACEHOLDER in name or not _HOSTNAME_RE.match(name) or len(name) > 255:
        return None
    return name


def _resolve_hostname(argument: str | None, tree: Mapping[str, object]) -> str:
    """The agent's name (extensions.md "Identity"): ``--hostname``, else the file's
    ``hostname:``, else the task topic's host level (``communicator.subscribe-topic``
    shaped ``<prefix>/<name>/task``), else ``socket.gethostname()``."""
    from_file = tree.get("hostname")
    file_name: str | None = None
    if from_file is not None:
        if not isinstance(from_file, str):
            raise ConfigError(f"expected a string, got {_show(from_file)}", path="hostname")
        file_name = _check_hostname(from_file, "the configured name")
    if argument is not None:
        return _check_hostname(argument, "the --hostname")
    if file_name is not None:
        return file_name
    communicator = tree.get("communicator")
    if isinstance(communicator, Mapping):
        from_topic = _name_from_topic(communicator.get("subscribe-topic"))
        if from_topic is not None:
            return from_topic
    return _check_hostname(
        socket.gethostname(), "the machine's host name (set hostname: or --hostname)"
    )


def _substitute(node: object, hostname: str) -> object:
    """Replace ``<hostname>`` in every string key and value; ``<vm_name>`` stays literal."""
    if isinstance(node, str):
        return node.replace(_HOSTNAME_PLACEHOLDER, hostname)
    if isinstance(node, dict):
        return {
            _substitute(key, hostname): _substitute(value, hostname) for key, value in node.items()
        }
    if isinstance(node, list):
        return [_substitute(item, hostname) for item in node]
    return node


# --- parsing -----------------------------------------------------------------------------------


def _parse_yaml(text: str, source: str) -> object:
    """One YAML document with ruamel's safe loader; errors name the line and column.

    The parser's own message quotes the offending line, and a duplicate-key message quotes
    both values. Either may be a password, so the message is rebuilt from the problem and the
    position only, and the parser's exception is not chained.
    """
    yaml = YAML(typ="safe")
    yaml.allow_duplicate_keys = False
    try:
        return yaml.load(text)
    except DuplicateKeyError as exc:
        key = re.match(r'found duplicate key "(.*?)" with value', exc.problem or "")
        what = f"duplicate key {key.group(1)!r}" if key else "duplicate key"
        raise ConfigError(f"{source}: {_position(exc)}{what}") from None
    except MarkedYAMLError as exc:
        problem = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        raise ConfigError(f"{source}: {_position(exc)}{problem}{context}") from None
    except YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{source}: invalid YAML: {detail}") from None


def _position(exc: MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    if mark is None:
        return ""
    return f"line {mark.line + 1}, column {mark.column + 1}: "


# --- public API --------------------------------------------------------------------------------


def settings_from_text(
    text: str,
    *,
    hostname: str | None = None,
    source: str = "<string>",
    base_dir: str | os.PathLike[str] | None = None,
) -> Settings:
    """Parse a configuration document.

    Args:
        text: The YAML text (the original migfra.conf and the extended format alike).
        hostname: ``--hostname``; wins over the file's ``hostname:`` and the machine's name.
        source: Names the document in file-level error messages.
        base_dir: Relative ``password-file`` and ``tls`` file names are resolved against it
            (default: the current directory).

    Raises:
        ConfigError: a syntax error (with line and column), or a bad or unknown key (with its
            key path).
    """
    document = _parse_yaml(text, source)
    if document is not None and not isinstance(document, dict):
        raise ConfigError(f"{source}: the top level must be a map, got {_show(document)}")
    tree = _as_map(document, "")
    top = _top_level_keys()
    _check_keys(tree, top, "")
    name = _resolve_hostname(hostname, tree)
    substituted = _substitute(tree, name)
    assert isinstance(substituted, dict)
    directory = Path(base_dir) if base_dir is not None else Path()
    ctx = _Context(hostname=name, base_dir=directory.expanduser().absolute())
    return _settings(substituted, ctx)


def load_settings(path: str | os.PathLike[str] | None, *, hostname: str | None = None) -> Settings:
    """Read the configuration file at ``path``; ``None`` means the built-in defaults.

    Unlike the original, which started with an empty configuration and exited 0, a missing
    file is a :class:`ConfigError` (the CLI exits 2). Relative file names inside the file are
    resolved against the file's directory, so the result does not depend on the working
    directory the agent was started from.
    """
    if path is None:
        return default_settings(hostname=hostname)
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: configuration file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from exc
    return settings_from_text(text, hostname=hostname, source=str(file), base_dir=file.parent)


def default_settings(*, hostname: str | None = None, **overrides: object) -> Settings:
    """The settings of an empty configuration file, for the demo and for tests.

    ``overrides`` replace whole sections by ``Settings`` field name (``mqtt=``,
    ``hypervisor=``, ...): either a section instance, used as is, or a mapping of field names
    applied to that section's defaults (``mqtt={"port": 1884}`` keeps the host-name topics).
    Overrides are trusted code, not configuration, and are not validated.

    Raises:
        ConfigError: the host name cannot be used.
        TypeError: an unknown section or field name.
    """
    settings = settings_from_text("", hostname=hostname, source="<defaults>")
    changes: dict[str, Any] = {}
    for section, value in overrides.items():
        if section not in {f.name for f in dataclasses.fields(Settings)}:
            raise TypeError(f"default_settings() got an unexpected section {section!r}")
        current = getattr(settings, section)
        if isinstance(value, type(current)):
            changes[section] = value
        elif isinstance(value, Mapping):
            changes[section] = dataclasses.replace(current, **value)
        else:
            raise TypeError(
                f"{section}= must be a {type(current).__name__} or a mapping, got {value!r}"
            )
    return dataclasses.replace(settings, **changes)
