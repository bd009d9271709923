"""Shared state behind one small interface: per worker in memory, or Redis for many boxes.

``SHIM_STATE_URL`` picks the store: ``memory://`` (the default; every worker
process keeps its own counts, so with N workers a client can get up to N
times its limits and a benched Gemini key is benched on one worker only) or
``redis://[:password@]host:port/db`` / ``rediss://`` / ``unix:///path``
(one store for all workers of all instances).

What it holds:
- per-client limit state (``admit``/``finish``; the rules are in shim.limits);
- Gemini key benches (``bench_key``/``benched_keys``): when one instance
  gets a 429 for a key, every instance skips it until it is back.

Every method takes ``now`` (epoch seconds) from the caller, so both stores
follow the same clock in tests; instances behind one load balancer are
assumed NTP-synced (a second of skew only shifts windows by a second).

Redis failing is reported as ``StateUnavailable`` and each feature decides
what that means (limits fail open, key benches fall back to per worker).
After a failure the store is not asked again for ``RETRY_AFTER_FAILURE_S``,
so a dead Redis costs one short timeout per worker now and then, not one
per request.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Protocol
from urllib.parse import urlsplit

from shim.limits import ADMITTED, LEASE_S, Admission, Limits, StateUnavailable
from shim.locks import LockTimeout

DAY_S = 86_400
RETRY_AFTER_FAILURE_S = 1.0
# Redis must answer fast or not at all: it is on the path of every limited call.
REDIS_TIMEOUT_S = 0.25


class State(Protocol):
    shared: bool  # True when every instance sees the same store

    def admit(self, client: str, limits: Limits, lease: str, now: float) -> Admission: ...

    def finish(self, client: str, limits: Limits, lease: str, tokens: int, now: float) -> None: ...

    def bench_key(self, ident: str, until: float) -> None: ...

    def benched_keys(self, now: float) -> dict[str, float]: ...

    def reachable(self) -> bool: ...


def _until_next_day(now: float) -> float:
    return (int(now // DAY_S) + 1) * DAY_S - now


class MemoryState:
    """Counts in this process only (``memory://``)."""

    shared = False

    def __init__(self) -> None:
        self._slots: dict[str, dict[str, float]] = {}  # client -> lease -> expiry
        self._tat: dict[str, float] = {}  # client -> GCRA theoretical arrival time
        self._tokens: dict[str, tuple[int, int]] = {}  # client -> (day, tokens)
        self._benched: dict[str, float] = {}

    def __repr__(self) -> str:
        return "MemoryState()"

    def admit(self, client: str, limits: Limits, lease: str, now: float) -> Admission:
        if limits.tokens_per_day:
            day, used = self._tokens.get(client, (0, 0))
            if day == int(now // DAY_S) and used >= limits.tokens_per_day:
                return Admission("tokens_per_day", _until_next_day(now))
        slots = None
        if limits.concurrency:
            slots = self._slots.setdefault(client, {})
            for held, expiry in list(slots.items()):
                if expiry <= now:
                    del slots[held]
            if len(slots) >= limits.concurrency:
                return Admission("concurrency", 1.0)
        if limits.rpm:
            interval = 60.0 / limits.rpm
            tat = max(self._tat.get(client, now), now)
            wait = tat - now - (60.0 - interval)
            if wait > 0:
                return Admission("rpm", wait)
            self._tat[client] = tat + interval
        if slots is not None:
            slots[lease] = now + LEASE_S
        return ADMITTED

    def finish(self, client: str, limits: Limits, lease: str, tokens: int, now: float) -> None:
        slots = self._slots.get(client)
        if slots is not None:
            slots.pop(lease, None)
        if tokens:
            today = int(now // DAY_S)
            day, used = self._tokens.get(client, (today, 0))
            self._tokens[client] = (today, (used if day == today else 0) + tokens)

    def bench_key(self, ident: str, until: float) -> None:
        self._benched[ident] = max(until, self._benched.get(ident, 0.0))

    def benched_keys(self, now: float) -> dict[str, float]:
        return {ident: until for ident, until in self._benched.items() if until > now}

    def reachable(self) -> bool:
        return True


# KEYS: slots zset, GCRA key, tokens key. ARGV: now, concurrency, lease, lease_s,
# rpm, tokens_per_day, day. Returns {limit, retry_after} with numbers as
# strings (Lua numbers come back from Redis truncated to integers).
_ADMIT = """
local now = tonumber(ARGV[1])
local tokens_limit = tonumber(ARGV[6])
if tokens_limit > 0 then
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
  if used >= tokens_limit then return {'tokens_per_day', '-1'} end
end
local concurrency = tonumber(ARGV[2])
if concurrency > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= concurrency then return {'concurrency', '1'} end
end
local rpm = tonumber(ARGV[5])
if rpm > 0 then
  local interval = 60 / rpm
  local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
  if tat < now then tat = now end
  local wait = tat - now - (60 - interval)
  if wait > 0 then return {'rpm', tostring(wait)} end
  redis.call('SET', KEYS[2], tostring(tat + interval), 'PX',
             math.ceil((tat + interval - now) * 1000) + 1000)
end
if concurrency > 0 then
  local lease_s = tonumber(ARGV[4])
  redis.call('ZADD', KEYS[1], now + lease_s, ARGV[3])
  redis.call('EXPIRE', KEYS[1], math.ceil(lease_s) + 60)
end
return {'', '0'}
"""

# KEYS: benches hash. ARGV: ident, until. A longer bench already set is kept.
_BENCH = """
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > current then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""


class RedisState:
    """Counts in one Redis shared by every worker of every instance."""

    shared = True

    def __init__(self, url: str, clock=time.monotonic):  # noqa: ANN001 - a () -> float
        import redis  # only when configured: memory:// deployments never load it

        self._redis_errors = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            health_check_interval=30,
        )
        self._admit = self._client.register_script(_ADMIT)
        self._bench = self._client.register_script(_BENCH)
        self._clock = clock
        self._down_until = float("-inf")
        self._where = _describe(url)

    def __repr__(self) -> str:
        return f"RedisState({self._where})"

    def _call(self, action):  # noqa: ANN001, ANN202 - a zero-argument callable
        if self._clock() < self._down_until:
            raise StateUnavailable("redis unavailable (waiting before the next try)")
        try:
            return action()
        except self._redis_errors as exc:
            self._down_until = self._clock() + RETRY_AFTER_FAILURE_S
            raise StateUnavailable(f"redis at {self._where}: {type(exc).__name__}") from None

    def admit(self, client: str, limits: Limits, lease: str, now: float) -> Admission:
        day = int(now // DAY_S)
        keys = [f"shim:{{{client}}}:slots", f"shim:{{{client}}}:rpm", f"shim:{{{client}}}:t{day}"]
        args = [
            repr(now),
            limits.concurrency,
            lease,
            repr(LEASE_S),
            limits.rpm,
            limits.tokens_per_day,
            day,
        ]
        limit, retry_after = self._call(lambda: self._admit(keys=keys, args=args))
        limit = limit.decode() if isinstance(limit, bytes) else limit
        if not limit:
            return ADMITTED
        wait = float(retry_after)
        return Admission(limit, _until_next_day(now) if wait < 0 else wait)

    def finish(self, client: str, limits: Limits, lease: str, tokens: int, now: float) -> None:
        def settle() -> None:
            pipe = self._client.pipeline(transaction=False)
            if limits.concurrency:
                pipe.zrem(f"shim:{{{client}}}:slots", lease)
            if tokens:
                key = f"shim:{{{client}}}:t{int(now // DAY_S)}"
                pipe.incrby(key, tokens)
                pipe.expire(key, 2 * DAY_S)
            pipe.execute()

        self._call(settle)

    def bench_key(self, ident: str, until: float) -> None:
        self._call(lambda: self._bench(keys=["shim:gemini:benched"], args=[ident, repr(until)]))

    def benched_keys(self, now: float) -> dict[str, float]:
        raw = self._call(lambda: self._client.hgetall("shim:gemini:benched"))
        benched = {}
        for ident, until in raw.items():
            value = float(until)
            if value > now:
                benched[ident.decode()] = value
        return benched

    def reachable(self) -> bool:
        try:
            return bool(self._call(self._client.ping))
        except StateUnavailable:
            return False

    # -- for shim.oauth: one refresher across boxes, and the pair it refreshed ------------

    @contextlib.contextmanager
    def held(self, name: str, lease_s: float, timeout_s: float) -> Iterator[None]:
        """Hold the lock ``name`` across every instance; it frees itself after ``lease_s``."""
        lock = self._client.lock(
            f"shim:lock:{name}", timeout=lease_s, sleep=0.05, blocking_timeout=timeout_s
        )
        if not self._call(lock.acquire):
            raise LockTimeout(f"lock {name} held by another instance")
        try:
            yield
        finally:
            # Lease expired or Redis gone: either way the lock frees itself.
            with contextlib.suppress(*self._redis_errors):
                lock.release()

    def get_value(self, name: str) -> bytes | None:
        return self._call(lambda: self._client.get(f"shim:{name}"))

    def set_value(self, name: str, value: bytes, ttl_s: float) -> None:
        self._call(lambda: self._client.set(f"shim:{name}", value, ex=max(1, int(ttl_s))))


def _describe(url: str) -> str:
    """host:port/db of a Redis URL, without any password it carries."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    return f"{parts.hostname}:{parts.port or 6379}{parts.path or ''}"


def open_state(url: str) -> MemoryState | RedisState:
    """The store ``SHIM_STATE_URL`` names (validated by settings)."""
    if url.startswith("memory:"):
        return MemoryState()
    return RedisState(url)
