"""The credentials file, live: 2 gunicorn workers, a fake token endpoint, the expiry crossed.

Each test starts its own gateway on a credentials file of tokens minted by its
own fake upstream (``FakeUpstream.issue_tokens``), so refresh counts are the
test's alone. The fake's refresh tokens are single-use: a second refresh of
the same token would be answered ``invalid_grant`` and a call would fail.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import stat
import threading
import time
from pathlib import Path

import pytest

from shim.credentials import read_credentials
from tests.conftest import SECRET, closed_port, start_gateway
from tests.fake_upstream import FakeUpstream


def message(stream: bool) -> bytes:
    return json.dumps(
        {
            "model": "claude-test-model",
            "max_tokens": 16,
            "stream": stream,
            "messages": [{"role": "user", "content": "hi"}],
        }
    ).encode()


@pytest.fixture
def fake():
    upstream = FakeUpstream().start()
    yield upstream
    upstream.stop()


def write_file(path: Path, access: str, refresh: str, expires_at: float) -> Path:
    document = {
        "claudeAiOauth": {
            "accessToken": access,
            "refreshToken": refresh,
            "expiresAt": int(expires_at * 1000),
            "scopes": ["user:inference", "user:profile"],
            "subscriptionType": "max",
        }
    }
    path.write_text(json.dumps(document))
    path.chmod(0o600)
    return path


@pytest.fixture
def launch(fake, tmp_path):
    """Start a 2-worker gateway on a credentials file whose token expires in ``lifetime_s``."""
    gateways = []

    def start(lifetime_s: float, margin_s: float = 300, **env: str):
        access, refresh, expires_at = fake.issue_tokens(lifetime_s)
        path = write_file(tmp_path / ".credentials.json", access, refresh, expires_at)
        overrides = {
            "SHIM_ANTHROPIC_CREDENTIALS_FILE": str(path),
            "SHIM_ANTHROPIC_TOKEN_URL": f"{fake.url}/v1/oauth/token",
            "SHIM_ANTHROPIC_REFRESH_MARGIN_S": str(margin_s),
            "SHIM_ANTHROPIC_UPSTREAM": fake.url,
            "SHIM_WORKERS": "2",
            **env,
        }
        gateway = start_gateway(overrides, tmp_path / "gunicorn.log")
        gateways.append(gateway)
        return gateway, path, access

    yield start
    for gateway in gateways:
        gateway.stop()
        issued = fake.issued_tokens()
        assert issued and not any(token in gateway.log_text() for token in issued)


def call(gateway, stream: bool, results: list, gap_ms: int = 60) -> None:
    """One client call; appends (status, complete, seconds, started) to ``results``."""
    began = time.monotonic()
    conn = gateway.connection("anthropic", timeout=30)
    headers = {"x-api-key": SECRET, "content-type": "application/json"}
    if stream:
        headers.update({"x-fake-events": "5", "x-fake-gap-ms": str(gap_ms)})
    try:
        conn.request("POST", "/v1/messages", body=message(stream), headers=headers)
        response = conn.getresponse()
        body = response.read()
        complete = b"event: message_stop" in body if stream else b'"msg_fake_0001"' in body
        results.append((response.status, complete, time.monotonic() - began, began))
    except (OSError, http.client.HTTPException) as exc:
        results.append((repr(exc), False, time.monotonic() - began, began))
    finally:
        conn.close()


def events(gateway, name: str) -> list[dict]:
    found = []
    for line in gateway.log_text().splitlines():
        if line.startswith("{") and f'"event":"{name}"' in line:
            found.append(json.loads(line))
    return found


def metric(gateway, name: str, labels: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.metrics_port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    match = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_many_calls_across_the_expiry_make_exactly_one_refresh(fake, launch):
    # Due at +2 s (margin 2 s), expired at +4 s; the endpoint takes 2.5 s, so
    # the refresh is still in flight when the token expires: calls in that
    # window wait for it, on both workers.
    fake.token_delay_s = 2.5
    gateway, path, old_access = launch(lifetime_s=4.0, margin_s=2)
    results: list = []
    threads = []
    start = time.monotonic()
    for index in range(64):  # one call every 100 ms over 6.4 s, every other one streaming
        thread = threading.Thread(target=call, args=(gateway, index % 2 == 0, results))
        thread.start()
        threads.append(thread)
        time.sleep(max(0.0, start + (index + 1) * 0.1 - time.monotonic()))
    for thread in threads:
        thread.join(30)

    assert len(results) == 64
    failed = [r for r in results if r[0] != 200 or not r[1]]
    assert failed == []
    assert len(fake.token_calls) == 1
    assert metric(gateway, "shim_oauth_refresh_total", 'result="refreshed"') == 1.0
    assert metric(gateway, "shim_oauth_refresh_total", 'result="failed"') == 0.0
    [refreshed] = events(gateway, "oauth_refreshed")
    # The file now holds the pair the endpoint issued, private, Claude Code's fields kept.
    credentials = read_credentials(str(path)).credentials
    assert credentials.access_token != old_access
    assert credentials.access_token in fake.oauth_access
    assert credentials.refresh_token in fake.oauth_refresh  # issued, not yet used
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text())["claudeAiOauth"]["subscriptionType"] == "max"
    # Calls after the switch carry the new token to upstream.
    sent = [r.header("authorization") for r in fake.requests if r.path == "/v1/messages"]
    assert sent[-1] == f"Bearer {credentials.access_token}"
    # The status page shows the new token's expiry and that shim refreshed it just now.
    conn = http.client.HTTPConnection("127.0.0.1", gateway.metrics_port, timeout=10)
    try:
        conn.request("GET", "/status")
        page = conn.getresponse().read().decode()
    finally:
        conn.close()
    expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(credentials.expires_at))
    assert f"OAuth token expires <b>{expires}" in page
    assert re.search(r"last refreshed <b>[0-9-]+ [0-9:]+ UTC \(0h 0\dm ago\)</b>", page)
    slowest = max(r[2] for r in results)
    print(
        f"\n64 calls, 1 refresh ({refreshed['duration_ms']} ms at the endpoint), "
        f"{fake.oauth_rejected} upstream 401s retried, slowest call {slowest:.2f} s"
    )


def test_a_revoked_token_is_refreshed_once_and_the_calls_retried(fake, launch):
    gateway, path, old_access = launch(lifetime_s=3600)
    warmup: list = []
    call(gateway, False, warmup)
    assert warmup[0][:2] == (200, True)
    fake.revoke(old_access)

    results: list = []
    threads = [
        threading.Thread(target=call, args=(gateway, index % 2 == 0, results))
        for index in range(20)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert [r[:2] for r in results] == [(200, True)] * 20
    assert len(fake.token_calls) == 1
    assert fake.oauth_rejected >= 1
    assert read_credentials(str(path)).credentials.access_token != old_access
    # Streams included: a 401 always comes before the first byte, so they were retried too.
    retries = events(gateway, "upstream_retry")
    assert retries and all(r["upstream_status"] == 401 for r in retries)


@pytest.mark.parametrize("failure", ["invalid_grant", "unreachable"])
def test_a_failing_token_endpoint_is_logged_and_the_gateway_keeps_serving(fake, launch, failure):
    env = {}
    if failure == "unreachable":
        env["SHIM_ANTHROPIC_TOKEN_URL"] = f"http://127.0.0.1:{closed_port()}/v1/oauth/token"
    # Due at once (60 s left, 300 s margin) but valid: calls must go on meanwhile.
    gateway, path, old_access = launch(lifetime_s=60, **env)
    if failure == "invalid_grant":
        fake.oauth_refresh.clear()  # the file's refresh token is spent
    results: list = []
    for index in range(30):  # well within the 5 s back-off
        call(gateway, index % 2 == 0, results, gap_ms=0)
    assert [r[:2] for r in results] == [(200, True)] * 30

    failures = events(gateway, "oauth_refresh_failed")
    # One attempt for the whole instance: the 5 s back-off (or, after invalid_grant, the
    # token marked dead) is shared by both workers.
    assert len(failures) == 1
    for entry in failures:
        if failure == "invalid_grant":
            assert (entry["reason"], entry["status"], entry["error"]) == (
                "rejected",
                400,
                "invalid_grant",
            )
        else:
            assert (entry["reason"], entry["error"]) == ("unreachable", "ConnectionError")
            assert entry["retry_in_s"] == 5.0
    assert len(fake.token_calls) == (len(failures) if failure == "invalid_grant" else 0)
    assert read_credentials(str(path)).credentials.access_token == old_access

    # Once the token is revoked the client gets upstream's 401, and the gateway still serves.
    fake.revoke(old_access)
    conn = gateway.connection("anthropic")
    conn.request(
        "POST",
        "/v1/messages",
        body=message(False),
        headers={"x-api-key": SECRET, "content-type": "application/json"},
    )
    response = conn.getresponse()
    assert response.status == 401
    assert json.loads(response.read())["error"]["type"] == "authentication_error"
    conn.close()
    conn = gateway.connection("anthropic")
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


def test_two_boxes_on_one_redis_refresh_once_and_share_the_new_pair(fake, redis_server, tmp_path):
    # Two gateways, each with its own copy of the file (as on two boxes), one Redis.
    fake.token_delay_s = 1.0
    access, refresh, expires_at = fake.issue_tokens(4.0)
    redis_server.command("DEL", "shim:oauth:anthropic:pair")
    gateways, paths = [], []
    try:
        for box in ("one", "two"):
            (tmp_path / box).mkdir()
            path = write_file(tmp_path / box / ".credentials.json", access, refresh, expires_at)
            paths.append(path)
            gateways.append(
                start_gateway(
                    {
                        "SHIM_ANTHROPIC_CREDENTIALS_FILE": str(path),
                        "SHIM_ANTHROPIC_TOKEN_URL": f"{fake.url}/v1/oauth/token",
                        "SHIM_ANTHROPIC_REFRESH_MARGIN_S": "2",
                        "SHIM_ANTHROPIC_UPSTREAM": fake.url,
                        "SHIM_WORKERS": "2",
                        "SHIM_STATE_URL": redis_server.url,
                    },
                    tmp_path / box / "gunicorn.log",
                )
            )
        results: list = []
        threads = []
        start = time.monotonic()
        for index in range(48):  # 100 ms apart over 4.8 s, alternating boxes, half streaming
            thread = threading.Thread(
                target=call, args=(gateways[index % 2], index % 4 < 2, results)
            )
            thread.start()
            threads.append(thread)
            time.sleep(max(0.0, start + (index + 1) * 0.1 - time.monotonic()))
        for thread in threads:
            thread.join(30)
        # Past the expiry: both boxes must be on the new token by now.
        for gateway in gateways:
            call(gateway, False, results)

        assert len(results) == 50
        assert [r for r in results if r[0] != 200 or not r[1]] == []
        assert len(fake.token_calls) == 1
        new = [read_credentials(str(path)).credentials for path in paths]
        assert new[0].access_token == new[1].access_token != access
        assert new[0].refresh_token == new[1].refresh_token != refresh
        assert all(stat.S_IMODE(os.stat(path).st_mode) == 0o600 for path in paths)
        adopted = [e for gw in gateways for e in events(gw, "oauth_token_adopted")]
        assert any(e.get("from") == "redis" for e in adopted)
        assert not any(
            access in gw.log_text() or new[0].access_token in gw.log_text() for gw in gateways
        )
    finally:
        for gateway in gateways:
            gateway.stop()
        redis_server.command("DEL", "shim:oauth:anthropic:pair")
