"""Read the client's request body: bounded in size and in time.

Used by the forwarding core (shim.forward) before anything goes upstream: a
body over the limit is refused before it is read (413), a body that trickles
in past its deadline gets 408, a broken or short one 400. Not for response
bodies (shim.stream).
"""

from __future__ import annotations

import contextlib
import logging
import socket

from shim import greenlets
from shim.errors import BadRequest, PayloadTooLarge, RequestTimeout

# The forwarding core's logger: these lines kept their logger name when they moved here.
log = logging.getLogger("shim.forward")

# A chunked request body is read this much at a time.
CHUNK_BYTES = 65_536


def read_body_in_time(environ: dict, limit: int, seconds: float) -> bytes:
    """``read_body``, but a client that trickles its body gets 408 after ``seconds``."""
    try:
        with greenlets.deadline(seconds):
            return read_body(environ, limit)
    except TimeoutError:
        log.info("request body too slow", extra={"event": "request_body_timeout"})
        client = environ.get("gunicorn.socket")
        if client is not None:
            # The rest of the body is unread: end the connection after the 408
            # instead of letting the server drain a trickle.
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RD)
        raise RequestTimeout() from None


def read_body(environ: dict, limit: int) -> bytes:
    """Read the request body, refusing one over ``limit`` before reading it."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        try:
            expected = int(length)
        except ValueError:
            raise BadRequest("Invalid Content-Length header.") from None
        if expected < 0:
            raise BadRequest("Invalid Content-Length header.")
        if expected > limit:
            raise PayloadTooLarge()
        if expected == 0:
            return b""
        body = _read(stream, expected)
        if len(body) != expected:
            raise BadRequest("The request body ended before Content-Length bytes arrived.")
        return body
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        parts = []
        total = 0
        while True:
            data = _read(stream, CHUNK_BYTES)
            if not data:
                return b"".join(parts)
            total += len(data)
            if total > limit:
                raise PayloadTooLarge()
            parts.append(data)
    return b""


def _read(stream, size: int) -> bytes:  # noqa: ANN001 - any WSGI input stream
    try:
        return stream.read(size)
    except TimeoutError:
        raise  # our own deadline (read_body_in_time), not a broken body
    except Exception as exc:  # noqa: BLE001 - the server's body parser raises its own types
        # A client that hangs up or sends a broken chunked body: that is a bad
        # request, not a gateway failure, whatever class the server uses for it.
        log.info(
            "request body unreadable",
            extra={"event": "request_body_unreadable", "error": type(exc).__name__},
        )
        raise BadRequest("The request body could not be read.") from None
