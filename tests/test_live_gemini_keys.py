"""Gemini key pool under 429s and dead keys, live: each test gets a fresh gateway.

A fresh single-worker gateway per test, because a benched key is state that
must not leak between tests, and one worker so the pool is the one we watch.
"""

from __future__ import annotations

import http.client
import json
import time
from datetime import UTC

import pytest

from shim.providers.gemini import judge_key
from tests.conftest import SECRET, start_gateway
from tests.fake_upstream import FAKE_GEMINI_KEYS

GENERATE = "/v1beta/models/gemini-2.5-flash:generateContent"
BODY = json.dumps({"contents": [{"parts": [{"text": "hi"}]}]}).encode()


@pytest.fixture
def pool_gateway(fake_upstream, tmp_path):
    gw = start_gateway(
        {
            "SHIM_GEMINI_KEYS": ",".join(FAKE_GEMINI_KEYS),
            "SHIM_GEMINI_UPSTREAM": fake_upstream.url,
            "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
        },
        tmp_path / "gunicorn.log",
    )
    yield gw
    gw.stop()


def call(gateway, test_id: str, **headers: str) -> tuple[int, dict[str, str], bytes, float]:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.gemini_port, timeout=10)
    start = time.monotonic()
    try:
        conn.request("POST", GENERATE, body=BODY, headers={
            "x-goog-api-key": SECRET, "content-type": "application/json", "x-test-id": test_id,
            **{k.replace("_", "-"): v for k, v in headers.items()},
        })
        response = conn.getresponse()
        body = response.read()
        return response.status, dict(response.getheaders()), body, time.monotonic() - start
    finally:
        conn.close()


def keys_used(fake_upstream, test_id: str) -> list[int]:
    return [FAKE_GEMINI_KEYS.index(r.header("x-goog-api-key"))
            for r in fake_upstream.matching(test_id)]


def test_429_on_one_key_is_retried_once_on_the_next_and_the_key_is_benched(
    pool_gateway, fake_upstream, test_id
):
    status, _, body, _ = call(pool_gateway, test_id, x_fake_limited_keys="0",
                              x_fake_retry_delay="1.5s")
    assert status == 200
    assert json.loads(body)["candidates"][0]["content"]["parts"][0]["text"]
    assert keys_used(fake_upstream, test_id) == [0, 1]

    # Key 0 cools for 1.5 s: the next calls rotate over keys 2 and 1 only.
    for _ in range(4):
        assert call(pool_gateway, test_id)[0] == 200
    assert 0 not in keys_used(fake_upstream, test_id)[2:]

    time.sleep(1.6)
    for _ in range(3):
        assert call(pool_gateway, test_id)[0] == 200
    assert 0 in keys_used(fake_upstream, test_id)[6:]


def test_when_every_key_cools_the_client_gets_a_quick_429_with_the_soonest_return(
    pool_gateway, fake_upstream, test_id
):
    limited = {"x_fake_limited_keys": "0,1,2", "x_fake_retry_delay": "40s"}
    # First call: key 0 then key 1 are limited; the second 429 is relayed as upstream sent it.
    status, headers, body, _ = call(pool_gateway, test_id, **limited)
    assert status == 429
    assert json.loads(body)["error"]["details"]  # upstream's own body, details and all
    # Second call: key 2 is limited, and no key is left to retry on.
    status, headers, body, _ = call(pool_gateway, test_id, **limited)
    assert status == 429
    assert json.loads(body)["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert keys_used(fake_upstream, test_id) == [0, 1, 2]

    # Now every key cools: answered at once, nothing sent upstream, no retry loop.
    status, headers, body, elapsed = call(pool_gateway, test_id)
    assert status == 429
    assert json.loads(body)["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert 38 <= int(headers["Retry-After"]) <= 41
    assert elapsed < 0.5
    assert len(fake_upstream.matching(test_id)) == 3


def test_a_key_upstream_calls_invalid_is_taken_out_of_rotation(
    pool_gateway, fake_upstream, test_id
):
    status, _, _, _ = call(pool_gateway, test_id, x_fake_invalid_keys="0")
    assert status == 200
    assert keys_used(fake_upstream, test_id) == [0, 1]
    for _ in range(6):
        assert call(pool_gateway, test_id)[0] == 200
    assert keys_used(fake_upstream, test_id)[2:] == [2, 1, 2, 1, 2, 1]
    log = pool_gateway.log_text()
    assert "gemini_key_disabled" in log
    for key in FAKE_GEMINI_KEYS:
        assert key not in log


def test_a_per_day_quota_benches_the_key_until_the_daily_reset(
    pool_gateway, fake_upstream, test_id
):
    status, _, _, _ = call(
        pool_gateway, test_id, x_fake_limited_keys="0", x_fake_retry_delay="1s",
        x_fake_quota="GenerateRequestsPerDayPerProjectPerModel-FreeTier",
    )
    assert status == 200
    time.sleep(1.2)  # past the 1 s retryDelay: a per-minute bench would be over
    for _ in range(4):
        assert call(pool_gateway, test_id)[0] == 200
    assert 0 not in keys_used(fake_upstream, test_id)[2:]
    lines = [json.loads(line) for line in pool_gateway.log_text().splitlines()]
    assert any(line.get("quota") == "per_day" for line in lines)


def test_an_error_that_is_about_the_request_is_not_retried(pool_gateway, fake_upstream, test_id):
    status, _, body, _ = call(pool_gateway, test_id, x_fake_scenario="error:400")
    assert status == 400
    assert json.loads(body)["error"]["message"] == "Fake upstream error."
    assert len(fake_upstream.matching(test_id)) == 1


# -- the verdict itself, pure ------------------------------------------------------------


def quota_body(delay: str | None, quota: str | None) -> bytes:
    details = []
    if quota:
        details.append({"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [{"quotaId": quota}]})
    if delay:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay})
    return json.dumps({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
                                 "message": "quota", "details": details}}).encode()


@pytest.mark.parametrize(
    ("delay", "quota", "retry_after", "expected"),
    [
        ("34s", "GenerateRequestsPerMinutePerProjectPerModel-FreeTier", None, 34.0),
        ("1.5s", None, None, 1.5),
        (None, None, "12", 12.0),
        (None, None, None, 60.0),
        ("bogus", None, None, 60.0),
    ],
)
def test_429_cool_down_length(delay, quota, retry_after, expected):
    verdict = judge_key(429, retry_after, quota_body(delay, quota))
    assert (verdict.action, verdict.seconds) == ("cool_down", expected)


def test_per_day_quota_cools_until_pacific_midnight():
    from datetime import datetime

    now = datetime(2026, 11, 26, 20, 0, tzinfo=UTC)  # 12:00 at UTC-8
    verdict = judge_key(429, None, quota_body("5s", "GenerateRequestsPerDay-FreeTier"), now)
    assert (verdict.action, verdict.quota) == ("cool_down", "per_day")
    assert verdict.seconds == 12 * 3600


@pytest.mark.parametrize(
    ("status", "body", "action"),
    [
        (400, {"error": {"message": "API key not valid. Please pass a valid API key."}}, "disable"),
        (403, {"error": {"message": "x", "details": [{"reason": "API_KEY_SERVICE_BLOCKED"}]}},
         "disable"),
        (400, {"error": {"message": "Invalid JSON payload received."}}, "keep"),
        (403, {"error": {"message": "The caller does not have permission"}}, "keep"),
        (400, "not json at all", "keep"),
    ],
)
def test_dead_key_verdicts(status, body, action):
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    assert judge_key(status, None, raw).action == action
