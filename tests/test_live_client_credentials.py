"""Each member's own login (issue #15, mode 5), live through real gunicorn (2 workers).

With SHIM_ALLOW_CLIENT_CREDENTIALS=1 a client authenticates to shim with
``X-Shim-Key`` and its own ``Authorization`` / ``x-api-key`` goes upstream
unchanged instead of shim's credential; Claude Code does this with
ANTHROPIC_CUSTOM_HEADERS and its own login.
"""

from __future__ import annotations

import http.client
import json
import uuid

import pytest

from tests.conftest import SECRET, start_gateway
from tests.fake_upstream import FAKE_API_KEY, FAKE_OAUTH_TOKEN, OAUTH_BETA
from tests.test_live_clients import BIN, client_env, run

BODY = json.dumps({"model": "claude-member", "max_tokens": 8,
                   "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture(scope="module")
def members(fake_upstream, tmp_path_factory):
    gw = start_gateway(
        {
            "SHIM_ALLOW_CLIENT_CREDENTIALS": "1",
            "SHIM_ANTHROPIC_TOKEN": FAKE_OAUTH_TOKEN,
            "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
            "SHIM_GEMINI_UPSTREAM": fake_upstream.url,
            "SHIM_WORKERS": "2",
        },
        tmp_path_factory.mktemp("members") / "gunicorn.log",
    )
    yield gw
    gw.stop()


def post(gateway, headers: dict, stream: bool = False):
    conn = http.client.HTTPConnection("127.0.0.1", gateway.anthropic_port, timeout=15)
    try:
        body = json.loads(BODY) | ({"stream": True} if stream else {})
        conn.request("POST", "/v1/messages?beta=true", json.dumps(body),
                     {"content-type": "application/json", **headers})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def upstream_saw(fake_upstream, test_id: str):
    seen = fake_upstream.matching(test_id)
    assert len(seen) == 1
    return seen[0]


def assert_nothing_of_shim_upstream(request) -> None:
    assert "x-shim-key" not in request.headers
    assert SECRET not in json.dumps(request.headers) + request.query + request.body.decode()


@pytest.mark.parametrize("stream", [False, True])
def test_a_members_own_subscription_token_goes_upstream_untouched(
    members, fake_upstream, test_id, stream
):
    token, _, _ = fake_upstream.issue_tokens(3600)
    request_id = f"member-{test_id[:12]}"
    status, _ = post(members, {"x-shim-key": SECRET, "authorization": f"Bearer {token}",
                               "x-test-id": test_id, "x-request-id": request_id}, stream)
    assert status == 200
    seen = upstream_saw(fake_upstream, test_id)
    assert seen.header("authorization") == f"Bearer {token}"
    # Sent as ANTHROPIC_AUTH_TOKEN sends it (no OAuth beta): merged in, as for shim's own.
    assert OAUTH_BETA in seen.header("anthropic-beta").split(",")
    assert "x-api-key" not in seen.headers
    assert_nothing_of_shim_upstream(seen)
    line = members.access_line(request_id)
    assert line["client"] == "default" and line["client_credential"].startswith("client:")
    assert line["input_tokens"] == 12  # usage works the same in this mode
    assert token not in members.log_text()


def test_a_members_own_api_key_goes_upstream_and_shims_credential_does_not(
    members, fake_upstream, test_id
):
    status, _ = post(members, {"X-Shim-Key": SECRET, "x-api-key": FAKE_API_KEY,
                               "x-test-id": test_id})
    assert status == 200
    seen = upstream_saw(fake_upstream, test_id)
    assert seen.header("x-api-key") == FAKE_API_KEY
    assert "authorization" not in seen.headers  # not shim's OAuth token
    assert_nothing_of_shim_upstream(seen)


def test_two_members_are_told_apart_by_a_short_hash_of_their_credential(members, fake_upstream):
    ids = []
    for _ in range(2):
        token, _, _ = fake_upstream.issue_tokens(3600)
        request_id = f"member-{uuid.uuid4().hex[:12]}"
        assert post(members, {"x-shim-key": SECRET, "authorization": f"Bearer {token}",
                              "x-request-id": request_id})[0] == 200
        ids.append(members.access_line(request_id)["client_credential"])
    assert ids[0] != ids[1]


def test_a_wrong_shim_key_is_refused_and_a_shim_key_alone_uses_shims_credential(
    members, fake_upstream, test_id
):
    token, _, _ = fake_upstream.issue_tokens(3600)
    status, body = post(members, {"x-shim-key": "not-the-secret-0000000000",
                                  "authorization": f"Bearer {token}", "x-test-id": test_id})
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert fake_upstream.matching(test_id) == []
    marker = uuid.uuid4().hex
    assert post(members, {"x-shim-key": SECRET, "x-test-id": marker})[0] == 200
    assert upstream_saw(fake_upstream, marker).header("authorization") == (
        f"Bearer {FAKE_OAUTH_TOKEN}")


def test_a_members_rejected_token_is_their_answer_not_a_refresh_of_shims(
    members, fake_upstream, test_id
):
    token, _, _ = fake_upstream.issue_tokens(3600)
    fake_upstream.revoke(token)
    status, body = post(members, {"x-shim-key": SECRET, "authorization": f"Bearer {token}",
                                  "x-test-id": test_id})
    assert status == 401  # upstream's own answer, relayed
    assert json.loads(body)["error"]["type"] == "authentication_error"
    assert len(fake_upstream.matching(test_id)) == 1  # not retried on shim's credential


def test_without_the_setting_a_request_with_both_is_refused_and_x_shim_key_never_leaves(
    gateway, fake_upstream, test_id
):
    token, _, _ = fake_upstream.issue_tokens(3600)
    status, _ = post(gateway, {"x-shim-key": SECRET, "authorization": f"Bearer {token}",
                               "x-test-id": test_id})
    assert status == 401
    marker = uuid.uuid4().hex
    status, _ = post(gateway, {"x-api-key": SECRET, "x-shim-key": "stray", "x-test-id": marker})
    assert status == 200
    assert "x-shim-key" not in upstream_saw(fake_upstream, marker).headers


def test_claude_code_runs_through_with_its_own_login(members, fake_upstream, tmp_path, test_id):
    token, _, _ = fake_upstream.issue_tokens(3600)
    env = client_env(
        tmp_path,
        ANTHROPIC_BASE_URL=members.anthropic_url,
        ANTHROPIC_AUTH_TOKEN=token,
        ANTHROPIC_CUSTOM_HEADERS=f"X-Shim-Key: {SECRET}\nx-test-id: {test_id}",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        DISABLE_TELEMETRY="1",
        DISABLE_ERROR_REPORTING="1",
        DISABLE_AUTOUPDATER="1",
    )
    result = run([str(BIN / "claude"), "-p", "say hi"], env, tmp_path)

    assert result.returncode == 0, result.stderr[-2000:]
    assert "chunk0 chunk1 chunk2" in result.stdout
    messages = [r for r in fake_upstream.matching(test_id) if r.path == "/v1/messages"]
    assert messages
    for request in messages:
        assert request.header("authorization") == f"Bearer {token}"
        assert OAUTH_BETA in request.header("anthropic-beta").split(",")
        assert_nothing_of_shim_upstream(request)
