"""Failed-secret throttling: an address that keeps guessing is told to wait, cheaply.

After ``max_failures`` failed secret checks from one client address within
``window_s``, that address is answered 429 for ``cooloff_s`` without the
secret being compared at all. Keyed by the client address shim believes
(the socket peer, or the last X-Forwarded-For hop from a trusted proxy), so
one address's failures never slow another's calls. IPv4 addresses count one
by one; IPv6 addresses by their /64, the block one host or one customer
usually gets whole (issue #14).

One count per instance, not per worker: the counts live in a
``shim.shared_table.FailureTable`` the gunicorn master maps before it forks,
so however a client's connections spread over the workers, the
``max_failures``-th wrong secret starts the cool-off and every worker
refuses the address from then on. A check for an address with no failures
is a hash lookup in shared memory (~1 us, no lock, no syscall; see
bench/throttle.py).

With ``SHIM_STATE_URL=redis://`` the count is shared by every instance too
(``RedisFailures``: one script call per failure). The per-request check
stays local: Redis is asked only about an address with failures recorded on
this instance lately; an address that has failed only on *other* instances
gets its first guess here compared without asking. So with K instances a
guesser gets at most ``max_failures + K - 1`` comparisons per cool-off, and
the right secret from a cooled-off address is refused by every instance that
saw it fail, served by one that never did. In exchange, the common call costs
no Redis round trip.

Redis down: failures go on counting in the shared table, so each instance
still throttles on its own count (as without Redis); the check never waits
for Redis, and a right secret is still served. Auth neither fails open (no
unlimited guessing) nor closed (no lock-out) because of Redis; the failure
is logged and counted in ``shim_state_errors_total``.

Exactness: the count is exact across workers (a lock per bucket), and an
address with failures takes a check from the table before its secret is
compared (``FailureTable.take_check``): once ``failures + checks in flight``
reaches ``max_failures``, another guess arriving on another worker at that
very instant waits (429, ``Retry-After: 1``) instead of being compared. So
the ``max_failures``-th wrong secret is the last one compared, however the
guesses spread over workers, as long as ``max_failures`` is at least the
number of workers (the first guesses of an address with no entry yet take no
check; at most one per worker can be in flight at once). One caveat: a
request presenting several candidates has them all compared, so its count
can carry the total past the limit by up to the candidates it brought.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
from collections.abc import Callable

from shim.shared_table import FailureTable
from shim.store import RedisConnection, StateUnavailable, StoreTrouble

log = logging.getLogger("shim.throttle")


@functools.lru_cache(maxsize=4096)
def address_group(address: str) -> str:
    """The key an address is counted under: IPv4 as is, IPv6 by its /64."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        return address[:64]
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


