"""A login shared with Claude Code, live: 2 gunicorn workers, the fake token endpoint (#15).

"Claude Code" is this test: a thread that refreshes with the file's refresh
token at the fake's endpoint and rewrites the file the way Claude Code does,
in place and without shim's lock. The fake's refresh tokens are single-use and
it counts every ``invalid_grant`` (``token_invalid_grants``): shim spending a
token Claude Code already spent shows up there.
"""

from __future__ import annotations

import http.client
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from shim.credentials import read_credentials
from tests.conftest import start_gateway
from tests.fake_upstream import OAUTH_CLIENT_ID, FakeUpstream
from tests.test_live_oauth import call, events, metric, write_file

CLAUDE_CODE_UA = "claude-cli/2.1.81 (external, cli)"


@pytest.fixture
def fake():
    upstream = FakeUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture
def gateways(fake):
    started = []
    yield started
    for gateway in started:
        gateway.stop()
        issued = fake.issued_tokens()
        assert issued and not any(token in gateway.log_text() for token in issued)


def start(
    fake, gateways: list, path: Path, margin_s: float = 300, log_dir: Path | None = None, **env: str
):
    overrides = {
        "SHIM_ANTHROPIC_CREDENTIALS_FILE": str(path),
        "SHIM_ANTHROPIC_TOKEN_URL": f"{fake.url}/v1/oauth/token",
        "SHIM_ANTHROPIC_REFRESH_MARGIN_S": str(margin_s),
        "SHIM_ANTHROPIC_UPSTREAM": fake.url,
        "SHIM_WORKERS": "2",
        **env,
    }
    log_dir = log_dir or path.parent
    gateway = start_gateway(overrides, log_dir / f"gunicorn-{len(gateways)}.log")
    gateways.append(gateway)
    return gateway


