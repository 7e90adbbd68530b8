"""structlog, configured once at the CLI entry point, and again while a run's terminal output is taken over."""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, TextIO

import structlog

from llmbatch.redact import redact_event

Observer = Callable[[Any, str, dict], dict]


def configure_logging(fmt: str = "console", level: str = "info", *, stream: TextIO | None = None,
                      observers: tuple[Observer, ...] = (), colors: bool | None = None) -> None:
    """Log lines to `stream` (default: standard error). `observers` are structlog processors that see each
    event before it is rendered (a live view reads the run's events from them)."""
    stream = stream or sys.stderr
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        redact_event,
        *observers,
        structlog.processors.TimeStamper(fmt="iso" if fmt == "json" else "%H:%M:%S"),
    ]
    if fmt == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        shown_in_colour = stream.isatty() if colors is None else colors
        processors += [structlog.dev.ConsoleRenderer(colors=shown_in_colour)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
