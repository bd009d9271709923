"""Gemini key pool under 429s and dead keys, live: each test gets a fresh gateway.

A fresh single-worker gateway per test, because a benched key is state that
must not leak between tests, and one worker so the pool is the one we watch.
"""

from __future__ import annotations

import gzip
import http.client
import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from shim.keys import key_id
from shim.providers.gemini import PACIFIC, judge_key, readable
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


def call(
    gateway, test_id: str, path: str = GENERATE, **headers: str
) -> tuple[int, dict[str, str], bytes, float]:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.gemini_port, timeout=10)
    start = time.monotonic()
    try:
        conn.request("POST", path, body=BODY, headers={
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


# -- per (key, model): a quota of one model leaves the key to the others (issue #14) -----

PRO = "/v1beta/models/gemini-2.5-pro:generateContent"
PER_DAY = "GenerateRequestsPerDayPerProjectPerModel-FreeTier"


def seconds_to_pacific_midnight() -> float:
    local = datetime.now(PACIFIC)
    midnight = (local + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - local).total_seconds()


def readiness(gateway) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.gemini_port, timeout=10)
    try:
        conn.request("GET", "/health/ready")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


@pytest.fixture
def two_workers(fake_upstream, tmp_path):
    gw = start_gateway(
        {
            "SHIM_GEMINI_KEYS": ",".join(FAKE_GEMINI_KEYS),
            "SHIM_GEMINI_UPSTREAM": fake_upstream.url,
            "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
            "SHIM_WORKERS": "2",
        },
        tmp_path / "gunicorn.log",
    )
    yield gw
    gw.stop()


def test_a_per_day_quota_for_pro_benches_the_key_for_pro_only(
    two_workers, fake_upstream, test_id
):
    pro, flash = test_id + "-pro", test_id + "-flash"
    # Key 0 is out of pro for the day (the fake says so on every pro call); each
    # worker meets that 429 at most once, retries on the next key, and benches
    # (key 0, pro): 12 pro calls, all served, key 0 tried at most twice.
    for _ in range(12):
        status, _, _, _ = call(two_workers, pro, PRO, x_fake_limited_keys="0",
                               x_fake_quota=PER_DAY, x_fake_retry_delay="1s")
        assert status == 200
    assert keys_used(fake_upstream, pro).count(0) <= 2
    assert keys_used(fake_upstream, pro).count(0) >= 1
    # Flash calls keep using key 0 (the fake would 429 nothing here).
    for _ in range(6):
        assert call(two_workers, flash)[0] == 200
    assert sorted(set(keys_used(fake_upstream, flash))) == [0, 1, 2]
    # Past the 1 s retry delay: the pro bench lasts until the daily reset.
    time.sleep(1.2)
    after = test_id + "-pro-after"
    for _ in range(6):
        assert call(two_workers, after, PRO)[0] == 200
    assert 0 not in keys_used(fake_upstream, after)
    lines = [json.loads(line) for line in two_workers.log_text().splitlines()]
    cooling = [line for line in lines if line.get("event") == "gemini_key_cooling"]
    assert cooling and all(line["model"] == "gemini-2.5-pro" for line in cooling)
    assert all(line["quota"] == "per_day" for line in cooling)


def test_with_every_key_out_of_pro_pro_gets_429_until_the_reset_and_flash_is_served(
    two_workers, fake_upstream, test_id
):
    limited = {"x_fake_limited_keys": "0,1,2", "x_fake_quota": PER_DAY,
               "x_fake_retry_delay": "1s"}
    quiet = 0
    for _ in range(20):  # until both workers benched every key for pro
        before = len(fake_upstream.matching(test_id))
        status, headers, body, elapsed = call(two_workers, test_id, PRO, **limited)
        assert status == 429
        quiet = quiet + 1 if len(fake_upstream.matching(test_id)) == before else 0
        if quiet == 6:
            break
    else:
        pytest.fail("pro calls kept reaching upstream")
    # Answered by the gateway itself: the 429 says when a key is back for pro.
    assert json.loads(body)["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert abs(int(headers["Retry-After"]) - seconds_to_pacific_midnight()) < 5
    assert elapsed < 0.5
    flash = test_id + "-flash"
    for _ in range(6):
        assert call(two_workers, flash)[0] == 200
    assert sorted(set(keys_used(fake_upstream, flash))) == [0, 1, 2]
    # Readiness: still ready (every key serves flash), pro named as unavailable
    # by a worker that met the 429s (memory:// benches are per worker).
    seen = []
    for _ in range(10):
        report = readiness(two_workers)
        gemini = report["providers"]["gemini"]
        assert report["status"] == "ready" and gemini["keys"]["available"] == 3
        if gemini["models_unavailable"]:
            seen.append(gemini)
    assert seen, "no worker reported its benches"
    assert [sorted(k["benched_models"]) for k in seen[0]["per_key"]] == [
        ["gemini-2.5-pro"]] * 3
    wait = seen[0]["models_unavailable"]["gemini-2.5-pro"]
    assert abs(wait - seconds_to_pacific_midnight()) < 5
    text = two_workers.metrics_text()
    assert 'shim_gemini_keys{' in text and 'state="model_benched"' in text


def test_a_gzipped_quota_answer_is_judged_per_model_too(pool_gateway, fake_upstream, test_id):
    # SDKs offer gzip, and Google compresses its error bodies when offered.
    status, _, _, _ = call(pool_gateway, test_id, PRO, x_fake_limited_keys="0",
                           x_fake_quota=PER_DAY, accept_encoding="gzip")
    assert status == 200
    assert keys_used(fake_upstream, test_id) == [0, 1]
    assert fake_upstream.matching(test_id)[0].header("accept-encoding") == "gzip"
    for _ in range(4):
        assert call(pool_gateway, test_id, PRO, accept_encoding="gzip")[0] == 200
    assert 0 not in keys_used(fake_upstream, test_id)[2:]
    for _ in range(3):  # flash: key 0 serves it in turn
        assert call(pool_gateway, test_id)[0] == 200
    assert 0 in keys_used(fake_upstream, test_id)[-3:]


def test_models_list_calls_are_not_held_back_by_a_model_bench(
    pool_gateway, fake_upstream, test_id
):
    for _ in range(2):  # keys 0, 1 then 2, 0: every key out of pro for the day
        call(pool_gateway, test_id, PRO, x_fake_limited_keys="0,1,2", x_fake_quota=PER_DAY)
    conn = http.client.HTTPConnection("127.0.0.1", pool_gateway.gemini_port, timeout=10)
    try:
        conn.request("GET", "/v1beta/models", headers={"x-goog-api-key": SECRET})
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_a_pro_bench_is_shared_by_two_gateways_on_one_redis(
    fake_upstream, redis_server, tmp_path, test_id
):
    redis_server.command("DEL", "shim:gemini:benched")
    env = {
        "SHIM_GEMINI_KEYS": ",".join(FAKE_GEMINI_KEYS),
        "SHIM_GEMINI_UPSTREAM": fake_upstream.url,
        "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
        "SHIM_WORKERS": "2",
        "SHIM_STATE_URL": redis_server.url,
    }
    first = start_gateway(env, tmp_path / "first.log")
    second = start_gateway(env, tmp_path / "second.log")
    try:
        # On the first gateway, until a pro call met key 0's per-day 429.
        for _ in range(6):
            status, _, _, _ = call(first, test_id, PRO, x_fake_limited_keys="0",
                                   x_fake_quota=PER_DAY)
            assert status == 200
            if 0 in keys_used(fake_upstream, test_id):
                break
        else:
            pytest.fail("key 0 was never tried")
        fields = redis_server.command("HKEYS", "shim:gemini:benched").decode()
        assert f"{key_id(FAKE_GEMINI_KEYS[0])}:gemini-2.5-pro" in fields
        assert int(redis_server.command("TTL", "shim:gemini:benched")[1:]) > 0
        time.sleep(0.6)  # past the shared-bench sync interval
        pro, flash = test_id + "-pro", test_id + "-flash"
        for _ in range(6):
            assert call(second, pro, PRO)[0] == 200
        for _ in range(6):  # one worker gets 3 of them at least: a full round
            assert call(second, flash)[0] == 200
        assert 0 not in keys_used(fake_upstream, pro)
        assert 0 in keys_used(fake_upstream, flash)
    finally:
        first.stop()
        second.stop()
        redis_server.command("DEL", "shim:gemini:benched")


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


NOON_PACIFIC = datetime(2026, 11, 26, 20, 0, tzinfo=UTC)  # 12:00 at UTC-8: 12 h to the reset
HALF_DAY = 12 * 3600.0


@pytest.mark.parametrize(
    ("delay", "quota", "retry_after", "expected"),
    [
        # (whole-key bench s, (key, model) bench s, quota kind)
        ("34s", "GenerateRequestsPerMinutePerProjectPerModel-FreeTier", None,
         (0.0, 34.0, "per_minute")),
        ("5s", "GenerateRequestsPerDayPerProjectPerModel-FreeTier", None,
         (0.0, HALF_DAY, "per_day")),
        ("34s", "GenerateRequestsPerMinutePerProject-FreeTier", None, (34.0, 0.0, "per_minute")),
        ("5s", "GenerateRequestsPerDay-FreeTier", None, (HALF_DAY, 0.0, "per_day")),
        ("7s", "SomeNewQuota", None, (7.0, 0.0, "")),
        ("1.5s", None, None, (1.5, 0.0, "")),
        (None, None, "12", (12.0, 0.0, "")),
        (None, None, None, (60.0, 0.0, "")),
        ("bogus", None, None, (60.0, 0.0, "")),
    ],
)
def test_429_bench_rule(delay, quota, retry_after, expected):
    verdict = judge_key(429, retry_after, quota_body(delay, quota), NOON_PACIFIC)
    assert verdict.action == "cool_down"
    assert (verdict.seconds, verdict.model_seconds, verdict.quota) == expected


def test_a_quota_that_names_a_model_dimension_is_per_model():
    body = json.dumps({"error": {"code": 429, "details": [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
            {"quotaId": "GenerateContentInputTokensPerModelPerMinute-FreeTier",
             "quotaDimensions": {"location": "global", "model": "gemini-2.5-pro"}},
            {"quotaId": "GenerateRequestsPerDayPerProject", "quotaDimensions": {}}]},
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "20s"}]}}).encode()
    verdict = judge_key(429, None, body, NOON_PACIFIC)
    # Both benches: the project-wide daily quota for the key, the per-minute one for the model.
    assert (verdict.seconds, verdict.model_seconds, verdict.delay) == (HALF_DAY, 20.0, 20.0)


def test_a_compressed_error_body_is_read_like_a_plain_one():
    body = quota_body("5s", "GenerateRequestsPerDayPerProjectPerModel-FreeTier")
    assert readable(gzip.compress(body), "gzip") == body
    assert readable(body, None) == body
    assert readable(b"\x00not gzip", "gzip") == b""
    assert readable(body, "compress") == b""  # a coding nothing here decodes


def test_per_day_quota_cools_until_pacific_midnight():
    verdict = judge_key(429, None, quota_body("5s", "GenerateRequestsPerDay-FreeTier"),
                        NOON_PACIFIC)
    assert (verdict.action, verdict.quota) == ("cool_down", "per_day")
    assert verdict.seconds == HALF_DAY


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