class AuthThrottle:
    def __init__(
        self,
        max_failures: int,
        window_s: float,
        cooloff_s: float,
        clock: Callable[[], float] = time.monotonic,
        table: FailureTable | None = None,
        shared: RedisFailures | None = None,
        on_state_error: Callable[[str], None] | None = None,
    ):
        self.max_failures = max_failures
        self.window_s = window_s
        self.cooloff_s = cooloff_s
        self._clock = clock
        # Outside gunicorn (tests, a plain WSGI server) a table of this process's own.
        self.table = table if table is not None else FailureTable()
        self._shared = shared
        self._state_failed = StoreTrouble(
            "state store unavailable; failed secrets counted per instance only",
            on_state_error,
            log,
        )
        self._taken: tuple[int, int] | None = None  # the check blocked_for last took
        # Clients come back from the same few addresses: group and hash each once.
        self._where = functools.lru_cache(maxsize=8192)(self._locate)

    def __repr__(self) -> str:
        return (
            f"AuthThrottle(max_failures={self.max_failures}, table={self.table!r}, "
            f"shared={self._shared!r})"
        )

    def _locate(self, address: str) -> tuple[str, tuple[int, int]]:
        key = address_group(address)
        return key, self.table.locate(key)

    def blocked_for(self, address: str | None) -> float:
        """Seconds ``address`` must still wait (0 when it may try)."""
        key, where = self._where(address or "")
        self._taken = None
        entry = self.table.lookup(where)
        if entry is None:
            return 0.0
        now = self._clock()
        if entry.until > now:
            return entry.until - now
        # A cool-off another instance started covers failures counted here no
        # later than window_s after this entry's window began: ask Redis that long.
        if self._shared is not None and (
            now - entry.window_start <= 2 * self.window_s + self.cooloff_s
        ):
            try:
                left = self._shared.cooling_off(key)
            except StateUnavailable as exc:
                self._state_failed("auth_check", exc)
                left = 0.0
            if left > 0:
                self.table.block(where, now + left, now, self.window_s)
                return left
        if entry.failures == 0 or now - entry.window_start > self.window_s:
            return 0.0  # nothing counted in this window: no check to take
        wait = self.table.take_check(where, now, self.max_failures, self.window_s)
        # Read back by failed(): in a gevent worker nothing yields between the
        # check and the comparison's outcome, so this is still this request's.
        self._taken = where if wait == 0 else None
        return wait

    def failed(self, address: str | None, count: int = 1) -> bool:
        """Count ``count`` failed checks; return True when they start a cool-off."""
        key, where = self._where(address or "")
        now = self._clock()
        taken, self._taken = self._taken == where, None
        started = self.table.add(
            where, count, now, self.max_failures, self.window_s, self.cooloff_s, taken
        )
        if self._shared is None:
            return started > 0
        try:
            began, left = self._shared.failed(
                key, count, self.max_failures, self.window_s, self.cooloff_s
            )
        except StateUnavailable as exc:
            self._state_failed("auth_failed", exc)
            return started > 0
        if left > 0:
            self.table.block(where, now + left, now, self.window_s)
        return started > 0 or began


# KEYS: failures in the window, the cool-off marker. ARGV: count, max failures,
# window (ms), cool-off (ms). Returns {1 if this call started the cool-off, ms
# of cool-off left}. Failures during a cool-off are not counted (as locally).
_FAILED = """
local left = redis.call('PTTL', KEYS[2])
if left > 0 then return {0, left} end
local count = tonumber(ARGV[1])
local failures = redis.call('INCRBY', KEYS[1], count)
if failures == count then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
if failures >= tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[4])
  return {1, tonumber(ARGV[4])}
end
return {0, 0}
"""


class RedisFailures:
    """Failed-secret counts in the Redis of ``SHIM_STATE_URL``, shared by every instance.

    Windows and cool-offs are Redis TTLs, so instances need no common clock.
    Runs on the process's one ``shim.store.RedisConnection`` (given a URL, as
    tests and bench/throttle.py do, it opens one of its own): an error is
    ``StateUnavailable``, and Redis is not asked again for
    ``shim.store.RETRY_AFTER_FAILURE_S``.
    """

    def __init__(self, redis: RedisConnection | str):
        if isinstance(redis, str):
            redis = RedisConnection(redis)
        self._redis = redis
        self._call = redis.call
        self._failed = redis.script(_FAILED)

    def __repr__(self) -> str:
        return "RedisFailures()"

    def failed(
        self, key: str, count: int, max_failures: int, window_s: float, cooloff_s: float
    ) -> tuple[bool, float]:
        """Count failures of ``key``: (whether they started a cool-off, seconds of it left)."""
        keys = [f"shim:auth:{{{key}}}:failures", f"shim:auth:{{{key}}}:cooloff"]
        args = [count, max_failures, max(1, int(window_s * 1000)), max(1, int(cooloff_s * 1000))]
        began, left = self._call(lambda: self._failed(keys=keys, args=args))
        return bool(began), max(0, int(left)) / 1000

    def cooling_off(self, key: str) -> float:
        """Seconds of cool-off ``key`` has left on any instance (0 when none)."""
        left = self._call(lambda: self._redis.client.pttl(f"shim:auth:{{{key}}}:cooloff"))
        return max(0, int(left)) / 1000
