"""Subscription quota: read the ``anthropic-ratelimit-unified-*`` headers, notice when they change.

Subscription (OAuth) answers carry the account's quota state in headers
(issue #15): ``status`` (allowed | allowed_warning | rejected), ``reset``,
``representative-claim`` (the binding window), per-window ``5h-``/``7d-``
``utilization`` (0-1, can exceed 1) and ``reset``, ``overage-status``,
``overage-disabled-reason``, ``fallback`` and ``fallback-percentage``.

What lives here: ``read`` copies every one that is present onto the access
record (``FIELDS`` names the record fields, in snapshot order), and
``QuotaWatch`` keeps a per-worker last-seen snapshot so that gauges are
written and ``quota_warning`` lines logged only when something changed:
the headers come with every call, the state changes rarely, and each gauge
write in multiprocess mode is a locked write to a shared file. What does not:
the gauges themselves (``shim.metrics``) and readiness (``shim.readiness``).

Warnings are per worker: each gunicorn worker logs a crossing the first time
*it* sees one, so with N workers a crossing logs at most N lines, never one
per request. No token, key or header dict is ever logged; only the window
and the value.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from shim.access import AccessRecord

log = logging.getLogger("shim.quota")

PREFIX = "anthropic-ratelimit-unified-"
# Above this utilization a window is logged as a warning (once per crossing).
WARN_UTILIZATION = 0.8
WARN_STATUSES = frozenset({"allowed_warning", "rejected"})
# A header value longer than this is not a quota value: kept out of the record.
_MAX_VALUE = 64

# (header suffix, record field, is a number); the order is the snapshot's.
HEADERS: tuple[tuple[str, str, bool], ...] = (
    ("status", "quota_status", False),
    ("reset", "quota_reset", False),
    ("representative-claim", "quota_representative_claim", False),
    ("5h-utilization", "quota_5h_utilization", True),
    ("7d-utilization", "quota_7d_utilization", True),
    ("5h-reset", "quota_5h_reset", False),
    ("7d-reset", "quota_7d_reset", False),
    ("overage-status", "quota_overage_status", False),
    ("overage-disabled-reason", "quota_overage_disabled_reason", False),
    ("fallback", "quota_fallback", False),
    ("fallback-percentage", "quota_fallback_percentage", True),
)
FIELDS = tuple(field for _, field, _ in HEADERS)
_LOOKUP = tuple((PREFIX + suffix, field, number) for suffix, field, number in HEADERS)
_STATUS_HEADER = PREFIX + "status"
STATUS = FIELDS.index("quota_status")
CLAIM = FIELDS.index("quota_representative_claim")
UTILIZATION = {
    "5h": FIELDS.index("quota_5h_utilization"),
    "7d": FIELDS.index("quota_7d_utilization"),
}

Snapshot = tuple


def read(headers: object, record: AccessRecord) -> None:
    """Copy every unified quota header present in ``headers`` onto ``record``.

    Nothing is read unless ``…-status`` is there: API-key traffic has none of
    these, and pays one lookup.
    """
    # `in` first: a missing key costs urllib3's get a raised KeyError (0.8 us vs 0.3 us).
    if _STATUS_HEADER not in headers:  # type: ignore[operator]
        return
    get = headers.get  # type: ignore[attr-defined]
    for name, field, number in _LOOKUP:
        value = get(name)
        if value is None or len(value) > _MAX_VALUE:
            continue
        if number:
            try:
                setattr(record, field, float(value))
            except ValueError:
                continue
        else:
            setattr(record, field, value)


def snapshot(record: AccessRecord) -> Snapshot:
    return tuple([getattr(record, field) for field in FIELDS])


class QuotaWatch:
    """One worker's last-seen quota state; says when it changed and logs warnings once.

    Gauges are multiprocess ``livemostrecent``: the latest write of any worker
    wins. A worker that sees no change writes nothing, so another worker's
    older, different state could otherwise stand for good; every
    ``refresh_s`` a worker that sees quota headers writes all of its gauges
    again (``on_change(None, current)``), bounding that staleness.
    """

    def __init__(
        self,
        on_change: Callable[[Snapshot | None, Snapshot], None] | None = None,
        refresh_s: float = 10.0,
    ):
        self.last: Snapshot | None = None
        self.on_change = on_change
        self.refresh_s = refresh_s
        self._written = float("-inf")

    def seen(self, record: AccessRecord) -> bool:
        """Take ``record``'s quota state; return True if gauges were (re)written."""
        if record.quota_status is None:
            return False  # not subscription traffic, or no headers on this answer
        current = snapshot(record)
        previous = self.last
        now = time.monotonic()
        if current == previous:
            if now - self._written < self.refresh_s:
                return False
            previous = None  # a refresh: write every gauge again
        else:
            self.last = current
            self._warn(previous, current, record)
        self._written = now
        if self.on_change is not None:
            self.on_change(previous, current)
        return True

    def _warn(self, previous: Snapshot | None, current: Snapshot, record: AccessRecord) -> None:
        status = current[STATUS]
        if status in WARN_STATUSES and (previous is None or previous[STATUS] != status):
            _warning(record, current[CLAIM] or "unified", status)
        for window, at in UTILIZATION.items():
            value = current[at]
            if value is None or value <= WARN_UTILIZATION:
                continue
            before = previous[at] if previous is not None else None
            if before is None or before <= WARN_UTILIZATION:
                _warning(record, window, value)


def _warning(record: AccessRecord, window: str, value: str | float) -> None:
    log.warning(
        "subscription quota warning",
        extra={
            "event": "quota_warning",
            "window": window,
            "value": value,
            "request_id": record.request_id,
        },
    )
