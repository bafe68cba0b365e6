"""Logging set-up: text or JSON lines, each record stamped with the request id of its call.

The request id lives in a context variable set for the duration of each gRPC call, so every
record logged during the call (in its task or in threads started with asyncio.to_thread)
carries it; a handler filter copies it onto the record.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TextIO

#: The id of the call being handled; None outside calls.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)

#: Shown (text) or left out (JSON) when a record is logged outside any call.
NO_REQUEST = "-"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id"}


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id` to the id of the current call ("-" outside calls)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or NO_REQUEST
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, extras, exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", NO_REQUEST)
        if request_id != NO_REQUEST:
            entry["request_id"] = request_id
        entry.update((k, v) for k, v in vars(record).items() if k not in _RECORD_FIELDS)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        # default=str: an extra that JSON cannot hold is written as its str, not lost.
        return json.dumps(entry, default=str)


def make_handler(log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) writing `text` or `json` lines with request ids."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    return handler


def configure_logging(level: str, log_format: str) -> None:
    """Send every logger's records to stderr as `log_format` lines at `level` and above.

    Raises ValueError for a level name logging does not know.
    """
    known = logging.getLevelNamesMapping()
    if level.upper() not in known:
        raise ValueError(f"unknown log level {level!r}; one of {', '.join(sorted(known))}")
    logging.basicConfig(level=level.upper(), handlers=[make_handler(log_format)], force=True)
