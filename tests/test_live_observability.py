"""Access lines, metrics and readiness, live, through real gunicorn with 2 workers."""

from __future__ import annotations

import http.client
import json
import re
import time
import uuid

import pytest

from shim.keys import key_id
from tests.conftest import SECRET, start_gateway
from tests.fake_upstream import FAKE_GEMINI_KEYS, FAKE_OAUTH_TOKEN

ANTHROPIC_BODY = {"model": "claude-test-model", "max_tokens": 16,
                  "messages": [{"role": "user", "content": "hi"}]}
ACCESS_FIELDS = {
    "ts", "level", "event", "request_id", "provider", "method", "route", "model", "stream",
    "status", "upstream_status", "duration_ms", "ttfb_ms", "bytes_in", "bytes_out",
    "input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens",
    "stop_reason", "gemini_key_id", "claude_session_id", "quota_status", "quota_reset",
    "quota_5h_utilization", "quota_7d_utilization",
}


def call(port: int, method: str, path: str, body: dict | None = None, **headers: str):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload, headers={
            "content-type": "application/json", **{k.replace("_", "-"): v
                                                   for k, v in headers.items()}})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def access_lines(gateway) -> dict[str, dict]:
    """Every log line must parse as JSON; return the access lines by request id."""
    lines = [json.loads(line) for line in gateway.log_text().splitlines() if line.strip()]
    return {line["request_id"]: line for line in lines if line.get("event") == "access"}


def wait_for_line(gateway, request_id: str) -> dict:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        line = access_lines(gateway).get(request_id)
        if line:
            return line
        time.sleep(0.05)
    raise AssertionError(f"no access line for {request_id}")


@pytest.fixture(scope="module")
def traffic(gateway):
    """Plain and streamed calls on both ports, each with a known request id."""
    ids = {name: f"test-{name}-{uuid.uuid4().hex[:8]}" for name in
           ("anthropic_plain", "anthropic_stream", "gemini_plain", "gemini_stream", "denied")}
    auth = {"x_api_key": SECRET}
    call(gateway.anthropic_port, "POST", "/v1/messages?beta=true", ANTHROPIC_BODY,
         x_request_id=ids["anthropic_plain"], x_claude_code_session_id="session-42", **auth)
    call(gateway.anthropic_port, "POST", "/v1/messages", {**ANTHROPIC_BODY, "stream": True},
         x_request_id=ids["anthropic_stream"], x_fake_gap_ms="150", x_fake_events="4", **auth)
    gemini = {"x_goog_api_key": SECRET}
    call(gateway.gemini_port, "POST", "/v1beta/models/gemini-2.5-flash:generateContent",
         {"contents": []}, x_request_id=ids["gemini_plain"], **gemini)
    call(gateway.gemini_port, "POST",
         "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", {"contents": []},
         x_request_id=ids["gemini_stream"], x_fake_gap_ms="150", **gemini)
    call(gateway.anthropic_port, "POST", "/v1/messages", ANTHROPIC_BODY,
         x_request_id=ids["denied"], x_api_key="wrong-secret-123456")
    return {name: wait_for_line(gateway, rid) for name, rid in ids.items()}


def test_every_log_line_is_json_and_access_lines_have_every_field(gateway, traffic):
    for line in traffic.values():
        assert ACCESS_FIELDS <= set(line), ACCESS_FIELDS - set(line)
    assert access_lines(gateway)  # and the whole log parsed line by line


def test_plain_anthropic_call_is_logged_with_usage_session_and_quota(traffic):
    line = traffic["anthropic_plain"]
    assert (line["provider"], line["method"]) == ("anthropic", "POST")
    assert line["route"] == "/v1/messages"
    assert (line["status"], line["upstream_status"], line["stream"]) == (200, 200, False)
    assert line["model"] == "claude-test-model"
    assert (line["input_tokens"], line["output_tokens"]) == (12, 6)
    assert line["stop_reason"] == "end_turn"
    assert line["claude_session_id"] == "session-42"
    assert line["quota_status"] == "allowed"
    assert line["bytes_in"] == len(json.dumps(ANTHROPIC_BODY))
    assert line["bytes_out"] > 0 and 0 < line["ttfb_ms"] <= line["duration_ms"]


def test_streamed_anthropic_call_is_logged_with_gaps_events_and_usage_from_the_stream(traffic):
    line = traffic["anthropic_stream"]
    assert line["stream"] is True
    assert line["events"] == 10  # 3 opening events, 4 deltas, 3 closing events
    assert (line["input_tokens"], line["output_tokens"]) == (12, 4)
    assert line["stop_reason"] == "end_turn"
    assert line["model"] == "claude-test-model"
    assert 100 < line["max_gap_ms"] < 600  # upstream paced events 150 ms apart
    assert line["duration_ms"] > 9 * 150 * 0.8
    assert line["ttfb_ms"] < 150  # the first event was not held back


def test_gemini_calls_are_logged_with_key_id_model_and_usage(traffic):
    key_ids = {key_id(k) for k in FAKE_GEMINI_KEYS}
    for name in ("gemini_plain", "gemini_stream"):
        line = traffic[name]
        assert line["provider"] == "gemini"
        assert line["route"].startswith("/<any(v1beta,v1):version>/models/")
        assert line["model"] == "gemini-2.5-flash"
        assert line["gemini_key_id"] in key_ids
        assert (line["input_tokens"], line["output_tokens"]) == (5, 4)
        assert line["stop_reason"] == "STOP"
    assert traffic["gemini_stream"]["stream"] is True
    assert traffic["gemini_stream"]["events"] == 3


