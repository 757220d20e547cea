"""Agent configuration: frozen dataclasses grouped by subject, and the YAML loader.

The original migfra.conf (``communicator``, ``hypervisor``, ``pscom-handler``) loads
unchanged; every new key is optional and documented in ``config/asyncmigfra.example.yaml``.
A bad or unknown key raises :class:`asyncmigfra.errors.ConfigError` naming its key path.

The package re-exports the public names; the code lives in:

- :mod:`~asyncmigfra.settings.model`: the dataclasses and the hook point names;
- :mod:`~asyncmigfra.settings.schema`: field tables, ranges and the generic converter;
- :mod:`~asyncmigfra.settings.sections`: the sections that need their own code (password,
  topics, hooks, agent) and the whole ``Settings``;
- :mod:`~asyncmigfra.settings.loader`: host name resolution, YAML parsing, the public loaders.
"""

from asyncmigfra.settings.loader import default_settings, load_settings, settings_from_text
from asyncmigfra.settings.model import DEFAULT_PSCOM_COUNT_COMMAND as DEFAULT_PSCOM_COUNT_COMMAND
from asyncmigfra.settings.model import (
    HOOK_POINTS,
    AgentSettings,
    HookSettings,
    HostDevice,
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
    TlsSettings,
)
from asyncmigfra.settings.model import HOOK_TOPIC_PLACEHOLDERS as HOOK_TOPIC_PLACEHOLDERS
from asyncmigfra.settings.model import MIGRATE_HOOK_POINTS as MIGRATE_HOOK_POINTS

# ``X as X``: module-level names outside ``__all__`` that other modules import from here.
__all__ = [
    "HOOK_POINTS",
    "AgentSettings",
    "HookSettings",
    "HostDevice",
    "HypervisorSettings",
    "LimitsSettings",
    "LoggingSettings",
    "MetricsSettings",
    "MigrationDefaults",
    "MqttHookSettings",
    "MqttSettings",
    "PscomSettings",
    "Settings",
    "ShutdownSettings",
    "TlsSettings",
    "default_settings",
    "load_settings",
    "settings_from_text",
]
