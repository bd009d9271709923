"""Per-client limits: what a client may use, and the check every forwarded call passes.

A client's limits come from its line in the clients file
(``alice <sha256> concurrency=4 rpm=60 tokens_per_day=2000000``); any of
them may be left out, and a client with none costs nothing here. Over a
limit the call is answered 429 in the provider's shape with ``Retry-After``
before anything is sent upstream.

- ``concurrency``: calls in flight at once (a stream holds its slot until it
  ends). A slot held by an instance that died frees itself after ``LEASE_S``;
  a call that runs longer keeps its slot by renewing it (``Limiter.renew``).
- ``rpm``: calls per minute, as a GCRA (a token bucket of ``rpm`` calls that
  refills one call every 60/rpm s): a burst of ``rpm`` is allowed, then an
  even pace; ``Retry-After`` says when the next call fits.
- ``tokens_per_day``: tokens the provider reported (input + output + cache
  reads and writes, from the usage shim already reads off every answer) per
  UTC day, counted on the day the call ends. A call's size is only known when
  it ends, so while in flight each call holds a *reservation* of
  ``r = max(tokens_per_day // 32, the client's largest call in the last two
  UTC days, 1)`` tokens, and a call is admitted only while ``used + the
  reservations of the calls in flight < tokens_per_day`` (issue #13): many
  parallel calls cannot all slip in before any is counted. When a call ends
  its reservation is replaced by its real count. Bound: the day's total
  exceeds the limit by less than ``r`` of the last call admitted, plus
  whatever the calls then in flight used beyond their own reservations (none
  unless one was bigger than every call of the two days before it). Refused because the day is used
  up: ``Retry-After`` until 00:00 UTC; refused because reservations of calls
  in flight fill it: ``IN_FLIGHT_RETRY_S``, as they free when those calls end.
  Reservations expire with the lease, like slots.

The values passed between the limiter and the store (``Limits``, ``Lease``,
``Admission``, the ``LimitStore`` interface) are in ``shim.limit_types``.
Where the counts live is a ``LimitStore``: ``shim.limit_store`` has one per
worker and one in Redis shared by every worker and instance (the Lua there
mirrors the rules above). When the state store fails, limits fail *open*:
the call is served, a warning is logged (at most every 10 s per worker) and
``shim_state_errors_total`` counts it. Authentication never depends on it.
A *settle* (slot and reservation released, tokens counted) that fails is not
dropped: it waits in a per-worker queue (at most ``MAX_PENDING_SETTLES``, the
oldest dropped beyond that, logged and counted) and is retried once the store
answers again, by a background retrier every ``SETTLE_RETRY_S`` and at once
when a call finds the store back. A retry counts tokens only if the store
still holds the call's lease, so tokens are counted once, on the day the call
ended; a settle still pending when its lease has expired is a no-op (the
store already freed the slot and reservation, and limits were failing open).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from shim.errors import RateLimited
from shim.limit_types import LEASE_S, Lease, Limits, LimitStore
from shim.store import WARN_EVERY_S, StateUnavailable, StoreTrouble

if TYPE_CHECKING:
    from shim.access import AccessRecord

log = logging.getLogger("shim.limits")

# How often a call still running renews its lease (Limiter.renew): a third of
# it, so two renewals can be missed (a slow Redis) before the lease runs out.
RENEW_EVERY_S = LEASE_S / 3
# Failed settles kept per worker for retrying: ~2 MB; a worker rarely ends
# this many calls within one outage, and past it the oldest are dropped.
MAX_PENDING_SETTLES = 10_000
# Just past shim.store's RETRY_AFTER_FAILURE_S (1 s), so a retry is not
# itself skipped by the store's own pause after a failure.
SETTLE_RETRY_S = 1.2




class LimitExceeded(RateLimited):
    def __init__(self, limit: str, retry_after: float, in_flight: bool = False):
        messages = {
            "concurrency": "Too many concurrent requests for this client; retry shortly.",
            "rpm": "Request rate limit for this client reached; retry later.",
            "tokens_per_day": "Daily token limit for this client reached; retry after 00:00 UTC.",
        }
        message = messages[limit]
        if in_flight:
            message = "Daily token limit for this client is held by calls in flight; retry shortly."
        super().__init__(message, headers=(("Retry-After", str(max(1, math.ceil(retry_after)))),))
        self.limit = limit


class Settle(NamedTuple):
    """One call's end, as sent to the store (and kept to resend if the store failed)."""

    client: str
    limits: Limits
    lease: Lease
    tokens: int
    now: float  # when the call ended: its tokens count on that UTC day


def tokens_used(record: AccessRecord) -> int:
    return (
        (record.input_tokens or 0)
        + (record.output_tokens or 0)
        + (record.cache_read_tokens or 0)
        + (record.cache_creation_tokens or 0)
    )


