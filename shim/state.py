"""Every feature's shared state on one store, as ``SHIM_STATE_URL`` picks it.

Each feature keeps its state in its own module: per-client limits in
``shim.limit_store``, Gemini key benches in ``shim.gemini_keys``, the OAuth
refresh lock and pair in ``shim.oauth_shared``, failed-secret counts in
``shim.throttle``; ``shim.store`` is the Redis connection they all use. This
module only lists them: ``open_state`` gives one object that is every
feature's store at once, on one connection, so a process opens one Redis
client however many features share state.

- ``memory://`` (the default): ``MemoryState``. Every worker process keeps its
  own counts, so with N workers a client can get up to N times its limits,
  and a benched Gemini key is benched on one worker only.
- ``redis://…`` / ``rediss://…`` / ``unix:///…``: ``RedisState``, one store
  for all workers of all instances. What a feature does when Redis fails is
  in the feature's docstring; the fail-fast window is ``shim.store``'s.

Adding a feature with shared state: its store class (on a
``RedisConnection``) goes in the feature's module, and one line here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shim.gemini_keys import MemoryBenches, RedisBenches
from shim.limit_store import MemoryLimits, RedisLimits
from shim.oauth_shared import OAuthRedis
from shim.store import RedisConnection


class MemoryState(MemoryLimits, MemoryBenches):
    """This process's own limits and key benches (``memory://``)."""

    shared = False

    def __init__(self) -> None:
        MemoryLimits.__init__(self)
        MemoryBenches.__init__(self)

    def __repr__(self) -> str:
        return "MemoryState()"

    def reachable(self) -> bool:
        return True


class RedisState(RedisLimits, RedisBenches, OAuthRedis):
    """Limits, key benches and the OAuth lock and pair in one Redis, on one connection.

    ``redis`` is that connection, for a feature kept apart from this list
    (``shim.throttle.RedisFailures``).
    """

    shared = True

    def __init__(self, url: str, clock: Callable[[], float] = time.monotonic):
        self.redis = RedisConnection(url, clock)
        RedisLimits.__init__(self, self.redis)
        RedisBenches.__init__(self, self.redis)
        OAuthRedis.__init__(self, self.redis)

    def __repr__(self) -> str:
        return f"RedisState({self.redis.where})"

    def reachable(self) -> bool:
        return self.redis.reachable()


# What open_state gives (shim.readiness reads ``shared`` and ``reachable()``).
State = MemoryState | RedisState


def open_state(url: str) -> State:
    """The store ``SHIM_STATE_URL`` names (validated by settings)."""
    if url.startswith("memory:"):
        return MemoryState()
    return RedisState(url)
