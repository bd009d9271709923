"""Cross-process locks: one holder at a time among all workers (and gateways) sharing it.

The interface is one method, ``held(timeout_s)``, a context manager that
raises ``LockTimeout`` if the lock is not taken in time. ``FileLock`` works
for the processes of one box (an ``flock`` on a file next to what it guards);
a Redis lock for several boxes only needs the same method.

Under gevent a blocking ``flock`` would freeze the whole worker (every
stream on it) until the holder lets go, so the lock is tried non-blocking
and polled with ``time.sleep``, which gevent patches into a greenlet sleep.
Not for hot paths: it is taken around a token refresh, every few hours.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from shim.limits import StateUnavailable

if TYPE_CHECKING:
    from shim.state import RedisState

log = logging.getLogger("shim.locks")


class LockTimeout(TimeoutError):
    """The lock was not taken within the time asked for."""


class Lock(Protocol):
    def held(self, timeout_s: float) -> contextlib.AbstractContextManager[None]:
        """Hold the lock for the ``with`` block; raise LockTimeout after ``timeout_s``."""
        ...


class FileLock:
    """An exclusive ``flock`` on ``path`` (created 0600), polled so it never blocks a worker.

    Each ``held`` opens its own file description, so two threads (or
    greenlets) of one process exclude each other as two processes do. The
    kernel drops the lock when its holder dies: no stale lock to clean up.
    """

    def __init__(
        self,
        path: str,
        poll_s: float = 0.05,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.path = path
        self.poll_s = poll_s
        self._sleep = sleep
        self._clock = clock

    def __repr__(self) -> str:
        return f"FileLock({self.path!r})"

    @contextlib.contextmanager
    def held(self, timeout_s: float) -> Iterator[None]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = self._clock() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self._clock() >= deadline:
                        raise LockTimeout(f"{self.path} held by another process") from None
                    self._sleep(self.poll_s)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class SharedLock:
    """A lock in the shared state store (Redis), for gateways on several boxes.

    The lease bounds how long a crashed holder can block the others. When
    the store is unavailable the box's own ``fallback`` lock is taken instead:
    boxes could then race each other, but the workers of one box still never
    do, and the gateway keeps working without Redis.
    """

    def __init__(self, state: RedisState, name: str, lease_s: float, fallback: Lock):
        self._state = state
        self.name = name
        self.lease_s = lease_s
        self._fallback = fallback

    def __repr__(self) -> str:
        return f"SharedLock({self.name!r}, fallback={self._fallback!r})"

    @contextlib.contextmanager
    def held(self, timeout_s: float) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self._state.held(self.name, self.lease_s, timeout_s))
            except StateUnavailable as exc:
                log.warning(
                    "shared lock unavailable; using this box's lock",
                    extra={
                        "event": "shared_lock_unavailable",
                        "lock": self.name,
                        "error": str(exc),
                    },
                )
                stack.enter_context(self._fallback.held(timeout_s))
            yield