class Limiter:
    """Admits a call against its client's limits, and settles it when the call ends."""

    def __init__(
        self,
        state: LimitStore,
        on_reject: Callable[[str, str], None] | None = None,
        on_state_error: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.state = state
        self._on_reject = on_reject
        self._on_state_error = on_state_error
        self._state_failed = StoreTrouble(
            "state store unavailable; limits are not enforced (failing open)", on_state_error, log
        )
        self._clock = clock
        self._leases = 0
        self._lease_prefix = f"{os.getpid()}.{os.urandom(4).hex()}."
        self._warned_drop = float("-inf")
        # Settles the store failed, oldest first; guarded by _lock with _retrier,
        # the one thread (a greenlet under gevent) that resends them.
        self._pending: deque[Settle] = deque()
        self._lock = threading.Lock()
        self._retrier: threading.Thread | None = None
        self._wake = threading.Event()

    def __repr__(self) -> str:
        return f"Limiter(state={self.state!r})"

    def admit(self, record: AccessRecord, limits: Limits) -> None:
        """Raise LimitExceeded if ``record.client`` may not make this call now."""
        if not limits:
            return
        client = record.client or ""
        self._leases += 1
        lease_id = f"{self._lease_prefix}{self._leases}"
        try:
            admission = self.state.admit(client, limits, lease_id, self._clock())
        except StateUnavailable as exc:
            self._state_failed("admit", exc)
            return  # fail open: the call is served unlimited
        if self._pending:
            self._wake.set()  # the store answers again: resend failed settles now
        if admission.limit:
            if self._on_reject is not None:
                self._on_reject(client, admission.limit)
            log.info(
                "client over its limit",
                extra={
                    "event": "limit_exceeded",
                    "client": client,
                    "limit": admission.limit,
                    "retry_after_s": round(admission.retry_after, 2),
                    "in_flight": admission.in_flight,
                },
            )
            record.error = f"limit_{admission.limit}"
            raise LimitExceeded(admission.limit, admission.retry_after, admission.in_flight)
        record.limits = limits
        record.lease = Lease(lease_id, admission.reserved)
        if limits.concurrency or limits.tokens_per_day:
            # A stream longer than LEASE_S keeps its slot: the record calls renew as it sends.
            record.renew_at = time.perf_counter() + RENEW_EVERY_S
            record.renewer = self.renew

    def settle(self, record: AccessRecord, fields: dict | None = None) -> None:
        """End-of-request listener: finish the call if it was admitted with limits."""
        if record.lease is not None:
            self.finish(record)

    def finish(self, record: AccessRecord) -> None:
        """Release the call's slot and reservation and count its tokens, once, as it closes."""
        limits, lease = record.limits, record.lease
        if limits is None or lease is None:
            return
        record.limits = record.lease = None
        if not limits.concurrency and not limits.tokens_per_day:
            return  # rpm only: nothing to release or count, no round trip
        tokens = tokens_used(record) if limits.tokens_per_day else 0
        settle = Settle(record.client or "", limits, lease, tokens, self._clock())
        try:
            self.state.finish(*settle)
        except StateUnavailable as exc:
            self._state_failed("finish", exc)
            self._defer(settle)
            return
        if self._pending:
            self._wake.set()

    def renew(self, record: AccessRecord) -> None:
        """Extend the call's slot and reservation to now + LEASE_S (a call outliving LEASE_S).

        Meant to be called by a stream every ``RENEW_EVERY_S``. A lease the
        store already let go (expired, or the call was settled) stays gone.
        """
        limits, lease = record.limits, record.lease
        if limits is None or lease is None or not (limits.concurrency or limits.tokens_per_day):
            return  # nothing held: rpm only, never admitted, or already settled
        record.renew_at = time.perf_counter() + RENEW_EVERY_S
        try:
            self.state.renew(record.client or "", lease, self._clock())
        except StateUnavailable as exc:
            self._state_failed("renew", exc)  # fail open: at worst the lease runs out

    def pending_settles(self) -> int:
        """How many failed settles wait to be resent."""
        return len(self._pending)

    def _defer(self, settle: Settle) -> None:
        """Queue a failed settle and make sure the one retrier is running."""
        dropped, retrier = False, None
        with self._lock:
            if len(self._pending) >= MAX_PENDING_SETTLES:
                self._pending.popleft()
                dropped = True
            self._pending.append(settle)
            if self._retrier is None:
                retrier = self._retrier = threading.Thread(
                    target=self._retry_pending, name="shim-settle-retry", daemon=True
                )
        if retrier is not None:
            retrier.start()  # outside the lock: under gevent, start() yields
        if dropped:
            self._dropped()

    def _retry_pending(self) -> None:
        """Resend failed settles until none is left (runs in the retrier thread)."""
        try:
            while True:
                self._wake.wait(SETTLE_RETRY_S)
                self._wake.clear()
                if self._resend():
                    return
        finally:
            with self._lock:  # also when something unexpected ended the loop
                if self._retrier is threading.current_thread():
                    self._retrier = None

    def _resend(self) -> bool:
        """Resend pending settles oldest first; True once none is left."""
        while True:
            with self._lock:
                if not self._pending:
                    self._retrier = None  # under the lock: a new _defer starts another
                    return True
                settle = self._pending[0]
            try:
                # retry=True: tokens count only if the first try never landed.
                self.state.finish(*settle, retry=True)
            except StateUnavailable as exc:
                self._state_failed("settle_retry", exc)
                return False
            with self._lock:
                if self._pending and self._pending[0] is settle:
                    self._pending.popleft()

    def _dropped(self) -> None:
        if self._on_state_error is not None:
            self._on_state_error("settle_dropped")
        now = time.monotonic()
        if now - self._warned_drop >= WARN_EVERY_S:
            self._warned_drop = now
            log.warning(
                "too many settles waiting for the state store; dropped the oldest",
                extra={"event": "settle_dropped", "pending": len(self._pending)},
            )