def test_a_denied_call_is_logged_with_its_route_and_status(traffic):
    line = traffic["denied"]
    assert (line["status"], line["route"], line["upstream_status"]) == (401, "/v1/messages", None)


def test_request_id_is_echoed_or_replaced_when_not_sane(gateway):
    _, headers, _ = call(gateway.anthropic_port, "GET", "/health", x_request_id="abc-123.x")
    assert headers["X-Request-Id"] == "abc-123.x"
    _, headers, _ = call(gateway.anthropic_port, "GET", "/health",
                         x_request_id="bad id <script>" + "x" * 200)
    assert re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-Id"])


def metric(text: str, name: str, missing: float | None = None, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        sample_labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found and missing is not None:
        return missing
    assert found, f"no sample {name} {labels}"
    return total


def scrape(gateway) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.metrics_port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        return response.read().decode()
    finally:
        conn.close()


def test_metrics_count_the_traffic_of_both_workers(gateway, traffic):
    before = metric(scrape(gateway), "shim_requests_total", missing=0.0, provider="gemini",
                    route="/<any(v1beta,v1):version>/models", status_class="2xx")
    # New connections for each call: gunicorn spreads them over both workers.
    for _ in range(12):
        call(gateway.gemini_port, "GET", "/v1beta/models", x_goog_api_key=SECRET)
    text = scrape(gateway)
    assert metric(text, "shim_requests_total", provider="gemini",
                  route="/<any(v1beta,v1):version>/models", status_class="2xx") == before + 12
    assert metric(text, "shim_requests_total", provider="anthropic", route="/v1/messages",
                  status_class="4xx") >= 1
    assert metric(text, "shim_tokens_total", provider="anthropic", model="claude-test-model",
                  kind="input") >= 24
    assert metric(text, "shim_request_duration_seconds_count", provider="anthropic",
                  route="/v1/messages") >= 3
    assert metric(text, "shim_ttfb_seconds_count", provider="gemini") >= 1  # streams only
    assert metric(text, "shim_stream_max_gap_seconds_count", provider="anthropic") >= 1
    assert metric(text, "shim_streams_in_flight", provider="anthropic") == 0
    assert metric(text, "shim_gemini_keys", state="available") == 6  # 3 keys x 2 workers
    assert metric(text, "shim_subscription_quota_status", status="allowed") == 1
    # Bounded labels: no secret, key, session id or request id in any sample.
    for forbidden in (SECRET, *FAKE_GEMINI_KEYS, FAKE_OAUTH_TOKEN, "session-42",
                      traffic["anthropic_plain"]["request_id"]):
        assert forbidden not in text
    pids = {re.search(r'pid="(\d+)"', line).group(1)
            for line in text.splitlines() if line.startswith("shim_gemini_keys{")}
    assert len(pids) == 2  # both workers report


def test_metrics_are_not_served_on_the_api_ports(gateway):
    for port in (gateway.anthropic_port, gateway.gemini_port):
        status, _, _ = call(port, "GET", "/metrics", x_api_key=SECRET)
        assert status == 404


def test_readiness_reports_each_provider_without_secrets(gateway, traffic):
    status, _, body = call(gateway.anthropic_port, "GET", "/health/ready")
    report = json.loads(body)
    assert status == 200 and report["status"] == "ready"
    assert report["providers"]["anthropic"]["credential"] == "oauth"
    assert report["providers"]["gemini"]["keys"]["available"] == 3
    for secret in (SECRET, FAKE_OAUTH_TOKEN, *FAKE_GEMINI_KEYS):
        assert secret not in body.decode()


def test_readiness_ignores_a_provider_left_unconfigured(gateway_api_key):
    status, _, body = call(gateway_api_key.gemini_port, "GET", "/health/ready")
    assert status == 200
    assert json.loads(body)["providers"]["gemini"]["configured"] is False


def test_readiness_is_503_when_every_gemini_key_is_cooling(fake_upstream, tmp_path):
    gw = start_gateway({"SHIM_GEMINI_KEYS": FAKE_GEMINI_KEYS[0],
                        "SHIM_GEMINI_UPSTREAM": fake_upstream.url}, tmp_path / "g.log")
    try:
        call(gw.gemini_port, "POST", "/v1beta/models/gemini-2.5-flash:generateContent",
             {"contents": []}, x_goog_api_key=SECRET, x_fake_limited_keys="0",
             x_fake_retry_delay="60s",
             # A quota of the whole project: a per-model one leaves the key to other models.
             x_fake_quota="GenerateRequestsPerMinutePerProject-FreeTier")
        status, _, body = call(gw.gemini_port, "GET", "/health/ready")
        assert status == 503
        assert json.loads(body)["providers"]["gemini"]["keys"]["cooling"] == 1
        assert call(gw.gemini_port, "GET", "/health")[0] == 200  # the LB check stays trivial
    finally:
        gw.stop()


def test_text_log_format_for_a_terminal(fake_upstream, tmp_path):
    gw = start_gateway({"SHIM_ANTHROPIC_TOKEN": FAKE_OAUTH_TOKEN, "SHIM_LOG_FORMAT": "text",
                        "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url}, tmp_path / "t.log")
    try:
        call(gw.anthropic_port, "POST", "/v1/messages", ANTHROPIC_BODY, x_api_key=SECRET)
        time.sleep(0.2)
        text = gw.log_text()
    finally:
        gw.stop()
    assert re.search(r"^\S+Z info +access request .*route=/v1/messages .*status=200", text, re.M)
    assert SECRET not in text
