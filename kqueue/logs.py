"""One log line per event, as text or JSON, carrying the task's facts as fields."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["ClosingChannelFilter", "configure", "fields"]

_FIELDS = "kqueue_fields"


def fields(**values: Any) -> dict[str, Any]:
    """The `extra=` of a log call whose `values` are shown as the event's fields."""
    return {_FIELDS: values}


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        values = getattr(record, _FIELDS, None)
        if values:
            line += " " + " ".join(f"{key}={value}" for key, value in values.items())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, _FIELDS, None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class ClosingChannelFilter(logging.Filter):
    """Drops py-amqp's warning for each frame that arrives on a channel being closed.

    Replacing a channel that a broker keeps refusing (see `kqueue.producer`)
    closes it with thousands of confirms still on their way; py-amqp logs one
    line per frame it then ignores. kqueue has said what happened, in one line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Received method %s during closing channel")


def configure(level: int = logging.INFO, fmt: str = "text") -> None:
    """Send kqueue's logs (and Kombu's warnings) to standard error.

    For the command-line tools, which log a line per task: the record fields
    nobody prints (caller, thread, process) are not collected, as the logging
    documentation's "Optimization" section suggests.
    """
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("kqueue").setLevel(level)
    amqp = logging.getLogger("amqp")
    if not any(isinstance(f, ClosingChannelFilter) for f in amqp.filters):
        amqp.addFilter(ClosingChannelFilter())
