"""The environment of a command hook: the agent's own without its secrets
(:func:`hook_base_environment`), then the task's data in ``ASYNCMIGFRA_*`` variables
(:func:`hook_environment`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from asyncmigfra.peers.userhooks.call import HookCall, _host
from asyncmigfra.settings import HookSettings

#: Variables never passed on to a command: the MQTT password of the agent and of its tools
#: (``asyncmigfra`` console commands read ``ASYNCMIGFRA_MQTT_PASSWORD``).
SECRET_VARIABLES: Final = ("ASYNCMIGFRA_MQTT_PASSWORD",)

#: Environment variables the runner sets; inherited ones of these names are dropped first.
_ENV_NAMES = (
    "ASYNCMIGFRA_HOOK",
    "ASYNCMIGFRA_POINT",
    "ASYNCMIGFRA_TASK",
    "ASYNCMIGFRA_TASK_ID",
    "ASYNCMIGFRA_VM_NAME",
    "ASYNCMIGFRA_SOURCE",
    "ASYNCMIGFRA_DESTINATION",
    "ASYNCMIGFRA_HOST",
    "ASYNCMIGFRA_OUTCOME",
    "ASYNCMIGFRA_DETAILS",
)


def _text(value: str) -> str:
    """Environment values cannot hold NUL."""
    return value.replace("\0", "\\0")


def hook_environment(hook: HookSettings, call: HookCall) -> dict[str, str]:
    """The ``ASYNCMIGFRA_*`` variables a command hook gets (on top of the agent's own)."""
    env = {
        "ASYNCMIGFRA_HOOK": hook.name,
        "ASYNCMIGFRA_POINT": call.point,
        "ASYNCMIGFRA_TASK": call.task,
        "ASYNCMIGFRA_TASK_ID": call.task_id or "",
        "ASYNCMIGFRA_VM_NAME": call.vm_name,
        "ASYNCMIGFRA_SOURCE": call.source,
        "ASYNCMIGFRA_HOST": _host(hook, call),
    }
    if call.destination is not None:
        env["ASYNCMIGFRA_DESTINATION"] = call.destination
    if call.outcome is not None:
        env["ASYNCMIGFRA_OUTCOME"] = call.outcome
    if call.details is not None:
        env["ASYNCMIGFRA_DETAILS"] = call.details
    return {key: _text(value) for key, value in env.items()}


@dataclass(frozen=True, slots=True)
class _Hidden:
    """What a command must not see: variables by name, and any variable with a secret value."""

    names: frozenset[str] = frozenset(SECRET_VARIABLES)
    values: frozenset[str] = frozenset()


def hook_base_environment(
    environ: Mapping[str, str],
    *,
    secret_names: Iterable[str] = (),
    secret_values: Iterable[str] = (),
) -> dict[str, str]:
    """The agent's environment as a command gets it, before the ``ASYNCMIGFRA_*`` task data:
    without :data:`SECRET_VARIABLES`, ``secret_names``, any variable whose value is one of
    ``secret_values`` (the MQTT password, however it came: ``password-env`` names a variable
    that holds it) and the runner's own names."""
    names = {*SECRET_VARIABLES, *secret_names, *_ENV_NAMES}
    values = {value for value in secret_values if value}
    return {
        key: value for key, value in environ.items() if key not in names and value not in values
    }
