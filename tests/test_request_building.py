"""What shim sends upstream, and what it gives back, checked with ``responses``.

The in-process app forwards to the fake hosts from ``settings_env``; ``responses``
intercepts the session's adapter, so nothing leaves the process. Each test asserts
on the request as it was *sent* (URL, headers, body) or on the client's answer.
"""

from __future__ import annotations

import io
import json

import pytest
import requests
import responses
from responses import matchers

from tests.conftest import ANTHROPIC_BASE, GEMINI_BASE, SECRET
from tests.fake_upstream import FAKE_API_KEY, FAKE_GEMINI_KEYS, FAKE_OAUTH_TOKEN

ANTHROPIC_UP = "https://anthropic.upstream.test"
GEMINI_UP = "https://gemini.upstream.test"
MESSAGES = f"{ANTHROPIC_UP}/v1/messages"
GENERATE = f"{GEMINI_UP}/v1beta/models/gemini-2.5-flash:generateContent"
OAUTH_BETA = "oauth-2025-04-20"
BODY = b'{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[]}'

ANTHROPIC_AUTH = {"x-api-key": SECRET}
GEMINI_AUTH = {"x-goog-api-key": SECRET}
# (base_url, path, client auth headers, upstream URL) per provider, for shared checks.
PROVIDERS = {
    "anthropic": (ANTHROPIC_BASE, "/v1/messages", ANTHROPIC_AUTH, MESSAGES),
    "gemini": (
        GEMINI_BASE,
        "/v1beta/models/gemini-2.5-flash:generateContent",
        GEMINI_AUTH,
        GENERATE,
    ),
}


@pytest.fixture
def rsps():
    """Every registered upstream URL must be called."""
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


