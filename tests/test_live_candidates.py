"""One guess per request and no client secret upstream (issue #14), through real gunicorn.

The shared ``gateway`` (2 gevent workers, throttling off) shows what reaches
the fake upstream; a dedicated gateway with SHIM_AUTH_FAILURES_MAX=5 shows
how candidates are counted. The failed-secret count is shared by the
workers, and a refused request ends its connection, so each request of a
counting scenario comes on a new connection (either worker) from the
scenario's own loopback source address (its own count).
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import quote, unquote

import pytest

from shim.web import CONFLICTING
from tests.conftest import SECRET, start_gateway
from tests.fake_upstream import FAKE_API_KEY, FAKE_GEMINI_KEYS, FAKE_OAUTH_TOKEN

WRONG = [f"wrong-live-guess-{i:03d}-000000000000" for i in range(200)]
# Short enough that 189 of them and the secret fit gunicorn's 4094-byte request line.
SHORT = [f"w{i:03d}-guess-xx" for i in range(189)]
ANTHROPIC_BODY = json.dumps(
    {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
).encode()
GEMINI_BODY = json.dumps({"contents": [{"parts": [{"text": "hi"}]}]}).encode()
PATHS = {
    "anthropic": "/v1/messages",
    "gemini": "/v1beta/models/gemini-2.5-flash:generateContent",
}
# Where each port reads the secret when a test needs the request to get through.
AUTH = {"anthropic": ("x-api-key", SECRET), "gemini": ("x-goog-api-key", SECRET)}


def post(conn: http.client.HTTPConnection, port: str, headers, query: str = ""):
    """POST on ``conn``; ``headers`` is a list of pairs so a name may repeat or change case."""
    path = PATHS[port] + (f"?{query}" if query else "")
    conn.putrequest("POST", path, skip_accept_encoding=True)
    body = ANTHROPIC_BODY if port == "anthropic" else GEMINI_BODY
    for name, value in [*headers, ("content-type", "application/json")]:
        conn.putheader(name, value)
    conn.putheader("content-length", str(len(body)))
    conn.endheaders(body)
    response = conn.getresponse()
    return response, response.read()


def call(gateway, port: str, headers, query: str = ""):
    conn = gateway.connection(port)
    try:
        return post(conn, port, headers, query)
    finally:
        conn.close()


def assert_refused_in_port_shape(port: str, response, body: bytes, message: str) -> None:
    assert response.status == 401
    if port == "anthropic":
        assert json.loads(body) == {
            "type": "error",
            "error": {"type": "authentication_error", "message": message},
        }
    else:
        assert json.loads(body) == {
            "error": {"code": 401, "message": message, "status": "UNAUTHENTICATED"}
        }


# --- two distinct candidates: refused, never forwarded ---------------------------------------

CONFLICTS = [
    ("anthropic", [("x-api-key", SECRET), ("Authorization", f"Bearer {WRONG[0]}")], ""),
    ("anthropic", [("X-API-KEY", WRONG[0]), ("authorization", f"BEARER {SECRET}")], ""),
    ("gemini", [("x-goog-api-key", SECRET)], f"key={WRONG[0]}"),
    ("gemini", [("X-Goog-Api-Key", WRONG[0])], f"alt=sse&%6Bey={SECRET}"),
    ("gemini", [], f"key={SECRET}&key={WRONG[0]}"),
    ("gemini", [], f"k%65y={WRONG[0]}&key={SECRET}"),
    # The request: the right key among 189 wrong ones.
    ("gemini", [], "&".join(f"key={w}" for w in SHORT) + f"&key={SECRET}"),
]


@pytest.mark.parametrize(("port", "headers", "query"), CONFLICTS)
def test_two_distinct_candidates_are_refused_in_the_ports_shape_and_never_forwarded(
    gateway, fake_upstream, test_id, port, headers, query
):
    response, body = call(gateway, port, [*headers, ("x-test-id", test_id)], query)
    assert_refused_in_port_shape(port, response, body, CONFLICTING)
    assert fake_upstream.matching(test_id) == []


# --- one candidate in several places: served -------------------------------------------------

SAME = [
    ("anthropic", [("x-api-key", SECRET), ("Authorization", f"Bearer {SECRET}")], ""),
    ("anthropic", [("X-Api-Key", SECRET), ("authorization", f"bearer  {SECRET} ")], ""),
    ("gemini", [("x-goog-api-key", SECRET)], f"key={SECRET}"),
    ("gemini", [], f"key={SECRET}&alt=sse&%6Bey={SECRET}&key={quote(SECRET, safe='')}"),
]


@pytest.mark.parametrize(("port", "headers", "query"), SAME)
def test_the_same_secret_in_several_places_is_one_candidate_and_served(
    gateway, fake_upstream, test_id, port, headers, query
):
    response, _ = call(gateway, port, [*headers, ("x-test-id", test_id)], query)
    assert response.status == 200
    assert len(fake_upstream.matching(test_id)) == 1


# --- no client secret upstream, whatever the client sent -------------------------------------

ENCODED = "".join(f"%{b:02X}" for b in SECRET.encode())
# (label, extra headers, extra query): each puts the secret somewhere besides where the
# port authenticates it. Every one is tried on both ports.
PLACES = [
    ("x-api-key", [("x-api-key", SECRET)], ""),
    ("X-API-KEY", [("X-API-KEY", SECRET)], ""),
    ("bearer", [("Authorization", f"Bearer {SECRET}")], ""),
    ("basic", [("Authorization", f"Basic {SECRET}")], ""),
    ("x-goog-api-key", [("x-goog-api-key", SECRET)], ""),
    ("X-Goog-Api-Key", [("X-Goog-Api-Key", SECRET)], ""),
    ("proxy-authorization", [("Proxy-Authorization", f"Bearer {SECRET}")], ""),
    ("x-goog-iam-authorization-token", [("X-Goog-Iam-Authorization-Token", SECRET)], ""),
    ("custom header", [("x-my-copy", SECRET)], ""),
    ("custom header, inside", [("x-my-note", f"the key is {SECRET}.")], ""),
    ("key", [], f"key={SECRET}"),
    ("KEY", [], f"KEY={SECRET}"),
    ("Key repeated", [], f"Key={SECRET}&key={SECRET}&kEy={SECRET}"),
    ("%6Bey", [], f"%6Bey={SECRET}"),
    ("k%65y encoded value", [], f"k%65y={ENCODED}"),
    ("api_key", [], f"api_key={SECRET}"),
    ("API-KEY", [], f"API-KEY={SECRET}"),
    ("apikey", [], f"apikey={SECRET}"),
    ("access_token", [], f"access_token={SECRET}"),
    ("oauth_token", [], f"oauth_token={SECRET}"),
    ("other param", [], f"note={SECRET}"),
    ("other param, encoded", [], f"note={ENCODED}"),
    ("other param, inside", [], f"note=the+key+is+{SECRET}"),
    ("as a param name", [], f"{SECRET}=1"),
]


@pytest.mark.parametrize("port", ["anthropic", "gemini"])
@pytest.mark.parametrize(("label", "headers", "query"), PLACES, ids=[p[0] for p in PLACES])
def test_no_upstream_request_carries_the_client_secret(
    gateway, fake_upstream, test_id, port, label, headers, query
):
    # A repeated header reaches shim joined ("S,S", one wrong value): say it once.
    named = {name.lower() for name, _ in headers}
    auth = [] if AUTH[port][0] in named else [AUTH[port]]
    kept = "beta=true" if port == "anthropic" else "alt=sse"
    full_query = f"{kept}&{query}" if query else kept
    response, _ = call(gateway, port, [*auth, *headers, ("x-test-id", test_id)], full_query)
    assert response.status == 200, label
    [sent] = fake_upstream.matching(test_id)
    assert sent.query == kept
    assert SECRET not in sent.path and SECRET not in unquote(sent.query)
    for name, value in sent.headers.items():
        assert SECRET not in name and SECRET not in value, name
    if port == "anthropic":
        assert sent.header("authorization") == f"Bearer {FAKE_OAUTH_TOKEN}"
        assert "x-api-key" not in sent.headers and "x-goog-api-key" not in sent.headers
    else:
        assert sent.header("x-goog-api-key") in FAKE_GEMINI_KEYS
        assert "authorization" not in sent.headers and "x-api-key" not in sent.headers


# --- counting: guesses, not requests ---------------------------------------------------------


@pytest.fixture(scope="module")
def counting_gateway(fake_upstream, tmp_path_factory):
    gw = start_gateway(
        {
            "SHIM_ANTHROPIC_API_KEY": FAKE_API_KEY,
            "SHIM_GEMINI_KEYS": ",".join(FAKE_GEMINI_KEYS),
            "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
            "SHIM_GEMINI_UPSTREAM": fake_upstream.url,
            "SHIM_WORKERS": "2",
            "SHIM_AUTH_FAILURES_MAX": "5",
            "SHIM_AUTH_COOLOFF_S": "60",
        },
        tmp_path_factory.mktemp("counting") / "gunicorn.log",
    )
    yield gw
    gw.stop()


def session(gateway, port: str, source: str) -> http.client.HTTPConnection:
    number = gateway.anthropic_port if port == "anthropic" else gateway.gemini_port
    return http.client.HTTPConnection("127.0.0.1", number, timeout=10, source_address=(source, 0))


def statuses(gateway, port: str, source: str, requests) -> list[int]:
    answers = []
    for headers, query in requests:
        # A new connection each time: a 401 closes its connection (issue #14).
        conn = session(gateway, port, source)
        try:
            response, _ = post(conn, port, headers, query)
        finally:
            conn.close()
        answers.append(response.status)
    return answers


RIGHT = {"anthropic": ([("x-api-key", SECRET)], ""), "gemini": ([("x-goog-api-key", SECRET)], "")}
# Five guesses (= SHIM_AUTH_FAILURES_MAX) spread over requests and places, per port.
FIVE = {
    "anthropic": [
        ([("x-api-key", WRONG[0]), ("Authorization", f"Bearer {WRONG[1]}")], ""),
        ([("authorization", f"Bearer {WRONG[2]}")], ""),
        ([("X-Api-Key", WRONG[3]), ("Authorization", f"bearer {WRONG[4]}")], ""),
    ],
    "gemini": [
        ([("x-goog-api-key", WRONG[0])], f"key={WRONG[1]}&%6Bey={WRONG[2]}"),
        ([], f"key={WRONG[3]}&alt=sse&key={WRONG[4]}&key={WRONG[3]}"),
    ],
}


@pytest.mark.parametrize(("port", "source"), [("anthropic", "127.0.1.2"), ("gemini", "127.0.1.3")])
def test_the_cool_off_begins_after_exactly_five_guesses_spread_over_requests_and_places(
    counting_gateway, port, source
):
    *guessing, last = FIVE[port]
    # Four guesses: not yet; the right secret is still served.
    assert statuses(counting_gateway, port, source, [*guessing, RIGHT[port]]) == [401] * len(
        guessing
    ) + [200]
    # The fifth begins the cool-off: now even the right secret waits.
    assert statuses(counting_gateway, port, source, [last]) == [401]
    conn = session(counting_gateway, port, source)
    try:
        response, body = post(conn, port, *RIGHT[port])
    finally:
        conn.close()
    assert response.status == 429
    assert 1 <= int(response.getheader("retry-after")) <= 60
    error = json.loads(body)
    if port == "anthropic":
        assert error["error"]["type"] == "rate_limit_error"
    else:
        assert error["error"]["status"] == "RESOURCE_EXHAUSTED"


def test_189_guesses_in_one_request_are_189_failures_not_one(counting_gateway):
    many = "&".join(f"key={w}" for w in SHORT)
    assert statuses(
        counting_gateway, "gemini", "127.0.1.4", [([], many + f"&key={SECRET}"), RIGHT["gemini"]]
    ) == [401, 429]
    log = counting_gateway.log_text()
    assert SECRET not in log and SHORT[0] not in log
    events = [json.loads(line).get("event") for line in log.splitlines() if line.startswith("{")]
    assert "auth_conflicting_secrets" in events and "auth_throttled" in events
