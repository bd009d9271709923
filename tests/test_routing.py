"""The route allow-list per port: what reaches upstream, and what never does."""

from __future__ import annotations

from urllib.parse import unquote

import pytest
import responses
from responses import matchers

from tests.conftest import ANTHROPIC_BASE, GEMINI_BASE, SECRET

UPSTREAM = {
    ANTHROPIC_BASE: "https://anthropic.upstream.test",
    GEMINI_BASE: "https://gemini.upstream.test",
}
AUTH = {ANTHROPIC_BASE: {"x-api-key": SECRET}, GEMINI_BASE: {"x-goog-api-key": SECRET}}


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def no_upstream():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


def open_raw(client, base: str, method: str, path: str, headers: dict[str, str]):  # noqa: ANN001
    """Send ``path`` as a WSGI server would hand it over: PATH_INFO percent-decoded, as is.

    Werkzeug's test client would read a leading ``//`` as a network location, so
    PATH_INFO is set directly (gunicorn keeps ``//v1/messages`` as the path).
    """
    target, _, query = path.partition("?")
    return client.open(
        target if not target.startswith("//") else "/",
        method=method,
        base_url=base,
        headers=headers,
        query_string=query,
        data=b"{}" if method == "POST" else None,
        environ_overrides={"PATH_INFO": unquote(target, encoding="latin-1")},
    )


def assert_provider_shaped(base: str, response, status: int) -> None:  # noqa: ANN001
    body = response.get_json()
    assert response.status_code == status
    if base == ANTHROPIC_BASE:
        assert body["type"] == "error", body
        assert body["error"]["type"] in ("not_found_error", "invalid_request_error"), body
        assert set(body["error"]) == {"type", "message"}
    else:
        assert body["error"]["code"] == status, body
        assert body["error"]["status"] in ("NOT_FOUND", "INVALID_ARGUMENT"), body
        assert set(body["error"]) == {"code", "message", "status"}


REFUSED = [
    # Anthropic port
    (ANTHROPIC_BASE, "GET", "/v1beta/models", 404),
    (ANTHROPIC_BASE, "POST", "/v1/models/gemini-2.5-flash:generateContent", 404),
    (ANTHROPIC_BASE, "POST", "/v1beta/models/gemini-2.5-flash:generateContent", 404),
    (ANTHROPIC_BASE, "POST", "/v1/messages/", 404),
    (ANTHROPIC_BASE, "POST", "//v1/messages", 404),
    (ANTHROPIC_BASE, "POST", "///v1/messages", 404),
    (ANTHROPIC_BASE, "POST", "/v1//messages", 404),
    (ANTHROPIC_BASE, "POST", "/v1/messages/batches", 404),
    (ANTHROPIC_BASE, "GET", "/v1/messages/batches", 404),
    (ANTHROPIC_BASE, "POST", "/v1/messages/count_tokens/", 404),
    (ANTHROPIC_BASE, "POST", "/V1/messages", 404),
    (ANTHROPIC_BASE, "GET", "/v1/models/..%2f..%2fetc", 404),
    (ANTHROPIC_BASE, "GET", "/v1/models/%2e%2e", 404),
    (ANTHROPIC_BASE, "GET", "/v1/models/.hidden", 404),
    (ANTHROPIC_BASE, "GET", "/v1/models/a%2Fb", 404),
    (ANTHROPIC_BASE, "GET", "/v1/models/claude:foo", 404),
    (ANTHROPIC_BASE, "GET", "/v1/files", 404),
    (ANTHROPIC_BASE, "GET", "/admin", 404),
    (ANTHROPIC_BASE, "GET", "/v1/messages", 405),
    (ANTHROPIC_BASE, "DELETE", "/v1/models/claude-sonnet-4-5", 405),
    (ANTHROPIC_BASE, "POST", "/v1/models", 405),
    # Gemini port
    (GEMINI_BASE, "POST", "/v1/messages", 404),
    (GEMINI_BASE, "POST", "/v1beta/models/gemini-2.5-flash:deleteEverything", 404),
    (GEMINI_BASE, "GET", "/v2/models", 404),
    (GEMINI_BASE, "GET", "/v1alpha/models", 404),
    (GEMINI_BASE, "POST", "/v1beta/models/../x:generateContent", 404),
    (GEMINI_BASE, "POST", "/v1beta/models/%2e%2e:generateContent", 404),
    (GEMINI_BASE, "GET", "/v1beta/tunedModels", 404),
    (GEMINI_BASE, "GET", "/v1beta/files", 404),
    (GEMINI_BASE, "POST", "/v1beta/models/gemini:generateContent/extra", 404),
    (GEMINI_BASE, "POST", "/v1beta/models/gemini-2.5-flash:generateContent/", 404),
    (GEMINI_BASE, "GET", "//v1beta/models", 404),
    (GEMINI_BASE, "GET", "/v1beta/models/", 404),
    (GEMINI_BASE, "GET", "/admin", 404),
    (GEMINI_BASE, "GET", "/v1beta/models/gemini-2.5-flash:generateContent", 405),
    (GEMINI_BASE, "POST", "/v1beta/models", 405),
]