def claude_code_refreshes(fake, path: Path) -> tuple[str, str]:
    """Refresh as Claude Code does and rewrite the file in place; return (old, new) access."""
    document = json.loads(path.read_text())
    section = document["claudeAiOauth"]
    body = {
        "grant_type": "refresh_token",
        "refresh_token": section["refreshToken"],
        "client_id": OAUTH_CLIENT_ID,
    }
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)
    try:
        conn.request(
            "POST",
            "/v1/oauth/token",
            body=json.dumps(body),
            headers={"content-type": "application/json", "user-agent": CLAUDE_CODE_UA},
        )
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200, answer
    old = section["accessToken"]
    section.update(
        {
            "accessToken": answer["access_token"],
            "refreshToken": answer["refresh_token"],
            "expiresAt": int((time.time() + answer["expires_in"]) * 1000),
        }
    )
    # In place, in two writes: a reader in between sees half a file.
    text = json.dumps(document)
    with open(path, "w") as handle:
        handle.write(text[: len(text) // 2])
        handle.flush()
        time.sleep(0.1)
        handle.write(text[len(text) // 2 :])
    return old, answer["access_token"]


def readiness(gateway) -> tuple[int, dict]:
    conn = gateway.connection("anthropic", timeout=10)
    try:
        conn.request("GET", "/health/ready")
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def shim_token_calls(fake) -> list:
    return [r for r in fake.token_calls if (r.header("user-agent") or "").startswith("shim/")]


def test_claude_code_refreshing_mid_run_is_adopted_with_no_invalid_grant(fake, gateways, tmp_path):
    access, refresh, expires_at = fake.issue_tokens(3600)
    path = write_file(tmp_path / ".credentials.json", access, refresh, expires_at)
    gateway = start(fake, gateways, path)
    rotations: list[tuple[str, str]] = []

    def claude_code() -> None:
        for _ in range(3):
            time.sleep(1.2)
            old, new = claude_code_refreshes(fake, path)
            rotations.append((old, new))
            # Its old access token stops working: shim's calls with it get a 401.
            fake.revoke(old)

    results: list = []
    threads = []
    began = time.monotonic()
    other = threading.Thread(target=claude_code)
    other.start()
    for index in range(100):  # one call every 50 ms over 5 s, every other one streaming
        thread = threading.Thread(target=call, args=(gateway, index % 2 == 0, results, 20))
        thread.start()
        threads.append(thread)
        time.sleep(max(0.0, began + (index + 1) * 0.05 - time.monotonic()))
    other.join(30)
    for thread in threads:
        thread.join(30)

    assert len(rotations) == 3
    assert len(results) == 100
    assert [r for r in results if r[0] != 200 or not r[1]] == []
    assert fake.token_invalid_grants == 0
    assert len(fake.token_calls) == 3 and shim_token_calls(fake) == []
    # The file holds Claude Code's last pair, and shim sends it.
    latest = rotations[-1][1]
    assert read_credentials(str(path)).credentials.access_token == latest
    sent = [r.header("authorization") for r in fake.requests if r.path == "/v1/messages"]
    assert sent[-1] == f"Bearer {latest}"
    assert events(gateway, "oauth_token_adopted")
    print(
        f"\n100 calls, Claude Code refreshed 3 times, {fake.oauth_rejected} upstream 401s "
        f"retried, {len(events(gateway, 'oauth_token_adopted'))} adoptions, 0 invalid_grant"
    )


def test_a_dead_login_makes_readiness_503_until_a_new_login_is_written(fake, gateways, tmp_path):
    access, refresh, expires_at = fake.issue_tokens(3600)
    path = write_file(tmp_path / ".credentials.json", access, refresh, expires_at)
    gateway = start(fake, gateways, path)
    warmup: list = []
    call(gateway, False, warmup)
    assert warmup[0][:2] == (200, True)
    assert readiness(gateway)[0] == 200

    # Truly dead: the access token revoked, the refresh token unknown to the endpoint.
    fake.revoke(access)
    with fake.lock:
        fake.oauth_refresh.discard(refresh)
    results: list = []
    for index in range(6):
        call(gateway, index % 2 == 0, results)
    assert [r[0] for r in results] == [401] * 6  # upstream's own answer, passed through

    for _ in range(10):  # fresh connections: both workers answer
        status, report = readiness(gateway)
        anthropic = report["providers"]["anthropic"]
        assert status == 503 and report["status"] == "unavailable"
        assert anthropic["ready"] is False
        assert anthropic["oauth"]["state"] == "relogin_needed"
        assert anthropic["oauth"]["reason"] == "oauth_relogin_needed"
    # The dead token was sent once by the whole instance, never again.
    assert len(fake.token_calls) == 1
    [logged] = events(gateway, "oauth_relogin_needed")
    assert logged["level"] == "error" and "path" in logged
    assert metric(gateway, "shim_oauth_refresh_total", 'result="relogin_needed"') == 1.0

    # The user runs `claude` and logs in again: the new pair lands in the file.
    new_access, new_refresh, new_expires = fake.issue_tokens(3600)
    write_file(path, new_access, new_refresh, new_expires)
    deadline = time.monotonic() + 10
    ready_in_a_row = 0
    while ready_in_a_row < 10:
        assert time.monotonic() < deadline, "readiness did not recover"
        status, report = readiness(gateway)
        ready_in_a_row = ready_in_a_row + 1 if status == 200 else 0
        if status != 200:
            time.sleep(0.1)
    assert report["providers"]["anthropic"]["oauth"]["state"] == "ok"
    results = []
    for index in range(10):
        call(gateway, index % 2 == 0, results)
    assert [r[:2] for r in results] == [(200, True)] * 10
    sent = [r.header("authorization") for r in fake.requests if r.path == "/v1/messages"]
    assert sent[-1] == f"Bearer {new_access}"
    assert len(fake.token_calls) == 1


def test_a_429_with_retry_after_is_honoured_by_the_whole_instance(fake, gateways, tmp_path):
    # Due at once (60 s left, 300 s margin) but valid: calls go on while the endpoint says 429.
    access, refresh, expires_at = fake.issue_tokens(60)
    path = write_file(tmp_path / ".credentials.json", access, refresh, expires_at)
    fake.token_error = 429
    fake.token_retry_after = "30"
    gateway = start(fake, gateways, path)
    results: list = []
    threads = []
    began = time.monotonic()
    for index in range(70):  # one call every 100 ms over 7 s: past the default 5 s back-off
        thread = threading.Thread(target=call, args=(gateway, index % 2 == 0, results, 0))
        thread.start()
        threads.append(thread)
        time.sleep(max(0.0, began + (index + 1) * 0.1 - time.monotonic()))
    for thread in threads:
        thread.join(30)

    assert [r[:2] for r in results] == [(200, True)] * 70
    assert len(fake.token_calls) == 1
    [failed] = events(gateway, "oauth_refresh_failed")
    assert (failed["status"], failed["retry_in_s"]) == (429, 30.0)
    # The shared note: private, next to the credentials file.
    note = Path(str(path) + ".refresh-state")
    assert stat.S_IMODE(os.stat(note).st_mode) == 0o600
    assert json.loads(note.read_text())["not_before"] == pytest.approx(time.time() + 23, abs=8)


def test_a_symlinked_file_stays_a_link_keeps_unknown_fields_and_is_private(
    fake, gateways, tmp_path
):
    (tmp_path / "dotfiles").mkdir()
    (tmp_path / "home").mkdir()
    access, refresh, expires_at = fake.issue_tokens(4.0)
    target = write_file(tmp_path / "dotfiles" / "claude-credentials.json", access, refresh, 0)
    document = json.loads(target.read_text())
    document["claudeAiOauth"]["expiresAt"] = int(expires_at * 1000)
    document["claudeAiOauth"]["rateLimitTier"] = "default_claude_max_20x"
    document["organizationUuid"] = "org-0001"
    target.write_text(json.dumps(document))
    link = tmp_path / "home" / ".credentials.json"
    link.symlink_to(target)
    gateway = start(fake, gateways, link, margin_s=2, log_dir=tmp_path)  # due at +2 s

    results: list = []
    deadline = time.monotonic() + 10
    while not fake.token_calls or read_credentials(str(target)).credentials.access_token == access:
        assert time.monotonic() < deadline, "no refresh"
        call(gateway, False, results)
        time.sleep(0.1)
    call(gateway, True, results)
    assert [r[:2] for r in results] == [(200, True)] * len(results)
    assert len(fake.token_calls) == 1

    assert link.is_symlink() and os.readlink(link) == str(target)
    written = json.loads(target.read_text())
    section = written["claudeAiOauth"]
    assert section["accessToken"] != access and section["accessToken"] in fake.oauth_access
    assert section["refreshToken"] in fake.oauth_refresh  # issued, not yet spent
    assert section["scopes"] == ["user:inference", "user:profile"]
    assert (section["subscriptionType"], section["rateLimitTier"]) == (
        "max",
        "default_claude_max_20x",
    )
    assert written["organizationUuid"] == "org-0001"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    # No temporary file left anywhere: only the file, the link and shim's lock.
    assert sorted(p.name for p in (tmp_path / "dotfiles").iterdir()) == ["claude-credentials.json"]
    home = sorted(p.name for p in (tmp_path / "home").iterdir())
    assert home == [".credentials.json", ".credentials.json.lock"]
