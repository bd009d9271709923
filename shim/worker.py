"""shim's gunicorn worker: gunicorn's gevent worker plus two things it does not do.

1. **Prompt graceful stop.** On SIGTERM gunicorn's worker stops accepting and
   waits up to ``graceful_timeout`` for its connections, idle keep-alive ones
   included, so a deploy waited the whole grace period for SDK connection
   pools that had nothing in flight. Here a connection waiting for its next
   request is closed as soon as the stop begins; requests in flight (long
   streams) keep the full grace period.
2. **Provider-shaped framing errors.** A request gunicorn cannot parse (an
   oversized request line or header, broken chunked framing) is answered
   before the app runs, with gunicorn's HTML page. Here it gets the JSON error
   shape of the port it arrived on, and the log line carries the error class
   only: gunicorn's own message quotes the request line, which can hold a
   client's ``?key=``.

Imported by gunicorn's master to load the worker class, so it imports nothing
but gunicorn, gevent and ``shim.errors`` (standard library only).
"""

from __future__ import annotations

import contextlib
import socket

import gevent
from gunicorn.http import errors as http_errors
from gunicorn.util import write_nonblock
from gunicorn.workers.ggevent import GeventWorker

from shim.errors import anthropic_error_body, google_error_body

# gunicorn's framing errors by answer; anything else it raises is the client's 400.
_STATUS = (
    (http_errors.LimitRequestLine, 414, "URI Too Long", "too_large"),
    (http_errors.LimitRequestHeaders, 431, "Request Header Fields Too Large", "too_large"),
    (http_errors.UnsupportedTransferCoding, 501, "Not Implemented", "invalid_request"),
    (http_errors.ExpectationFailed, 417, "Expectation Failed", "invalid_request"),
    (http_errors.ForbiddenProxyRequest, 403, "Forbidden", "invalid_request"),
)
_MESSAGES = {
    414: "The request line is too long.",
    431: "A request header is too large, or there are too many.",
    501: "Unsupported transfer coding.",
    417: "Unsupported expectation.",
    403: "Forbidden.",
    400: "The request could not be parsed as HTTP.",
}


class _NextRequestWait:
    """The keep-alive wait for a next request: bounded, and registered so a stop can end it."""

    def __init__(self, worker: ShimWorker):
        self.worker = worker
        self.timeout = gevent.Timeout(worker.cfg.keepalive, False)

    def __enter__(self) -> None:
        if not self.worker.alive:
            raise StopIteration  # stopping: gunicorn closes the connection quietly
        self.worker._waiting.add(gevent.getcurrent())
        self.timeout.start()

    def __exit__(self, kind, value, traceback) -> bool:  # noqa: ANN001
        self.timeout.close()
        self.worker._waiting.discard(gevent.getcurrent())
        # Like gevent.Timeout(..., False): a keep-alive that expires ends quietly.
        return value is self.timeout


class ShimWorker(GeventWorker):
    def init_process(self) -> None:
        self._waiting: set[gevent.Greenlet] = set()  # connections between requests
        self._busy: set[gevent.Greenlet] = set()  # requests in flight
        # gunicorn.conf.py binds the Anthropic port first, then the Gemini port.
        self._gemini_port = int(self.cfg.bind[1].rsplit(":", 1)[1])
        super().init_process()

    def timeout_ctx(self) -> _NextRequestWait:
        # gunicorn wraps exactly the wait for a connection's next request in this.
        return _NextRequestWait(self)

    def handle_request(self, listener_name, req, sock, addr):  # noqa: ANN001, ANN201
        current = gevent.getcurrent()
        self._busy.add(current)
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            self._busy.discard(current)

    def handle_exit(self, sig, frame) -> None:  # noqa: ANN001 - gunicorn's signature
        if self.alive:
            # Out of the signal handler: do the blocking work in a greenlet of its own.
            gevent.spawn(self._drain)
        super().handle_exit(sig, frame)

    def _drain(self) -> None:
        gevent.killall(list(self._waiting), block=False)
        # The master SIGKILLs workers at graceful_timeout, so end the streams
        # still running a little before that, while they can still say why
        # (shim.forward turns this GreenletExit into the provider's error frame).
        grace = float(self.cfg.graceful_timeout)
        gevent.sleep(max(grace - 1.0, grace * 0.5))
        if self._busy:
            self.log.warning("grace period over: ending %d request(s) in flight", len(self._busy))
            gevent.killall(list(self._busy), block=False)

    def handle_error(self, req, client, addr, exc) -> None:  # noqa: ANN001
        status, reason, kind = 400, "Bad Request", "invalid_request"
        for error_class, code, text, error_kind in _STATUS:
            if isinstance(exc, error_class):
                status, reason, kind = code, text, error_kind
                break
        else:
            app_fault = (http_errors.InvalidResponseHeader, http_errors.InvalidResponseHeaderName)
            if isinstance(exc, app_fault) or not isinstance(exc, http_errors.ParseException):
                status, reason, kind = 500, "Internal Server Error", "internal"
        if status == 500:
            # Never the request line or URI: it can carry a client's ?key=.
            self.log.error("error handling request: %s", type(exc).__name__)
        else:
            self.log.warning("unparseable request: %s (%s)", type(exc).__name__, status)
        message = _MESSAGES.get(status, "The gateway failed to handle the request.")
        try:
            port = client.getsockname()[1]
        except OSError:
            port = None
        if port == self._gemini_port:
            body = google_error_body(status, kind, message)
        else:
            body = anthropic_error_body(kind, message)
        head = (
            f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            write_nonblock(client, head.encode("latin-1") + body)
            _linger(client)


def _linger(client) -> None:  # noqa: ANN001 - a gevent socket
    """Read and drop what the client still sends, briefly, before gunicorn closes.

    Closing a socket with unread input makes the kernel send a reset, and the
    client may then lose the error answer it was about to read (nginx calls
    this lingering close).
    """
    client.shutdown(socket.SHUT_WR)
    with gevent.Timeout(1.0, False):
        for _ in range(64):  # at most 4 MiB
            if not client.recv(65536):
                break
