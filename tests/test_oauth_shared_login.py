"""A login shared with Claude Code, and the refresh request as the endpoint expects it (#15).

TokenRefresher against ``responses`` (what shim *sent*, strictly matched) with
an injected clock; "Claude Code" is this test writing the credentials file the
way Claude Code does (in place, without shim's lock). Several refreshers on one
file stand in for several workers. The live counterparts are in
tests/test_live_oauth_shared_login.py.
"""

from __future__ import annotations

import email.utils
import json
import logging
import threading
import tomllib
from pathlib import Path

import pytest
import responses
from responses import matchers

from shim.credentials import CLIENT_ID, read_credentials
from shim.oauth_endpoint import USER_AGENT, VERSION
from shim.oauth_gate import FileGate, GateNote, SharedGate, gate_path
from shim.secret_files import key_id
from shim.state import RedisState
from tests.conftest import ROOT
from tests.test_oauth import (
    ACCESS,
    EXPIRES,
    NEW_ACCESS,
    NEW_REFRESH,
    REFRESH,
    TOKEN_URL,
    TOKENS,
    Clock,
    refresher,
    token_answer,
)

CC_ACCESS = "sk-ant-oat01-claude-code-access-22222222222"
CC_REFRESH = "sk-ant-ort01-claude-code-refresh-2222222222"
LOGIN_ACCESS = "sk-ant-oat01-fresh-login-access-3333333333"
LOGIN_REFRESH = "sk-ant-ort01-fresh-login-refresh-333333333"
ALL_TOKENS = (*TOKENS, CC_ACCESS, CC_REFRESH, LOGIN_ACCESS, LOGIN_REFRESH)


@pytest.fixture
def cred_path(tmp_path) -> Path:
    """Claude Code's file, as in tests/test_oauth.py."""
    path = tmp_path / ".credentials.json"
    section = {
        "accessToken": ACCESS,
        "refreshToken": REFRESH,
        "expiresAt": int(EXPIRES * 1000),
        "scopes": ["user:inference"],
        "subscriptionType": "max",
    }
    path.write_text(json.dumps({"claudeAiOauth": section}))
    path.chmod(0o600)
    return path


def claude_code_writes(path: Path, access: str, refresh: str, expires_at: float, **extra) -> None:
    """Rewrite the file as Claude Code does: in place (same inode), its other fields kept."""
    document = json.loads(path.read_text())
    document["claudeAiOauth"].update(
        {"accessToken": access, "refreshToken": refresh, "expiresAt": int(expires_at * 1000)}
    )
    document["claudeAiOauth"].update(extra)
    with open(path, "w") as handle:
        handle.write(json.dumps(document))


def failed_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "oauth_refresh_failed"]


# --- the request ---------------------------------------------------------------------------


def test_the_refresh_request_carries_the_configured_client_id_and_a_plain_user_agent(cred_path):
    with responses.RequestsMock() as mock:
        mock.post(
            TOKEN_URL,
            json=token_answer(),
            match=[
                matchers.json_params_matcher(
                    {"grant_type": "refresh_token", "refresh_token": REFRESH, "client_id": "c-1"}
                ),
                matchers.header_matcher({"User-Agent": f"shim/{VERSION}"}),
            ],
        )
        assert refresher(cred_path, Clock(EXPIRES + 1), client_id="c-1").credential()[0] == (
            NEW_ACCESS
        )


def test_the_default_client_id_is_claude_codes_and_the_version_is_the_packages():
    assert CLIENT_ID == "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert USER_AGENT == f"shim/{project['version']}"


def test_expires_in_sets_the_expiry_and_a_rotated_refresh_token_replaces_the_old(cred_path):
    clock = Clock(EXPIRES + 1)
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer(expires_in=3600))
        refresher(cred_path, clock).credential()
    credentials = read_credentials(str(cred_path)).credentials
    assert credentials.refresh_token == NEW_REFRESH
    assert credentials.expires_at == pytest.approx(clock.now + 3600, abs=0.001)


