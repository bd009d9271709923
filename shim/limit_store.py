"""Where the limits' counts live: per worker in memory, or one Redis for every instance.

Two stores answer ``shim.limits.LimitStore`` (admit, finish, renew) with the
same rules, one in Python and one in Lua, so both give the same answers:
``MemoryLimits`` (``memory://``; every worker process keeps its own counts, so
with N workers a client can get up to N times its limits) and ``RedisLimits``
(on the process's ``shim.store.RedisConnection``: one count for all workers of
all instances). What each limit means, and the bound the reservations give,
is in shim.limits; what happens when Redis fails (limits fail open) too.

Every method takes ``now`` (epoch seconds) from the caller, so both stores
follow the same clock in tests; instances behind one load balancer are
assumed NTP-synced (a second of skew only shifts windows by a second).
"""

from __future__ import annotations

import math

from shim.limit_types import ADMITTED, IN_FLIGHT_RETRY_S, LEASE_S, Admission, Lease, Limits
from shim.store import RedisConnection

DAY_S = 86_400


def _until_next_day(now: float) -> float:
    return (int(now // DAY_S) + 1) * DAY_S - now


def _reservation(tokens_per_day: int, largest_recent: int) -> int:
    """Tokens one call holds while in flight: 1/32 of the day, or the largest call lately."""
    # Mirrored in _ADMIT (Lua); the bound it gives is in shim.limits' docstring.
    return max(tokens_per_day // 32, largest_recent, 1)


class MemoryLimits:
    """Counts in this process only (``memory://``)."""

    shared = False

    def __init__(self) -> None:
        # client -> lease id -> (expiry, tokens reserved): the calls in flight.
        self._leases: dict[str, dict[str, tuple[float, int]]] = {}
        self._tat: dict[str, float] = {}  # client -> GCRA theoretical arrival time
        self._tokens: dict[str, tuple[int, int]] = {}  # client -> (day, tokens)
        # client -> (day, largest call that day, largest call the day before)
        self._largest: dict[str, tuple[int, int, int]] = {}

    def __repr__(self) -> str:
        return "MemoryLimits()"

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


class RedisLimits:
    """Counts in one Redis shared by every worker of every instance."""

    shared = True

    def __init__(self, redis: RedisConnection):
        self._redis = redis
        self._call = redis.call  # bound once: admit and finish are on every limited call
        self._admit = redis.script(_ADMIT)
        self._finish = redis.script(_FINISH)

    def __repr__(self) -> str:
        return f"RedisLimits({self._redis.where})"

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
            pipe = self._redis.client.pipeline(transaction=False)
            pipe.zadd(f"shim:{{{client}}}:slots", {lease.member: now + LEASE_S}, xx=True)
            pipe.expire(f"shim:{{{client}}}:slots", math.ceil(LEASE_S) + 60)
            if lease.reserved:
                pipe.expire(f"shim:{{{client}}}:reserved", math.ceil(LEASE_S) + 60)
            pipe.execute()

        self._call(extend)
