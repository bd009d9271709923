"""The status page (issue #17): one HTML page on the metrics listener, from the metrics.

``GET /`` and ``GET /status`` on ``SHIM_METRICS_PORT`` render the same metric
families a scrape of ``/metrics`` serves (``shim.metrics.families``: all
workers' multiprocess files), so the page and Prometheus never disagree and
there is no second store. Server-rendered, no script, no external asset
(works air-gapped), a viewport and a few lines of CSS for a phone, and a
``<meta http-equiv="refresh">`` to reload itself.

Rates are honest about being stateless: the totals are since the gateway
started; "per minute" comes from a small ring of this worker's earlier
renders (``Rates``), so it is blank on a worker's first render, and spans
whatever time lies between this worker's samples (a reload may land on
another worker). Percentiles are read from histogram buckets, interpolated
linearly within the bucket, as Prometheus's ``histogram_quantile`` does.

Never on the page: keys, secrets, tokens, session ids. Only label values
(client names from the clients file, model names, fixed vocabularies) and
numbers, and the API-equivalent cost of the tokens at list prices (``shim.prices``).
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable
from datetime import UTC, datetime
from html import escape

from prometheus_client.metrics_core import Metric

from shim.prices import PriceTable
from shim.report import cost

REFRESH_S = 5
# Rates are taken over about this span of this worker's earlier samples.
RATE_WINDOW_S = 60
_RING = 64

Labels = dict[str, str]


class Samples:
    """Every sample of a collection, by sample name, with label filtering and sums."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._by_name: dict[str, list[tuple[Labels, float]]] = defaultdict(list)
        for family in families:
            for sample in family.samples:
                self._by_name[sample.name].append((sample.labels, sample.value))

    def each(self, name: str, **labels: str) -> list[tuple[Labels, float]]:
        return [(have, value) for have, value in self._by_name.get(name, ())
                if all(have.get(k) == v for k, v in labels.items())]

    def total(self, name: str, **labels: str) -> float:
        return sum(value for _, value in self.each(name, **labels))

    def by(self, name: str, *keys: str, **labels: str) -> dict[tuple[str, ...], float]:
        """Sum of ``name`` grouped by the values of ``keys``."""
        sums: dict[tuple[str, ...], float] = defaultdict(float)
        for have, value in self.each(name, **labels):
            sums[tuple(have.get(k, "") for k in keys)] += value
        return dict(sums)

    def one_hot(self, name: str) -> str | None:
        """The label value whose gauge is 1 (the quota gauges' shape), if any."""
        for have, value in self.each(name):
            if value == 1:
                return next(iter(have.values()), None)
        return None

    def gauge(self, name: str, **labels: str) -> float | None:
        found = self.each(name, **labels)
        return found[0][1] if found else None


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The ``q`` quantile of cumulative ``buckets`` (upper bound -> count), interpolated."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bucket: its bound is all we know
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0)
        lower, below = bound, count
    return None


class Rates:
    """Per-minute rates of counters, from this worker's earlier renders of the page."""

    def __init__(self) -> None:
        self._ring: deque[tuple[float, dict[str, float]]] = deque(maxlen=_RING)
        self._lock = threading.Lock()

    def per_minute(self, totals: dict[str, float], now: float) -> tuple[dict[str, float], float]:
        """Rates of ``totals`` since the youngest sample RATE_WINDOW_S old (else the oldest)."""
        with self._lock:
            base = None
            for then, values in self._ring:
                if now - then >= RATE_WINDOW_S or base is None:
                    base = (then, values)
            self._ring.append((now, dict(totals)))
        if base is None or now - base[0] <= 0:
            return {}, 0.0
        span = now - base[0]
        return {name: max(0.0, value - base[1].get(name, 0.0)) * 60 / span
                for name, value in totals.items()}, span