# --- Retry-After, shared by every worker ----------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [
        (429, "30", 30.0),
        (429, "1", 5.0),  # clamped up: never a tight loop
        (429, "86400", 300.0),  # clamped down: a bad header cannot park refreshes for a day
        (503, "40", 40.0),
        (502, None, 5.0),  # no header: the usual back-off
        (429, "soon", 5.0),  # unparseable: the usual back-off
        (429, email.utils.formatdate(EXPIRES - 3600 + 60, usegmt=True), 60.0),
    ],
)
def test_429_and_5xx_back_off_by_retry_after_clamped(
    cred_path, caplog, status, retry_after, expected
):
    clock = Clock(EXPIRES - 3600)  # valid; the refresh comes from a 401
    caplog.set_level(logging.INFO, logger="shim.oauth")
    headers = {"Retry-After": retry_after} if retry_after else {}
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, status=status, json={"error": "rate_limited"}, headers=headers)
        r = refresher(cred_path, clock)
        assert r.after_unauthorized(r.credential()[1]) is False
        [record] = failed_records(caplog)
        assert record.retry_in_s == pytest.approx(expected, abs=1.0)
        clock.now += expected - 1
        r.after_unauthorized(r.credential()[1])
        assert len(mock.calls) == 1
    assert FileGate(gate_path(str(cred_path))).read().not_before == pytest.approx(
        EXPIRES - 3600 + expected, abs=1.0
    )


def test_the_back_off_holds_for_every_worker_on_the_file(cred_path):
    clock = Clock(EXPIRES - 3600)
    workers = [refresher(cred_path, clock) for _ in range(3)]
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, status=429, headers={"Retry-After": "30"}, json={})
        for _ in range(5):
            for worker in workers:
                worker.after_unauthorized(worker.credential()[1])
        assert len(mock.calls) == 1
        # Once the interval is over (here the token has expired too), one worker
        # (not each) tries again; the others adopt its pair from the file.
        clock.now = EXPIRES + 1
        mock.replace(responses.POST, TOKEN_URL, json=token_answer())
        for worker in workers:
            worker.credential()
        assert len(mock.calls) == 2
    assert {worker.credential()[0] for worker in workers} == {NEW_ACCESS}
    # Success clears the note.
    assert FileGate(gate_path(str(cred_path))).read() == GateNote()


def test_the_back_off_is_shared_between_boxes_through_redis(tmp_path, cred_path, redis_server):
    redis_server.command("DEL", "shim:oauth:anthropic:gate")
    # Another box: its own copy of the file, the same Redis.
    other_path = tmp_path / "other" / ".credentials.json"
    other_path.parent.mkdir()
    other_path.write_text(cred_path.read_text())
    clock = Clock(EXPIRES - 3600)
    state = RedisState(redis_server.url)
    try:
        boxes = [refresher(p, clock, shared=state) for p in (cred_path, other_path)]
        with responses.RequestsMock() as mock:
            mock.post(TOKEN_URL, status=503, headers={"Retry-After": "20"}, json={})
            for box in boxes * 3:
                box.after_unauthorized(box.credential()[1])
            assert len(mock.calls) == 1
        assert SharedGate(state, FileGate("/nonexistent")).read().not_before == pytest.approx(
            EXPIRES - 3600 + 20, abs=1
        )
    finally:
        redis_server.command("DEL", "shim:oauth:anthropic:gate")


# --- Claude Code refreshes the same login ---------------------------------------------------


