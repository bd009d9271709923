"""Relay a streamed upstream answer to the client, chunk by chunk, failing visibly.

``UpstreamBody`` is the WSGI body of an answer of unknown or large length,
built by the forwarding core (shim.forward ``relay``). Its ``__next__`` runs
for every chunk: keep it lean (a failure is translated by shim.failures only
in the ``except`` branch). Not for answers read whole (shim.forward).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import urllib3

from shim import greenlets, hangup, usage
from shim.access import AccessRecord
from shim.errors import CLIENT_GONE, StreamAborted
from shim.failures import STREAM, UPSTREAM_FAILURES, failed
from shim.providers.base import Provider

# The forwarding core's logger: these lines kept their logger name when they moved here.
log = logging.getLogger("shim.forward")

# Read at most this much per chunk; a chunk that arrives smaller is sent as it is.
CHUNK_BYTES = 65_536

# Told (provider name, +1 or -1) as a stream starts and ends (the in-flight gauge).
StreamCounter = Callable[[str, int], None]


def usage_unread(record: AccessRecord, why: str) -> None:
    """Say on the access line, and in one log line, that usage could not be read."""
    record.usage_unread = why
    log.warning(
        "usage not read from the answer",
        extra={
            "event": "usage_unread",
            "reason": why,
            "provider": record.provider,
            "request_id": record.request_id,
        },
    )


class UpstreamBody:
    """The WSGI body of a streamed upstream response.

    Yields upstream's bytes as they arrive. If upstream fails mid-stream the
    client must *see* a failure, never a clean end that looks complete: the
    provider's error frame is sent if it has one for this content type,
    otherwise the stream is aborted (the server drops the connection without
    the terminating chunk). The same happens when the worker is stopped past
    its grace period (gevent's GreenletExit arrives while we wait on upstream).

    A client that hangs up while upstream is quiet is noticed by a watcher on
    its socket, which cuts the upstream connection at once, so an abandoned
    generation stops costing quota without waiting for upstream's next byte.

    ``close`` is called by the server even when the body was never iterated
    (HEAD, client gone): it always releases upstream.
    """

    __slots__ = (
        "_raw",
        "_read",
        "_provider",
        "_content_type",
        "_frame",
        "_complete",
        "_watch",
        "_client_gone",
        "_record",
        "_tap",
        "_finished",
        "_on_stream",
    )

    def __init__(  # noqa: PLR0913
        self,
        raw: urllib3.HTTPResponse,
        provider: Provider,
        content_type: str,
        frame,  # noqa: ANN001 - the provider's stream_error_frame, or None
        record: AccessRecord,
        tap: usage.Tap | None,
        on_stream: StreamCounter | None = None,
    ):
        self._on_stream = on_stream
        self._raw = raw
        self._provider = provider
        self._content_type = content_type
        self._frame = frame
        self._record = record
        self._tap = tap
        self._complete = False
        self._finished = False
        self._watch = None
        self._client_gone = False
        record.stream = True
        record.deferred = True  # this body writes the access line when it ends
        record.body = self
        if on_stream is not None:
            on_stream(provider.name, 1)
        # A bound method, not a generator: the greenlet of every open stream
        # waits on upstream one interpreter frame shallower (issue #19).
        self._read: Callable[[], bytes] = self._next_chunk if raw.chunked else self._next_read1

    def watch_client(self, client: socket.socket | None) -> None:
        if client is not None:
            self._watch = hangup.watch(client, self._on_client_hangup)

    def _on_client_hangup(self) -> None:
        # Runs in the event loop (shim.hangup): flags and a shutdown only; the
        # stream's greenlet logs when the EOF this causes wakes it.
        self._client_gone = True
        self._record.error = CLIENT_GONE
        raw = self._raw
        if raw is not None:
            # Wakes the greenlet blocked on upstream's next byte with an EOF.
            hangup.shutdown_upstream(raw)

    def __iter__(self) -> UpstreamBody:
        return self

    def __next__(self) -> bytes:
        try:
            chunk = self._read()
        except UPSTREAM_FAILURES as exc:
            # A plain except, not a `with`, on this per-chunk path (shim.failures).
            return self._fail(exc)
        if not chunk:
            if self._client_gone:
                self._left()  # our watcher's shutdown looked like a clean end
            self._complete = True
            raise StopIteration
        self._record.sent(len(chunk))
        if self._tap is not None:
            self._tap.feed(chunk)
        else:
            self._record.events += 1
        return chunk

    def _fail(self, exc: BaseException) -> bytes:
        if self._client_gone and not isinstance(exc, greenlets.STOPPING):
            self._left()
        error = failed(exc, STREAM, self._record, self._provider.name)
        self._release(clean=False)
        frame = self._frame(error, self._content_type) if self._frame else None
        if frame is None:
            self._finish()
            raise StreamAborted(f"stream ended early ({error.code})") from None
        self._read = _ended
        self._record.sent(len(frame))
        return frame

    def _next_chunk(self) -> bytes:
        """The next piece of a chunked answer; b"" at its end.

        urllib3's ``read_chunked`` loop, one step per call (urllib3 is pinned;
        the live stream and fault tests cover these internals). Its failures
        are urllib3's ProtocolError and http.client's IncompleteRead.
        """
        raw = self._raw
        raw._update_chunk_length()
        if raw.chunk_left != 0:
            return raw._handle_chunk(CHUNK_BYTES)
        # The last chunk: drop trailers up to the blank line, as urllib3 does.
        fp = raw._fp
        while fp is not None and fp.fp is not None:
            line = fp.fp.readline()
            if not line or line == b"\r\n":
                break
        if raw._original_response is not None:
            raw._original_response.close()
        return b""

    def _next_read1(self) -> bytes:
        # read1 returns what has arrived (up to CHUNK_BYTES) instead of waiting to fill it.
        return self._raw.read1(CHUNK_BYTES, decode_content=False)

    def _left(self) -> None:
        # Our own watcher cut upstream: the client is not there to tell.
        log.info(
            "client went away mid-stream; closed upstream",
            extra={
                "event": "client_gone",
                "provider": self._provider.name,
                "request_id": self._record.request_id,
            },
        )
        self._release(clean=False)
        raise StopIteration from None

    def close(self) -> None:
        self._release(clean=self._complete)
        self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        record = self._record
        tap = self._tap
        if tap is not None:
            tap.read(lambda data: self._provider.read_usage(data, record))
            record.events = tap.events
            why = tap.unread
            if why is not None:
                usage_unread(record, why)
        if self._on_stream is not None:
            self._on_stream(self._provider.name, -1)
        record.close()

    def _release(self, clean: bool) -> None:
        if self._watch is not None:
            hangup.stop(self._watch)
            self._watch = None
        raw = self._raw
        if raw is None:
            return
        self._raw = None
        if not clean:
            # Closing the socket is what stops an abandoned generation upstream.
            raw.close()
        raw.release_conn()


def _ended() -> bytes:
    return b""
