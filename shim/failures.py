"""Translate every failure toward upstream into the gateway's own errors, in one place.

The shape of httpx's ``map_httpcore_exceptions`` (and of requests'
``adapters.py`` ``send``): what requests, urllib3 and the socket raise, and
gevent's ``GreenletExit`` when the worker stops past its grace period
(``greenlets.STOPPING``), becomes one ``GatewayError``; the access record gets
that error's ``code`` and the log one warning line. Which error, by what
failed and in which step of the call::

    what was raised                    SEND                 WHOLE_BODY           STREAM
    greenlets.STOPPING                 ShuttingDown         ShuttingDown         ShuttingDown
    a timeout (requests/urllib3/OS)    UpstreamTimeout      UpstreamTimeout      UpstreamTimeout
    any other requests/urllib3/OS      UpstreamUnreachable  UpstreamBodyFailed   StreamFailed

``map_upstream_failures`` wraps the steps that run once per call (the send, a
body read whole). The stream's per-chunk loop catches ``UPSTREAM_FAILURES``
in a plain ``try`` and calls ``failed``: free while nothing fails, where a
``with`` per chunk would not be (measured, issue #16).

Not here: what a stream does once it failed (an error frame or an aborted
body, shim.stream), how an error reads on a provider's wire (shim.errors).
"""

from __future__ import annotations

import http.client
import logging
from dataclasses import dataclass
from types import TracebackType

import requests
import urllib3.exceptions

from shim import greenlets
from shim.access import AccessRecord
from shim.errors import (
    GatewayError,
    ShuttingDown,
    StreamFailed,
    UpstreamBodyFailed,
    UpstreamTimeout,
    UpstreamUnreachable,
)

# The forwarding core's logger: these lines kept their logger name when they moved here.
log = logging.getLogger("shim.forward")

# Everything that can end a step toward upstream. requests wraps most of what
# the send raises; a body read raises urllib3's errors and OSError directly.
UPSTREAM_FAILURES: tuple[type[BaseException], ...] = (
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,  # IncompleteRead from a chunk cut short (shim.stream)
    OSError,
    *greenlets.STOPPING,
)
# Checked before the rest: requests' ConnectTimeout is both a Timeout and a ConnectionError.
_TIMEOUTS = (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)


@dataclass(frozen=True, slots=True)
class Step:
    """A step of a forwarded call that can fail, and how its failure reads."""

    broken: type[GatewayError]  # what a failure other than a timeout or a stop becomes
    event: str | None  # the log line's event; None: the error's code
    message: str


SEND = Step(UpstreamUnreachable, None, "upstream failed before answering")
WHOLE_BODY = Step(
    UpstreamBodyFailed, "upstream_body_failed", "upstream failed while sending the body"
)
STREAM = Step(StreamFailed, "upstream_stream_failed", "upstream stream ended early")


def failed(
    exc: BaseException,
    step: Step,
    record: AccessRecord,
    provider: str,
    credential: str | None = None,
) -> GatewayError:
    """Return the gateway's error for ``exc`` raised in ``step``; note it on ``record``, log it."""
    if isinstance(exc, greenlets.STOPPING):
        error: GatewayError = ShuttingDown()
    elif isinstance(exc, _TIMEOUTS):
        error = UpstreamTimeout()
    else:
        error = step.broken()
    record.error = error.code
    log.warning(
        step.message,
        extra={
            "event": step.event or error.code,
            "provider": provider,
            "error": type(exc).__name__,
            "status": error.status,
            "credential": credential,
            "request_id": record.request_id,
        },
    )
    return error


class map_upstream_failures:  # noqa: N801 - named like the function-shaped context manager it is
    """Raise the gateway's error (see the table above) for an upstream failure in the block.

    A class rather than ``contextlib.contextmanager``: it runs for every call,
    and the generator version costs three times as much (issue #16).
    """

    __slots__ = ("_step", "_record", "_provider", "_credential")

    def __init__(
        self, step: Step, record: AccessRecord, provider: str, credential: str | None = None
    ):
        self._step = step
        self._record = record
        self._provider = provider
        self._credential = credential

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if exc is not None and isinstance(exc, UPSTREAM_FAILURES):
            raise failed(exc, self._step, self._record, self._provider, self._credential) from None
        return False