def test_a_pair_claude_code_wrote_in_place_is_adopted_before_refreshing(cred_path):
    clock = Clock(EXPIRES - 3600)
    r = refresher(cred_path, clock)
    assert r.credential()[0] == ACCESS
    claude_code_writes(cred_path, CC_ACCESS, CC_REFRESH, EXPIRES + 28_800)
    clock.now = EXPIRES + 1  # the token shim had is expired now: it would refresh it
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(TOKEN_URL, json=token_answer())
        assert r.credential()[0] == CC_ACCESS
        assert r.after_unauthorized("oauth:" + key_id(ACCESS)) is True
        assert len(mock.calls) == 0  # the refresh token Claude Code spent is never sent


def test_a_half_written_file_is_read_again_once_complete(cred_path, caplog):
    r = refresher(cred_path, Clock(EXPIRES - 3600))
    complete = json.loads(cred_path.read_text())
    complete["claudeAiOauth"].update({"accessToken": CC_ACCESS, "refreshToken": CC_REFRESH})
    text = json.dumps(complete)
    with caplog.at_level(logging.WARNING, logger="shim.oauth"):
        cred_path.write_text(text[: len(text) // 2])  # Claude Code mid-write
        assert r.credential()[0] == ACCESS
        assert r.credential()[0] == ACCESS  # said once per state of the file
        cred_path.write_text(text)
        assert r.credential()[0] == CC_ACCESS
    assert [rec.event for rec in caplog.records] == ["oauth_file_unusable"]


def test_a_refresh_waits_for_a_half_written_file_instead_of_spending_a_stale_token(cred_path):
    r = refresher(cred_path, Clock(EXPIRES + 1))  # expired: a refresh is due now
    complete = json.loads(cred_path.read_text())
    complete["claudeAiOauth"].update(
        {"accessToken": CC_ACCESS, "refreshToken": CC_REFRESH, "expiresAt": (EXPIRES + 9e3) * 1e3}
    )
    text = json.dumps(complete)
    cred_path.write_text(text[:20])  # Claude Code truncated the file and is writing its pair
    finisher = threading.Timer(0.3, cred_path.write_text, args=(text,))
    finisher.start()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(TOKEN_URL, json=token_answer())
        assert r.credential()[0] == CC_ACCESS
        assert len(mock.calls) == 0
    finisher.join()


def test_after_invalid_grant_the_pair_claude_code_is_writing_is_adopted(cred_path, caplog):
    clock = Clock(EXPIRES - 3600)
    caplog.set_level(logging.INFO, logger="shim.oauth")
    results = []

    def claude_code_got_there_first(request):
        # Claude Code spent the token a moment ago and writes its pair just after.
        claude_code_writes(cred_path, CC_ACCESS, CC_REFRESH, EXPIRES + 28_800)
        return 400, {}, json.dumps({"error": "invalid_grant"})

    with responses.RequestsMock() as mock:
        mock.add_callback(responses.POST, TOKEN_URL, callback=claude_code_got_there_first)
        r = refresher(cred_path, clock, on_result=results.append)
        assert r.after_unauthorized(r.credential()[1]) is True
        assert r.credential()[0] == CC_ACCESS
        assert len(mock.calls) == 1
    assert r.state()["state"] == "ok"
    assert "relogin_needed" not in results
    events = [rec.event for rec in caplog.records]
    assert "oauth_stale_refresh_recovered" in events and "oauth_relogin_needed" not in events
    # The endpoint was fine: nothing backs the next refresh off.
    assert FileGate(gate_path(str(cred_path))).read() == GateNote()


def test_a_dead_refresh_token_with_nothing_newer_needs_a_new_login(cred_path, caplog):
    clock = Clock(EXPIRES - 3600)
    caplog.set_level(logging.INFO, logger="shim.oauth")
    results = []
    workers = [refresher(cred_path, clock, on_result=results.append) for _ in range(2)]
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, status=400, json={"error": "invalid_grant"})
        assert workers[0].after_unauthorized(workers[0].credential()[1]) is False
        # Neither this worker nor the other ever spends that token again, even much later.
        clock.now += 3600
        for worker in workers * 5:
            worker.credential()
            assert worker.after_unauthorized(worker.credential()[1]) is False
        assert len(mock.calls) == 1
    assert results.count("relogin_needed") == 1
    for worker in workers:
        state = worker.state()
        assert (state["state"], state["reason"]) == ("relogin_needed", "oauth_relogin_needed")
    [record] = [rec for rec in caplog.records if rec.event == "oauth_relogin_needed"]
    assert record.levelno == logging.ERROR and record.credential == "oauth:" + key_id(ACCESS)
    assert FileGate(gate_path(str(cred_path))).read().dead == key_id(REFRESH)
    text = caplog.text + "".join(str(vars(rec)) for rec in caplog.records)
    text += Path(gate_path(str(cred_path))).read_text()
    assert not any(token in text for token in ALL_TOKENS)

    # The user runs `claude` and logs in again: picked up without a restart.
    claude_code_writes(cred_path, LOGIN_ACCESS, LOGIN_REFRESH, clock.now + 28_800)
    for worker in workers:
        assert worker.state()["state"] == "ok"
        assert worker.credential()[0] == LOGIN_ACCESS


def test_a_new_login_is_refreshed_normally_after_a_dead_one(cred_path):
    clock = Clock(EXPIRES + 10)  # expired
    r = refresher(cred_path, clock)
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, status=400, json={"error": "invalid_grant"})
        assert r.credential()[0] == ACCESS
        assert r.state()["state"] == "relogin_needed"
    # A new login whose token is already due: its refresh token is spent normally.
    claude_code_writes(cred_path, LOGIN_ACCESS, LOGIN_REFRESH, clock.now + 60)
    with responses.RequestsMock() as mock:
        mock.post(
            TOKEN_URL,
            json=token_answer(),
            match=[
                matchers.json_params_matcher({"refresh_token": LOGIN_REFRESH}, strict_match=False)
            ],
        )
        assert r.credential()[0] == LOGIN_ACCESS  # still valid: refreshed in the background
        r.after_unauthorized(r.credential()[1])
        assert r.credential()[0] == NEW_ACCESS and r.state()["state"] == "ok"


