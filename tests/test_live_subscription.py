"""Subscription refusals and quota headers, live: real gunicorn (2 workers) against the fake.

The client must get upstream's answer untouched (status and the exact bytes
on the wire, compressed or not) while shim classifies it in the access line,
the refusal counter and readiness, and carries the quota headers into the
access line and the gauges. Readiness is per worker: a check sent on the same
keep-alive connection as the refused call reaches the worker that saw it.
"""

from __future__ import annotations

import http.client
import json
import time
import uuid

import pytest

from tests.conftest import SECRET
from tests.fake_upstream import REFUSALS
from tests.test_live_observability import access_lines, metric, scrape, wait_for_line

BODY = json.dumps({"model": "claude-test-model", "max_tokens": 16,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()
KIND = {
    "third_party_extra_usage": "third_party_extra_usage",
    "third_party_org": "third_party_extra_usage",
    "claude_code_only": "claude_code_only",
    "org_disabled": "org_disabled",
    "oauth_not_allowed": "oauth_not_allowed",
    "oauth_not_supported": "oauth_not_supported",
}


class Client:
    """One keep-alive connection to the Anthropic port: every call reaches the same worker."""

    def __init__(self, gateway):
        self.conn = http.client.HTTPConnection("127.0.0.1", gateway.anthropic_port, timeout=15)

    def call(self, method: str = "POST", path: str = "/v1/messages", **headers: str):
        request_id = f"sub-{uuid.uuid4().hex[:12]}"
        self.conn.request(method, path, body=BODY if method == "POST" else None, headers={
            "content-type": "application/json", "x-api-key": SECRET, "x-request-id": request_id,
            **{k.replace("_", "-"): v for k, v in headers.items()}})
        response = self.conn.getresponse()
        return response.status, dict(response.getheaders()), response.read(), request_id

    def ready(self) -> tuple[int, dict]:
        status, _, body, _ = self.call("GET", "/health/ready")
        return status, json.loads(body)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def client(gateway):
    c = Client(gateway)
    yield c
    # Leave this worker as a success leaves it: later tests expect a ready gateway.
    c.call()
    c.close()


@pytest.mark.parametrize("encoding", ["gzip", "identity"])
@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_a_refusal_is_relayed_untouched_and_classified(gateway, fake_upstream, client, test_id,
                                                       name, encoding):
    before = metric(scrape(gateway), "shim_subscription_refusals_total", missing=0.0,
                    kind=KIND[name])
    status, headers, body, request_id = client.call(
        x_fake_scenario=f"refusal:{name}", x_fake_encoding=encoding, x_test_id=test_id,
        accept_encoding="gzip, deflate, br, zstd")
    assert status == REFUSALS[name][0]
    assert body == bytes(fake_upstream.sent[test_id])  # the bytes upstream put on the wire
    assert headers.get("Content-Encoding") == (None if encoding == "identity" else encoding)
    if encoding == "gzip":
        assert body[:2] == b"\x1f\x8b"
    line = wait_for_line(gateway, request_id)
    assert (line["refusal"], line["status"], line["upstream_status"]) == (
        KIND[name], status, status)
    after = metric(scrape(gateway), "shim_subscription_refusals_total", kind=KIND[name])
    assert after == before + 1


def test_other_errors_and_successes_carry_no_refusal(gateway, client):
    _, _, _, failed = client.call(x_fake_scenario="error:400")
    _, _, _, ok = client.call()
    assert wait_for_line(gateway, failed)["refusal"] is None
    assert wait_for_line(gateway, ok)["refusal"] is None


@pytest.mark.parametrize("name", ["org_disabled", "oauth_not_allowed"])
def test_a_refusal_that_serves_no_one_makes_readiness_503_until_a_success(client, name):
    client.call()
    started = int(time.time())
    client.call(x_fake_scenario=f"refusal:{name}", accept_encoding="gzip")
    status, report = client.ready()
    anthropic = report["providers"]["anthropic"]
    assert status == 503 and report["status"] == "unavailable"
    assert anthropic["ready"] is False and anthropic["credential_state"] == "refused"
    assert anthropic["last_refusal"]["kind"] == name
    assert anthropic["last_refusal"]["upstream_status"] == REFUSALS[name][0]
    assert started <= anthropic["last_refusal"]["at"] <= int(time.time())
    client.call()  # the credential served again
    status, report = client.ready()
    assert status == 200 and report["providers"]["anthropic"]["credential_state"] == "ok"
    assert report["providers"]["anthropic"]["last_refusal"]["kind"] == name  # still shown


def test_a_refusal_for_some_clients_is_shown_but_leaves_the_gateway_ready(client):
    client.call(x_fake_scenario="refusal:claude_code_only")
    status, report = client.ready()
    anthropic = report["providers"]["anthropic"]
    assert status == 200 and anthropic["ready"] is True
    assert anthropic["credential_state"] == "limited"
    assert anthropic["last_refusal"]["kind"] == "claude_code_only"


def quota_headers(**values: object) -> str:
    return json.dumps({k.replace("_", "-"): str(v) for k, v in values.items()})


def test_quota_headers_reach_the_access_line_and_the_gauges(gateway, client):
    # Values no other test sends, so this worker sees a change and writes.
    reset_5h, reset_7d = 1_790_000_000 + int(time.time()) % 10_000, 1_791_000_000
    used_5h, used_7d = round(0.1 + (time.time() % 1) / 10, 4), 1.04
    sent = {"status": "allowed", "reset": reset_5h, "representative_claim": "seven_day_opus",
            "5h_utilization": used_5h, "7d_utilization": used_7d, "5h_reset": reset_5h,
            "7d_reset": reset_7d, "overage_status": "rejected",
            "overage_disabled_reason": "out_of_credits", "fallback": "available",
            "fallback_percentage": "0.5"}
    _, _, _, request_id = client.call(x_fake_quota_headers=quota_headers(**sent))
    line = wait_for_line(gateway, request_id)
    assert line["quota_status"] == "allowed"
    assert line["quota_reset"] == str(reset_5h)
    assert line["quota_representative_claim"] == "seven_day_opus"
    assert (line["quota_5h_utilization"], line["quota_7d_utilization"]) == (used_5h, used_7d)
    assert (line["quota_5h_reset"], line["quota_7d_reset"]) == (str(reset_5h), str(reset_7d))
    assert line["quota_overage_status"] == "rejected"
    assert line["quota_overage_disabled_reason"] == "out_of_credits"
    assert (line["quota_fallback"], line["quota_fallback_percentage"]) == ("available", 0.5)

    text = scrape(gateway)
    assert metric(text, "shim_subscription_quota_status", status="allowed") == 1
    assert metric(text, "shim_subscription_quota_reset_timestamp_seconds") == reset_5h
    assert metric(text, "shim_subscription_quota_utilization_ratio", window="5h") == used_5h
    assert metric(text, "shim_subscription_quota_utilization_ratio", window="7d") == used_7d
    assert metric(text, "shim_subscription_quota_window_reset_timestamp_seconds",
                  window="7d") == reset_7d
    assert metric(text, "shim_subscription_quota_representative_claim",
                  claim="seven_day_opus") == 1
    assert metric(text, "shim_subscription_quota_representative_claim", claim="five_hour") == 0
    assert metric(text, "shim_subscription_quota_overage_status", status="rejected") == 1
    assert metric(text, "shim_subscription_quota_overage_disabled",
                  reason="out_of_credits") == 1
    assert metric(text, "shim_subscription_quota_fallback_available") == 1
    assert metric(text, "shim_subscription_quota_fallback_ratio") == 0.5
    status, report = client.ready()
    assert report["providers"]["anthropic"]["quota_5h_utilization"] == used_5h
    assert report["providers"]["anthropic"]["quota_representative_claim"] == "seven_day_opus"


def warnings_for(gateway, request_ids: set[str]) -> list[dict]:
    lines = [json.loads(line) for line in gateway.log_text().splitlines() if line.strip()]
    return [line for line in lines
            if line.get("event") == "quota_warning" and line.get("request_id") in request_ids]


def test_crossing_0_8_logs_one_warning_not_one_per_request(gateway, client):
    below = quota_headers(status="allowed", **{"5h_utilization": 0.5, "7d_utilization": 0.1})
    client.call(x_fake_quota_headers=below)
    ids = set()
    for used in (0.85, 0.85, 0.86, 0.9, 0.9):
        above = quota_headers(status="allowed", **{"5h_utilization": used,
                                                   "7d_utilization": 0.1})
        ids.add(client.call(x_fake_quota_headers=above)[3])
    for request_id in ids:
        wait_for_line(gateway, request_id)
    warnings = warnings_for(gateway, ids)
    assert [(w["window"], w["value"]) for w in warnings] == [("5h", 0.85)]
    assert warnings[0]["level"] == "warning"


def test_a_warning_status_logs_one_warning_per_worker_at_most(gateway, client):
    # New connections: calls spread over both workers; each logs the change it sees once.
    ids = set()
    for _ in range(8):
        other = Client(gateway)
        try:
            ids.add(other.call(x_fake_quota_headers=quota_headers(
                status="allowed_warning", representative_claim="five_hour"))[3])
        finally:
            other.close()
    for request_id in ids:
        wait_for_line(gateway, request_id)
    warnings = warnings_for(gateway, ids)
    assert 1 <= len(warnings) <= 2
    assert {(w["window"], w["value"]) for w in warnings} == {("five_hour", "allowed_warning")}
    for request_id in ids:  # no token in any of those lines
        assert SECRET not in json.dumps(access_lines(gateway)[request_id])
    # Back to allowed on this test's way out, on both workers as far as new connections go.
    for _ in range(8):
        other = Client(gateway)
        try:
            other.call()
        finally:
            other.close()