_CSS = """
body{font:15px/1.4 system-ui,sans-serif;margin:0 auto;padding:12px;max-width:60em;color:#222}
h1{font-size:1.3em;margin:0 0 4px}h2{font-size:1.1em;margin:18px 0 6px;border-bottom:1px solid #ccc}
.muted{color:#666;font-size:.85em}.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:.9em}
th,td{padding:3px 8px;text-align:right;white-space:nowrap}
th:first-child,td:first-child,.l{text-align:left}tr:nth-child(even){background:#f4f4f4}
.two td:nth-child(2),.two th:nth-child(2){text-align:left}
.bar{background:#e6e6e6;border-radius:3px;height:1.1em;width:100%;max-width:24em}
.fill{height:100%;border-radius:3px;background:#3a7}.warn{background:#d90}.over{background:#c33}
.kv span{display:inline-block;margin:0 14px 4px 0}.kv b{font-size:1.2em}
"""


def _num(value: float) -> str:
    return f"{value:,.0f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _when(timestamp: float | None, now: float) -> str:
    if not timestamp:
        return "unknown"
    left = int(timestamp - now)
    at = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")
    if left <= 0:
        return f"{at} (passed)"
    days, hours, minutes = left // 86400, left % 86400 // 3600, left % 3600 // 60
    return f"{at} (in {f'{days}d ' if days else ''}{hours}h {minutes:02d}m)"


def _ago(timestamp: float, now: float) -> str:
    at = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")
    gone = max(0, int(now - timestamp))
    return f"{at} ({gone // 3600}h {gone % 3600 // 60:02d}m ago)"


def _bar(ratio: float) -> str:
    width = max(0.0, min(ratio, 1.0)) * 100
    tone = " over" if ratio >= 1 else " warn" if ratio >= 0.8 else ""
    return (f'<div class="bar" role="img" aria-label="{ratio:.0%} used">'
            f'<div class="fill{tone}" style="width:{width:.1f}%"></div></div>')


def _table(head: list[str], rows: list[list[str]], css: str = "") -> str:
    if not rows:
        return '<p class="muted">Nothing yet.</p>'
    cells = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table class="{css}"><tr>{cells}</tr>{body}</table></div>'


def _login(s: Samples, now: float) -> str:
    """The credentials file's OAuth token: when it expires, when shim last refreshed it."""
    expiry = s.gauge("shim_oauth_token_expiry_timestamp_seconds")
    if not expiry:
        return ""
    refreshed = s.gauge("shim_oauth_last_refresh_timestamp_seconds")
    last = _ago(refreshed, now) if refreshed else "not by this gateway since it started"
    return (f'<p class="kv"><span>OAuth token expires <b>{escape(_when(expiry, now))}</b></span>'
            f"<span>last refreshed <b>{escape(last)}</b></span></p>")


def _quota(s: Samples, now: float) -> str:
    login = _login(s, now)
    status = s.one_hot("shim_subscription_quota_status")
    if status is None and not s.each("shim_subscription_quota_utilization_ratio"):
        return login + '<p class="muted">No subscription quota headers seen since start.</p>'
    claim = s.one_hot("shim_subscription_quota_representative_claim")
    parts = [login, f'<p class="kv"><span>status <b>{escape(status or "unknown")}</b></span>'
             f'<span>binding window <b>{escape(claim or "unknown")}</b></span>']
    overage = s.one_hot("shim_subscription_quota_overage_status")
    if overage:
        parts.append(f"<span>extra usage <b>{escape(overage)}</b></span>")
    parts.append("</p>")
    for window in ("5h", "7d"):
        used = s.gauge("shim_subscription_quota_utilization_ratio", window=window)
        reset = s.gauge("shim_subscription_quota_window_reset_timestamp_seconds", window=window)
        if used is None:
            parts.append(f'<p>{window} window: <span class="muted">not reported</span></p>')
            continue
        parts.append(f"<p>{window} window: <b>{used:.0%}</b> used, resets "
                     f"{escape(_when(reset, now))}{_bar(used)}</p>")
    return "".join(parts)


