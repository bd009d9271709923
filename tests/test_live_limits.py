"""Per-client limits and shared state, live: real gunicorn+gevent, real redis-server, real SDKs.

- one gateway on ``memory://`` (1 worker, so its per-worker counts are the
  whole truth): each limit refuses in the provider's shape with Retry-After,
  refused calls never reach upstream, clients without limits are untouched;
- two gateways (separate gunicorn masters, 2 workers each) on one Redis: a
  limit of N holds across both, and a Gemini key benched by one is skipped by
  the other;
- Redis killed mid-run: streams in flight finish, calls keep flowing (limits
  fail open, counted), and limits come back with Redis.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
import uuid

import anthropic
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from tests.conftest import RedisServer, free_port, start_gateway
from tests.fake_upstream import FAKE_API_KEY, FAKE_GEMINI_KEYS

SECRETS = {
    name: f"{name}-secret-{uuid.uuid4().hex}"
    for name in ("alice", "bob", "carol", "dave", "erin", "frank", "gina")
}
LIMITS = {
    "alice": "rpm=3",
    "bob": "concurrency=1",
    "carol": "tokens_per_day=30",
    "erin": "rpm=4",
    "frank": "concurrency=2",
    "gina": "rpm=2",
}
MESSAGE = json.dumps(
    {
        "model": "claude-test-model",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
    }
)
GEMINI_PATH = "/v1beta/models/gemini-2.5-flash:generateContent"
GEMINI_BODY = json.dumps({"contents": [{"parts": [{"text": "hi"}]}]})


def clients_file(tmp_path) -> str:
    path = tmp_path / "clients.txt"
    lines = [
        f"{name} {hashlib.sha256(secret.encode()).hexdigest()} {LIMITS.get(name, '')}"
        for name, secret in SECRETS.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def gateway_env(tmp, upstream_url: str, workers: int, state_url: str = "memory://") -> dict:
    """A gateway of named clients only (no shared secret) in front of the fake."""
    return {
        "SHIM_CLIENTS_FILE": clients_file(tmp),
        "SHIM_ANTHROPIC_API_KEY": FAKE_API_KEY,
        "SHIM_GEMINI_KEYS": ",".join(FAKE_GEMINI_KEYS),
        "SHIM_ANTHROPIC_UPSTREAM": upstream_url,
        "SHIM_GEMINI_UPSTREAM": upstream_url,
        "SHIM_SHARED_SECRET": "",
        "SHIM_WORKERS": str(workers),
        "SHIM_STATE_URL": state_url,
    }


def call(
    port: int,
    client: str,
    test_id: str,
    *,
    stream: bool = False,
    gap_ms: int = 0,
    events: int = 3,
    gemini: bool = False,
    headers: dict | None = None,
):
    """One call, read to its end: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        sent = {
            "x-test-id": test_id,
            "content-type": "application/json",
            "x-fake-gap-ms": str(gap_ms),
            "x-fake-events": str(events),
            **(headers or {}),
        }
        if gemini:
            sent["x-goog-api-key"] = SECRETS[client]
            conn.request("POST", GEMINI_PATH, GEMINI_BODY, sent)
        else:
            sent.update({"x-api-key": SECRETS[client], "anthropic-version": "2023-06-01"})
            body = json.loads(MESSAGE) | ({"stream": True} if stream else {})
            conn.request("POST", "/v1/messages", json.dumps(body), sent)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def in_background(fn, *args, **kwargs) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, result


def assert_anthropic_429(status, headers, body, retry_after: int | None = None):
    assert status == 429
    error = json.loads(body)
    assert error["type"] == "error" and error["error"]["type"] == "rate_limit_error"
    if retry_after is not None:
        assert headers["Retry-After"] == str(retry_after)
    assert int(headers["Retry-After"]) >= 1


def readiness(port: int) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health/ready")
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def upstream_calls(fake_upstream, test_id: str) -> int:
    return len(fake_upstream.matching(test_id))


