"""Notice a client that hung up mid-stream, even while upstream is quiet.

A write to a closed socket only fails on the *next* write, so a client that
leaves while upstream is thinking (between Anthropic ``ping``s, or during a
long tool call) would keep the upstream generation running, and costing
quota, until upstream speaks again. ``watch`` registers a read watcher on the
client socket: during a response an HTTP/1.1 client sends nothing, so
readable-with-EOF (or a reset) means it is gone.

The watcher is a bare event-loop callback, not a greenlet (issue #19): a
greenlet per stream cost ~4.6 KiB of saved stack and objects per open stream
and a spawn plus a blocking kill (several switches) per request. The callback
runs in the hub, so ``on_hangup`` must not block or switch: it may set flags
and shut a socket, and leaves logging to the stream's own greenlet.

Only under gevent (the gunicorn worker); elsewhere ``watch`` is a no-op and
the next failed write still ends the stream. Not for request bodies: the
watcher only runs while a response streams.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

try:
    import gevent
    import gevent.monkey

except ImportError:  # pragma: no cover - gevent is a runtime dependency
    gevent = None

_READ = 1  # libev's EV_READ
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


def watch(client: socket.socket, on_hangup: Callable[[], None]) -> object | None:
    """Call ``on_hangup`` once (in the hub) if ``client`` closes; return a handle for ``stop``."""
    if gevent is None or not gevent.monkey.is_module_patched("socket"):
        return None
    try:
        watcher = gevent.get_hub().loop.io(client.fileno(), _READ)
    except (OSError, ValueError):
        return None  # already closed: the next write fails and ends the stream
    # The real socket under gevent's wrapper: a peek from the hub must never wait.
    raw = getattr(client, "_sock", client)
    watcher.start(_readable, watcher, raw, on_hangup)
    return watcher


def stop(handle: object) -> None:
    """Stop watching (the response is over; the socket goes back to the server)."""
    handle.close()  # type: ignore[attr-defined] - stops and frees the watcher at once


def _readable(watcher: object, client: socket.socket, on_hangup: Callable[[], None]) -> None:
    try:
        if client.recv(1, _PEEK):
            watcher.close()  # type: ignore[attr-defined]
            return  # a pipelined next request, not a hang-up: stop watching
    except BlockingIOError:
        return  # woken with nothing to read: keep watching
    except (OSError, ValueError):
        pass  # reset or already closed: the client is gone all the same
    watcher.close()  # type: ignore[attr-defined]
    on_hangup()


def shutdown_upstream(raw: object) -> None:
    """Shut the upstream socket so a read blocked on it returns at once."""
    connection = getattr(raw, "connection", None) or getattr(raw, "_connection", None)
    sock = getattr(connection, "sock", None)
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed: the blocked read has its EOF either way
