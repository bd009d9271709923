"""shim's gunicorn worker: gunicorn's gevent worker plus what it does not do.

1. **Prompt graceful stop.** On SIGTERM gunicorn's worker stops accepting and
   waits up to ``graceful_timeout`` for its connections, idle keep-alive ones
   included, so a deploy waited the whole grace period for SDK connection
   pools that had nothing in flight. Here a connection idle between requests
   is closed, quietly, as soon as the stop begins; one accepted but not yet
   read is served; requests in flight (long streams) keep the full grace
   period, and the call a client sends right after one of them is served
   with ``Connection: close`` (it was told keep-alive; issue #19).
2. **Provider-shaped framing errors.** A request gunicorn cannot parse (an
   oversized request line or header, broken chunked framing) is answered
   before the app runs, with gunicorn's HTML page. Here it gets the JSON error
   shape of the port it arrived on, and the log line carries the error class
   only: gunicorn's own message quotes the request line, which can hold a
   client's ``?key=``. A ``Transfer-Encoding`` other than plain ``chunked``
   (``gzip, chunked``, ``chunked, chunked``, ``identity``) is a 501 here:
   gunicorn passes ``gzip, chunked`` to the app still compressed and answers
   the others 400; shim forwards no coded bodies, so it implements none (#14).
3. **No body invited before the secret and the size are checked.** gunicorn
   answers ``Expect: 100-continue`` with ``100 Continue`` as it builds the
   environ, before the app runs, so a client with a wrong secret or a 1 GB
   Content-Length was invited to send it. Here ``100 Continue`` goes out on
   the app's first read of ``wsgi.input``, which shim makes only after the
   secret check and the Content-Length check (shim.web, shim.forward;
   the body wrapper is shim.doors).
4. **A refused request ends its connection.** A 401 or 413, or any answer
   given before the body was read, is sent with ``Connection: close`` and the
   connection ends after a lingering close of at most 1 s: gunicorn would
   otherwise read and discard the unread body, however large, for up to the
   keep-alive timeout before the next request (shim.doors).

Imported by gunicorn's master to load the worker class, so it imports nothing
but gunicorn and gevent at import time; the providers (for their error
shapes) are asked in the worker process, after the fork.
"""

from __future__ import annotations

import contextlib
import socket

import gevent
from gunicorn.http import errors as http_errors
from gunicorn.http.body import Body
from gunicorn.util import write_nonblock
from gunicorn.workers.ggevent import GeventWorker

from shim import resolver
from shim.doors import RequestBody, is_refused_coding, linger, unsupported_coding

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

# How long a stopping worker waits for one more call on a connection it just answered.
_LAST_CALL_WAIT_S = 1.0


class _Closing(Exception):  # noqa: N818 - a signal between greenlets, not an error
    """Thrown into an idle keep-alive connection by a stopping worker: close it quietly."""


class _NextRequestWait:
    """The keep-alive wait for a next request: bounded, and registered so a stop can end it.

    gunicorn wraps *every* wait for a request in this, a fresh connection's
    first one included. A stopping worker closes only connections that are
    idle between requests; one that has not had its first request read yet
    was accepted by this worker and is served (issue #19: the soak saw such
    connections answered with an unasked-for 500 when a stop killed them).
    """

    __slots__ = ("worker", "timeout", "current")

    def __init__(self, worker: ShimWorker):
        self.worker = worker
        self.current = gevent.getcurrent()
        # A connection whose answer ended after the stop began was told
        # keep-alive when that answer started, and its client may send its next
        # call at once: a brief wait serves that call (with Connection: close)
        # instead of closing under it (issue #19: the soak's resets on reuse;
        # behind nginx such a POST is a 502). Idle ones were closed at the stop.
        wait = worker.cfg.keepalive if worker.alive else _LAST_CALL_WAIT_S
        self.timeout = gevent.Timeout(wait, False)

    def __enter__(self) -> None:
        self.worker._waiting.add(self.current)
        self.timeout.start()

    def __exit__(self, kind, value, traceback) -> bool:  # noqa: ANN001
        self.timeout.close()
        self.worker._waiting.discard(self.current)
        # Like gevent.Timeout(..., False): a keep-alive that expires ends
        # quietly, and so does one a stopping worker closes (gunicorn would
        # answer any other exception here with a 500 nobody asked for).
        return value is self.timeout or isinstance(value, _Closing)