def _key_rows(s: Samples, now: float) -> list[list[str]]:
    """One row per key id: its worst state in any worker, until when, for which models."""
    states: dict[str, dict[str, str]] = defaultdict(dict)  # id -> state -> reason
    for labels, value in s.each("shim_gemini_key_state"):
        if value == 1:
            states[labels.get("key", "")][labels.get("state", "")] = labels.get("reason", "")
    benches: dict[str, dict[str, float]] = defaultdict(dict)  # id -> model ("" all) -> until
    for labels, value in s.each("shim_gemini_key_cooling_until_timestamp_seconds"):
        if value > now:
            benches[labels.get("key", "")][labels.get("model", "")] = value
    rows = []
    for ident in sorted(states):
        have, bench = states[ident], benches.get(ident, {})
        if "disabled" in have:
            state, detail = "disabled", have["disabled"] or "–"
        elif "" in bench:
            state, detail = "cooling", f"until {_when(bench[''], now)}"
        else:
            state, detail = "available", "–"
        models = ", ".join(f"{m} until {_when(t, now)}" for m, t in sorted(bench.items()) if m)
        rows.append([f"<code>{escape(ident)}</code>", escape(state), escape(detail),
                     escape(models or "–")])
    return rows


def _keys(s: Samples, now: float) -> str:
    samples = s.each("shim_gemini_keys")
    if not samples:
        return '<p class="muted">No Gemini key pool reported.</p>'
    by_state: dict[str, list[float]] = defaultdict(list)
    for labels, value in samples:
        by_state[labels.get("state", "")].append(value)
    shown = []
    for state in ("available", "cooling", "disabled", "model_benched"):
        values = by_state.get(state)
        if values is None:
            continue
        low, high = min(values), max(values)
        count = _num(low) if low == high else f"{_num(low)}–{_num(high)}"
        shown.append(f"<span>{state.replace('_', ' ')} <b>{count}</b></span>")
    table = _table(["key id", "state", "until / why", "benched models"], _key_rows(s, now))
    return (f'<p class="kv">{"".join(shown)}</p>{table}<p class="muted">Each worker keeps '
            f"its own view of the pool; a range means workers differ, and a key shows the "
            f"worst state any worker has it in. Keys by id: a short hash, never the key.</p>")


def _now(s: Samples, rates: Rates, now: float) -> str:
    streams = s.by("shim_streams_in_flight", "provider")
    calls = s.by("shim_client_model_requests_total", "outcome")
    errors: dict[str, float] = {}
    for name in ("shim_upstream_errors_total", "shim_request_errors_total"):
        for (kind,), value in s.by(name, "kind").items():
            errors[kind] = errors.get(kind, 0) + value
    for (provider, status_class), value in s.by(
            "shim_requests_total", "provider", "status_class").items():
        if provider != "none" and status_class in ("4xx", "5xx"):
            errors[f"answered {status_class}"] = errors.get(f"answered {status_class}", 0) + value
    totals = {"calls": sum(calls.values()), **{f"error:{k}": v for k, v in errors.items()}}
    per_minute, span = rates.per_minute(totals, now)

    def rate(name: str) -> str:
        return f"{per_minute[name]:.1f}" if name in per_minute else "–"

    in_flight = "".join(f"<span>{escape(p)} <b>{_num(v)}</b></span>"
                        for (p,), v in sorted(streams.items())) or "<span>none</span>"
    rows = [["calls", _num(totals["calls"]), rate("calls")]]
    rows += [[f'<span class="l">{escape(kind)}</span>', _num(value), rate(f"error:{kind}")]
             for kind, value in sorted(errors.items()) if value]
    span_note = (f"over the last {span:.0f} s of this worker's renders" if span
                 else "blank until this worker has rendered the page once before")
    return (f'<p class="kv">streams in flight: {in_flight}</p>'
            + _table(["", "since start", "per minute"], rows)
            + f'<p class="muted">Per minute: {span_note}. Calls are those that named a model.</p>')


