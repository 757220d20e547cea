"""configure_logging: one renderer for structlog and stdlib loggers (style anchors B.8)."""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import structlog

from asyncmigfra.logs import configure_logging, would_drop
from asyncmigfra.settings import LoggingSettings


class FakeTty(io.StringIO):
    """A stream that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo what configure_logging does to global state: structlog config, root handlers."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def configure(stream: io.StringIO, **settings: Any) -> None:
    configure_logging(LoggingSettings(**settings), stream=stream, testing=True)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_entry_has_event_level_timestamp_and_context() -> None:
    stream = io.StringIO()
    configure(stream, format="json")

    with structlog.contextvars.bound_contextvars(task_id="t-1"):
        structlog.stdlib.get_logger("asyncmigfra.test").info("task.accepted", vm="vm1")

    [entry] = json_lines(stream)
    assert entry["event"] == "task.accepted"
    assert entry["level"] == "info"
    assert entry["logger"] == "asyncmigfra.test"
    assert entry["task_id"] == "t-1"
    assert entry["vm"] == "vm1"
    assert datetime.fromisoformat(entry["timestamp"]).utcoffset() == timedelta(0)


def test_stdlib_records_render_through_the_same_processors() -> None:
    """aiomqtt logs to the stdlib logger ``mqtt``; its records must look like ours."""
    stream = io.StringIO()
    configure(stream, format="json")

    with structlog.contextvars.bound_contextvars(task_id="t-2"):
        logging.getLogger("mqtt").warning("connection lost: %s", "EOF", extra={"attempt": 3})

    [entry] = json_lines(stream)
    assert entry["event"] == "connection lost: EOF"
    assert entry["level"] == "warning"
    assert entry["logger"] == "mqtt"
    assert entry["attempt"] == 3
    assert entry["task_id"] == "t-2"
    assert "timestamp" in entry


def test_auto_format_is_json_when_not_a_tty() -> None:
    stream = io.StringIO()
    configure(stream, format="auto")

    structlog.stdlib.get_logger("x").info("agent.started")

    assert json_lines(stream)[0]["event"] == "agent.started"


@pytest.mark.parametrize(
    ("stream", "format"),
    [
        pytest.param(FakeTty(), "auto", id="auto-on-tty"),
        pytest.param(io.StringIO(), "console", id="console-forced"),
    ],
)
def test_console_renderer(stream: io.StringIO, format: str) -> None:
    configure(stream, format=format)

    structlog.stdlib.get_logger("asyncmigfra.test").info("task.accepted", vm="vm1")
    logging.getLogger("mqtt").warning("connection lost")

    plain = re.sub(r"\x1b\[[0-9;]*m", "", stream.getvalue())  # colours, on a TTY
    first, second = plain.splitlines()
    assert not first.startswith("{")
    assert "task.accepted" in first
    assert "vm=vm1" in first
    assert "[asyncmigfra.test]" in first
    assert "connection lost" in second
    assert "[mqtt]" in second


def test_console_on_a_pipe_has_no_colour_codes() -> None:
    stream = io.StringIO()
    configure(stream, format="console")

    structlog.stdlib.get_logger("x").warning("agent.degraded")

    assert "\x1b[" not in stream.getvalue()


@pytest.mark.parametrize(
    ("level", "emitted"),
    [
        pytest.param("debug", ["d", "i", "w", "e", "stdlib-d"], id="debug"),
        pytest.param("info", ["i", "w", "e"], id="info"),
        pytest.param("warning", ["w", "e"], id="warning"),
        pytest.param("error", ["e"], id="error"),
    ],
)
def test_level_applies_to_structlog_and_stdlib(level: str, emitted: list[str]) -> None:
    stream = io.StringIO()
    configure(stream, format="json", level=level)
    log = structlog.stdlib.get_logger("x")

    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    logging.getLogger("virEventAsyncIOImpl").debug("stdlib-d")

    assert [entry["event"] for entry in json_lines(stream)] == emitted


def test_exceptions_are_structured_without_locals() -> None:
    """Frame locals could hold the MQTT password; they must not be logged."""
    stream = io.StringIO()
    configure(stream, format="json")
    password = "hunter2-very-secret"  # a local in the failing frame

    try:
        raise ValueError(len(password))
    except ValueError:
        structlog.stdlib.get_logger("x").exception("task.crashed")

    [entry] = json_lines(stream)
    assert [e["exc_type"] for e in entry["exception"]] == ["ValueError"]
    assert entry["level"] == "error"
    assert password not in stream.getvalue()


def test_stdlib_exception_is_structured() -> None:
    stream = io.StringIO()
    configure(stream, format="json")

    try:
        raise OSError("broker gone")
    except OSError:
        logging.getLogger("mqtt").exception("reader failed")

    [entry] = json_lines(stream)
    assert [e["exc_value"] for e in entry["exception"]] == ["broker gone"]


def test_calling_twice_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure(first, format="json")
    configure(second, format="json")

    structlog.stdlib.get_logger("x").info("agent.started")

    ours = [h for h in logging.getLogger().handlers if h.get_name() == "asyncmigfra"]
    assert len(ours) == 1
    assert first.getvalue() == ""
    assert len(json_lines(second)) == 1


def test_other_root_handlers_are_kept() -> None:
    other = logging.NullHandler()
    logging.getLogger().addHandler(other)

    configure(io.StringIO(), format="json")
    configure(io.StringIO(), format="json")

    assert other in logging.getLogger().handlers


@pytest.mark.parametrize(
    ("testing", "cached"),
    [pytest.param(False, True, id="production"), pytest.param(True, False, id="testing")],
)
def test_logger_caching_off_in_tests(testing: bool, cached: bool) -> None:
    configure_logging(LoggingSettings(format="json"), stream=io.StringIO(), testing=testing)

    assert structlog.get_config()["cache_logger_on_first_use"] is cached


def test_logger_created_before_configuration_follows_it() -> None:
    """Modules create their logger at import time, before the CLI configures logging."""
    log = structlog.stdlib.get_logger("asyncmigfra.early")
    stream = io.StringIO()
    configure(stream, format="json")

    log.info("agent.started")

    assert json_lines(stream)[0]["logger"] == "asyncmigfra.early"


def test_a_python_warning_is_a_log_entry_not_a_raw_line() -> None:
    # A library's deprecation notice at import (asyncssh under a newer cryptography) once went
    # to stderr raw and broke the agent's JSON log.
    stream = io.StringIO()
    configure(stream, format="json")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("DSA is deprecated", UserWarning, stacklevel=1)
    [entry] = json_lines(stream)
    assert entry["logger"] == "py.warnings"
    assert entry["level"] == "warning"
    assert "DSA is deprecated" in entry["event"]


def test_would_drop_follows_the_level_and_sees_captured_logs() -> None:
    """Entries below the configured level are known to be dropped (hot paths skip building
    them); at or above it, or while ``capture_logs`` replaced the chain, they are not."""
    logger = logging.getLogger("asyncmigfra.dispatching")
    configure_logging(LoggingSettings(level="warning"), stream=io.StringIO(), testing=True)
    assert would_drop(logger, logging.INFO)
    assert would_drop(logger, logging.DEBUG)
    assert not would_drop(logger, logging.WARNING)
    with structlog.testing.capture_logs() as logs:
        assert not would_drop(logger, logging.INFO)
        structlog.stdlib.get_logger("asyncmigfra.dispatching").info("task.finished")
    assert [e["event"] for e in logs] == ["task.finished"]
    configure_logging(LoggingSettings(level="info"), stream=io.StringIO(), testing=True)
    assert not would_drop(logger, logging.INFO)
    assert would_drop(logger, logging.DEBUG)
