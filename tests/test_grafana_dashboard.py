"""deploy/grafana/shim-dashboard.json vs a live scrape: every metric and label it queries exists.

A real gunicorn gateway (named clients, one with a limit; an OAuth credentials
file whose token is due for refresh; three Gemini keys) in front of the fake
upstream is driven through the events the dashboard shows, then its metrics
port is scraped. A second gateway on a Redis nobody listens on produces the
state store errors. A family the dashboard queries must show up in a scrape
(multiprocess prometheus-client lists only families with samples), and every
label an expression groups by, matches on or names in its legend must be one
the metric carries.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, closed_port, start_gateway
from tests.fake_upstream import FAKE_GEMINI_KEYS

DASHBOARD = ROOT / "deploy" / "grafana" / "shim-dashboard.json"
SECRETS = {name: f"{name}-secret-{uuid.uuid4().hex}" for name in ("alice", "bob")}
MESSAGE = {"model": "claude-test-model", "max_tokens": 16,
           "messages": [{"role": "user", "content": "hi"}]}
GEMINI_PATH = "/v1beta/models/gemini-2.5-flash:generateContent"
QUOTA_HEADERS = {
    "status": "allowed",
    "reset": "1900000000",
    "representative-claim": "five_hour",
    "5h-utilization": "0.5",
    "7d-utilization": "0.25",
    "5h-reset": "1900000000",
    "7d-reset": "1900500000",
    "overage-status": "rejected",
    "overage-disabled-reason": "out_of_credits",
    "fallback": "available",
    "fallback-percentage": "0.5",
}
# Families the dashboard may query although this test cannot make them appear.
# Keep this short: each entry needs a reason.
ALLOWED_ABSENT: dict[str, str] = {}

METRIC = re.compile(r"\bshim_[a-z0-9_]+")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def targets(doc: dict) -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every query, rows' nested panels included."""
    found = []
    for panel in doc["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner["title"], target["expr"], target.get("legendFormat", "")))
    return found


def variable_queries(doc: dict) -> list[tuple[str, str]]:
    """(variable name, its label_values query)."""
    out = []
    for var in doc["templating"]["list"]:
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        out.append((var["name"], query))
    return out


def family(name: str, histograms: set[str]) -> str:
    """The family a sample name belongs to (``_bucket``/``_sum``/``_count`` of a histogram)."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in histograms:
            return name[: -len(suffix)]
    return name


def parse_scrape(text: str) -> tuple[dict[str, str], dict[str, set[str]]]:
    """Family types from ``# TYPE`` lines, and the labels seen on each sample name."""
    types = {}
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line and not line.startswith("#"):
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group()
            inside = line[len(name):].partition("{")[2].rpartition("}")[0]
            labels.setdefault(name, set()).update(re.findall(r'([a-zA-Z_]\w*)="', inside))
    return types, labels


def call(port: int, path: str, body: dict, **headers: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(),
                     headers={"content-type": "application/json", **headers})
        response = conn.getresponse()
        response.read()
        return response.status
    except (http.client.HTTPException, OSError):
        return 0  # a cut stream
    finally:
        conn.close()


def write_clients(path: Path) -> str:
    limits = {"alice": "rpm=2", "bob": ""}
    path.write_text("".join(
        f"{name} {hashlib.sha256(secret.encode()).hexdigest()} {limits[name]}\n"
        for name, secret in SECRETS.items()))
    return str(path)


def write_credentials(path: Path, fake_upstream) -> str:
    """A token that expires within the refresh margin: the first call refreshes it."""
    access, refresh, expires_at = fake_upstream.issue_tokens(60)
    path.write_text(json.dumps({"claudeAiOauth": {
        "accessToken": access, "refreshToken": refresh, "expiresAt": int(expires_at * 1000),
        "scopes": ["user:inference", "user:profile"], "subscriptionType": "max"}}))
    path.chmod(0o600)
    return str(path)


@pytest.fixture(scope="module")
def scrape(fake_upstream, tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("grafana")
    gateway = start_gateway({
        "SHIM_SHARED_SECRET": "",
        "SHIM_CLIENTS_FILE": write_clients(tmp / "clients.txt"),
        "SHIM_ANTHROPIC_CREDENTIALS_FILE": write_credentials(tmp / ".credentials.json",
                                                              fake_upstream),
        "SHIM_ANTHROPIC_TOKEN_URL": f"{fake_upstream.url}/v1/oauth/token",
        "SHIM_ANTHROPIC_REFRESH_MARGIN_S": "300",
        "SHIM_GEMINI_KEYS": ",".join(FAKE_GEMINI_KEYS),
        "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
        "SHIM_GEMINI_UPSTREAM": fake_upstream.url,
        "SHIM_STATE_URL": "memory://",
    }, tmp / "gunicorn.log")
    dead_redis = start_gateway({
        "SHIM_SHARED_SECRET": "",
        "SHIM_CLIENTS_FILE": write_clients(tmp / "clients-redis.txt"),
        "SHIM_GEMINI_KEYS": ",".join(FAKE_GEMINI_KEYS),
        "SHIM_GEMINI_UPSTREAM": fake_upstream.url,
        "SHIM_STATE_URL": f"redis://127.0.0.1:{closed_port()}/0",
    }, tmp / "gunicorn-redis.log")
    try:
        port, gport = gateway.anthropic_port, gateway.gemini_port
        bob = {"x-api-key": SECRETS["bob"]}
        quota = {"x-fake-quota-headers": json.dumps(QUOTA_HEADERS)}
        assert call(port, "/v1/messages", MESSAGE, **bob, **quota) == 200
        assert call(port, "/v1/messages", {**MESSAGE, "stream": True}, **bob) == 200
        assert call(gport, GEMINI_PATH, {"contents": []},
                    **{"x-goog-api-key": SECRETS["bob"]}) == 200
        assert call(port, "/v1/messages", MESSAGE, **{"x-api-key": "wrong-secret-123456"}) == 401
        assert call(port, "/v1/messages", MESSAGE, **bob, **{"x-fake-scenario": "error:500"}) == 500
        call(port, "/v1/messages", {**MESSAGE, "stream": True}, **bob,
             **{"x-fake-scenario": "drop"})  # an upstream error: the stream is cut
        assert call(port, "/v1/messages", MESSAGE, **bob,
                    **{"x-fake-scenario": "refusal:third_party_extra_usage"}) == 400
        statuses = [call(port, "/v1/messages", MESSAGE, **{"x-api-key": SECRETS["alice"]})
                    for _ in range(3)]
        assert statuses[-1] == 429, statuses  # alice's rpm=2: a limit rejection
        assert call(dead_redis.gemini_port, GEMINI_PATH, {"contents": []},
                    **{"x-goog-api-key": SECRETS["alice"]}) == 200  # limits fail open
        time.sleep(0.3)  # the access record (and its metrics) closes just after the last byte
        return gateway.metrics_text() + dead_redis.metrics_text()
    finally:
        gateway.stop()
        dead_redis.stop()


def test_dashboard_is_importable_json_with_a_prometheus_input():
    doc = dashboard()
    assert doc["__inputs"] == [{**doc["__inputs"][0], "name": "DS_PROMETHEUS",
                                "type": "datasource", "pluginId": "prometheus"}]
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 36
    ids = [panel["id"] for panel in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert {name for name, _ in variable_queries(doc)} == {"provider", "client"}
    assert len(targets(doc)) >= 20


def test_every_metric_the_dashboard_queries_is_scraped(scrape):
    types, labels = parse_scrape(scrape)
    histograms = {name for name, kind in types.items() if kind == "histogram"}
    queried = {family(name, histograms)
               for _, expr, _ in targets(dashboard()) for name in METRIC.findall(expr)}
    queried |= {family(name, histograms)
                for _, query in variable_queries(dashboard()) for name in METRIC.findall(query)}
    sampled = {family(name, histograms) for name in labels}
    missing = {name for name in queried if name not in types or name not in sampled}
    assert missing <= set(ALLOWED_ABSENT), sorted(missing - set(ALLOWED_ABSENT))
    # An allowance nobody needs any more is removed, not kept "just in case".
    assert not set(ALLOWED_ABSENT) & sampled


def test_histogram_queries_use_the_histogram_series(scrape):
    types, _ = parse_scrape(scrape)
    for title, expr, _ in targets(dashboard()):
        for name in METRIC.findall(expr):
            if types.get(name) == "histogram":
                raise AssertionError(f"{title}: {name} is a histogram; query _bucket/_sum/_count")
        if "histogram_quantile" in expr:
            assert re.search(r"by \([^)]*\ble\b", expr), f"{title}: quantile without le"
            assert "_bucket" in expr, title


def test_every_label_the_dashboard_uses_is_on_its_metric(scrape):
    types, labels = parse_scrape(scrape)
    histograms = {name for name, kind in types.items() if kind == "histogram"}
    for title, expr, legend in targets(dashboard()):
        names = METRIC.findall(expr)
        # labels each metric is matched on: {label=~"..."} right after the name
        for name, matchers in re.findall(r"(shim_[a-z0-9_]+)\{([^}]*)\}", expr):
            used = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
            assert used <= labels[name], f"{title}: {name} has no {used - labels[name]}"
        carried = set().union(*(labels[name] for name in names))
        grouped = set()
        for clause in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            grouped |= {label.strip() for label in clause.split(",") if label.strip()}
        assert grouped <= carried, f"{title}: {expr} groups by {grouped - carried}"
        shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        assert shown <= (grouped if "by (" in expr else carried), f"{title}: legend {legend}"
        assert names and all(family(name, histograms) in types for name in names), title
    for variable, query in variable_queries(dashboard()):
        name, label = re.fullmatch(r"label_values\((shim_\w+),\s*(\w+)\)", query).groups()
        assert label == variable and label in labels[name], query
