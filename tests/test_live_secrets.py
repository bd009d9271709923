"""No secret ever reaches a log line or a response, even on the failure paths."""

from __future__ import annotations

import http.client
import json

from tests.conftest import ALL_SECRETS, SECRET

WRONG = "wrong-but-secret-looking-value-42"


def request(gateway, provider, method, path, body=b"", headers=None):
    conn = gateway.connection(provider)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        try:
            payload = response.read()
        except http.client.IncompleteRead as cut:  # an aborted stream: keep what came
            payload = cut.partial
        return response.status, response.getheaders(), payload
    finally:
        conn.close()


def test_failures_leave_no_secret_in_logs_or_responses(gateway, gateway_unreachable):
    body = json.dumps({"model": "m", "max_tokens": 1, "messages": [], "stream": True}).encode()
    calls = [
        (gateway, "gemini", "POST", f"/v1beta/models/g:generateContent?key={WRONG}", b"{}", {}),
        (
            gateway,
            "gemini",
            "POST",
            f"/v1beta/models/g:generateContent?key={SECRET}",
            b"{}",
            {"x-fake-scenario": "error:429"},
        ),
        (
            gateway,
            "gemini",
            "POST",
            f"/v1beta/models/g:streamGenerateContent?alt=sse&key={SECRET}",
            b"{}",
            {"x-fake-scenario": "drop"},
        ),
        (gateway, "gemini", "GET", f"/v1beta/nowhere?key={SECRET}", b"", {}),
        (gateway, "anthropic", "POST", "/v1/messages", body, {"x-api-key": WRONG}),
        (
            gateway,
            "anthropic",
            "POST",
            "/v1/messages",
            body,
            {"x-api-key": SECRET, "x-fake-scenario": "stall-mid:4"},
        ),
        (
            gateway,
            "anthropic",
            "POST",
            "/v1/messages",
            body,
            {"authorization": f"Bearer {SECRET}", "x-fake-scenario": "drop"},
        ),
        (
            gateway,
            "anthropic",
            "POST",
            "/v1/messages",
            body,
            {"x-api-key": SECRET, "x-fake-scenario": "stall:3"},
        ),
        (gateway_unreachable, "anthropic", "POST", "/v1/messages", body, {"x-api-key": SECRET}),
        (gateway_unreachable, "gemini", "GET", f"/v1/models?key={SECRET}", b"", {}),
    ]
    responses = [request(*call) for call in calls]

    statuses = [status for status, _, _ in responses]
    assert statuses == [401, 429, 200, 404, 401, 200, 200, 504, 502, 502]
    for _, headers, payload in responses:
        text = payload.decode("latin-1") + json.dumps(headers)
        for secret in (*ALL_SECRETS, WRONG):
            assert secret not in text
    logs = gateway.log_text() + gateway_unreachable.log_text()
    assert "upstream_stream_failed" in logs  # the failures above were logged...
    for secret in (*ALL_SECRETS, WRONG):
        assert secret not in logs  # ...without any secret
