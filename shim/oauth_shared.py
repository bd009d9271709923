"""OAuth across boxes (``SHIM_STATE_URL=redis://``): one refresher at a time, one pair for all.

Several boxes sharing one login must never spend one refresh token twice
(refresh tokens are single-use), so with Redis configured:

- the refresh lock is ``SharedLock``: a Redis lock (``shim:lock:<name>``)
  whose lease bounds how long a crashed holder blocks the others, with the
  box's own ``FileLock`` taken instead while Redis is down (boxes could then
  race, the workers of one box still never do);
- the pair a refresh produced is put in Redis (``publish_pair``), and a
  refresher, once it holds the lock, adopts a newer one from there
  (``read_pair``) before it thinks of refreshing;
- the refresh gate (``shim.oauth_gate.SharedGate``) keeps its note there too.

All three use ``OAuthRedis``: keys under ``shim:`` on the process's
``shim.store.RedisConnection``. Redis failing is ``StateUnavailable``; each
user here falls back to what one box can do alone. What is not here: when to
refresh (``shim.oauth``), the file lock (``shim.locks``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator

from shim.credentials import OAuthCredentials
from shim.locks import Lock, LockTimeout
from shim.store import RedisConnection, StateUnavailable

log = logging.getLogger("shim.oauth")
_lock_log = logging.getLogger("shim.locks")

# Where the refreshed pair is shared between boxes (a Redis key under shim:).
SHARED_PAIR = "oauth:anthropic:pair"


class OAuthRedis:
    """A lock and small values under ``shim:`` in Redis, for OAuth shared by boxes."""

    shared = True

    def __init__(self, redis: RedisConnection):
        self._redis = redis

    def __repr__(self) -> str:
        return f"OAuthRedis({self._redis.where})"

    @contextlib.contextmanager
    def held(self, name: str, lease_s: float, timeout_s: float) -> Iterator[None]:
        """Hold the lock ``name`` across every instance; it frees itself after ``lease_s``."""
        lock = self._redis.client.lock(
            f"shim:lock:{name}", timeout=lease_s, sleep=0.05, blocking_timeout=timeout_s
        )
        if not self._redis.call(lock.acquire):
            raise LockTimeout(f"lock {name} held by another instance")
        try:
            yield
        finally:
            # Lease expired or Redis gone: either way the lock frees itself.
            with contextlib.suppress(*self._redis.errors):
                lock.release()

    def get_value(self, name: str) -> bytes | None:
        return self._redis.call(lambda: self._redis.client.get(f"shim:{name}"))

    def set_value(self, name: str, value: bytes, ttl_s: float) -> None:
        self._redis.call(
            lambda: self._redis.client.set(f"shim:{name}", value, ex=max(1, int(ttl_s)))
        )


class SharedLock:
    """A lock in Redis, for gateways on several boxes; the box's ``fallback`` while it is down.

    The lease bounds how long a crashed holder can block the others. When
    the store is unavailable the box's own ``fallback`` lock is taken instead:
    boxes could then race each other, but the workers of one box still never
    do, and the gateway keeps working without Redis.
    """

    def __init__(self, state: OAuthRedis, name: str, lease_s: float, fallback: Lock):
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
                _lock_log.warning(
                    "shared lock unavailable; using this box's lock",
                    extra={
                        "event": "shared_lock_unavailable",
                        "lock": self.name,
                        "error": str(exc),
                    },
                )
                stack.enter_context(self._fallback.held(timeout_s))
            yield


def publish_pair(shared: OAuthRedis, new: OAuthCredentials, now: float) -> None:
    """Put the pair a refresh produced where every box finds it; a failure is only logged."""
    value = json.dumps(
        {
            "access_token": new.access_token,
            "refresh_token": new.refresh_token,
            "expires_at": new.expires_at,
        }
    ).encode()
    try:
        # Kept a day past expiry: a box that wakes up late still finds the newest pair.
        shared.set_value(SHARED_PAIR, value, new.expires_at - now + 86_400)
    except StateUnavailable as exc:
        log.warning(
            "refreshed token not shared: other boxes must refresh on their own",
            extra={"event": "oauth_share_failed", "error": str(exc)},
        )


def read_pair(shared: OAuthRedis) -> OAuthCredentials | None:
    """The pair last shared by any box; None if none, Redis is down, or it is unreadable."""
    try:
        raw = shared.get_value(SHARED_PAIR)
    except StateUnavailable:
        return None
    if not raw:
        return None
    try:
        data = json.loads(raw)
        return OAuthCredentials(
            str(data["access_token"]), str(data["refresh_token"]), float(data["expires_at"])
        )
    except (ValueError, KeyError, TypeError):
        log.warning("shared oauth pair unreadable; ignored", extra={"event": "oauth_share_bad"})
        return None
