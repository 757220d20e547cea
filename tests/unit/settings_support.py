"""Helpers shared by the ``test_settings*.py`` modules: load a configuration from YAML text."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from asyncmigfra.errors import ConfigError
from asyncmigfra.settings import Settings, settings_from_text


@pytest.fixture(autouse=True)
def predictable_machine_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``socket.gethostname()`` predictable; the loader falls back to it.

    Autouse in each module that imports it."""
    monkeypatch.setattr("socket.gethostname", lambda: "machine")


def load(text: str, **kwargs: Any) -> Settings:
    kwargs.setdefault("hostname", "node1")
    return settings_from_text(textwrap.dedent(text), **kwargs)


def config_error(text: str, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text, **kwargs)
    return info.value
