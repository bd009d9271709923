"""Names resolved once per half-minute per worker, not once per new connection.

gevent's default resolver runs every ``getaddrinfo`` on a thread pool, even
for a literal address: a hand-off to a thread and back (a queue, a condition,
an async watcher) for each new upstream connection. Every concurrent stream
needs its own upstream connection, so during a ramp of 500 new streams a
second that hand-off was a quarter of a worker's CPU (issue #19, py-spy), and
on a real box each one is also a DNS query to api.anthropic.com.

``CachingResolver`` wraps the hub's resolver: a successful answer is kept for
``TTL_S`` (the real records' TTLs are minutes; a moved endpoint is followed
within half a minute), concurrent misses for one name share a single lookup,
failures are never kept, and the table is bounded. Every other method goes to
the wrapped resolver unchanged.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

TTL_S = 30.0
# Upstream names are a handful (two providers, an OAuth endpoint, Redis);
# the bound only stops a stream of distinct names from growing the table.
MAX_NAMES = 256

try:
    import gevent
    from gevent.event import AsyncResult
except ImportError:  # pragma: no cover - gevent is a runtime dependency
    gevent = None


class CachingResolver:
    def __init__(self, inner, ttl_s: float = TTL_S, clock: Callable[[], float] = time.monotonic):  # noqa: ANN001
        self._inner = inner
        self._ttl_s = ttl_s
        self._clock = clock
        self._answers: dict[tuple, tuple[float, list]] = {}
        self._pending: dict[tuple, AsyncResult] = {}

    def getaddrinfo(self, host, port, family=0, socktype=0, proto=0, flags=0):  # noqa: ANN001, ANN201, PLR0913 - the resolver interface
        key = (host, port, family, socktype, proto, flags)
        now = self._clock()
        kept = self._answers.get(key)
        if kept is not None and kept[0] > now:
            return kept[1]
        pending = self._pending.get(key)
        if pending is not None:
            return pending.get()  # another greenlet is asking already
        pending = self._pending[key] = AsyncResult()
        try:
            answer = self._inner.getaddrinfo(host, port, family, socktype, proto, flags)
        except Exception as exc:
            pending.set_exception(exc)
            raise
        except BaseException:
            # This greenlet was killed mid-lookup: the waiters get a lookup
            # failure of their own, not its GreenletExit.
            pending.set_exception(socket.gaierror(socket.EAI_AGAIN, "lookup interrupted"))
            raise
        else:
            if len(self._answers) >= MAX_NAMES:
                self._answers.clear()
            self._answers[key] = (self._clock() + self._ttl_s, answer)
            pending.set(answer)
            return answer
        finally:
            del self._pending[key]

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else is the wrapped resolver's
        return getattr(self._inner, name)


def install() -> None:
    """Wrap this worker's hub resolver (after gevent's patching, before serving)."""
    if gevent is None:  # pragma: no cover
        return
    hub = gevent.get_hub()
    if not isinstance(hub.resolver, CachingResolver):
        hub.resolver = CachingResolver(hub.resolver)
