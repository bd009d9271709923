"""One access record per request: filled in as the request passes, written once at its end.

``AccessLog`` is a thin WSGI middleware: it opens the record (request id,
provider by port, start time), adds ``X-Request-Id`` to the answer and, for
answers sent in one piece, closes the record right away. A streamed answer
(``shim.stream.UpstreamBody``) closes it itself when the stream ends, so
duration, bytes, gaps and token usage cover the whole stream.

Closing a record writes the access line (logger ``shim.access``) and feeds the
metrics; nothing here holds a byte of the response back.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from shim.errors import STOPPED, UNHANDLED_ERROR

log = logging.getLogger("shim.access")

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestIds:
    """Unique request ids, cheaply: a random per-process prefix and a counter.

    uuid4 costs a system call per request; this costs a string format. Each
    worker builds its own after fork (the app is created in the worker, never
    preloaded), so no two workers share a prefix.
    """

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


class AccessRecord:
    """What one request did; field names are the access line's keys."""

    __slots__ = (
        "request_id",
        "provider",
        "method",
        "route",
        "model",
        "stream",
        "status",
        "upstream_status",
        "start",
        "ttfb",
        "max_gap",
        "events",
        "bytes_in",
        "bytes_out",
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_creation_tokens",
        "stop_reason",
        "usage_unread",
        "gemini_key_id",
        "claude_session_id",
        "quota_status",
        "quota_reset",
        "quota_5h_utilization",
        "quota_7d_utilization",
        "quota_representative_claim",
        "quota_5h_reset",
        "quota_7d_reset",
        "quota_overage_status",
        "quota_overage_disabled_reason",
        "quota_fallback",
        "quota_fallback_percentage",
        "refusal",
        "error",
        "deferred",
        "_last",
        "_done",
        "_observe",
        "client_ip",
        "client",
        "client_credential",
        "limits",
        "lease",
        "body",
        "renew_at",
        "renewer",
    )

    def __init__(
        self,
        request_id: str,
        provider: str | None,
        method: str,
        observe: Callable[[AccessRecord, dict], None] | None = None,
    ):
        self._observe = observe
        self.client_ip: str | None = None
        self.client: str | None = None
        # A short hash naming a credential the client brought itself (never the value).
        self.client_credential: str | None = None
        # Set by shim.limits when a limited call is admitted; settled as the record closes.
        self.limits = self.lease = None
        # A long call renews its limit lease as it streams (set by shim.limits.Limiter.admit).
        self.renew_at = float("inf")
        self.renewer: Callable[[AccessRecord], None] | None = None
        # A streamed body that closes this record when it ends (shim.stream.UpstreamBody).
        self.body: _Closable | None = None
        self.request_id = request_id
        self.provider = provider
        self.method = method
        self.start = self._last = time.perf_counter()
        self.route = self.model = self.stop_reason = self.error = None
        self.usage_unread: str | None = None
        self.gemini_key_id = self.claude_session_id = None
        self.quota_status = self.quota_reset = None
        self.quota_5h_utilization = self.quota_7d_utilization = None
        self.quota_representative_claim = self.quota_5h_reset = self.quota_7d_reset = None
        self.quota_overage_status = self.quota_overage_disabled_reason = None
        self.quota_fallback = self.quota_fallback_percentage = None
        # A subscription refusal recognised in the error answer (shim.refusals.KINDS).
        self.refusal: str | None = None
        self.status = self.upstream_status = None
        self.input_tokens = self.output_tokens = None
        self.cache_read_tokens = self.cache_creation_tokens = None
        self.stream = False
        self.ttfb = None
        self.max_gap = 0.0
        self.events = 0
        self.bytes_in = self.bytes_out = 0
        self.deferred = False  # a streamed body closes the record itself
        self._done = False

    def sent(self, size: int) -> None:
        """Account for ``size`` bytes just handed to the client."""
        now = time.perf_counter()
        if self.ttfb is None:
            self.ttfb = now - self.start
        else:
            gap = now - self._last
            if gap > self.max_gap:
                self.max_gap = gap
        self._last = now
        self.bytes_out += size
        if now >= self.renew_at:  # finite only once Limiter.admit set a renewer
            self.renew_at = float("inf")  # the renewer sets the next one
            self.renewer(self)  # type: ignore[misc]

    def fields(self) -> dict:
        duration = time.perf_counter() - self.start
        fields = {
            "request_id": self.request_id,
            "client_ip": self.client_ip,
            "client": self.client,
            "client_credential": self.client_credential,
            "provider": self.provider,
            "method": self.method,
            "route": self.route,
            "model": self.model,
            "stream": self.stream,
            "status": self.status,
            "upstream_status": self.upstream_status,
            "duration_ms": round(duration * 1000, 2),
            "ttfb_ms": None if self.ttfb is None else round(self.ttfb * 1000, 2),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_creation_tokens": self.cache_creation_tokens,
            "stop_reason": self.stop_reason,
            "usage_unread": self.usage_unread,
            "gemini_key_id": self.gemini_key_id,
            "claude_session_id": self.claude_session_id,
            "quota_status": self.quota_status,
            "quota_reset": self.quota_reset,
            "quota_5h_utilization": self.quota_5h_utilization,
            "quota_7d_utilization": self.quota_7d_utilization,
            "quota_representative_claim": self.quota_representative_claim,
            "quota_5h_reset": self.quota_5h_reset,
            "quota_7d_reset": self.quota_7d_reset,
            "quota_overage_status": self.quota_overage_status,
            "quota_overage_disabled_reason": self.quota_overage_disabled_reason,
            "quota_fallback": self.quota_fallback,
            "quota_fallback_percentage": self.quota_fallback_percentage,
            "refusal": self.refusal,
            "error": self.error,
        }
        if self.stream:
            fields["max_gap_ms"] = round(self.max_gap * 1000, 2)
            fields["events"] = self.events
        return fields

    def end(self) -> None:
        """Close the streamed body, if one was made, and this record: every exit path ends here."""
        body = self.body
        if body is not None:
            self.body = None
            try:
                body.close()
            finally:
                self.close()
        else:
            self.close()

    def close(self) -> None:
        """Write the access line and feed the metrics, once."""
        if self._done:
            return
        self._done = True
        fields = self.fields()
        log.info("request", extra={"event": "access", "fields": fields})
        if self._observe is not None:
            self._observe(self, fields)


