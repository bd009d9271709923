"""What gevent means for a request's greenlet: a stop signal, and a deadline on a blocking step.

Under gunicorn's gevent worker each request runs in a greenlet. Two things
from that reach the request path: the worker ending it when its grace period
is over (``STOPPING``, raised into the greenlet), and a bound on a step that
could block forever on a slow client (``deadline``). Elsewhere (tests without
gevent's patching) both are inert. Hang-ups are ``shim.hangup``.
"""

from __future__ import annotations

import contextlib

try:
    import gevent
    import gevent.monkey

    # Raised into a request's greenlet when the worker stops past its grace period.
    STOPPING: tuple[type[BaseException], ...] = (gevent.GreenletExit,)
except ImportError:  # pragma: no cover - gevent is a runtime dependency
    gevent = None
    STOPPING = ()


def deadline(seconds: float):  # noqa: ANN201 - a context manager
    """Bound a blocking step (reading a request body) under gevent; elsewhere a no-op.

    Raises ``TimeoutError`` when the step outlives ``seconds``.
    """
    if gevent is None or not gevent.monkey.is_module_patched("socket"):
        return contextlib.nullcontext()
    return gevent.Timeout(seconds, TimeoutError)
