"""Cross-process locks: one holder at a time among all workers (and gateways) sharing it.

The interface is one method, ``held(timeout_s)``, a context manager that
raises ``LockTimeout`` if the lock is not taken in time. ``FileLock`` works
for the processes of one box (an ``flock`` on a file next to what it guards);
the Redis lock for several boxes (``shim.oauth_shared.SharedLock``, its only
user being the OAuth refresh) has the same method.

Under gevent a blocking ``flock`` would freeze the whole worker (every
stream on it) until the holder lets go, so the lock is tried non-blocking
and polled with ``time.sleep``, which gevent patches into a greenlet sleep.
Not for hot paths: it is taken around a token refresh, every few hours.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from typing import Protocol


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
