"""One candidate secret per request, and no client secret upstream (issue #14), in process.

Pure checks of ``shim.candidates`` first; then the real app built from settings,
with ``responses`` standing in for the upstream so a test sees exactly what
was (or was not) sent. The live versions, through gunicorn, are in
tests/test_live_candidates.py.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
import responses
from hypothesis import given
from hypothesis import strategies as st

from shim.candidates import (
    CREDENTIAL_PARAMS,
    bearer,
    decode,
    distinct,
    param_values,
    query_params,
    without_credentials,
)
from shim.forward import SECRET_IN_PATH
from shim.web import CONFLICTING
from tests.conftest import ANTHROPIC_BASE, GEMINI_BASE, SECRET

ANTHROPIC_UP = "https://anthropic.upstream.test"
GEMINI_UP = "https://gemini.upstream.test"
MESSAGES = f"{ANTHROPIC_UP}/v1/messages"
GENERATE_PATH = "/v1beta/models/gemini-2.5-flash:generateContent"
BODY = b'{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[]}'
WRONG = [f"wrong-guess-{i:03d}-0000000000000000" for i in range(200)]


# --- pure -------------------------------------------------------------------------------------


def test_distinct_keeps_first_occurrences_and_drops_empty_values():
    assert distinct([b"a", None, b"", b"b", b"a", b"b"]) == [b"a", b"b"]
    assert distinct([None, b""]) == []


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("Bearer abc", b"abc"),
        ("bearer abc", b"abc"),
        ("BEARER  abc  ", b"abc"),
        ("Basic abc", None),
        ("Bearerabc", None),
        (None, None),
    ],
)
def test_bearer_reads_the_token_of_a_bearer_only(value, token):
    assert bearer(value) == token


def test_param_values_match_the_decoded_name_exactly():
    query = "key=a&%6Bey=b&k%65y=c&KEY=d&api_key=e&key=a+b%21&monkey=f"
    assert param_values(query, b"key") == [b"a", b"b", b"c", b"a b!"]


def test_decode_gives_the_bytes_on_the_wire_for_wsgi_latin1_text():
    # A raw UTF-8 "é" arrives in WSGI as two latin-1 characters.
    assert decode("caf\u00c3\u00a9%21") == "café!".encode()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("beta=true", "beta=true"),
        (f"beta=true&key={SECRET}", "beta=true"),
        ("KEY=x&Key=y&%6Bey=z&k%65y=w&alt=sse", "alt=sse"),
        ("api_key=1&API-KEY=2&apikey=3&access_token=4&Access%5FToken=5&oauth_token=6", ""),
        ("monkey=1&keys=2&pageToken=3&key2=4", "monkey=1&keys=2&pageToken=3&key2=4"),
        ("a=1&&b=2&key=3", "a=1&b=2"),
    ],
)
def test_every_credential_parameter_is_stripped_and_others_kept_raw_in_order(query, expected):
    assert without_credentials(query) == expected


@pytest.mark.parametrize(
    "carrier",
    [
        f"note={SECRET}",
        f"note=before%20{SECRET}%20after",
        f"note={quote(SECRET, safe='')}",
        "note=" + "".join(f"%{b:02x}" for b in SECRET.encode()),
        f"note=x+{SECRET}+y",
        f"{SECRET}=1",
        f"{SECRET}",
    ],
)
def test_a_pair_carrying_the_secret_anywhere_is_dropped(carrier):
    query = f"alt=sse&{carrier}&pageSize=5"
    assert without_credentials(query, SECRET.encode()) == "alt=sse&pageSize=5"


def test_a_query_with_nothing_to_strip_is_returned_as_is():
    query = "beta=true"
    assert without_credentials(query, SECRET.encode()) is query


SECRET_ENCODINGS = st.sampled_from(
    [
        SECRET,
        quote(SECRET, safe=""),
        "".join(f"%{b:02X}" for b in SECRET.encode()),
        SECRET[:5] + "%" + SECRET[5:6].encode().hex() + SECRET[6:],
    ]
)
NAME = st.sampled_from(["alt", "key", "Key", "%6Bey", "x", "api_key", "pageToken", "k%65y"])
VALUE = st.one_of(
    st.text(alphabet="abcxyz019%+-_", max_size=6),
    st.tuples(st.text(alphabet="ab ", max_size=3), SECRET_ENCODINGS).map("".join),
)


@given(st.lists(st.tuples(NAME, VALUE), max_size=8))
def test_no_credential_name_and_no_secret_survives_a_rewrite(pairs):
    query = "&".join(f"{name}={value}" for name, value in pairs)
    rewritten = without_credentials(query, SECRET.encode())
    for name, pair in query_params(rewritten):
        assert name.lower() not in CREDENTIAL_PARAMS
        assert SECRET.encode() not in decode(pair)


# --- through the app --------------------------------------------------------------------------


@pytest.fixture
def no_upstream():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


def call(client, port: str, headers: dict[str, str], query: str = ""):
    if port == "anthropic":
        path, base, body = "/v1/messages", ANTHROPIC_BASE, BODY
    else:
        path, base, body = GENERATE_PATH, GEMINI_BASE, b"{}"
    url = f"{path}?{query}" if query else path
    return client.post(
        url, base_url=base, data=body, content_type="application/json", headers=headers
    )


# (port, headers, query) with two distinct values where that port reads the secret; the
# right secret is among them, so only the count of values decides the refusal.
CONFLICTS = [
    ("anthropic", {"x-api-key": SECRET, "Authorization": f"Bearer {WRONG[0]}"}, ""),
    ("anthropic", {"X-Api-Key": WRONG[0], "authorization": f"bearer {SECRET}"}, ""),
    ("gemini", {"x-goog-api-key": SECRET}, f"key={WRONG[0]}"),
    ("gemini", {}, f"key={SECRET}&key={WRONG[0]}"),
    ("gemini", {}, f"key={SECRET}&%6Bey={WRONG[0]}"),
    ("gemini", {}, f"k%65y={WRONG[0]}&alt=sse&key={SECRET}"),
    ("gemini", {}, "&".join(f"key={w}" for w in WRONG[:189]) + f"&key={SECRET}"),
]


@pytest.mark.parametrize(("port", "headers", "query"), CONFLICTS)
def test_two_distinct_candidates_are_refused_unforwarded_even_when_one_is_right(
    make_client, no_upstream, port, headers, query
):
    response = call(make_client(), port, headers, query)
    assert response.status_code == 401
    if port == "anthropic":
        assert response.json == {
            "type": "error",
            "error": {"type": "authentication_error", "message": CONFLICTING},
        }
    else:
        assert response.json == {
            "error": {"code": 401, "message": CONFLICTING, "status": "UNAUTHENTICATED"}
        }
    assert len(no_upstream.calls) == 0


def test_the_refusal_is_the_same_bytes_whether_or_not_a_candidate_was_right(
    make_client, no_upstream
):
    client = make_client()
    with_right = call(client, "gemini", {"x-goog-api-key": SECRET}, f"key={WRONG[0]}")
    all_wrong = call(client, "gemini", {"x-goog-api-key": WRONG[1]}, f"key={WRONG[0]}")
    assert (with_right.status_code, with_right.data) == (all_wrong.status_code, all_wrong.data)


@pytest.mark.parametrize(
    ("port", "headers", "query"),
    [
        ("anthropic", {"x-api-key": SECRET, "Authorization": f"Bearer {SECRET}"}, ""),
        ("anthropic", {"x-api-key": SECRET, "Authorization": "Basic Zm9vOmJhcg=="}, ""),
        ("anthropic", {"x-api-key": SECRET, "Authorization": "Bearer "}, ""),
        ("gemini", {"x-goog-api-key": SECRET}, f"key={SECRET}"),
        ("gemini", {}, f"key={SECRET}&%6Bey={SECRET}&key={quote(SECRET)}"),
        # Read by neither port's check, so no second guess; still stripped.
        ("gemini", {"x-goog-api-key": SECRET, "Authorization": f"Bearer {WRONG[0]}"}, ""),
        ("gemini", {"x-goog-api-key": SECRET}, f"KEY={WRONG[0]}&api_key={WRONG[1]}"),
        ("anthropic", {"x-api-key": SECRET, "x-goog-api-key": WRONG[0]}, f"key={WRONG[1]}"),
    ],
)
def test_one_candidate_in_several_places_is_served(make_client, rsps, port, headers, query):
    up = MESSAGES if port == "anthropic" else GEMINI_UP + GENERATE_PATH
    rsps.add(responses.POST, up, json={})
    assert call(make_client(), port, headers, query).status_code == 200
    sent = rsps.calls[0].request
    assert "?" not in sent.url
    assert not {WRONG[0], WRONG[1], SECRET} & {v for v in sent.headers.values()}


@pytest.mark.parametrize(
    ("guesses", "then"),
    [
        # 5 = SHIM_AUTH_FAILURES_MAX, spread over requests and places: the cool-off begins.
        (
            [
                ({"x-goog-api-key": WRONG[0]}, f"key={WRONG[1]}&%6Bey={WRONG[2]}"),
                ({}, f"key={WRONG[3]}&key={WRONG[4]}"),
            ],
            429,
        ),
        ([({}, "&".join(f"key={w}" for w in WRONG[:5]))], 429),
        ([({}, "&".join(f"key={w}" for w in WRONG[:189]))], 429),
        # 4: not yet.
        (
            [
                ({"x-goog-api-key": WRONG[0]}, f"key={WRONG[1]}"),
                ({}, f"key={WRONG[2]}&key={WRONG[3]}&key={WRONG[2]}"),
            ],
            200,
        ),
        # The right secret among 4 wrong ones counts 5: nothing says which was right.
        ([({"x-goog-api-key": SECRET}, "&".join(f"key={w}" for w in WRONG[:4]))], 429),
    ],
)
def test_each_candidate_counts_as_one_failed_guess(make_client, no_upstream, guesses, then):
    no_upstream.add(responses.POST, GEMINI_UP + GENERATE_PATH, json={})
    client = make_client(SHIM_AUTH_FAILURES_MAX="5", SHIM_AUTH_COOLOFF_S="30")
    for headers, query in guesses:
        assert call(client, "gemini", headers, query).status_code == 401
    answer = call(client, "gemini", {"x-goog-api-key": SECRET})
    assert answer.status_code == then
    if then == 429:
        assert answer.json["error"]["status"] == "RESOURCE_EXHAUSTED"


def test_a_secret_copied_into_other_headers_and_parameters_is_not_forwarded(make_client, rsps):
    rsps.add(responses.POST, MESSAGES, json={})
    headers = {
        "x-api-key": SECRET,
        "x-copy": SECRET,
        "x-note": f"token is {SECRET}!",
        "x-goog-iam-authorization-token": SECRET,
        "x-kept": "fine",
    }
    query = f"beta=true&note={quote(SECRET)}&{SECRET}=1&api_key={SECRET}"
    assert call(make_client(), "anthropic", headers, query).status_code == 200
    sent = rsps.calls[0].request
    assert sent.url == f"{MESSAGES}?beta=true"
    names = {name.lower() for name in sent.headers}
    assert "x-kept" in names
    assert not names & {"x-copy", "x-note", "x-api-key", "x-goog-iam-authorization-token"}
    assert all(SECRET not in value for value in sent.headers.values())


@pytest.mark.parametrize(
    ("port", "path", "headers"),
    [
        ("anthropic", f"/v1/models/{SECRET}", {"x-api-key": SECRET}),
        ("gemini", f"/v1beta/models/{SECRET}:generateContent", {"x-goog-api-key": SECRET}),
        ("gemini", f"/v1beta/models/x-{SECRET}", {"x-goog-api-key": SECRET}),
    ],
)
def test_a_path_carrying_the_secret_is_refused_not_forwarded(
    make_client, no_upstream, port, path, headers
):
    base = ANTHROPIC_BASE if port == "anthropic" else GEMINI_BASE
    method = "POST" if ":" in path else "GET"
    response = make_client().open(
        path,
        base_url=base,
        method=method,
        data=b"{}",
        headers=headers,
        content_type="application/json",
    )
    assert response.status_code == 400
    message = json.loads(response.data)["error"]["message"]
    assert message == SECRET_IN_PATH and SECRET not in response.data.decode()
    assert len(no_upstream.calls) == 0