class AccessLog:
    """WSGI middleware that gives every request an ``AccessRecord`` and an ``X-Request-Id``."""

    def __init__(
        self,
        app: Callable,
        provider_for_port: Callable[[str], str | None],
        observe: Callable[[AccessRecord, dict], None] | None,
        trusted_proxies: tuple[str, ...] = (),
    ):
        self.trusted_proxies = frozenset(trusted_proxies)
        self.app = app
        self.provider_for_port = provider_for_port
        self.observe = observe
        self.ids = RequestIds()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        incoming = environ.get("HTTP_X_REQUEST_ID")
        request_id = (
            incoming if incoming and _SANE_REQUEST_ID.fullmatch(incoming) else self.ids.next()
        )
        record = AccessRecord(
            request_id,
            self.provider_for_port(environ.get("SERVER_PORT", "")),
            environ.get("REQUEST_METHOD", ""),
            self.observe,
        )
        record.client_ip = client_address(environ, self.trusted_proxies)
        environ["shim.record"] = record

        def start(status: str, headers: list, exc_info=None):  # noqa: ANN001, ANN202
            record.status = int(status[:3])
            if not record.deferred:
                for name, value in headers:
                    if name.lower() == "content-length" and value.isdigit():
                        record.sent(int(value))
                        break
            headers.append(("X-Request-Id", request_id))
            return start_response(status, headers, exc_info)

        try:
            body = self.app(environ, start)
        except BaseException as exc:
            # Raised after the record may have a stream (a header the server refuses
            # to relay) or while waiting for upstream (the worker stopping): the line is
            # still written and the stream's gauge, socket and limit slot still freed.
            record.status = 500
            if record.error is None:
                record.error = UNHANDLED_ERROR if isinstance(exc, Exception) else STOPPED
            record.end()
            raise
        if not record.deferred:
            record.close()
            return body
        # A stream (or an error answer that replaced one): whatever the server does
        # with the body, its close ends the record. Iteration goes straight to `body`.
        return _EndsRecord(body, record)


class _Closable(Protocol):
    def close(self) -> None: ...


class _EndsRecord:
    """A WSGI body whose ``close`` also ends its record; ``iter`` hands out the body's own."""

    __slots__ = ("_body", "_record")

    def __init__(self, body: Iterable[bytes], record: AccessRecord):
        self._body = body
        self._record = record

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._record.end()


def client_address(environ: dict, trusted_proxies: frozenset[str]) -> str | None:
    """The caller's address: the socket peer, or what a trusted proxy in front says.

    Only when the peer is a trusted proxy (nginx) is ``X-Forwarded-For``
    believed, and then only its last entry: the address nginx itself saw
    (``proxy_add_x_forwarded_for`` appends it); earlier entries are whatever
    the client claimed.
    """
    peer = environ.get("REMOTE_ADDR")
    if peer and (peer in trusted_proxies or "*" in trusted_proxies):
        forwarded = environ.get("HTTP_X_FORWARDED_FOR")
        if forwarded:
            last = forwarded.rsplit(",", 1)[-1].strip()
            if last:
                return last[:64]
    return peer