class ShimWorker(GeventWorker):
    def init_process(self) -> None:
        self._waiting: set[gevent.Greenlet] = set()  # connections waiting for a request
        self._busy: set[gevent.Greenlet] = set()  # requests in flight
        # Connections that have been answered at least once, with their sockets.
        self._served: dict[gevent.Greenlet, socket.socket] = {}
        self._renderers: dict | None = None
        super().init_process()

    def timeout_ctx(self) -> _NextRequestWait:
        # gunicorn wraps exactly the wait for a connection's next request in this.
        return _NextRequestWait(self)

    def load_wsgi(self) -> None:
        resolver.install()  # patched by now; nothing has connected upstream yet
        super().load_wsgi()
        app = self.wsgi

        def told_the_status(environ: dict, start_response):  # noqa: ANN001, ANN202
            body = environ.get("wsgi.input")
            if not isinstance(body, RequestBody):
                return app(environ, start_response)

            def start(status: str, headers: list, exc_info=None):  # noqa: ANN001, ANN202
                body.respond(int(status[:3]))
                return start_response(status, headers, exc_info)

            return app(environ, start)

        self.wsgi = told_the_status

    def handle(self, listener, client, addr):  # noqa: ANN001, ANN201 - gunicorn's signature
        try:
            return super().handle(listener, client, addr)
        finally:
            self._served.pop(gevent.getcurrent(), None)

    def handle_request(self, listener_name, req, sock, addr):  # noqa: ANN001, ANN201
        if unsupported_coding(req):
            # gunicorn accepted it (``gzip, chunked``); handle_error answers 501.
            raise http_errors.UnsupportedTransferCoding("transfer coding")
        body = None
        if type(req.body) is Body:  # HTTP/1.x; an HTTP/2 stream has its own
            body = req.body = RequestBody(req, sock, req._expected_100_continue)
            req._expected_100_continue = False  # not gunicorn's to send: see RequestBody
        current = gevent.getcurrent()
        self._busy.add(current)
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            self._busy.discard(current)
            self._served[current] = sock
            if body is not None and body.closing:
                linger(sock)

    def handle_exit(self, sig, frame) -> None:  # noqa: ANN001 - gunicorn's signature
        if self.alive:
            # Out of the signal handler: do the blocking work in a greenlet of its own.
            gevent.spawn(self._drain)
        super().handle_exit(sig, frame)

    def _drain(self) -> None:
        self._close_idle()
        # The master SIGKILLs workers at graceful_timeout, so end the streams
        # still running a little before that, while they can still say why
        # (shim.failures turns this GreenletExit into the provider's error frame).
        grace = float(self.cfg.graceful_timeout)
        gevent.sleep(max(grace - 1.0, grace * 0.5))
        if self._busy:
            self.log.warning("grace period over: ending %d request(s) in flight", len(self._busy))
            gevent.killall(list(self._busy), block=False)
        # Whatever still waits for a first request gets no more time either.
        gevent.killall(list(self._waiting), exception=_Closing, block=False)

    def _close_idle(self) -> None:
        """Close the connections idle between requests, except one whose next request is here."""
        idle = []
        for current in self._waiting:
            sock = self._served.get(current)
            if sock is None:
                continue  # its first request is on its way: serve it
            try:
                # The real socket: gevent's would wait for a byte instead of saying none came.
                raw = getattr(sock, "_sock", sock)
                if raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    continue  # the next request has arrived: serve it, then close
            except BlockingIOError:
                pass  # nothing sent: idle
            except OSError:
                pass  # reset: closing is all that is left
            idle.append(current)
        gevent.killall(idle, exception=_Closing, block=False)

    def _renderer(self, port: int | None):  # noqa: ANN202 - a provider's render_error
        """The error shape of the provider listening on ``port`` (the first one otherwise)."""
        if self._renderers is None:
            # Asked of the providers here, in the worker after gevent patched it,
            # so the master (which loads this class) imports none of them.
            from shim.providers import REGISTRY
            from shim.settings import Settings

            settings = Settings.from_env()  # the only reader of the environment
            self._renderers = {p.port(settings): p.render_error for p in REGISTRY}
            self._renderers[None] = REGISTRY[0].render_error
        return self._renderers.get(port, self._renderers[None])

    def handle_error(self, req, client, addr, exc) -> None:  # noqa: ANN001
        status, reason, kind = 400, "Bad Request", "invalid_request"
        for error_class, code, text, error_kind in _STATUS:
            if isinstance(exc, error_class):
                status, reason, kind = code, text, error_kind
                break
        if is_refused_coding(exc):
            status, reason, kind = 501, "Not Implemented", "invalid_request"
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
        body = self._renderer(port)(status, kind, message)
        head = (
            f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            write_nonblock(client, head.encode("latin-1") + body)
        linger(client)