# The order shim.report.cost takes token counts in (input, output, cache read, cache write).
TOKEN_KINDS = ("input", "output", "cache_read", "cache_creation")


def _clients(s: Samples, prices: PriceTable | None, plan_usd: float | None) -> str:
    calls = s.by("shim_client_model_requests_total", "client", "model", "outcome")
    tokens = s.by("shim_client_model_tokens_total", "client", "model", "kind")
    pairs = sorted({(c, m) for c, m, _ in calls} | {(c, m) for c, m, _ in tokens})
    rows = []
    total_usd, unknown = 0.0, False
    for client, model in pairs:
        ok, failed = calls.get((client, model, "ok"), 0), calls.get((client, model, "error"), 0)
        counts = [int(tokens.get((client, model, kind), 0)) for kind in TOKEN_KINDS]
        usd, unpriced = cost({(model, False): counts}, prices) if prices else (0.0, sum(counts))
        total_usd += usd
        unknown = unknown or bool(unpriced)
        rows.append([f'<span class="l">{escape(client)}</span>', escape(model),
                     _num(ok + failed), _num(failed), *(_num(n) for n in counts),
                     _usd(usd, unpriced)])
    plan = f" · plan ${plan_usd:,.2f} a month" if plan_usd else ""
    summary = (f'<p class="kv">API-equivalent cost since start: <b>${total_usd:,.2f}'
               f'{"+?" if unknown else ""}</b>{plan}</p>')
    return summary + _table(
        ["client", "model", "calls", "errors", "input", "output", "cache read", "cache write",
         "API-equivalent"], rows, css="two"
    ) + ('<p class="muted">Cost at the list prices in shim/prices.json (or SHIM_PRICES_FILE); '
         "? where no price covers the tokens: never a guess. Long-context prices are not "
         "applied here (the page sees totals, not each prompt's size); the report does.</p>")


def _usd(usd: float, unpriced: int) -> str:
    if unpriced and not usd:
        return "?"
    return f"${usd:,.2f}" + ("+?" if unpriced else "")


def _histograms(s: Samples, name: str) -> dict[str, dict[float, float]]:
    per_model: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for labels, value in s.each(name + "_bucket"):
        per_model[labels.get("model", "")][float(labels["le"])] += value
    return per_model


def _models(s: Samples) -> str:
    duration = _histograms(s, "shim_model_duration_seconds")
    ttfb = _histograms(s, "shim_model_ttfb_seconds")
    rows = []
    for model in sorted(duration):
        count = max(duration[model].values(), default=0)
        rows.append([f'<span class="l">{escape(model)}</span>', _num(count),
                     *(_seconds(quantile(hist.get(model, {}), q))
                       for hist in (ttfb, duration) for q in (0.5, 0.95))])
    return _table(["model", "calls", "TTFB p50", "TTFB p95", "duration p50", "duration p95"],
                  rows) + ('<p class="muted">Percentiles interpolated within histogram buckets; '
                           "TTFB is for streams (a whole answer's TTFB is its duration).</p>")


def render(
    families: Iterable[Metric],
    rates: Rates,
    now: float | None = None,
    prices: PriceTable | None = None,
    plan_usd: float | None = None,
) -> str:
    """The whole page, from the collected metric families."""
    now = time.time() if now is None else now
    s = Samples(families)
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    sections = [
        ("Subscription quota (Anthropic)", _quota(s, now)),
        ("Gemini key pool", _keys(s, now)),
        ("Now", _now(s, rates, now)),
        ("Per client and model, since start", _clients(s, prices, plan_usd)),
        ("Latency per model, since start", _models(s)),
    ]
    body = "".join(f"<h2>{title}</h2>{html}" for title, html in sections)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<meta http-equiv="refresh" content="{REFRESH_S}">'
        f"<title>shim status</title><style>{_CSS}</style></head><body>"
        f'<h1>shim status</h1><p class="muted">{stamp} · all workers, since the gateway '
        f"started · reloads every {REFRESH_S} s</p>{body}</body></html>"
    )
