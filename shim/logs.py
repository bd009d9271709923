"""Logging: one JSON object per line on stdout (or ``key=value`` text for a terminal).

Fixed field names; values go in fields, never into the message; ``event`` is a
snake_case constant. Redaction is by construction (callers log fields, never
header dicts or full URLs); ``SecretFilter`` is the backstop: any configured
secret that still reaches a record is replaced before the line is written,
in a traceback too (an exception message or a source line can quote a key).

``gunicorn_logconfig`` gives gunicorn's own loggers the same format; its
access logger is silenced because its request line would carry a client's
``?key=``, and shim writes its own access line (``shim.access``).

Standard library plus orjson: gunicorn's master imports this module.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable

import orjson
from gunicorn.glogging import Logger as _GunicornLogger

from shim.errors import StreamAborted

# Attributes every LogRecord has; anything else was passed in ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "fields",
}
REDACTED = "[redacted]"


def _timestamp(record: logging.LogRecord) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z"
    )


def _entry(record: logging.LogRecord) -> dict:
    entry = {
        "ts": _timestamp(record),
        "level": record.levelname.lower(),
        "event": getattr(record, "event", None) or "log",
        "logger": record.name,
        "message": record.getMessage(),
    }
    # The access line passes its fields as one dict: cheaper than 25 attributes.
    fields = record.__dict__.get("fields")
    if fields:
        entry.update(fields)
    for key, value in record.__dict__.items():
        if key not in _STANDARD and key != "event":
            entry[key] = value
    return entry


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    """The record's traceback: SecretFilter's redacted ``exc_text`` when it made one."""
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    text = record.exc_text or ""
    if record.stack_info:
        text = f"{text}\n{record.stack_info}" if text else record.stack_info
    return text or None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = _entry(record)
        exception = _exception_text(self, record)
        if exception:
            entry["exception"] = exception
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """``ts level event message key=value …`` for a human at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        entry = _entry(record)
        head = f"{entry.pop('ts')} {entry.pop('level'):7} {entry.pop('event')}"
        message = entry.pop("message")
        entry.pop("logger")
        pairs = " ".join(f"{k}={v}" for k, v in entry.items() if v is not None)
        line = f"{head} {message} {pairs}".rstrip()
        exception = _exception_text(self, record)
        if exception:
            line += "\n" + exception
        return line


FORMATTERS = {"json": JsonFormatter, "text": TextFormatter}
_TRACEBACKS = logging.Formatter()


class SecretFilter(logging.Filter):
    """Replace any known secret in a record's message or fields with a marker."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self.secrets = tuple(s for s in secrets if s and len(s) >= 8)

    def add(self, secret: str) -> None:
        """Redact ``secret`` too from now on (a token obtained at run time)."""
        if secret and len(secret) >= 8 and secret not in self.secrets:
            self.secrets = (*self.secrets, secret)

    def _clean(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        cleaned = self._clean(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        fields = record.__dict__.get("fields")
        if fields:
            # One search over all string values, field by field only on a hit:
            # this runs for every access line.
            joined = "\x00".join(v for v in fields.values() if isinstance(v, str))
            if self._clean(joined) != joined:
                for key, value in fields.items():
                    if isinstance(value, str):
                        fields[key] = self._clean(value)
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and isinstance(value, str):
                record.__dict__[key] = self._clean(value)
        # Format the traceback here, once, so what the formatter prints is the
        # cleaned text (logging caches it in exc_text and every formatter,
        # shim's and the stdlib's, prints exc_text when it is set).
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._clean(record.exc_text)
        if record.stack_info:
            record.stack_info = self._clean(record.stack_info)
        return True


def configure(secrets: Iterable[str], fmt: str = "json", level: int = logging.INFO) -> None:
    """Send the root logger's records to stdout in ``fmt``, secrets filtered out."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(FORMATTERS[fmt]())
    handler.addFilter(SecretFilter(secrets))
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_shim", False):
            root.removeHandler(existing)
    handler._shim = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)


def add_secret(secret: str) -> None:
    """Redact ``secret`` in every shim-configured handler of this process, gunicorn's too."""
    for logger in (logging.getLogger(), logging.getLogger("gunicorn.error")):
        for handler in logger.handlers:
            for candidate in handler.filters:
                if isinstance(candidate, SecretFilter):
                    candidate.add(secret)


def gunicorn_logconfig(fmt: str, secrets: Iterable[str]) -> dict:
    """A ``logconfig_dict`` for gunicorn: its error log in shim's format, no access log."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"shim": {"()": f"shim.logs.{FORMATTERS[fmt].__name__}"}},
        "filters": {"secrets": {"()": "shim.logs.SecretFilter", "secrets": list(secrets)}},
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
                "formatter": "shim",
                "filters": ["secrets"],
            },
            "null": {"class": "logging.NullHandler"},
        },
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["stdout"], "propagate": False},
            "gunicorn.access": {"level": "CRITICAL", "handlers": ["null"], "propagate": False},
        },
        "root": {"level": "INFO", "handlers": []},
    }


class GunicornLogger(_GunicornLogger):
    """gunicorn's logger with its access log off for good.

    Once ``logconfig_dict`` is set, gunicorn builds every access line (and
    its request line, with any ``?key=``) even when nothing prints it: about
    3 % of a request's CPU in a profile. shim writes its own access line.
    """

    def _compute_access_log_enabled(self) -> bool:
        return False

    def access(self, resp, req, environ, request_time) -> None:  # noqa: ANN001
        return None

    def exception(self, msg, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        # A stream cut on purpose (shim.stream logged the upstream failure and
        # its code) is no "Error handling request" with a traceback.
        if isinstance(sys.exc_info()[1], StreamAborted):
            self.error_log.info("stream aborted so the client sees it fail")
            return
        super().exception(msg, *args, **kwargs)
