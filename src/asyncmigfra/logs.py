"""Structured logging: one processor chain for asyncmigfra's own and third-party loggers.

The agent logs through structlog, but aiomqtt (logger ``mqtt``) and libvirt's asyncio glue
(``virEventAsyncIOImpl``) log through the standard library. So that both come out in one
format, with the same timestamp, level and bound task context, this module copies the shape
of warehouse's ``logging.py``:

- structlog loggers run the *shared* processors and hand the event dict to stdlib logging
  (``ProcessorFormatter.wrap_for_formatter``);
- one handler on the root logger carries a :class:`structlog.stdlib.ProcessorFormatter`,
  which runs the same shared processors (plus ``ExtraAdder``) over foreign records and then
  renders every record with the one renderer: JSON for machines, or the console renderer
  when a person is watching a terminal.

Logs are for people; events are an API. Log event names are dotted identifiers
(``task.accepted``) with key-value details, never prose with interpolated values. Bind
``task_id``/``vm`` for the span of a task with ``structlog.contextvars.bound_contextvars``.

Nothing here runs at import time: the CLI calls :func:`configure_logging` once it has read
the settings.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
from structlog.typing import Processor

from asyncmigfra.settings import LoggingSettings

__all__ = ["configure_logging", "would_drop"]

#: The name of the root handler this module owns, so a second call replaces it.
_HANDLER_NAME = "asyncmigfra"

_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _is_tty(stream: TextIO) -> bool:
    """Whether a person is probably reading ``stream``; closed or odd streams are not TTYs."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _shared_processors() -> list[Processor]:
    """The processors every entry runs, whether it came from structlog or stdlib logging."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def configure_logging(
    settings: LoggingSettings, *, stream: TextIO | None = None, testing: bool = False
) -> None:
    """Set up structlog and the stdlib root logger to render alike into ``stream``.

    Args:
        settings: ``logging.format`` picks the renderer (``auto``: the console renderer on a
            TTY, JSON otherwise); ``logging.level`` is the root logger's level, so it also
            applies to aiomqtt's and libvirt's loggers.
        stream: Where entries go; default ``sys.stderr`` at call time, which keeps standard
            output free for anything the CLI prints.
        testing: Turn off ``cache_logger_on_first_use``, which would otherwise pin loggers
            created before a test reconfigured structlog (and defeat ``capture_logs``).

    Calling it again replaces the handler it installed earlier instead of adding a second
    one, so every entry is written once; handlers that others put on the root logger
    (pytest's, for example) are left alone.
    """
    out = stream if stream is not None else sys.stderr
    console = settings.format == "console" or (settings.format == "auto" and _is_tty(out))
    shared = _shared_processors()

    renderer: Processor
    exceptions: list[Processor]
    if console:
        # The console renderer prints exc_info itself, as a readable traceback.
        renderer = structlog.dev.ConsoleRenderer(colors=_is_tty(out))
        exceptions = []
    else:
        renderer = structlog.processors.JSONRenderer()
        # Structured tracebacks, but without the frames' local variables: those can hold
        # the MQTT password or a whole domain XML, and would bloat every entry.
        exceptions = [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        ]

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *exceptions,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(_LEVELS[settings.level])
    # Python warnings (a library's deprecation notice at import, for example) become entries
    # of logger ``py.warnings`` instead of raw lines on stderr that break the JSON log.
    logging.captureWarnings(True)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=not testing,
    )


def would_drop(logger: logging.Logger, level: int) -> bool:
    """Whether an entry at ``level`` through ``logger`` would be dropped at once: the level
    is below the logger's, and structlog's chain starts with the level filter (as
    :func:`configure_logging` sets it; ``structlog.testing.capture_logs`` replaces the
    chain and sees every entry). Code that logs once a task skips building such entries."""
    if logger.isEnabledFor(level):
        return False
    processors = structlog.get_config()["processors"]
    return bool(processors) and processors[0] is structlog.stdlib.filter_by_level