@pytest.fixture
def no_upstream():
    """Nothing registered: a test asserts ``len(calls) == 0``."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def api_key_client(make_client):
    return make_client(SHIM_ANTHROPIC_TOKEN="", SHIM_ANTHROPIC_API_KEY=FAKE_API_KEY)


def sent_headers(call) -> dict[str, str]:  # noqa: ANN001 - a responses Call
    return {name.lower(): value for name, value in call.request.headers.items()}


def assert_secret_not_sent(call) -> None:  # noqa: ANN001 - a responses Call
    request = call.request
    assert SECRET not in request.url
    for name, value in request.headers.items():
        assert SECRET not in name
        assert SECRET not in value
    body = request.body or b""
    assert SECRET.encode() not in (body if isinstance(body, bytes) else body.encode())


def post_messages(client, headers: dict[str, str] | None = None, body: bytes = BODY, **kwargs):
    return client.post(
        "/v1/messages",
        base_url=ANTHROPIC_BASE,
        data=body,
        headers={**ANTHROPIC_AUTH, **(headers or {})},
        content_type="application/json",
        **kwargs,
    )


def anthropic_error(response) -> str:  # noqa: ANN001 - a test response
    body = response.get_json()
    assert body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"}, body
    return body["error"]["type"]


def google_error(response) -> str:  # noqa: ANN001 - a test response
    body = response.get_json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "status"}, body
    assert body["error"]["code"] == response.status_code
    return body["error"]["status"]


# --- Anthropic, OAuth upstream credential ----------------------------------------------------


@pytest.mark.parametrize(
    "auth",
    [
        {"x-api-key": SECRET},
        {"Authorization": f"Bearer {SECRET}"},
        {"Authorization": f"bearer {SECRET}"},
        {"Authorization": f"Bearer   {SECRET} "},
    ],
)
def test_oauth_mode_sends_bearer_token_instead_of_secret(make_client, rsps, auth):
    rsps.add(
        responses.POST,
        MESSAGES,
        json={"ok": True},
        match=[matchers.header_matcher({"authorization": f"Bearer {FAKE_OAUTH_TOKEN}"})],
    )
    response = make_client().post("/v1/messages", base_url=ANTHROPIC_BASE, data=BODY, headers=auth)
    assert response.status_code == 200
    sent = sent_headers(rsps.calls[0])
    assert sent["authorization"] == f"Bearer {FAKE_OAUTH_TOKEN}"
    assert "x-api-key" not in sent
    assert_secret_not_sent(rsps.calls[0])


@pytest.mark.parametrize(
    ("client_beta", "upstream_beta"),
    [
        (None, OAUTH_BETA),
        ("", OAUTH_BETA),
        ("a, b,a", f"a,b,{OAUTH_BETA}"),
        (OAUTH_BETA, OAUTH_BETA),
        (f"x, {OAUTH_BETA}", f"x,{OAUTH_BETA}"),
        (f"{OAUTH_BETA},x", f"{OAUTH_BETA},x"),
    ],
)
def test_oauth_mode_merges_oauth_beta(make_client, rsps, client_beta, upstream_beta):
    rsps.add(
        responses.POST,
        MESSAGES,
        json={},
        match=[matchers.header_matcher({"anthropic-beta": upstream_beta})],
    )
    headers = {} if client_beta is None else {"anthropic-beta": client_beta}
    post_messages(make_client(), headers)
    assert sent_headers(rsps.calls[0])["anthropic-beta"] == upstream_beta


# --- Anthropic, API-key upstream credential --------------------------------------------------


@pytest.mark.parametrize("auth", [{"x-api-key": SECRET}, {"Authorization": f"Bearer {SECRET}"}])
def test_api_key_mode_sends_api_key_instead_of_secret(api_key_client, rsps, auth):
    rsps.add(
        responses.POST,
        MESSAGES,
        json={},
        match=[matchers.header_matcher({"x-api-key": FAKE_API_KEY})],
    )
    response = api_key_client.post("/v1/messages", base_url=ANTHROPIC_BASE, data=BODY, headers=auth)
    assert response.status_code == 200
    sent = sent_headers(rsps.calls[0])
    assert sent["x-api-key"] == FAKE_API_KEY
    assert "authorization" not in sent
    assert_secret_not_sent(rsps.calls[0])


@pytest.mark.parametrize("client_beta", ["b2 ,b1", "a, b,a", OAUTH_BETA, "x,,y "])
def test_api_key_mode_forwards_beta_byte_for_byte(api_key_client, rsps, client_beta):
    rsps.add(responses.POST, MESSAGES, json={})
    post_messages(api_key_client, {"anthropic-beta": client_beta})
    assert sent_headers(rsps.calls[0])["anthropic-beta"] == client_beta


def test_api_key_mode_adds_no_beta(api_key_client, rsps):
    rsps.add(responses.POST, MESSAGES, json={})
    post_messages(api_key_client)
    assert "anthropic-beta" not in sent_headers(rsps.calls[0])


# --- path, query, body, headers --------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "upstream_url"),
    [
        ("/v1/messages", MESSAGES),
        ("/v1/messages?beta=true", f"{MESSAGES}?beta=true"),
        ("/v1/messages?b=2&a=1&b=3", f"{MESSAGES}?b=2&a=1&b=3"),
        ("/v1/messages/count_tokens?beta=true", f"{MESSAGES}/count_tokens?beta=true"),
    ],
)
def test_anthropic_path_and_query_kept(make_client, rsps, path, upstream_url):
    rsps.add(responses.POST, upstream_url.split("?")[0], json={})
    make_client().post(path, base_url=ANTHROPIC_BASE, data=BODY, headers=ANTHROPIC_AUTH)
    assert rsps.calls[0].request.url == upstream_url


def test_upstream_base_path_is_kept(make_client, rsps):
    rsps.add(responses.POST, f"{ANTHROPIC_UP}/base/v1/messages", json={})
    post_messages(make_client(SHIM_ANTHROPIC_UPSTREAM=f"{ANTHROPIC_UP}/base/"))
    assert rsps.calls[0].request.url == f"{ANTHROPIC_UP}/base/v1/messages"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{ "z":1 ,\n\t"a" : [ 2,1 ],"m":"x"   }  \n'),
        ("application/json", '{"t":"h\u00e9llo \u2603 \U0001f600"}'.encode()),
        ("text/plain", b"not json at all \x00\xff\xfe bytes"),
        ("application/octet-stream", bytes(range(256)) * 4),
        ("application/json", b""),
    ],
)
def test_body_forwarded_byte_for_byte(make_client, rsps, content_type, body):
    rsps.add(responses.POST, MESSAGES, json={})
    make_client().post(
        "/v1/messages",
        base_url=ANTHROPIC_BASE,
        data=body,
        headers=ANTHROPIC_AUTH,
        content_type=content_type,
    )
    request = rsps.calls[0].request
    assert request.body == body
    sent = sent_headers(rsps.calls[0])
    assert sent["content-length"] == str(len(body))
    assert sent["content-type"] == content_type


def test_get_sends_no_body(make_client, rsps):
    rsps.add(responses.GET, f"{ANTHROPIC_UP}/v1/models", json={})
    make_client().get("/v1/models", base_url=ANTHROPIC_BASE, headers=ANTHROPIC_AUTH)
    assert not rsps.calls[0].request.body
    assert "content-length" not in sent_headers(rsps.calls[0])


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("anthropic-version", "2023-06-01"),
        ("x-claude-code-session-id", "5b0c6a1e-0000-4000-8000-000000000001"),
        ("user-agent", "claude-cli/2.0.0 (external, cli)"),
        ("x-app", "cli"),
        ("accept", "application/json"),
        ("x-stainless-retry-count", "0"),
    ],
)
def test_end_to_end_header_forwarded(make_client, rsps, name, value):
    rsps.add(responses.POST, MESSAGES, json={}, match=[matchers.header_matcher({name: value})])
    post_messages(make_client(), {name: value})
    assert sent_headers(rsps.calls[0])[name] == value


@pytest.mark.parametrize(
    ("headers", "dropped"),
    [
        ({"Connection": "keep-alive"}, "connection"),
        ({"Connection": "keep-alive, X-Foo", "X-Foo": "1"}, "x-foo"),
        ({"Connection": "close,x-bar ", "X-Bar": "1"}, "x-bar"),
        ({"Keep-Alive": "timeout=5, max=100"}, "keep-alive"),
        ({"TE": "trailers"}, "te"),
        ({"Upgrade": "h2c", "Connection": "Upgrade"}, "upgrade"),
        ({"Proxy-Authorization": "Basic eDp5"}, "proxy-authorization"),
        ({"X-Forwarded-For": "203.0.113.7"}, "x-forwarded-for"),
        ({"X-Real-IP": "203.0.113.7"}, "x-real-ip"),
        ({"X-Forwarded-Host": "shim.example"}, "x-forwarded-host"),
        ({"X-Forwarded-Proto": "https"}, "x-forwarded-proto"),
        ({"Forwarded": "for=203.0.113.7"}, "forwarded"),
        ({"Host": "shim.example"}, "host"),
    ],
)
def test_hop_and_proxy_headers_not_forwarded(make_client, rsps, headers, dropped):
    rsps.add(responses.POST, MESSAGES, json={})
    post_messages(make_client(), headers)
    assert dropped not in sent_headers(rsps.calls[0])


def test_content_length_is_recomputed_not_copied(make_client, rsps):
    rsps.add(responses.POST, MESSAGES, json={})
    post_messages(make_client(), body=b"12345")
    sent = rsps.calls[0].request.headers
    assert [v for k, v in sent.items() if k.lower() == "content-length"] == ["5"]


def test_timeouts_from_settings_reach_the_adapter(make_client, rsps):
    rsps.add(responses.POST, MESSAGES, json={})
    post_messages(make_client(SHIM_CONNECT_TIMEOUT_S="3", SHIM_HTTP_TIMEOUT_S="45"))
    kwargs = rsps.calls[0].request.req_kwargs
    timeout = kwargs["timeout"]
    assert (timeout.connect_timeout, timeout.read_timeout, kwargs["stream"]) == (3.0, 45.0, True)


# --- Gemini ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_query", "upstream_query"),
    [
        (f"key={SECRET}&alt=sse", "alt=sse"),
        (f"alt=sse&key={SECRET}", "alt=sse"),
        (f"a=1&key={SECRET}&b=2", "a=1&b=2"),
        (f"%6Bey={SECRET}&alt=sse", "alt=sse"),
        (f"k%65y={SECRET}&alt=sse", "alt=sse"),
        (f"key={SECRET}", ""),
        (f"key={SECRET}&key={SECRET}", ""),
        (f"monkey=1&key={SECRET}&keys=2", "monkey=1&keys=2"),
        (f"a=%20x%26&key={SECRET}&z=%F0%9F", "a=%20x%26&z=%F0%9F"),
        (f"b=2&a=1&key={SECRET}&c=3", "b=2&a=1&c=3"),
    ],
)
def test_gemini_key_param_removed_other_params_kept_in_order(
    make_client, rsps, client_query, upstream_query
):
    rsps.add(responses.POST, GENERATE, json={})
    response = make_client().post(
        f"/v1beta/models/gemini-2.5-flash:generateContent?{client_query}",
        base_url=GEMINI_BASE,
        data=b"{}",
        content_type="application/json",
    )
    assert response.status_code == 200
    expected = f"{GENERATE}?{upstream_query}" if upstream_query else GENERATE
    assert rsps.calls[0].request.url == expected
    assert_secret_not_sent(rsps.calls[0])


@pytest.mark.parametrize(
    ("auth", "query"),
    [
        ({"x-goog-api-key": SECRET}, ""),
        ({}, f"?key={SECRET}"),
        ({"x-goog-api-key": SECRET, "Authorization": f"Bearer {SECRET}"}, ""),
    ],
)
def test_gemini_sends_a_pool_key_never_the_secret(make_client, rsps, auth, query):
    rsps.add(
        responses.POST,
        GENERATE,
        json={},
        match=[matchers.header_matcher({"x-goog-api-key": FAKE_GEMINI_KEYS[0]})],
    )
    response = make_client().post(
        f"/v1beta/models/gemini-2.5-flash:generateContent{query}",
        base_url=GEMINI_BASE,
        data=b"{}",
        headers=auth,
    )
    assert response.status_code == 200
    sent = sent_headers(rsps.calls[0])
    assert sent["x-goog-api-key"] in FAKE_GEMINI_KEYS
    assert "authorization" not in sent
    assert_secret_not_sent(rsps.calls[0])


def test_gemini_uses_keys_round_robin(make_client, rsps):
    rsps.add(responses.POST, GENERATE, json={})
    client = make_client()
    for _ in range(4):
        client.post(
            "/v1beta/models/gemini-2.5-flash:generateContent",
            base_url=GEMINI_BASE,
            data=b"{}",
            headers=GEMINI_AUTH,
        )
    used = [sent_headers(call)["x-goog-api-key"] for call in rsps.calls]
    assert used == [*FAKE_GEMINI_KEYS, FAKE_GEMINI_KEYS[0]]


# --- response passthrough --------------------------------------------------------------------


RATE_LIMITED = {
    "anthropic": (
        b'{"type":"error","error":{"type":"rate_limit_error","message":"Rate limited"}}',
        {
            "retry-after": "7",
            "request-id": "req_011CUpstream",
            "anthropic-ratelimit-unified-status": "rejected",
        },
    ),
    "gemini": (
        b'{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED"}}',
        {"retry-after": "7", "x-goog-request-id": "g-123"},
    ),
}


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_upstream_error_status_headers_and_body_pass_through(make_client, rsps, provider):
    base, path, auth, upstream = PROVIDERS[provider]
    body, headers = RATE_LIMITED[provider]
    rsps.add(
        responses.POST,
        upstream,
        body=body,
        status=429,
        headers=headers,
        content_type="application/json",
    )
    response = make_client().post(path, base_url=base, data=b"{}", headers=auth)
    assert response.status_code == 429
    assert response.data == body
    for name, value in headers.items():
        assert response.headers[name] == value
    assert response.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    "body", [b"", b"{}", b'{"id":"msg_1","content":[]}', b"\x1f\x8b\x08garbage"]
)
def test_upstream_success_body_passes_through(make_client, rsps, body):
    rsps.add(responses.POST, MESSAGES, body=body, status=200)
    response = post_messages(make_client())
    assert (response.status_code, response.data) == (200, body)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Connection", "close"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authenticate", "Basic"),
        ("Trailer", "x-checksum"),
        ("Upgrade", "h2c"),
        ("Date", "Thu, 01 Jan 2026 00:00:00 GMT"),
        ("Server", "upstream/1.0"),
    ],
)
def test_hop_by_hop_response_header_not_relayed(make_client, rsps, name, value):
    rsps.add(responses.POST, MESSAGES, json={}, headers={name: value, "x-upstream": "yes"})
    response = post_messages(make_client())
    assert name not in response.headers
    assert response.headers["x-upstream"] == "yes"


def test_upstream_redirect_not_followed(make_client, rsps):
    rsps.add(
        responses.POST,
        MESSAGES,
        status=302,
        headers={"Location": "https://elsewhere.test/steal"},
    )
    rsps.add(responses.POST, "https://elsewhere.test/steal", json={})
    response = post_messages(make_client())
    assert response.status_code == 302
    assert response.headers["Location"] == "https://elsewhere.test/steal"
    assert len(rsps.calls) == 1
    # The second URL is registered only to catch a follow; it must not fire.
    rsps.remove(responses.POST, "https://elsewhere.test/steal")


# --- shim's own errors, in the provider's shape ----------------------------------------------


WRONG = "wrong-value-AAAA-0123456789"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-api-key": WRONG},
        {"Authorization": f"Bearer {WRONG}"},
        {"x-api-key": SECRET[:-1]},
        {"x-api-key": SECRET + "x"},
        {"x-api-key": SECRET.upper()},
        {"Authorization": SECRET},
        {"Authorization": f"Basic {SECRET}"},
        {"x-goog-api-key": SECRET},
        {"x-api-key": ""},
    ],
)
def test_anthropic_wrong_secret_is_401_not_forwarded(make_client, no_upstream, headers):
    response = make_client().post(
        "/v1/messages", base_url=ANTHROPIC_BASE, data=BODY, headers=headers
    )
    assert response.status_code == 401
    assert anthropic_error(response) == "authentication_error"
    assert WRONG.encode() not in response.data
    assert len(no_upstream.calls) == 0


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({}, ""),
        ({"x-goog-api-key": WRONG}, ""),
        ({}, f"?key={WRONG}"),
        ({}, f"?KEY={SECRET}"),
        ({"x-goog-api-key": SECRET[:-1]}, ""),
        ({"x-api-key": SECRET}, ""),
        ({"Authorization": f"Bearer {SECRET}"}, ""),
        ({}, f"?alt=sse&key={WRONG}"),
    ],
)
def test_gemini_wrong_secret_is_401_not_forwarded(make_client, no_upstream, headers, query):
    response = make_client().post(
        f"/v1beta/models/gemini-2.5-flash:generateContent{query}",
        base_url=GEMINI_BASE,
        data=b"{}",
        headers=headers,
    )
    assert response.status_code == 401
    assert google_error(response) == "UNAUTHENTICATED"
    assert WRONG.encode() not in response.data
    assert len(no_upstream.calls) == 0


@pytest.mark.parametrize(
    ("provider", "headers", "query"),
    [
        ("anthropic", {"x-api-key": "s\xe9cret-\xff-0123456789abcdef"}, ""),
        ("anthropic", {"Authorization": "Bearer \xe9\xe8\xff0123456789abcdef"}, ""),
        ("anthropic", {"x-api-key": "Ã©-utf8-as-latin1-0123456789"}, ""),
        ("gemini", {"x-goog-api-key": "s\xe9cret-\xff-0123456789abcdef"}, ""),
        ("gemini", {}, "?key=%FF%FE%E9-0123456789abcdef"),
        ("gemini", {}, "?key=\xe9\xff"),
    ],
)
def test_non_ascii_secret_is_401_not_500(make_client, no_upstream, provider, headers, query):
    base, path, _auth, _upstream = PROVIDERS[provider]
    response = make_client().post(path + query, base_url=base, data=b"{}", headers=headers)
    assert response.status_code == 401
    assert len(no_upstream.calls) == 0


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_body_over_limit_is_413_not_forwarded(make_client, no_upstream, provider):
    base, path, auth, _upstream = PROVIDERS[provider]
    client = make_client(SHIM_MAX_BODY_BYTES="100")
    response = client.post(path, base_url=base, data=b"x" * 101, headers=auth)
    assert response.status_code == 413
    if provider == "anthropic":
        assert anthropic_error(response) == "request_too_large"
    else:
        google_error(response)
    assert len(no_upstream.calls) == 0


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_body_at_limit_is_forwarded(make_client, rsps, provider):
    base, path, auth, upstream = PROVIDERS[provider]
    rsps.add(responses.POST, upstream, json={})
    client = make_client(SHIM_MAX_BODY_BYTES="100")
    response = client.post(path, base_url=base, data=b"x" * 100, headers=auth)
    assert response.status_code == 200
    assert rsps.calls[0].request.body == b"x" * 100


def test_chunked_body_over_limit_is_413_not_forwarded(make_client, no_upstream):
    client = make_client(SHIM_MAX_BODY_BYTES="100")
    response = client.post(
        "/v1/messages",
        base_url=ANTHROPIC_BASE,
        input_stream=io.BytesIO(b"x" * 300),
        headers={**ANTHROPIC_AUTH, "Transfer-Encoding": "chunked"},
    )
    assert response.status_code == 413
    assert len(no_upstream.calls) == 0


@pytest.mark.parametrize(
    ("provider", "overrides"),
    [
        ("anthropic", {"SHIM_ANTHROPIC_TOKEN": ""}),
        ("gemini", {"SHIM_GEMINI_KEYS": ""}),
    ],
)
def test_unconfigured_provider_is_503_in_its_shape(
    make_client, no_upstream, monkeypatch, tmp_path, provider, overrides
):
    monkeypatch.chdir(tmp_path)  # no default gemini_keys.txt to pick up
    base, path, auth, _upstream = PROVIDERS[provider]
    response = make_client(**overrides).post(path, base_url=base, data=b"{}", headers=auth)
    assert response.status_code == 503
    if provider == "anthropic":
        assert anthropic_error(response) == "api_error"
    else:
        assert google_error(response) == "UNAVAILABLE"
    assert len(no_upstream.calls) == 0


@pytest.mark.parametrize(
    ("provider", "overrides", "wrong"),
    [
        ("anthropic", {"SHIM_ANTHROPIC_TOKEN": ""}, {"x-api-key": WRONG}),
        ("gemini", {"SHIM_GEMINI_KEYS": ""}, {"x-goog-api-key": WRONG}),
    ],
)
def test_unconfigured_provider_still_checks_secret_first(
    make_client, no_upstream, monkeypatch, tmp_path, provider, overrides, wrong
):
    monkeypatch.chdir(tmp_path)
    base, path, _auth, _upstream = PROVIDERS[provider]
    response = make_client(**overrides).post(path, base_url=base, data=b"{}", headers=wrong)
    assert response.status_code == 401
    assert len(no_upstream.calls) == 0


@pytest.mark.parametrize(
    ("exception", "status", "anthropic_type", "google_status"),
    [
        (
            requests.exceptions.ConnectionError("Failed to resolve 'anthropic.upstream.test'"),
            502,
            "api_error",
            "UNAVAILABLE",
        ),
        (
            requests.exceptions.SSLError("gemini.upstream.test certificate verify failed"),
            502,
            "api_error",
            "UNAVAILABLE",
        ),
        (
            requests.exceptions.ReadTimeout("anthropic.upstream.test read timed out"),
            504,
            "timeout_error",
            "DEADLINE_EXCEEDED",
        ),
        (
            requests.exceptions.ConnectTimeout("gemini.upstream.test connect timed out"),
            504,
            "timeout_error",
            "DEADLINE_EXCEEDED",
        ),
    ],
)
@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_upstream_failure_is_provider_shaped_without_upstream_host(
    make_client, rsps, provider, exception, status, anthropic_type, google_status
):
    base, path, auth, upstream = PROVIDERS[provider]
    rsps.add(responses.POST, upstream, body=exception)
    response = make_client().post(path, base_url=base, data=b"{}", headers=auth)
    assert response.status_code == status
    if provider == "anthropic":
        assert anthropic_error(response) == anthropic_type
    else:
        assert google_error(response) == google_status
    assert b"upstream.test" not in response.data
    assert len(rsps.calls) == 1


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_error_response_never_echoes_any_secret(make_client, rsps, provider):
    base, path, auth, upstream = PROVIDERS[provider]
    rsps.add(responses.POST, upstream, body=requests.exceptions.ConnectionError("down"))
    response = make_client().post(path, base_url=base, data=b"{}", headers=auth)
    text = json.dumps(response.get_json()) + str(response.headers)
    for value in (SECRET, FAKE_OAUTH_TOKEN, *FAKE_GEMINI_KEYS):
        assert value not in text
