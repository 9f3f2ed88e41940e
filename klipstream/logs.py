"""JSON log lines that Cloud Logging understands (severity, message, trace), or plain text.

The request's `X-Cloud-Trace-Context` is kept in a context variable so every line logged while
handling that request carries the trace, and job/stage ids come from `extra=`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

trace_context: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_context", default=None)
_EXTRA_FIELDS = ("job_id", "stage", "error_type", "lag_ms", "route", "status")


class CloudJsonFormatter(logging.Formatter):
    def __init__(self, project: str | None = None) -> None:
        super().__init__()
        self.project = project

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "severity": record.levelname,
            "message": record.getMessage(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "logger": record.name,
        }
        for name in _EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        trace = trace_context.get()
        if trace:
            trace_id = trace.split("/", 1)[0]
            entry["logging.googleapis.com/trace"] = (
                f"projects/{self.project}/traces/{trace_id}" if self.project else trace_id
            )
        if record.exc_info:
            entry["stack_trace"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info", fmt: str = "json", project: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(CloudJsonFormatter(project))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
