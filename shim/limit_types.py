"""The values the limiter (shim.limits) and its stores (shim.limit_store) pass each other.

``Limits`` is a client's limits as its clients-file line gives them
(``parse_limits``); ``LimitStore`` is what a store answers to, with
``Admission`` its answer and ``Lease`` what an admitted call holds. What each
limit means is in shim.limits.

Standard library only: the clients file (read by settings in gunicorn's
master) parses limits with ``parse_limits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

# How long a concurrency slot (and a token reservation) lasts if its call never
# reports its end (the instance died): long enough for any sane stream, short
# enough to recover.
LEASE_S = 900.0
# Retry-After when the budget is held by reservations of calls in flight, not
# used up: those free as soon as the calls end.
IN_FLIGHT_RETRY_S = 2.0
_NAMES = ("concurrency", "rpm", "tokens_per_day")


@dataclass(frozen=True)
class Limits:
    """A client's limits; 0 means no limit of that kind."""

    concurrency: int = 0
    rpm: int = 0
    tokens_per_day: int = 0

    def __bool__(self) -> bool:
        return bool(self.concurrency or self.rpm or self.tokens_per_day)


NO_LIMITS = Limits()


def parse_limits(words: list[str]) -> Limits:
    """Parse ``name=value`` words (concurrency, rpm, tokens_per_day) or raise ValueError."""
    values: dict[str, int] = {}
    for word in words:
        name, _, raw = word.partition("=")
        if name not in _NAMES:
            raise ValueError(f"unknown limit {name!r} (expected {', '.join(_NAMES)})")
        if name in values:
            raise ValueError(f"limit {name!r} given twice")
        if not raw.isdigit() or not 0 < int(raw) <= 10**12:
            raise ValueError(f"limit {name!r} needs a positive integer, got {raw!r}")
        values[name] = int(raw)
    return Limits(**values)


class Admission(NamedTuple):
    """A state store's answer: ``limit`` names the one exceeded ("" when admitted).

    ``reserved``: tokens the admitted call holds while in flight; ``in_flight``:
    refused for tokens held by calls in flight rather than tokens used.
    """

    limit: str
    retry_after: float = 0.0
    reserved: int = 0
    in_flight: bool = False


class Lease(NamedTuple):
    """What an admitted call holds in the store, kept in ``record.lease`` until it ends."""

    id: str
    reserved: int = 0  # tokens reserved against tokens_per_day

    @property
    def member(self) -> str:
        """The call's member of the client's slots zset in Redis."""
        return f"{self.id}:{self.reserved}"


ADMITTED = Admission("")


class LimitStore(Protocol):
    """Where the counts live (``shim.limit_store``): admit, settle and renew calls."""

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

    def renew(self, client: str, lease: Lease, now: float) -> None:
        """Extend a lease still held to ``now + LEASE_S``; one already gone stays gone."""
