"""Structured JSON logs on stderr, carrying trace id, span id and request id.

Secrets never reach a log line: values of keys that look like credentials
are replaced, and so is anything shaped like an API key or bearer token.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from opentelemetry import trace

from hivemesh.runtime.middleware import request_id_var

_SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|passwd|token|authorization|dsn)", re.I)
_SECRET_VALUE = re.compile(
    r"(sk-[A-Za-z0-9_\-]{8,}|sk-ant-[A-Za-z0-9_\-]{8,}|Bearer\s+[A-Za-z0-9._\-]{8,}"
    # credentials in any URL (postgresql://u:pw@, redis://:pw@, https://u:pw@ ...),
    # up to the last @ before the path: URL parsers read an unescaped @ as
    # part of the password
    r"|[a-z][a-z0-9+.\-]*://[^\s:@/]*:[^\s/]*@"
    # keyword DSNs (password=...)
    r"|\b(password|passwd)\s*=\s*\S+)", re.I)
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def redact(text: str) -> str:
    return _SECRET_VALUE.sub("[REDACTED]", text)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            entry["trace_id"] = f"{ctx.trace_id:032x}"
            entry["span_id"] = f"{ctx.span_id:016x}"
        rid = request_id_var.get()
        if rid:
            entry["request_id"] = rid
        for key, value in record.__dict__.items():
            if key in _STANDARD or key.startswith("_"):
                continue
            entry[key] = "[REDACTED]" if _SECRET_KEY.search(key) else (
                redact(value) if isinstance(value, str) else value)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Route every logger to one JSON handler on stderr (stdout is for the CLI)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
