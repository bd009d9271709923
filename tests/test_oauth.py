"""TokenRefresher and FileLock: what is sent to the token endpoint, and when (injected clock).

The endpoint is ``responses`` here (what shim *sent*, strictly matched); the
live tests run the same code in gunicorn workers against the fake upstream.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import responses
from responses import matchers

from shim import logs
from shim.credentials import CLIENT_ID, read_credentials
from shim.locks import FileLock, LockTimeout
from shim.oauth import TokenRefresher
from tests.conftest import SECRET

TOKEN_URL = "https://token.test/v1/oauth/token"
ACCESS = "sk-ant-oat01-unit-access-token-0000000000000"
REFRESH = "sk-ant-ort01-unit-refresh-token-000000000000"
NEW_ACCESS = "sk-ant-oat01-unit-access-token-1111111111111"
NEW_REFRESH = "sk-ant-ort01-unit-refresh-token-111111111111"
EXPIRES = 1_900_000_000.0  # epoch seconds of the file's token
TOKENS = (ACCESS, REFRESH, NEW_ACCESS, NEW_REFRESH)


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def cred_path(tmp_path) -> Path:
    path = tmp_path / ".credentials.json"
    document = {
        "claudeAiOauth": {
            "accessToken": ACCESS,
            "refreshToken": REFRESH,
            "expiresAt": int(EXPIRES * 1000),
            "scopes": ["user:inference"],
            "subscriptionType": "max",
        }
    }
    path.write_text(json.dumps(document))
    path.chmod(0o600)
    return path


def refresher(path: Path, clock: Clock, **kwargs) -> TokenRefresher:
    kwargs.setdefault("reload_interval_s", 0.0)
    kwargs.setdefault("relogin_grace_s", 0.2)
    return TokenRefresher(str(path), TOKEN_URL, margin_s=300, clock=clock, **kwargs)


def token_answer(access=NEW_ACCESS, refresh=NEW_REFRESH, expires_in=28_800) -> dict:
    return {
        "token_type": "Bearer",
        "access_token": access,
        "refresh_token": refresh,
        "expires_in": expires_in,
        "scope": "user:inference",
    }


def wait_until(predicate, timeout=5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_fresh_token_is_used_without_calling_the_endpoint(cred_path):
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        r = refresher(cred_path, Clock(EXPIRES - 3600))
        token, ident = r.credential()
        assert token == ACCESS and ident.startswith("oauth:") and ACCESS not in ident
        assert len(mock.calls) == 0


def test_expired_token_is_refreshed_before_the_call_with_claude_codes_request(cred_path):
    clock = Clock(EXPIRES + 1)
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        mock.post(
            TOKEN_URL,
            json=token_answer(),
            match=[
                matchers.json_params_matcher(
                    {
                        "grant_type": "refresh_token",
                        "refresh_token": REFRESH,
                        "client_id": CLIENT_ID,
                    }
                ),
                matchers.header_matcher(
                    {"Content-Type": "application/json", "Accept": "application/json"}
                ),
            ],
        )
        token, _ = refresher(cred_path, clock).credential()
    assert token == NEW_ACCESS
    credentials = read_credentials(str(cred_path)).credentials
    assert credentials.access_token == NEW_ACCESS
    assert credentials.refresh_token == NEW_REFRESH
    assert credentials.expires_at == pytest.approx(clock.now + 28_800, abs=0.001)
    # Claude Code's other fields survived.
    assert json.loads(cred_path.read_text())["claudeAiOauth"]["subscriptionType"] == "max"


def test_due_token_refreshes_in_the_background_while_calls_use_the_current_one(cred_path):
    clock = Clock(EXPIRES - 100)  # inside the 300 s margin, still valid
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer())
        r = refresher(cred_path, clock)
        assert r.credential()[0] == ACCESS
        assert r.credential()[0] == ACCESS
        wait_until(lambda: r.credential()[0] == NEW_ACCESS)
        assert len(mock.calls) == 1


def test_answer_without_a_new_refresh_token_keeps_the_old_one(cred_path):
    answer = token_answer()
    del answer["refresh_token"]
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=answer)
        refresher(cred_path, Clock(EXPIRES + 1)).credential()
    assert read_credentials(str(cred_path)).credentials.refresh_token == REFRESH


def test_a_refresh_by_another_process_is_adopted_not_repeated(cred_path):
    clock = Clock(EXPIRES + 1)
    other, this = refresher(cred_path, clock), refresher(cred_path, clock)
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer())
        assert other.credential()[0] == NEW_ACCESS
        # `this` read the old pair at start; the file now holds a fresh one.
        assert this.credential()[0] == NEW_ACCESS
        assert len(mock.calls) == 1


def test_racing_refreshers_call_the_endpoint_once(cred_path):
    """Two refreshers (as two workers: separate lock descriptors) hit an expired token at once."""
    clock = Clock(EXPIRES + 1)
    refreshers = [refresher(cred_path, clock) for _ in range(4)]
    calls = []

    def slow_endpoint(request):
        calls.append(json.loads(request.body)["refresh_token"])
        time.sleep(0.3)  # the others arrive while this one holds the lock
        return 200, {}, json.dumps(token_answer())

    results = []
    with responses.RequestsMock() as mock:
        mock.add_callback(responses.POST, TOKEN_URL, callback=slow_endpoint)
        threads = [
            threading.Thread(target=lambda r=r: results.append(r.credential()[0]))
            for r in refreshers
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(5)
    assert calls == [REFRESH]
    assert results == [NEW_ACCESS] * 4


def test_unauthorized_refreshes_once_then_superseded_tokens_just_retry(cred_path):
    clock = Clock(EXPIRES - 3600)  # valid by the clock, but upstream revoked it
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer())
        r = refresher(cred_path, clock)
        _, used = r.credential()
        assert r.after_unauthorized(used) is True
        assert r.credential()[0] == NEW_ACCESS
        # A second call that went out with the old token before the refresh: no new refresh.
        assert r.after_unauthorized(used) is True
        assert len(mock.calls) == 1


def test_unauthorized_right_after_a_refresh_does_not_refresh_again(cred_path):
    clock = Clock(EXPIRES - 3600)
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer())
        r = refresher(cred_path, clock)
        r.after_unauthorized(r.credential()[1])
        # The new token is rejected too (account problem): no refresh per client call.
        assert r.after_unauthorized(r.credential()[1]) is False
        assert len(mock.calls) == 1


@pytest.mark.parametrize(
    ("answer", "reason", "error"),
    [
        # invalid_grant is not backed off but given up on: see the shared-login tests.
        ({"status": 400, "json": {"error": "invalid_request"}}, "rejected", "invalid_request"),
        ({"status": 503, "json": {"error": "server_error"}}, "rejected", "server_error"),
        ({"body": requests.ConnectionError("refused")}, "unreachable", "ConnectionError"),
        ({"status": 200, "json": {"access_token": NEW_ACCESS}}, "bad_answer", None),
        ({"status": 429, "body": "<html>" + REFRESH}, "rejected", None),
    ],
)
def test_failed_refresh_keeps_the_token_logs_and_backs_off(
    cred_path, caplog, answer, reason, error
):
    clock = Clock(EXPIRES - 100)  # due, still valid
    caplog.set_level(logging.INFO, logger="shim.oauth")
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, **answer)
        r = refresher(cred_path, clock)
        assert r.after_unauthorized(r.credential()[1]) is False
        [record] = [rec for rec in caplog.records if rec.event == "oauth_refresh_failed"]
        assert record.reason == reason and record.retry_in_s == 5.0
        if error:
            assert error in record.error
        # Calls go on with the current token, and nothing hammers the endpoint.
        for _ in range(20):
            assert r.credential()[0] == ACCESS
            r.after_unauthorized(r.credential()[1])
        assert len(mock.calls) == 1
        # After the back-off the next attempt goes out; a second failure doubles it.
        clock.now += 5.0
        r.after_unauthorized(r.credential()[1])
        assert len(mock.calls) == 2
        records = [rec for rec in caplog.records if rec.event == "oauth_refresh_failed"]
        assert records[-1].retry_in_s == 10.0
    assert read_credentials(str(cred_path)).credentials.access_token == ACCESS
    text = caplog.text + "".join(str(vars(rec)) for rec in caplog.records)
    assert not any(token in text for token in TOKENS)


def test_expired_token_and_failing_endpoint_still_answer_calls(cred_path):
    clock = Clock(EXPIRES + 10)
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, status=400, json={"error": "invalid_grant"})
        r = refresher(cred_path, clock)
        started = time.monotonic()
        tokens = {r.credential()[0] for _ in range(50)}
        assert time.monotonic() - started < 1.0
        assert tokens == {ACCESS} and len(mock.calls) == 1


def test_unusable_file_keeps_the_current_token(cred_path, caplog):
    r = refresher(cred_path, Clock(EXPIRES - 3600))
    cred_path.write_text('{"claudeAiOauth": {"accessToken": "half-writ')
    with caplog.at_level(logging.WARNING, logger="shim.oauth"):
        assert r.credential()[0] == ACCESS
    assert [rec.event for rec in caplog.records] == ["oauth_file_unusable"]


def test_tokens_are_handed_to_the_log_filter(cred_path):
    seen = []
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer())
        refresher(cred_path, Clock(EXPIRES + 1), on_token=seen.append).credential()
    assert seen == [ACCESS, REFRESH, NEW_ACCESS, NEW_REFRESH]


def test_secret_filter_redacts_a_secret_added_later():
    secret_filter = logs.SecretFilter(["initial-secret-000"])
    secret_filter.add(NEW_ACCESS)
    record = logging.LogRecord("t", logging.INFO, "", 0, "got %s", (NEW_ACCESS,), None)
    record.detail = "x" + NEW_ACCESS
    secret_filter.filter(record)
    assert NEW_ACCESS not in record.getMessage() and NEW_ACCESS not in record.detail


# --- the lock ------------------------------------------------------------------------------


def test_file_lock_excludes_another_process_and_is_freed_when_it_exits(tmp_path):
    path = str(tmp_path / "c.json.lock")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from shim.locks import FileLock\n"
            f"with FileLock({path!r}).held(5):\n"
            "    print('held', flush=True); time.sleep(1.0)\n",
        ],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        started = time.monotonic()
        with pytest.raises(LockTimeout), FileLock(path).held(0.2):
            pass
        assert 0.2 <= time.monotonic() - started < 0.5
        # Polling, not blocking: it gets the lock soon after the holder lets go.
        with FileLock(path).held(5):
            waited = time.monotonic() - started
        assert waited < 1.5
    finally:
        holder.wait(5)
        holder.stdout.close()


def test_file_lock_polls_instead_of_blocking(tmp_path):
    """Waiting goes through ``sleep`` (a greenlet switch under gevent), never a blocking flock."""
    path = str(tmp_path / "x.lock")
    sleeps = []
    with FileLock(path).held(1):
        waiter = FileLock(path, poll_s=0.01, sleep=lambda s: (sleeps.append(s), time.sleep(s)))
        with pytest.raises(LockTimeout):
            with waiter.held(0.1):
                pass
    assert len(sleeps) >= 5 and set(sleeps) == {0.01}
    with FileLock(path).held(0.1):
        pass


# --- through the provider and the forwarding core (in-process app) ------------------------

MESSAGES = "https://anthropic.upstream.test/v1/messages"
BODY = b'{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[]}'


@pytest.fixture
def file_client(make_client, cred_path):
    # The file's token is valid for the next hour (the real clock here).
    document = json.loads(cred_path.read_text())
    document["claudeAiOauth"]["expiresAt"] = int((time.time() + 3600) * 1000)
    cred_path.write_text(json.dumps(document))
    return make_client(
        SHIM_ANTHROPIC_TOKEN="",
        SHIM_ANTHROPIC_CREDENTIALS_FILE=str(cred_path),
        SHIM_ANTHROPIC_TOKEN_URL=TOKEN_URL,
    )


def post(client, **headers):
    return client.post(
        "/v1/messages",
        base_url="http://localhost:8889",
        data=BODY,
        headers={"x-api-key": SECRET, "anthropic-beta": "tools-1", **headers},
        content_type="application/json",
    )


def test_upstream_gets_the_files_token_as_a_bearer_with_the_oauth_beta(file_client):
    with responses.RequestsMock() as mock:
        mock.post(
            MESSAGES,
            json={"ok": True},
            match=[
                matchers.header_matcher(
                    {
                        "authorization": f"Bearer {ACCESS}",
                        "anthropic-beta": "tools-1,oauth-2025-04-20",
                    }
                )
            ],
        )
        assert post(file_client).status_code == 200
        sent = {k.lower() for k in mock.calls[0].request.headers}
        assert "x-api-key" not in sent


def test_a_401_refreshes_once_and_the_call_is_retried_with_the_new_token(file_client, cred_path):
    with responses.RequestsMock() as mock:
        rejected = mock.post(
            MESSAGES,
            status=401,
            json={"type": "error", "error": {"type": "authentication_error", "message": "x"}},
            match=[matchers.header_matcher({"authorization": f"Bearer {ACCESS}"})],
        )
        refreshed = mock.post(TOKEN_URL, json=token_answer())
        accepted = mock.post(
            MESSAGES,
            json={"ok": True},
            match=[matchers.header_matcher({"authorization": f"Bearer {NEW_ACCESS}"})],
        )
        response = post(file_client)
        assert response.status_code == 200 and response.get_json() == {"ok": True}
        assert (rejected.call_count, refreshed.call_count, accepted.call_count) == (1, 1, 1)
    assert read_credentials(str(cred_path)).credentials.access_token == NEW_ACCESS


def test_a_401_the_refresh_cannot_fix_reaches_the_client(file_client):
    with responses.RequestsMock() as mock:
        mock.post(MESSAGES, status=401, json={"type": "error", "error": {"type": "x"}})
        mock.post(TOKEN_URL, status=400, json={"error": "invalid_grant"})
        response = post(file_client)
        assert response.status_code == 401
        assert len(mock.calls) == 2  # the call and one refresh attempt, no retry
