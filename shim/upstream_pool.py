"""The upstream connection pool of one worker: no retries, no proxies, lean buffers.

Every open stream holds one upstream response, and http.client gives each a
buffered reader over its socket with an 8 KiB buffer allocated up front. At
thousands of concurrent streams that buffer was the largest single cost per
stream (issue #19: ~9 KiB of ~35 KiB traced per stream). SSE events arrive a
few hundred bytes at a time and large reads bypass the buffer anyway, so the
responses here read through a 1 KiB one, and a stream drops its parsed
header copy once relayed (``forget_parsed_headers``).
"""

from __future__ import annotations

import http.client

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

READ_BUFFER_BYTES = 1024


class _LeanMakefile:
    """Hands http.client a socket whose ``makefile`` uses a small buffer."""

    __slots__ = ("_sock",)

    def __init__(self, sock):  # noqa: ANN001 - a (gevent or ssl) socket
        self._sock = sock

    def makefile(self, mode: str):  # noqa: ANN201 - whatever the socket's makefile returns
        return self._sock.makefile(mode, buffering=READ_BUFFER_BYTES)


class LeanResponse(http.client.HTTPResponse):
    def __init__(self, sock, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - http.client's signature
        super().__init__(_LeanMakefile(sock), *args, **kwargs)


class _Connection(HTTPConnection):
    response_class = LeanResponse


class _TLSConnection(HTTPSConnection):
    response_class = LeanResponse


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


def adapter(pool_maxsize: int) -> HTTPAdapter:
    """An adapter for one worker's session: never retries (a POST must not be sent twice)."""
    mounted = HTTPAdapter(pool_connections=4, pool_maxsize=pool_maxsize, max_retries=0)
    mounted.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}
    return mounted


def forget_parsed_headers(raw) -> None:  # noqa: ANN001 - a urllib3 response from this pool
    """Drop http.client's parsed copy of a stream's headers once the stream is relayed.

    urllib3 keeps its own copy (``raw.headers``) and nothing reads http.client's
    email.message object after the response began; ~0.5 KiB of every open
    stream. Not for a whole answer: requests reads it for cookies first.
    """
    original = getattr(raw, "_original_response", None)
    if original is not None:
        original.msg = original.headers = None
