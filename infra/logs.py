"""Structured logs: one JSON object per line (``STREAMREC_LOG_FORMAT=json``).

Fields: ``ts`` (unix seconds), ``level``, ``logger``, ``message``, plus any ``extra={...}`` the
call passed (e.g. the ingest agent's per-batch ``messages``, ``applied``, ``dead_lettered``)
and ``exc`` for exceptions.
"""

from __future__ import annotations

import json
import logging
import time

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(record.created, 6), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        doc.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=repr)


def logging_config(level: str = "INFO") -> dict:
    """A ``logging.config.dictConfig`` mapping that writes JSON lines to stderr."""
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"json": {"()": JsonFormatter}},
            "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json",
                                    "stream": "ext://sys.stderr"}},
            "root": {"level": level.upper(), "handlers": ["stderr"]}}


class Every:
    """:meth:`due` is true at most once per ``seconds`` (monotonic clock): for a message that
    would otherwise repeat on every pass."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._last = -float("inf")

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.seconds:
            return False
        self._last = now
        return True
