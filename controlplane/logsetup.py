"""structlog configuration shared by every modelpool process.

Pretty, coloured lines on a terminal; one JSON object per line otherwise (or with
MODELPOOL_LOG_FORMAT=json). MODELPOOL_LOG_LEVEL sets the level (default info).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import BinaryIO

import orjson
import structlog


def configure_logging(level: str | None = None, fmt: str | None = None, component: str | None = None) -> None:
    """Configure structlog and the stdlib root logger once per process."""
    level_name = (level or os.environ.get("MODELPOOL_LOG_LEVEL") or "info").upper()
    numeric = getattr(logging, level_name, logging.INFO)
    fmt = fmt or os.environ.get("MODELPOOL_LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json")
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _iso_utc_timestamp,
    ]
    if component:
        structlog.contextvars.bind_contextvars(component=component)
    _json_info_stream[0] = None
    renderer: structlog.types.Processor
    factory: structlog.types.WrappedLogger
    binary = getattr(sys.stderr, "buffer", None)
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        factory = structlog.PrintLoggerFactory(sys.stderr)
    elif binary is None:  # stderr replaced by a text-only stream (tests)
        renderer = structlog.processors.JSONRenderer()
        factory = structlog.PrintLoggerFactory(sys.stderr)
    else:
        # orjson renders bytes straight to the stream: a gateway logs one line per request.
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        factory = structlog.BytesLoggerFactory(binary)
        if numeric <= logging.INFO:
            _json_info_stream[0] = binary
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


_json_info_stream: list[BinaryIO | None] = [None]


def json_info_stream() -> BinaryIO | None:
    """The binary stream JSON log lines go to, when logging is JSON at info level or lower.

    For writers of high-volume info lines (the gateway's access log) that render their own
    JSON lines in the same shape; None when lines must go through structlog instead.
    """
    return _json_info_stream[0]


def _orjson_dumps(obj: object, default: Callable[[object], object] | None = None) -> bytes:
    return orjson.dumps(obj, default=default or str, option=orjson.OPT_NON_STR_KEYS)


_second: list[object] = [-1, ""]   # the last whole second formatted, and its text


def iso_utc_now() -> str:
    """Now as structlog's TimeStamper(fmt="iso", utc=True) writes it, formatting each second once."""
    now = time.time()
    sec = int(now)
    if _second[0] != sec:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_second[1]}.{int((now - sec) * 1e6):06d}Z"


def _iso_utc_timestamp(_: object, __: str, event_dict: structlog.types.EventDict) -> structlog.types.EventDict:
    """``timestamp`` as structlog's TimeStamper(fmt="iso", utc=True) writes it, formatting each
    second once (a gateway logs a line per request)."""
    event_dict["timestamp"] = iso_utc_now()
    return event_dict


class _CurrentStderr:
    """A structlog logger that writes to whatever ``sys.stderr`` is when it writes (one-shot
    commands run inside test runners that swap and close stderr between invocations)."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


def configure_command_logging() -> None:
    """One-shot `ctl` commands: warnings and up (MODELPOOL_LOG_LEVEL overrides) as plain lines on
    stderr, never on stdout where tables and JSON go."""
    numeric = getattr(logging, (os.environ.get("MODELPOOL_LOG_LEVEL") or "warning").upper(), logging.WARNING)
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    _iso_utc_timestamp, structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: _CurrentStderr(),
        cache_logger_on_first_use=False,
    )
