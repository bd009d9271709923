"""The connection to the shared store (Redis): one client per process, failing fast.

``SHIM_STATE_URL`` is ``memory://`` (the default: nothing is shared, each
feature keeps its state in the worker) or ``redis://[:password@]host:port/db``
/ ``rediss://`` / ``unix:///path`` (one store for all workers of all
instances). ``open_store`` opens the one ``RedisConnection`` a process uses;
every feature with shared state (limits, Gemini key benches, the OAuth lock
and pair, failed-secret counts) keeps its own keys and scripts, in its own
module, on top of it.

What lives here is only what every feature shares: the client, the timeouts,
``StateUnavailable``, and the fail-fast window. Redis failing is reported as
``StateUnavailable`` and each feature decides what that means (limits fail
open, key benches and failed-secret counts fall back to the instance, the
OAuth lock to the box's file lock). After a failure Redis is not asked again
for ``RETRY_AFTER_FAILURE_S``, by any feature, so a dead Redis costs one short
timeout per worker now and then, not one per request.

Standard library only at import: ``redis`` is imported when a Redis URL is
opened, so ``memory://`` deployments never load it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

RETRY_AFTER_FAILURE_S = 1.0
# Redis must answer fast or not at all: it is on the path of every limited call.
REDIS_TIMEOUT_S = 0.25
# A failing store is logged at most this often per worker, by each feature.
WARN_EVERY_S = 10.0


class StateUnavailable(Exception):
    """The state store could not answer (Redis down, timed out)."""


class StoreTrouble:
    """A feature going on without the shared store says so: counted each time, logged rarely.

    ``on_state_error(operation)`` feeds ``shim_state_errors_total``; the
    warning (``message``, event ``state_unavailable``) is written at most
    every ``WARN_EVERY_S`` per worker, so a dead Redis cannot flood the log.
    """

    def __init__(
        self,
        message: str,
        on_state_error: Callable[[str], None] | None,
        logger: logging.Logger,
    ):
        self._message = message
        self._on_state_error = on_state_error
        self._log = logger  # the feature's own logger: the line says whose trouble it is
        self._warned = float("-inf")

    def __call__(self, operation: str, exc: StateUnavailable) -> None:
        if self._on_state_error is not None:
            self._on_state_error(operation)
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY_S:
            self._warned = now
            self._log.warning(
                self._message,
                extra={"event": "state_unavailable", "operation": operation, "error": str(exc)},
            )


class RedisConnection:
    """One Redis client and its fail-fast window, shared by every feature of a process."""

    shared = True  # every instance sees the same store

    def __init__(self, url: str, clock: Callable[[], float] = time.monotonic):
        import redis  # only when configured: memory:// deployments never load it

        self.errors = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            health_check_interval=30,
        )
        self.where = describe(url)
        self._clock = clock
        self._down_until = float("-inf")

    def __repr__(self) -> str:
        return f"RedisConnection({self.where})"

    def call(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` (one Redis round trip); ``StateUnavailable`` if Redis fails or is down."""
        if self._clock() < self._down_until:
            raise StateUnavailable("redis unavailable (waiting before the next try)")
        try:
            return action()
        except self.errors as exc:
            self._down_until = self._clock() + RETRY_AFTER_FAILURE_S
            raise StateUnavailable(f"redis at {self.where}: {type(exc).__name__}") from None

    def script(self, source: str) -> Any:
        """A Lua script registered on the client (sent by hash, loaded on first use)."""
        return self.client.register_script(source)

    def reachable(self) -> bool:
        try:
            return bool(self.call(self.client.ping))
        except StateUnavailable:
            return False


def describe(url: str) -> str:
    """host:port/db of a Redis URL, without any password it carries."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    return f"{parts.hostname}:{parts.port or 6379}{parts.path or ''}"


def open_store(url: str) -> RedisConnection | None:
    """The connection ``SHIM_STATE_URL`` names (validated by settings); None for ``memory://``."""
    if url.startswith("memory:"):
        return None
    return RedisConnection(url)
