"""One boolean vocabulary: a task and every config section accept the same spellings.

yaml-cpp's ``convert<bool>`` words (:data:`asyncmigfra.values.BOOL_WORDS`) are what the
original accepted in tasks; the config loader (agent, communicator, migration sections) and
the hypervisor option converters (``hypervisor.never-throw`` of the dummy back-end) take
exactly the same set, and refuse the same near misses.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from asyncmigfra.errors import ConfigError, TaskRejected
from asyncmigfra.hypervisor.dummy import create as create_dummy
from asyncmigfra.hypervisor.registry import opt_float
from asyncmigfra.model import StartSpec
from asyncmigfra.settings import settings_from_text
from asyncmigfra.values import BOOL_WORDS, parse_bool, parse_number
from asyncmigfra.wire.parsing import parse_task

#: Spellings that no reader accepts: yaml-cpp's flexible case allows lower, UPPER and
#: Capitalized only; numbers and other words are not booleans.
NOT_BOOLEANS = ("yEs", "tRUE", "oN", "1", "0", "maybe", "enabled")


def task_transient(word: str) -> bool:
    payload = f"task: start vm\nvm-configurations:\n  - vm-name: v\n    transient: {word}\n"
    spec = parse_task(payload.encode()).subtasks[0]
    assert isinstance(spec, StartSpec)
    return spec.transient


def agent_allow_quit(word: str) -> bool:
    return settings_from_text(f"agent: {{allow-quit: {word}}}\n", hostname="h").agent.allow_quit


def tls_insecure(word: str) -> bool:
    text = f"communicator: {{tls: {{insecure: {word}}}}}\n"
    tls = settings_from_text(text, hostname="h").mqtt.tls
    assert tls is not None
    return tls.insecure


def migration_persist(word: str) -> bool:
    settings = settings_from_text(f"migration: {{persist: {word}}}\n", hostname="h")
    return settings.migration.persist


def hypervisor_never_throw(word: str) -> bool:
    text = f"hypervisor: {{type: dummy, never-throw: {word}}}\n"
    options = settings_from_text(text, hostname="h").hypervisor.options
    return create_dummy(options, hostname="h", shared={}).never_throw


READERS: dict[str, Callable[[str], bool]] = {
    "task.transient": task_transient,
    "agent.allow-quit": agent_allow_quit,
    "communicator.tls.insecure": tls_insecure,
    "migration.persist": migration_persist,
    "hypervisor.never-throw": hypervisor_never_throw,
}


def test_the_table_is_yaml_cpps() -> None:
    words = ("y", "yes", "true", "on", "n", "no", "false", "off")
    expected = {
        form: word in words[:4]
        for word in words
        for form in (word, word.upper(), word.capitalize())
    }
    assert expected == BOOL_WORDS
    assert len(BOOL_WORDS) == 22  # "y"/"n" have only two case styles
    assert parse_bool("Yes") is True
    assert parse_bool(" yes") is None


@pytest.mark.parametrize("key", READERS)
@pytest.mark.parametrize(("word", "value"), sorted(BOOL_WORDS.items()))
def test_every_boolean_key_accepts_the_same_spellings(key: str, word: str, value: bool) -> None:
    assert READERS[key](word) is value


@pytest.mark.parametrize("key", READERS)
@pytest.mark.parametrize("word", NOT_BOOLEANS)
def test_every_boolean_key_refuses_the_same_spellings(key: str, word: str) -> None:
    with pytest.raises((ConfigError, TaskRejected), match="expected a boolean"):
        READERS[key](word)


@pytest.mark.parametrize(("word", "enabled"), [("yes", True), ("On", True), ("no", False)])
def test_communicator_tls_switch_takes_the_same_spellings(word: str, enabled: bool) -> None:
    tls = settings_from_text(f"communicator: {{tls: {word}}}\n", hostname="h").mqtt.tls
    assert (tls is not None) is enabled


def agent_progress_interval(text: str) -> float:
    settings = settings_from_text(f'agent: {{progress-interval: "{text}"}}\n', hostname="h")
    return settings.agent.progress_interval


def hypervisor_option_seconds(text: str) -> float:
    return opt_float(text, "hypervisor.start-timeout", exclusive=True)


NUMBER_READERS: dict[str, Callable[[str], float]] = {
    "agent.progress-interval": agent_progress_interval,
    "hypervisor option": hypervisor_option_seconds,
}


@pytest.mark.parametrize("key", NUMBER_READERS)
@pytest.mark.parametrize(
    ("text", "value"), [("2.5", 2.5), (" 3 ", 3.0), ("1e1", 10.0), ("+4", 4.0), (".5", 0.5)]
)
def test_quoted_durations_read_the_same_in_every_section(key: str, text: str, value: float) -> None:
    assert parse_number(text) == value
    assert NUMBER_READERS[key](text) == value


@pytest.mark.parametrize("key", NUMBER_READERS)
@pytest.mark.parametrize("text", ["1_000", "inf", "nan", "1e999", "2,5", "\u0661", "0x10", ""])
def test_quoted_durations_refuse_the_same_text_in_every_section(key: str, text: str) -> None:
    assert parse_number(text) is None
    with pytest.raises(ConfigError, match="expected a number"):
        NUMBER_READERS[key](text)
