"""Shared state behind one small interface: per worker in memory, or Redis for many boxes.

``SHIM_STATE_URL`` picks the store: ``memory://`` (the default; every worker
process keeps its own counts, so with N workers a client can get up to N
times its limits and a benched Gemini key is benched on one worker only) or
``redis://[:password@]host:port/db`` / ``rediss://`` / ``unix:///path``
(one store for all workers of all instances).

What it holds:
- per-client limit state (``admit``/``finish``/``renew``: the leases of calls
  in flight with their token reservations, rate, tokens per day; the rules
  are in shim.limits);
- Gemini key benches (``bench_key``/``benched_keys``): when one instance
  gets a 429 for a key, every instance skips the key (or, for a per-model
  quota, the key for that model) until it is back.

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
import math
import time
from collections.abc import Iterator
from typing import Protocol
from urllib.parse import urlsplit

from shim.limits import (
    ADMITTED,
    IN_FLIGHT_RETRY_S,
    LEASE_S,
    Admission,
    Lease,
    Limits,
    StateUnavailable,
)
from shim.locks import LockTimeout

DAY_S = 86_400
RETRY_AFTER_FAILURE_S = 1.0
# A Gemini key bench: (key id, model), model None for the whole key.
Bench = tuple[str, str | None]
# The shared bench hash holds at most this many fields; past it a new bench
# stays in the worker that made it (model names come from request paths).
MAX_SHARED_BENCHES = 4096
# Redis must answer fast or not at all: it is on the path of every limited call.
REDIS_TIMEOUT_S = 0.25


class State(Protocol):
    shared: bool  # True when every instance sees the same store

    def admit(self, client: str, limits: Limits, lease_id: str, now: float) -> Admission: ...

    def finish(
        self,
        client: str,
        limits: Limits,
        lease: Lease,
        tokens: int,
        now: float,
        retry: bool = False,
    ) -> None:
        """Release ``lease`` (no-op if already gone); count ``tokens`` on the UTC day of ``now``.

        With ``retry`` (a resend after a failure of unknown outcome) tokens
        count only if the lease was still held: once, whether or not the
        first try landed.
        """
        ...

    def renew(self, client: str, lease: Lease, now: float) -> None:
        """Extend a lease still held to ``now + LEASE_S``; one already gone stays gone."""
        ...

    def bench_key(self, ident: str, until: float, now: float, model: str | None = None) -> None:
        """Bench key ``ident`` (for ``model`` only, if given) until ``until``; keep a longer one."""
        ...

    def benched_keys(self, now: float) -> dict[Bench, float]:
        """The benches still running at ``now``: (key id, model or None) -> until."""
        ...

    def reachable(self) -> bool: ...


def _until_next_day(now: float) -> float:
    return (int(now // DAY_S) + 1) * DAY_S - now


def _reservation(tokens_per_day: int, largest_recent: int) -> int:
    """Tokens one call holds while in flight: 1/32 of the day, or the largest call lately."""
    # Mirrored in _ADMIT (Lua); the bound it gives is in shim.limits' docstring.
    return max(tokens_per_day // 32, largest_recent, 1)


class MemoryState:
    """Counts in this process only (``memory://``)."""

    shared = False

    def __init__(self) -> None:
        # client -> lease id -> (expiry, tokens reserved): the calls in flight.
        self._leases: dict[str, dict[str, tuple[float, int]]] = {}
        self._tat: dict[str, float] = {}  # client -> GCRA theoretical arrival time
        self._tokens: dict[str, tuple[int, int]] = {}  # client -> (day, tokens)
        # client -> (day, largest call that day, largest call the day before)
        self._largest: dict[str, tuple[int, int, int]] = {}
        self._benched: dict[Bench, float] = {}

    def __repr__(self) -> str:
        return "MemoryState()"

    def admit(self, client: str, limits: Limits, lease_id: str, now: float) -> Admission:
        held = None
        if limits.concurrency or limits.tokens_per_day:
            held = self._leases.setdefault(client, {})
            for other, (expiry, _) in list(held.items()):
                if expiry <= now:
                    del held[other]
        reserve = 0
        if limits.tokens_per_day:
            day, used = self._tokens.get(client, (0, 0))
            used = used if day == int(now // DAY_S) else 0
            if used >= limits.tokens_per_day:
                return Admission("tokens_per_day", _until_next_day(now))
            if used + sum(amount for _, amount in held.values()) >= limits.tokens_per_day:
                return Admission("tokens_per_day", IN_FLIGHT_RETRY_S, in_flight=True)
            reserve = _reservation(limits.tokens_per_day, self._largest_recent(client, now))
        if limits.concurrency and len(held) >= limits.concurrency:
            return Admission("concurrency", 1.0)
        if limits.rpm:
            interval = 60.0 / limits.rpm
            tat = max(self._tat.get(client, now), now)
            wait = tat - now - (60.0 - interval)
            if wait > 0:
                return Admission("rpm", wait)
            self._tat[client] = tat + interval
        if held is not None:
            held[lease_id] = (now + LEASE_S, reserve)
        return Admission("", 0.0, reserve) if reserve else ADMITTED

    def finish(
        self,
        client: str,
        limits: Limits,
        lease: Lease,
        tokens: int,
        now: float,
        retry: bool = False,
    ) -> None:
        held = self._leases.get(client)
        released = held is not None and held.pop(lease.id, None) is not None
        # A retry counts only a call still held: one whose first try never landed.
        if tokens and (released or not retry):
            today = int(now // DAY_S)
            day, used = self._tokens.get(client, (today, 0))
            self._tokens[client] = (today, (used if day == today else 0) + tokens)
            day, largest, before = self._largest.get(client, (today, 0, 0))
            if day != today:
                largest, before = 0, (largest if day == today - 1 else 0)
            self._largest[client] = (today, max(largest, tokens), before)

    def renew(self, client: str, lease: Lease, now: float) -> None:
        held = self._leases.get(client)
        if held is not None and lease.id in held:
            held[lease.id] = (now + LEASE_S, lease.reserved)

    def _largest_recent(self, client: str, now: float) -> int:
        today = int(now // DAY_S)
        day, largest, before = self._largest.get(client, (today, 0, 0))
        if day == today:
            return max(largest, before)
        return largest if day == today - 1 else 0

    def bench_key(self, ident: str, until: float, now: float, model: str | None = None) -> None:
        for bench, ends in list(self._benched.items()):
            if ends <= now:
                del self._benched[bench]
        self._benched[(ident, model)] = max(until, self._benched.get((ident, model), 0.0))

    def benched_keys(self, now: float) -> dict[Bench, float]:
        return {bench: until for bench, until in self._benched.items() if until > now}

    def reachable(self) -> bool:
        return True


# The calls in flight of a client live in one zset, shim:{client}:slots, one
# member "<lease id>:<tokens reserved>" per call, scored by its expiry; the sum
# of the reservations is kept beside it in shim:{client}:reserved so admission
# costs O(1), not O(calls in flight). Only these scripts change either, so
# they stay equal; leases past their expiry are pruned (and their reservations
# given back) at the next admission, so a dead instance leaks nothing.
#
# KEYS: slots zset, GCRA key, tokens today, reserved sum, largest call today,
# largest call yesterday. ARGV: now, concurrency, lease id, lease_s, rpm,
# tokens_per_day, in-flight retry_after. Returns {limit, retry_after, reserved}
# with numbers as strings (Lua numbers come back from Redis truncated to
# integers); retry_after -1 means "until 00:00 UTC".
_ADMIT = """
local now = tonumber(ARGV[1])
local concurrency = tonumber(ARGV[2])
local tokens_limit = tonumber(ARGV[6])
local lease_s = tonumber(ARGV[4])
local held = concurrency > 0 or tokens_limit > 0
if held then
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
  if #expired > 0 then
    local freed = 0
    for _, member in ipairs(expired) do
      freed = freed + (tonumber(string.match(member, ':(%d+)$')) or 0)
    end
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
    if freed > 0 then redis.call('DECRBY', KEYS[4], freed) end
  end
end
local reserve = 0
if tokens_limit > 0 then
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
  if used >= tokens_limit then return {'tokens_per_day', '-1', '0'} end
  local reserved = 0
  if redis.call('ZCARD', KEYS[1]) > 0 then
    reserved = math.max(tonumber(redis.call('GET', KEYS[4]) or '0'), 0)
  else
    redis.call('DEL', KEYS[4])  -- nothing in flight: nothing reserved (heals any drift)
  end
  if used + reserved >= tokens_limit then return {'tokens_per_day', ARGV[7], '0'} end
  reserve = math.max(math.floor(tokens_limit / 32),
                     tonumber(redis.call('GET', KEYS[5]) or '0'),
                     tonumber(redis.call('GET', KEYS[6]) or '0'), 1)
end
if concurrency > 0 then
  if redis.call('ZCARD', KEYS[1]) >= concurrency then return {'concurrency', '1', '0'} end
end
local rpm = tonumber(ARGV[5])
if rpm > 0 then
  local interval = 60 / rpm
  local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
  if tat < now then tat = now end
  local wait = tat - now - (60 - interval)
  if wait > 0 then return {'rpm', tostring(wait), '0'} end
  redis.call('SET', KEYS[2], tostring(tat + interval), 'PX',
             math.ceil((tat + interval - now) * 1000) + 1000)
end
if held then
  local reserve_s = string.format('%.0f', reserve)
  redis.call('ZADD', KEYS[1], now + lease_s, ARGV[3] .. ':' .. reserve_s)
  redis.call('EXPIRE', KEYS[1], math.ceil(lease_s) + 60)
  if reserve > 0 then
    redis.call('INCRBY', KEYS[4], reserve_s)
    redis.call('EXPIRE', KEYS[4], math.ceil(lease_s) + 60)
  end
  return {'', '0', reserve_s}
end
return {'', '0', '0'}
"""

# KEYS: slots zset, reserved sum, tokens of the day the call ended, largest call
# that day. ARGV: lease member, tokens reserved, tokens used, retry (0|1).
# Releases the slot and its reservation (a lease already gone is no-op), and
# counts the tokens, on a retry only if the lease was still held: a first try
# that did land already counted them, so they are counted exactly once.
_FINISH = """
local released = redis.call('ZREM', KEYS[1], ARGV[1])
local reserved = tonumber(ARGV[2])
if released == 1 and reserved > 0 then
  if redis.call('DECRBY', KEYS[2], reserved) <= 0 then redis.call('DEL', KEYS[2]) end
end
local tokens = tonumber(ARGV[3])
if tokens > 0 and (released == 1 or ARGV[4] == '0') then
  redis.call('INCRBY', KEYS[3], ARGV[3])
  redis.call('EXPIRE', KEYS[3], 172800)
  if tokens > tonumber(redis.call('GET', KEYS[4]) or '0') then
    redis.call('SET', KEYS[4], ARGV[3], 'EX', 259200)
  end
end
return released
"""

# Gemini key benches live in one hash, field "<key id>" (the whole key) or
# "<key id>:<model>" (model ids never hold ':'), value the time it ends.
# KEYS: benches hash. ARGV: field, until, now, most fields. Benches over by
# now are pruned, a longer bench already set is kept, a new field past the
# cap is refused (returns 0), and the hash expires with its last bench.
_BENCH = """
local now = tonumber(ARGV[3])
local last = tonumber(ARGV[2])
local fields = redis.call('HGETALL', KEYS[1])
local kept = 0
for i = 1, #fields, 2 do
  local ends = tonumber(fields[i + 1]) or 0
  if ends <= now then
    redis.call('HDEL', KEYS[1], fields[i])
  else
    kept = kept + 1
    if ends > last then last = ends end
  end
end
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if current == 0 and kept >= tonumber(ARGV[4]) then return 0 end
if tonumber(ARGV[2]) > current then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('EXPIRE', KEYS[1], math.ceil(last - now) + 60)
return 1
"""
_BENCHES = "shim:gemini:benched"


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
        self._finish = self._client.register_script(_FINISH)
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

    def admit(self, client: str, limits: Limits, lease_id: str, now: float) -> Admission:
        day = int(now // DAY_S)
        keys = [
            f"shim:{{{client}}}:slots",
            f"shim:{{{client}}}:rpm",
            f"shim:{{{client}}}:t{day}",
            f"shim:{{{client}}}:reserved",
            f"shim:{{{client}}}:max{day}",
            f"shim:{{{client}}}:max{day - 1}",
        ]
        args = [
            repr(now),
            limits.concurrency,
            lease_id,
            repr(LEASE_S),
            limits.rpm,
            limits.tokens_per_day,
            repr(IN_FLIGHT_RETRY_S),
        ]
        limit, retry_after, reserved = self._call(lambda: self._admit(keys=keys, args=args))
        limit = limit.decode() if isinstance(limit, bytes) else limit
        if not limit:
            return Admission("", 0.0, int(reserved)) if int(reserved) else ADMITTED
        wait = float(retry_after)
        if wait < 0:
            return Admission(limit, _until_next_day(now))
        return Admission(limit, wait, in_flight=limit == "tokens_per_day")

    def finish(
        self,
        client: str,
        limits: Limits,
        lease: Lease,
        tokens: int,
        now: float,
        retry: bool = False,
    ) -> None:
        day = int(now // DAY_S)
        keys = [
            f"shim:{{{client}}}:slots",
            f"shim:{{{client}}}:reserved",
            f"shim:{{{client}}}:t{day}",
            f"shim:{{{client}}}:max{day}",
        ]
        args = [lease.member, lease.reserved, tokens, int(retry)]
        self._call(lambda: self._finish(keys=keys, args=args))

    def renew(self, client: str, lease: Lease, now: float) -> None:
        def extend() -> None:
            # XX: a lease already pruned stays gone (its reservation was given back).
            pipe = self._client.pipeline(transaction=False)
            pipe.zadd(f"shim:{{{client}}}:slots", {lease.member: now + LEASE_S}, xx=True)
            pipe.expire(f"shim:{{{client}}}:slots", math.ceil(LEASE_S) + 60)
            if lease.reserved:
                pipe.expire(f"shim:{{{client}}}:reserved", math.ceil(LEASE_S) + 60)
            pipe.execute()

        self._call(extend)

    def bench_key(self, ident: str, until: float, now: float, model: str | None = None) -> None:
        field = ident if model is None else f"{ident}:{model}"
        args = [field, repr(until), repr(now), MAX_SHARED_BENCHES]
        self._call(lambda: self._bench(keys=[_BENCHES], args=args))

    def benched_keys(self, now: float) -> dict[Bench, float]:
        raw = self._call(lambda: self._client.hgetall(_BENCHES))
        benched: dict[Bench, float] = {}
        for field, until in raw.items():
            value = float(until)
            if value > now:
                ident, _, model = field.decode().partition(":")
                benched[(ident, model or None)] = value
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