def test_fields_claude_code_added_during_a_refresh_survive_it(cred_path):
    def endpoint(request):
        document = json.loads(cred_path.read_text())
        document["claudeAiOauth"]["rateLimitTier"] = "default_claude_max_20x"
        document["mcpOAuth"] = {"server": {"accessToken": "other-service"}}
        cred_path.write_text(json.dumps(document))
        return 200, {}, json.dumps(token_answer())

    with responses.RequestsMock() as mock:
        mock.add_callback(responses.POST, TOKEN_URL, callback=endpoint)
        refresher(cred_path, Clock(EXPIRES + 1)).credential()
    document = json.loads(cred_path.read_text())
    section = document["claudeAiOauth"]
    assert (section["accessToken"], section["refreshToken"]) == (NEW_ACCESS, NEW_REFRESH)
    assert section["rateLimitTier"] == "default_claude_max_20x"
    assert (section["scopes"], section["subscriptionType"]) == (["user:inference"], "max")
    assert document["mcpOAuth"] == {"server": {"accessToken": "other-service"}}


def test_a_new_login_written_during_a_refresh_is_not_overwritten(cred_path):
    def endpoint(request):
        claude_code_writes(cred_path, LOGIN_ACCESS, LOGIN_REFRESH, EXPIRES + 28_800)
        return 200, {}, json.dumps(token_answer())

    clock = Clock(EXPIRES + 1)
    with responses.RequestsMock() as mock:
        mock.add_callback(responses.POST, TOKEN_URL, callback=endpoint)
        r = refresher(cred_path, clock)
        r.credential()
    assert read_credentials(str(cred_path)).credentials.refresh_token == LOGIN_REFRESH
    # Both pairs are valid; the file's wins at the next look.
    assert r.credential()[0] == LOGIN_ACCESS
