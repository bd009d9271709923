"""Prometheus metrics, multiprocess: every worker writes, any worker answers a scrape.

gunicorn.conf.py points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory
before the workers start and marks dead workers in ``child_exit``; a scrape
(``GET /metrics`` on ``SHIM_METRICS_PORT``, loopback by default) collects the
files of all workers. Without that variable (in-process tests) the metrics
live in this process's default registry.

Labels are bounded: provider, route template, status class, kind, and model
names cut off after ``MAX_MODELS`` distinct values per process (then
``other``); never keys, secrets, session ids or raw paths.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric

from shim import quota
from shim.access import AccessRecord
from shim.errors import UPSTREAM_CODES

MAX_MODELS = 50
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_GAP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "shim_requests_total",
    "Requests answered",
    ["provider", "route", "status_class", "client"],
)
DURATION = Histogram(
    "shim_request_duration_seconds",
    "Time from request to the end of the answer",
    ["provider", "route"],
    buckets=_LATENCY_BUCKETS,
)
TTFB = Histogram(
    "shim_ttfb_seconds",
    "Streams: time from request to the first byte of the answer (for an answer sent "
    "whole it equals the duration, so it is not observed twice)",
    ["provider", "route"],
    buckets=_LATENCY_BUCKETS,
)
STREAM_MAX_GAP = Histogram(
    "shim_stream_max_gap_seconds",
    "Longest silence between chunks of a stream",
    ["provider"],
    buckets=_GAP_BUCKETS,
)
STREAMS_IN_FLIGHT = Gauge(
    "shim_streams_in_flight",
    "Streams being relayed now",
    ["provider"],
    multiprocess_mode="livesum",
)
TOKENS = Counter("shim_tokens_total", "Tokens reported by upstream", ["provider", "model", "kind"])
# Every access line with an `error` counts once, in one of these two (issue #16).
UPSTREAM_ERRORS = Counter(
    "shim_upstream_errors_total",
    "Calls that failed upstream: unreachable, timed out, body or stream cut",
    ["provider", "kind"],
)
REQUEST_ERRORS = Counter(
    "shim_request_errors_total",
    "Calls that ended otherwise: client gone, limit refused, worker stopping, unhandled error",
    ["provider", "kind"],
)
LIMIT_REJECTIONS = Counter(
    "shim_limit_rejections_total", "Calls refused by a per-client limit", ["client", "limit"]
)
STATE_ERRORS = Counter(
    "shim_state_errors_total",
    "State store (Redis) failures; limits failed open meanwhile",
    ["operation"],
)
GEMINI_KEYS = Gauge(
    "shim_gemini_keys",
    "Gemini keys by state, per worker: available, cooling (benched for every model) and "
    "disabled add up to the pool; model_benched counts available keys benched for some model",
    ["state"],
    multiprocess_mode="liveall",
)
# Per key, by its id (a short hash, never the key): bounded by the configured keys.
# "livemax": a key cooling or disabled in any live worker shows so.
GEMINI_KEY_STATE = Gauge(
    "shim_gemini_key_state",
    "1 for each Gemini key id's state in some worker (available, cooling, disabled); "
    "reason says why a key was disabled",
    ["key", "state", "reason"],
    multiprocess_mode="livemax",
)
GEMINI_KEY_UNTIL = Gauge(
    "shim_gemini_key_cooling_until_timestamp_seconds",
    "When a benched Gemini key serves again (unix time; model empty: every model); "
    "0 once the bench is over",
    ["key", "model"],
    multiprocess_mode="livemax",
)
# The credentials file's login, for the status page: every worker holds the same pair,
# so the latest any worker wrote ("max" across workers) is the truth.
OAUTH_EXPIRY = Gauge(
    "shim_oauth_token_expiry_timestamp_seconds",
    "When the subscription OAuth access token in use expires (unix time)",
    multiprocess_mode="max",
)
OAUTH_LAST_REFRESH = Gauge(
    "shim_oauth_last_refresh_timestamp_seconds",
    "When this gateway last refreshed the OAuth token itself (unix time)",
    multiprocess_mode="max",
)
OAUTH_REFRESHES = Counter(
    "shim_oauth_refresh_total",
    "OAuth token refreshes: refreshed (called the endpoint), failed, adopted (another "
    "worker's or Claude Code's refresh picked up from the credentials file), "
    "relogin_needed (the refresh token is dead and the file holds nothing newer)",
    ["result"],
)
# Subscription quota gauges (issue #15): written only when a worker sees the
# quota state change (shim.quota.QuotaWatch), never per request; across workers
# the most recent write wins. Labels come from fixed vocabularies plus "other".
QUOTA_STATUS = Gauge(
    "shim_subscription_quota_status",
    "Last anthropic-ratelimit-unified-status seen (1 for the current one)",
    ["status"],
    multiprocess_mode="livemostrecent",
)
QUOTA_RESET = Gauge(
    "shim_subscription_quota_reset_timestamp_seconds",
    "When the subscription quota window resets (unix time)",
    multiprocess_mode="livemostrecent",
)
QUOTA_UTILIZATION = Gauge(
    "shim_subscription_quota_utilization_ratio",
    "Subscription quota used, by window (0-1, can exceed 1)",
    ["window"],
    multiprocess_mode="livemostrecent",
)
QUOTA_WINDOW_RESET = Gauge(
    "shim_subscription_quota_window_reset_timestamp_seconds",
    "When each subscription quota window resets (unix time)",
    ["window"],
    multiprocess_mode="livemostrecent",
)
QUOTA_CLAIM = Gauge(
    "shim_subscription_quota_representative_claim",
    "The binding quota window (anthropic-ratelimit-unified-representative-claim; 1 for "
    "the current one)",
    ["claim"],
    multiprocess_mode="livemostrecent",
)
QUOTA_OVERAGE_STATUS = Gauge(
    "shim_subscription_quota_overage_status",
    "Last anthropic-ratelimit-unified-overage-status seen (1 for the current one)",
    ["status"],
    multiprocess_mode="livemostrecent",
)
QUOTA_OVERAGE_DISABLED = Gauge(
    "shim_subscription_quota_overage_disabled",
    "Why extra usage is off (anthropic-ratelimit-unified-overage-disabled-reason; 1 for "
    "the current reason, all 0 when none is given)",
    ["reason"],
    multiprocess_mode="livemostrecent",
)
QUOTA_FALLBACK = Gauge(
    "shim_subscription_quota_fallback_available",
    "1 when anthropic-ratelimit-unified-fallback says available, else 0",
    multiprocess_mode="livemostrecent",
)
QUOTA_FALLBACK_RATIO = Gauge(
    "shim_subscription_quota_fallback_ratio",
    "anthropic-ratelimit-unified-fallback-percentage as sent (0.5 is half)",
    multiprocess_mode="livemostrecent",
)
SUBSCRIPTION_REFUSALS = Counter(
    "shim_subscription_refusals_total",
    "Anthropic subscription refusals relayed to clients, by kind (shim.refusals.KINDS)",
    ["kind"],
)

# Per client and model, for the status page (issue #17): bounded by the clients
# file and MAX_MODELS. outcome is "error" when the call failed (status >= 400 or
# an access-line error), else "ok".
CLIENT_MODEL_REQUESTS = Counter(
    "shim_client_model_requests_total",
    "Calls that named a model, by client and model",
    ["client", "model", "outcome"],
)
CLIENT_MODEL_TOKENS = Counter(
    "shim_client_model_tokens_total",
    "Tokens reported by upstream, by client and model",
    ["client", "model", "kind"],
)
MODEL_TTFB = Histogram(
    "shim_model_ttfb_seconds",
    "Streams: time from request to the first byte of the answer, by model",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
MODEL_DURATION = Histogram(
    "shim_model_duration_seconds",
    "Calls that named a model: time from request to the end of the answer, by model",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)

_models: set[str] = set()
# Label children by label values: .labels() validates and locks on every call,
# and observe runs for every request.
_children: dict[tuple, object] = {}


def _child(metric, *values: str):  # noqa: ANN001, ANN202
    key = (id(metric), *values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


class _Tally:
    """Counter increments and histogram observations summed in memory, written once a second.

    Each multiprocess write is a locked write to a shared file (~2 µs); the
    per-client/model metrics (issue #17) would add up to nine per request.
    Here a request adds to a dict, and a background greenlet (a thread outside
    gevent) writes the sums every ``FLUSH_S``; the status page also flushes its
    own worker before it reads. A scrape sees them at most a second late.
    """

    FLUSH_S = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sums: dict[tuple, float] = defaultdict(float)
        # Histogram observations as (sum, count per bucket index), by (metric, labels).
        self._observed: dict[tuple, list] = {}
        self._writer: threading.Thread | None = None

    def add(self, sums: list[tuple], observed: list[tuple] = ()) -> None:
        """Add one request's counts, ``(metric, amount, *labels)``, and histogram values,
        ``(metric, value, *labels)``, under one lock (one request, one acquisition)."""
        with self._lock:
            for metric, amount, *labels in sums:
                self._sums[(metric, *labels)] += amount
            for metric, value, *labels in observed:
                key = (metric, *labels)
                entry = self._observed.get(key)
                if entry is None:
                    entry = self._observed[key] = [0.0, [0] * len(metric._upper_bounds)]
                entry[0] += value
                # The bucket Histogram.observe would use: the first bound >= value.
                entry[1][bisect.bisect_left(metric._upper_bounds, value)] += 1
            if self._writer is None:
                self._start()

    def flush(self) -> None:
        with self._lock:
            sums, self._sums = self._sums, defaultdict(float)
            observed, self._observed = self._observed, {}
        for (metric, *labels), amount in sums.items():
            _child(metric, *labels).inc(amount)
        for (metric, *labels), (total, counts) in observed.items():
            # Histogram.observe's own writes (its _sum and _buckets), summed: one write
            # per bucket used instead of two per observation. Pinned prometheus-client;
            # tests/test_metrics_tally.py compares the result with Histogram.observe.
            child = _child(metric, *labels)
            child._sum.inc(total)
            for index, count in enumerate(counts):
                if count:
                    child._buckets[index].inc(count)

    def _start(self) -> None:
        # Under gunicorn's gevent worker threading is patched: this is a greenlet.
        self._writer = threading.Thread(target=self._write_forever, name="metrics-tally",
                                        daemon=True)
        self._writer.start()

    def _write_forever(self) -> None:
        while True:
            time.sleep(self.FLUSH_S)
            self.flush()


_tally = _Tally()


def flush() -> None:
    """Write what this worker has summed in memory (the status page calls it before reading)."""
    _tally.flush()


_QUOTA_STATUSES = ("allowed", "allowed_warning", "rejected", "other")
_CLAIMS = ("five_hour", "seven_day", "seven_day_opus", "seven_day_sonnet", "other")
_OVERAGE_REASONS = ("org_level_disabled", "out_of_credits", "org_spend_cap_reached", "other")
_WINDOWS = (
    ("5h", quota.FIELDS.index("quota_5h_utilization"), quota.FIELDS.index("quota_5h_reset")),
    ("7d", quota.FIELDS.index("quota_7d_utilization"), quota.FIELDS.index("quota_7d_reset")),
)
_Q = {field: at for at, field in enumerate(quota.FIELDS)}


def _one_hot(metric, labels: tuple[str, ...], value: str | None) -> None:  # noqa: ANN001
    """Set ``value``'s label to 1 and every other to 0 (all 0 when absent)."""
    current = None if value is None else value if value in labels else "other"
    for label in labels:
        _child(metric, label).set(1 if label == current else 0)


def _quota_changed(previous: quota.Snapshot | None, current: quota.Snapshot) -> None:
    """Write the gauges of the quota values that changed since this worker's last write."""

    def changed(field: str) -> bool:
        at = _Q[field]
        return previous is None or previous[at] != current[at]

    if changed("quota_status"):
        _one_hot(QUOTA_STATUS, _QUOTA_STATUSES, current[_Q["quota_status"]])
    reset = current[_Q["quota_reset"]]
    if changed("quota_reset") and reset and reset.isdigit():
        QUOTA_RESET.set(int(reset))
    if changed("quota_representative_claim"):
        _one_hot(QUOTA_CLAIM, _CLAIMS, current[_Q["quota_representative_claim"]])
    for window, used_at, reset_at in _WINDOWS:
        used, reset = current[used_at], current[reset_at]
        if used is not None and (previous is None or previous[used_at] != used):
            _child(QUOTA_UTILIZATION, window).set(used)
        if reset and reset.isdigit() and (previous is None or previous[reset_at] != reset):
            _child(QUOTA_WINDOW_RESET, window).set(int(reset))
    if changed("quota_overage_status"):
        _one_hot(QUOTA_OVERAGE_STATUS, _QUOTA_STATUSES, current[_Q["quota_overage_status"]])
    if changed("quota_overage_disabled_reason"):
        reason = current[_Q["quota_overage_disabled_reason"]]
        _one_hot(QUOTA_OVERAGE_DISABLED, _OVERAGE_REASONS, reason)
    if changed("quota_fallback"):
        QUOTA_FALLBACK.set(1 if current[_Q["quota_fallback"]] == "available" else 0)
    ratio = current[_Q["quota_fallback_percentage"]]
    if ratio is not None and changed("quota_fallback_percentage"):
        QUOTA_FALLBACK_RATIO.set(ratio)


# This worker's last-seen quota state: gauges are written when it changes.
_quota = quota.QuotaWatch(_quota_changed)


def _model_label(model: str | None) -> str:
    if not model:
        return "unknown"
    if model in _models:
        return model
    if len(_models) < MAX_MODELS and len(model) <= 64:
        _models.add(model)
        return model
    return "other"


def observe(record: AccessRecord, fields: dict) -> None:
    """Feed one finished request into the metrics."""
    provider = record.provider or "none"
    route = record.route or "unmatched"
    status = record.status or 0
    # client: a name from the clients file (bounded by it), "none" before auth.
    _child(REQUESTS, provider, route, f"{status // 100}xx", record.client or "none").inc()
    _child(DURATION, provider, route).observe(fields["duration_ms"] / 1000)
    # Each sample is a locked write to a shared file in multiprocess mode; per
    # request only what a dashboard needs (bytes are in the access line).
    if record.stream:
        if record.ttfb is not None:
            _child(TTFB, provider, route).observe(record.ttfb)
        _child(STREAM_MAX_GAP, provider).observe(record.max_gap)
    error = record.error
    client = record.client or "none"
    sums: list[tuple] = []
    observed: list[tuple] = []
    if record.model:
        model = _model_label(record.model)
        outcome = "error" if error or status >= 400 else "ok"
        sums.append((CLIENT_MODEL_REQUESTS, 1, client, model, outcome))
        observed.append((MODEL_DURATION, fields["duration_ms"] / 1000, model))
        if record.stream and record.ttfb is not None:
            observed.append((MODEL_TTFB, record.ttfb, model))
    if record.input_tokens or record.output_tokens:
        model = _model_label(record.model)
        for kind, count in (
            ("input", record.input_tokens),
            ("output", record.output_tokens),
            ("cache_read", record.cache_read_tokens),
            ("cache_creation", record.cache_creation_tokens),
        ):
            if count:
                _child(TOKENS, provider, model, kind).inc(count)
                sums.append((CLIENT_MODEL_TOKENS, count, client, model, kind))
    if sums:
        _tally.add(sums, observed)
    if error:
        metric = UPSTREAM_ERRORS if error in UPSTREAM_CODES else REQUEST_ERRORS
        _child(metric, provider, error).inc()
    if record.refusal is not None:
        _child(SUBSCRIPTION_REFUSALS, record.refusal).inc()
    # A member's own subscription (issue #15) is not shim's: its quota stays in the access line.
    if record.quota_status is not None and record.client_credential is None:
        _quota.seen(record)


def stream_started(provider: str) -> None:
    _child(STREAMS_IN_FLIGHT, provider).inc()


def stream_ended(provider: str) -> None:
    _child(STREAMS_IN_FLIGHT, provider).dec()


def limit_rejected(client: str, limit: str) -> None:
    _child(LIMIT_REJECTIONS, client, limit).inc()


def state_failed(operation: str) -> None:
    _child(STATE_ERRORS, operation).inc()


def oauth_refresh(result: str) -> None:
    _child(OAUTH_REFRESHES, result).inc()
    if result == "refreshed":
        OAUTH_LAST_REFRESH.set(time.time())


def oauth_expiry(expires_at: float) -> None:
    OAUTH_EXPIRY.set(expires_at)


def gemini_key_states(states: dict[str, int]) -> None:
    for state, count in states.items():
        _child(GEMINI_KEYS, state).set(count)


_key_labels: set[tuple[str, ...]] = set()  # (key, state, reason) set so far
_key_benches: set[tuple[str, str]] = set()  # (key, model) set so far


def gemini_key_detail(keys: list[dict]) -> None:
    """Per key id: its state one-hot, and when its benches end (0 once over)."""
    shown = {(k["id"], k["state"], k["reason"]) for k in keys}
    for labels in _key_labels - shown:
        _child(GEMINI_KEY_STATE, *labels).set(0)
    for labels in shown:
        _child(GEMINI_KEY_STATE, *labels).set(1)
    _key_labels.update(shown)
    benches = {(k["id"], ""): k["until"] for k in keys}
    benches |= {(k["id"], model): until for k in keys for model, until in k["models"].items()}
    for labels in _key_benches - benches.keys():
        _child(GEMINI_KEY_UNTIL, *labels).set(0)
    for labels, until in benches.items():
        _child(GEMINI_KEY_UNTIL, *labels).set(until)
    _key_benches.update(benches)


def _registry(multiprocess_dir: str | None) -> CollectorRegistry:
    """All workers' metrics (multiprocess: Settings.metrics_dir), else this process's."""
    if multiprocess_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def exposition(multiprocess_dir: str | None) -> tuple[bytes, str]:
    """The scrape body for all workers (multiprocess: Settings.metrics_dir) or this process."""
    return generate_latest(_registry(multiprocess_dir)), CONTENT_TYPE_LATEST


def families(multiprocess_dir: str | None) -> list[Metric]:
    """The metric families a scrape would serve, parsed (shim.status reads these)."""
    return list(_registry(multiprocess_dir).collect())
