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

import os

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

from shim.access import AccessRecord

MAX_MODELS = 50
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_GAP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "shim_requests_total", "Requests answered", ["provider", "route", "status_class"]
)
DURATION = Histogram(
    "shim_request_duration_seconds", "Time from request to the end of the answer",
    ["provider", "route"], buckets=_LATENCY_BUCKETS,
)
TTFB = Histogram(
    "shim_ttfb_seconds", "Time from request to the first byte of the answer",
    ["provider", "route"], buckets=_LATENCY_BUCKETS,
)
STREAM_MAX_GAP = Histogram(
    "shim_stream_max_gap_seconds", "Longest silence between chunks of a stream",
    ["provider"], buckets=_GAP_BUCKETS,
)
STREAMS_IN_FLIGHT = Gauge(
    "shim_streams_in_flight", "Streams being relayed now", ["provider"],
    multiprocess_mode="livesum",
)
TOKENS = Counter("shim_tokens_total", "Tokens reported by upstream", ["provider", "model", "kind"])
BYTES = Counter("shim_bytes_total", "Body bytes relayed", ["provider", "direction"])
UPSTREAM_ERRORS = Counter(
    "shim_upstream_errors_total", "Upstream failures by kind", ["provider", "kind"]
)
GEMINI_KEYS = Gauge(
    "shim_gemini_keys", "Gemini keys by state, per worker", ["state"],
    multiprocess_mode="liveall",
)
QUOTA_STATUS = Gauge(
    "shim_subscription_quota_status",
    "Last anthropic-ratelimit-unified-status seen (1 for the current one)", ["status"],
    multiprocess_mode="livemostrecent",
)
QUOTA_RESET = Gauge(
    "shim_subscription_quota_reset_timestamp_seconds",
    "When the subscription quota window resets (unix time)",
    multiprocess_mode="livemostrecent",
)
QUOTA_UTILIZATION = Gauge(
    "shim_subscription_quota_utilization_ratio", "Subscription quota used, by window",
    ["window"], multiprocess_mode="livemostrecent",
)

_models: set[str] = set()
_QUOTA_STATUSES = ("allowed", "allowed_warning", "rejected")


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
    REQUESTS.labels(provider, route, f"{status // 100}xx").inc()
    DURATION.labels(provider, route).observe(fields["duration_ms"] / 1000)
    if record.ttfb is not None:
        TTFB.labels(provider, route).observe(record.ttfb)
    if record.stream:
        STREAM_MAX_GAP.labels(provider).observe(record.max_gap)
    if record.bytes_in:
        BYTES.labels(provider, "in").inc(record.bytes_in)
    if record.bytes_out:
        BYTES.labels(provider, "out").inc(record.bytes_out)
    if record.input_tokens or record.output_tokens:
        model = _model_label(record.model)
        for kind in ("input", "output", "cache_read", "cache_creation"):
            count = getattr(record, f"{kind}_tokens")
            if count:
                TOKENS.labels(provider, model, kind).inc(count)
    if record.error:
        UPSTREAM_ERRORS.labels(provider, record.error).inc()
    if record.quota_status in _QUOTA_STATUSES:
        for name in _QUOTA_STATUSES:
            QUOTA_STATUS.labels(name).set(1 if name == record.quota_status else 0)
        if record.quota_reset and record.quota_reset.isdigit():
            QUOTA_RESET.set(int(record.quota_reset))
        for window in ("5h", "7d"):
            value = getattr(record, f"quota_{window}_utilization")
            if value is not None:
                QUOTA_UTILIZATION.labels(window).set(value)


def stream_started(provider: str) -> None:
    STREAMS_IN_FLIGHT.labels(provider).inc()


def stream_ended(provider: str) -> None:
    STREAMS_IN_FLIGHT.labels(provider).dec()


def gemini_key_states(states: dict[str, int]) -> None:
    for state, count in states.items():
        GEMINI_KEYS.labels(state).set(count)


def exposition() -> tuple[bytes, str]:
    """The scrape body for every worker (multiprocess) or this process."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