def scrape(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


# -- one gateway, memory:// -------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(fake_upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits_memory")
    gw = start_gateway(gateway_env(tmp, fake_upstream.url, 1), tmp / "gunicorn.log")
    yield gw
    gw.stop()


def test_rpm_refuses_past_the_burst_on_both_ports_and_never_forwards(limited, fake_upstream):
    test_id = uuid.uuid4().hex
    statuses = [call(limited.anthropic_port, "alice", test_id)[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert_anthropic_429(*call(limited.anthropic_port, "alice", test_id), retry_after=20)
    # The limit is the client's, not the port's: Gemini refuses too, in Google's shape.
    status, headers, body = call(limited.gemini_port, "alice", test_id, gemini=True)
    assert status == 429 and int(headers["Retry-After"]) in (19, 20)
    assert json.loads(body)["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert upstream_calls(fake_upstream, test_id) == 3
    # Others are not slowed by alice's limit.
    assert [call(limited.anthropic_port, "dave", test_id)[0] for _ in range(6)] == [200] * 6


def test_concurrency_holds_a_slot_for_the_whole_stream(limited, fake_upstream):
    test_id = uuid.uuid4().hex
    thread, result = in_background(
        call, limited.anthropic_port, "bob", test_id, stream=True, gap_ms=250, events=6
    )
    time.sleep(0.5)  # the stream is running
    assert_anthropic_429(*call(limited.anthropic_port, "bob", test_id), retry_after=1)
    thread.join(10)
    status, _, body = result[0]
    assert status == 200 and b"event: message_stop" in body
    # The slot came back when the stream ended.
    assert call(limited.anthropic_port, "bob", test_id)[0] == 200
    assert upstream_calls(fake_upstream, test_id) == 2


def test_tokens_per_day_count_usage_from_answers_and_streams(limited):
    test_id = uuid.uuid4().hex
    # The fake reports 12 in + 6 out for a message, 12 in + 3 out for a 3-delta stream.
    assert call(limited.anthropic_port, "carol", test_id)[0] == 200  # 18 used
    assert call(limited.anthropic_port, "carol", test_id, stream=True)[0] == 200  # 33 >= 30
    status, headers, body = call(limited.anthropic_port, "carol", test_id)
    assert_anthropic_429(status, headers, body)
    until_midnight = 86_400 - time.time() % 86_400
    assert abs(int(headers["Retry-After"]) - until_midnight) < 5
    assert "Daily token limit" in json.loads(body)["error"]["message"]


def test_sdks_see_a_rate_limit_error_they_understand(limited):
    client = anthropic.Anthropic(
        base_url=limited.anthropic_url, api_key=SECRETS["alice"], max_retries=0
    )
    with client, pytest.raises(anthropic.RateLimitError) as caught:
        for _ in range(5):  # alice's burst may be spent already; at most 3 more pass
            client.messages.create(
                model="claude-test-model", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
    assert int(caught.value.response.headers["retry-after"]) >= 1

    gemini = genai.Client(
        api_key=SECRETS["alice"],
        http_options=genai_types.HttpOptions(base_url=limited.gemini_url),
    )
    with pytest.raises(genai_errors.ClientError) as caught_gemini:
        for _ in range(5):
            gemini.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert caught_gemini.value.code == 429
    assert caught_gemini.value.status == "RESOURCE_EXHAUSTED"
    gemini.close()


def test_rejections_are_logged_and_counted_by_client_and_limit(limited):
    test_id = uuid.uuid4().hex
    for _ in range(5):
        call(limited.anthropic_port, "alice", test_id)
    metrics = scrape(limited.metrics_port)
    assert 'shim_limit_rejections_total{client="alice",limit="rpm"}' in metrics
    lines = [json.loads(line) for line in limited.log_text().splitlines() if line.startswith("{")]
    refused = [ln for ln in lines if ln.get("event") == "limit_exceeded"]
    assert refused and all(ln["client"] in LIMITS for ln in refused)
    access = [ln for ln in lines if ln.get("event") == "access" and ln.get("status") == 429]
    assert any(ln["client"] == "alice" and ln["error"] == "limit_rpm" for ln in access)
    text = limited.log_text()
    assert not any(secret in text for secret in SECRETS.values())


# -- two gateways, one Redis ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(fake_upstream, redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits_redis")
    env = gateway_env(tmp, fake_upstream.url, 2, redis_server.url)
    first = start_gateway(env, tmp / "first.log")
    second = start_gateway(env, tmp / "second.log")
    yield first, second
    first.stop()
    second.stop()
    redis_server.command("DEL", "shim:gemini:benched")


def test_a_limit_of_n_holds_across_two_instances(pair, fake_upstream):
    test_id = uuid.uuid4().hex
    statuses = [call(pair[i % 2].anthropic_port, "erin", test_id)[0] for i in range(10)]
    # rpm=4 shared by 2 instances x 2 workers: exactly the burst of 4 passes.
    assert statuses.count(200) == 4 and statuses.count(429) == 6
    assert statuses[:4] == [200] * 4
    assert upstream_calls(fake_upstream, test_id) == 4


def test_concurrency_across_two_instances(pair):
    test_id = uuid.uuid4().hex
    running = [
        in_background(call, gw.anthropic_port, "frank", test_id, stream=True, gap_ms=250, events=8)
        for gw in pair
    ]
    time.sleep(0.6)
    for gw in pair:  # both slots are held, one on each instance
        assert_anthropic_429(*call(gw.anthropic_port, "frank", test_id))
    for thread, result in running:
        thread.join(10)
        assert result[0][0] == 200 and b"event: message_stop" in result[0][2]
    assert [call(gw.anthropic_port, "frank", test_id)[0] for gw in pair] == [200, 200]


def test_a_key_benched_by_one_instance_is_skipped_by_the_other(pair, fake_upstream):
    first, second = pair
    benching = uuid.uuid4().hex
    # Until a call on the first instance has met key 0's 429 (each worker goes round-robin).
    for _ in range(8):
        status = call(
            first.gemini_port, "dave", benching, gemini=True, headers={"x-fake-limited-keys": "0"}
        )[0]
        assert status == 200  # the 429 was absorbed by a retry on the next key
        used = [r.header("x-goog-api-key") for r in fake_upstream.matching(benching)]
        if FAKE_GEMINI_KEYS[0] in used:
            break
    else:
        pytest.fail("key 0 was never tried")
    time.sleep(0.6)  # past the shared-bench sync interval
    after = uuid.uuid4().hex
    for _ in range(6):
        assert call(second.gemini_port, "dave", after, gemini=True)[0] == 200
    used = [r.header("x-goog-api-key") for r in fake_upstream.matching(after)]
    assert len(used) == 6 and FAKE_GEMINI_KEYS[0] not in used
    assert set(used) == set(FAKE_GEMINI_KEYS[1:])


# -- Redis dies mid-run -----------------------------------------------------------------------


def test_traffic_flows_when_redis_dies_and_limits_return_with_it(fake_upstream, tmp_path):
    redis = RedisServer(free_port(), tmp_path / "redis.log").start()
    gw = start_gateway(
        gateway_env(tmp_path, fake_upstream.url, 2, redis.url), tmp_path / "gunicorn.log"
    )
    try:
        test_id = uuid.uuid4().hex
        streams = [
            in_background(
                call, gw.anthropic_port, name, test_id, stream=True, gap_ms=200, events=12
            )
            for name in ("gina", "dave")
        ]
        time.sleep(0.5)
        status, report = readiness(gw.anthropic_port)
        assert status == 200 and report["state"] == {"store": "redis", "reachable": True}
        redis.kill()
        started = time.monotonic()
        # gina's rpm=2 is not enforced while Redis is gone: every call is served.
        statuses = [call(gw.anthropic_port, "gina", test_id)[0] for _ in range(6)]
        statuses += [call(gw.gemini_port, "dave", test_id, gemini=True)[0] for _ in range(3)]
        assert statuses == [200] * 9
        assert time.monotonic() - started < 3  # no call waited long on the dead Redis
        for thread, result in streams:
            thread.join(10)
            status, _, body = result[0]
            assert status == 200 and body.count(b"event: content_block_delta") == 12
            assert b"event: message_stop" in body
        assert "state_unavailable" in gw.log_text()
        # Reported, but a Redis outage never takes the gateway out of the load balancer.
        status, report = readiness(gw.anthropic_port)
        assert status == 200 and report["state"] == {"store": "redis", "reachable": False}
        assert "shim_state_errors_total" in scrape(gw.metrics_port)

        redis.start()  # same port, empty
        time.sleep(1.2)  # past the retry pause after a failure
        statuses = [call(gw.anthropic_port, "gina", test_id)[0] for _ in range(6)]
        assert statuses.count(429) >= 3, statuses
    finally:
        gw.stop()
        redis.kill()
