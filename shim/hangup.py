"""Notice a client that hung up mid-stream, even while upstream is quiet.

A write to a closed socket only fails on the *next* write, so a client that
leaves while upstream is thinking (between Anthropic ``ping``s, or during a
long tool call) would keep the upstream generation running, and costing
quota, until upstream speaks again. ``watch`` starts a tiny greenlet that
waits for the client socket to become readable: during a response an HTTP/1.1
client sends nothing, so readable-with-EOF (or a reset) means it is gone.

Only under gevent (the gunicorn worker); elsewhere ``watch`` is a no-op and
the next failed write still ends the stream. Not for request bodies: the
watcher only runs while a response streams.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

log = logging.getLogger("shim.hangup")

try:
    import gevent
    import gevent.monkey
    from gevent.socket import wait_read

except ImportError:  # pragma: no cover - gevent is a runtime dependency
    gevent = None


def watch(client: socket.socket, on_hangup: Callable[[], None]) -> object | None:
    """Call ``on_hangup`` once if ``client`` closes; return a handle for ``stop``."""
    if gevent is None or not gevent.monkey.is_module_patched("socket"):
        return None
    return gevent.spawn(_wait_for_hangup, client, on_hangup)


def stop(handle: object) -> None:
    """Stop watching (the response is over; the socket goes back to the server)."""
    # Blocking: a watcher left registered on the socket while the server closes
    # it delayed that close by about a second (measured).
    handle.kill(block=True, timeout=1)  # type: ignore[attr-defined]


def _wait_for_hangup(client: socket.socket, on_hangup: Callable[[], None]) -> None:
    try:
        wait_read(client.fileno())
        if client.recv(1, socket.MSG_PEEK):
            return  # a pipelined next request, not a hang-up: stop watching
    except (OSError, ValueError):
        pass  # reset or already closed: the client is gone all the same
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
        log.debug("upstream socket already closed", extra={"event": "upstream_shutdown_noop"})