@pytest.mark.parametrize("authenticated", [True, False], ids=["auth", "noauth"])
@pytest.mark.parametrize(
    ("base", "method", "path", "status"),
    REFUSED,
    ids=[f"{'anthropic' if b == ANTHROPIC_BASE else 'gemini'}-{m}-{p}" for b, m, p, _ in REFUSED],
)
def test_refused_route_never_reaches_upstream(
    client, no_upstream, base, method, path, status, authenticated
):
    headers = AUTH[base] if authenticated else {}
    response = open_raw(client, base, method, path, headers)
    assert len(no_upstream.calls) == 0, [call.request.url for call in no_upstream.calls]
    assert_provider_shaped(base, response, status)


@pytest.mark.parametrize(
    ("base", "path", "allowed"),
    [
        (ANTHROPIC_BASE, "/v1/messages", "POST"),
        (GEMINI_BASE, "/v1beta/models/gemini-2.5-flash:generateContent", "POST"),
    ],
)
def test_wrong_method_answers_405_with_allow(client, no_upstream, base, path, allowed):
    response = client.get(path, base_url=base, headers=AUTH[base])
    assert response.status_code == 405
    assert allowed in [m.strip() for m in response.headers["Allow"].split(",")]
    assert len(no_upstream.calls) == 0


def test_unknown_port_routes_nowhere(client, no_upstream):
    response = client.post(
        "/v1/messages", base_url="http://localhost:1234", headers={"x-api-key": SECRET}
    )
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == 404
    assert len(no_upstream.calls) == 0


ALLOWED = [
    (ANTHROPIC_BASE, "POST", "/v1/messages"),
    (ANTHROPIC_BASE, "POST", "/v1/messages?beta=true"),
    (ANTHROPIC_BASE, "POST", "/v1/messages/count_tokens"),
    (ANTHROPIC_BASE, "GET", "/v1/models"),
    (ANTHROPIC_BASE, "GET", "/v1/models?limit=1000"),
    (ANTHROPIC_BASE, "GET", "/v1/models/claude-sonnet-4-5"),
    (ANTHROPIC_BASE, "GET", "/v1/models/claude-sonnet-4-5-20250929"),
] + [
    (GEMINI_BASE, method, f"/{version}/{rest}")
    for version in ("v1beta", "v1")
    for method, rest in (
        ("GET", "models"),
        ("GET", "models?pageSize=50"),
        ("GET", "models/gemini-2.5-flash"),
        ("POST", "models/gemini-2.5-flash:generateContent"),
        ("POST", "models/gemini-2.5-flash:streamGenerateContent?alt=sse"),
        ("POST", "models/gemini-2.5-flash:countTokens"),
        ("POST", "models/gemini-embedding-001:embedContent"),
        ("POST", "models/gemini-embedding-001:batchEmbedContents"),
    )
]


@pytest.mark.parametrize(
    ("base", "method", "path"),
    ALLOWED,
    ids=[f"{'anthropic' if b == ANTHROPIC_BASE else 'gemini'}-{m}-{p}" for b, m, p in ALLOWED],
)
def test_allowed_route_reaches_upstream_once_with_same_path(client, rsps, base, method, path):
    target, _, query = path.partition("?")
    rsps.add(
        method,
        UPSTREAM[base] + target,
        json={"ok": True},
        match=[matchers.query_string_matcher(query or None)],
    )
    response = client.open(
        path,
        method=method,
        base_url=base,
        headers=AUTH[base],
        data=b"{}" if method == "POST" else None,
    )
    assert response.status_code == 200
    assert len(rsps.calls) == 1
    assert rsps.calls[0].request.url == UPSTREAM[base] + path
    assert rsps.calls[0].request.method == method


@pytest.mark.parametrize("base", [ANTHROPIC_BASE, GEMINI_BASE])
@pytest.mark.parametrize(("method", "path"), [("GET", "/health"), ("GET", "/"), ("HEAD", "/")])
def test_health_needs_no_auth_and_no_upstream(client, no_upstream, base, method, path):
    response = client.open(path, method=method, base_url=base)
    assert response.status_code == 200
    if method == "GET":
        assert response.get_json() == {"status": "ok"}
    assert len(no_upstream.calls) == 0
