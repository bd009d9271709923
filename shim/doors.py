"""What shim's worker does at the door: before the app, and around the request body.

- ``RequestBody`` is ``wsgi.input``: ``100 Continue`` goes out on the app's
  first read (after the secret and size checks), and an answer given before
  the body was read, or a 401/413, ends the connection.
- ``unsupported_coding`` / ``is_refused_coding``: a ``Transfer-Encoding``
  other than plain ``chunked`` is a 501, not gunicorn's pass-through or 400.
- ``linger``: a bounded lingering close, so an early answer is not lost to a
  reset while the client is still sending.

Imported by gunicorn's master with the worker class: gunicorn and gevent only.
"""

from __future__ import annotations

import contextlib
import socket

import gevent
from gunicorn.http import errors as http_errors
from gunicorn.http.body import Body, LengthReader

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Answers that end the connection whether or not the body was read: a guesser
# or an oversized upload gets no kept-alive connection to try again on.
CLOSING_STATUSES = frozenset({401, 413})


class RequestBody:
    """A request body as the app reads it (``wsgi.input``), sending ``100 Continue`` on demand.

    The 100 goes out on the app's first read, and never once the app has
    started its answer. ``respond`` is told the status and decides whether
    the connection outlives this request.
    """

    def __init__(self, req, sock, expecting: bool):  # noqa: ANN001 - gunicorn's objects
        self._req = req
        self._body: Body = req.body
        self._sock = sock
        self.expecting = expecting  # a 100 Continue is owed if the app reads
        self.answered = False  # the app has called start_response
        self.closing = False  # this connection ends after the answer
        self._eof = False

    @property
    def failed(self) -> bool:
        # gunicorn's parser reads this to know whether the connection is reusable.
        return self._body.failed

    def _invite(self) -> None:
        if self.expecting and not self.answered:
            self.expecting = False
            self._sock.sendall(CONTINUE)

    def read(self, size: int | None = None) -> bytes:
        self._invite()
        data = self._body.read(size)
        if not data and size != 0:
            self._eof = True
        return data

    def readline(self, size: int | None = None) -> bytes:
        self._invite()
        data = self._body.readline(size)
        if not data and size != 0:
            self._eof = True
        return data

    def readlines(self, size: int | None = None) -> list[bytes]:
        self._invite()
        lines = self._body.readlines(size)
        self._eof = True
        return lines

    def __iter__(self) -> RequestBody:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def consumed(self) -> bool:
        """True when nothing of the body is left unread (or there was none)."""
        if self._eof:
            return True
        reader = self._body.reader
        return isinstance(reader, LengthReader) and reader.length == 0 and not self._body.buf.tell()

    def respond(self, status: int) -> None:
        """The app answers ``status``: end the connection if the body must not be drained."""
        self.answered = True
        if status in CLOSING_STATUSES or not self.consumed():
            self.closing = True
            self._req.force_close()  # gunicorn then says Connection: close and stops


def unsupported_coding(req) -> bool:  # noqa: ANN001 - gunicorn's request
    """True unless the request's Transfer-Encoding, if any, is exactly ``chunked``."""
    codings = [
        word.strip(" \t").lower()
        for name, value in req.headers
        if name == "TRANSFER-ENCODING"
        for word in value.split(",")
    ]
    return bool(codings) and codings != ["chunked"]


def is_refused_coding(exc: BaseException) -> bool:
    """gunicorn's 400 for a Transfer-Encoding it parses but refuses (stacked, not chunked last).

    An HTTP/1.0 request with Transfer-Encoding stays a 400: its framing is faulty.
    """
    if not isinstance(exc, http_errors.InvalidHeader) or exc.hdr != "TRANSFER-ENCODING":
        return False
    version = getattr(exc.req, "version", None)
    return version is None or version >= (1, 1)


def linger(client) -> None:  # noqa: ANN001 - a gevent socket
    """Read and drop what the client still sends, briefly, before gunicorn closes.

    Closing a socket with unread input makes the kernel send a reset, and the
    client may then lose the error answer it was about to read (nginx calls
    this lingering close). Bounded in time and bytes, so a client still
    sending a huge body costs a worker a second at most.
    """
    with contextlib.suppress(OSError), gevent.Timeout(1.0, False):
        client.shutdown(socket.SHUT_WR)
        for _ in range(64):  # at most 4 MiB
            if not client.recv(65536):
                break
