"""Logging: one JSON object per line on stdout, configured once per process.

Redaction is by construction (callers log fields, never header dicts or full
URLs); ``SecretFilter`` is the backstop: any configured secret that still
reaches a record is replaced before the line is written.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable

# Attributes every LogRecord has; anything else was passed in ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": getattr(record, "event", None) or "log",
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key != "event":
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class SecretFilter(logging.Filter):
    """Replace any known secret in a record's rendered text with a marker."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        self.secrets = tuple(s for s in secrets if s and len(s) >= 8)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        dirty = any(secret in text for secret in self.secrets)
        if record.args and dirty:
            record.args = ()
        if dirty:
            for secret in self.secrets:
                text = text.replace(secret, "[redacted]")
            record.msg = text
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and isinstance(value, str):
                for secret in self.secrets:
                    if secret in value:
                        value = value.replace(secret, "[redacted]")
                record.__dict__[key] = value
        return True


def configure(secrets: Iterable[str], level: int = logging.INFO) -> None:
    """Send the root logger's records to stdout as JSON lines, secrets filtered out."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SecretFilter(secrets))
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_shim", False):
            root.removeHandler(existing)
    handler._shim = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
