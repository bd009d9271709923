"""Gemini port, live: real gunicorn+gevent, real fake upstream, google-genai SDK and raw HTTP."""

from __future__ import annotations

import http.client
import importlib
import json
import re
import socket
import time

import pytest
from google import genai
from google.genai import errors, types

from tests.conftest import ALL_SECRETS, SECRET
from tests.fake_upstream import FAKE_GEMINI_KEYS

MODEL = "gemini-2.5-flash"
GENERATE = f"/v1beta/models/{MODEL}:generateContent"
STREAM = f"/v1beta/models/{MODEL}:streamGenerateContent"
CONTENTS = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
BODY = json.dumps(CONTENTS).encode()
STATUS_NAMES = {429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


def _sdk_failures() -> tuple[type[BaseException], ...]:
    # google-genai runs on httpx or on its fork httpx2, whichever is installed.
    found: list[type[BaseException]] = [errors.APIError]
    for name in ("httpx", "httpx2"):
        try:
            found.append(importlib.import_module(name).HTTPError)
        except ImportError:
            pass
    return tuple(found)


SDK_FAILURES = _sdk_failures()


_clients: list[genai.Client] = []


@pytest.fixture(autouse=True)
def _close_sdk_clients():
    yield
    while _clients:
        _clients.pop().close()


def sdk(
    gateway,
    test_id: str,
    api_key: str = SECRET,
    api_version: str | None = None,
    headers: dict[str, str] | None = None,
) -> genai.Client:
    """An SDK client pointed at the gateway, no retries; closed after the test."""
    client = genai.Client(
        vertexai=False,
        api_key=api_key,
        http_options=types.HttpOptions(
            base_url=gateway.gemini_url,
            api_version=api_version,
            headers={"x-test-id": test_id, **(headers or {})},
            timeout=20_000,
            retry_options=types.HttpRetryOptions(attempts=1),
        ),
    )
    _clients.append(client)
    return client


def request(
    gateway,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
):
    """Send one request on a fresh connection; return the response and its whole body."""
    conn = gateway.connection("gemini")
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def post(gateway, path: str, body: bytes = BODY, headers: dict[str, str] | None = None):
    return request(
        gateway, "POST", path, body, {"content-type": "application/json", **(headers or {})}
    )


def get(gateway, path: str, headers: dict[str, str] | None = None):
    return request(gateway, "GET", path, None, headers)


def authed(test_id: str, **extra: str) -> dict[str, str]:
    return {"x-goog-api-key": SECRET, "x-test-id": test_id, **extra}


def assert_no_secret(response: http.client.HTTPResponse | None, *texts: str | bytes) -> None:
    """No secret of the test run in the response's headers or in any of ``texts``."""
    if response is not None:
        texts = (*texts, repr(response.getheaders()))
    for text in texts:
        text = text.decode("latin-1") if isinstance(text, bytes) else text
        for secret in ALL_SECRETS:
            assert secret not in text


def google_error(response: http.client.HTTPResponse, body: bytes, status: str) -> dict:
    """Assert the gateway's own error in Google's shape; return it."""
    parsed = json.loads(body)
    assert set(parsed) == {"error"}
    error = parsed["error"]
    assert error["code"] == response.status
    assert error["status"] == status
    assert isinstance(error["message"], str) and error["message"]
    assert response.getheader("content-type").startswith("application/json")
    assert_no_secret(response, body)
    return error


def read_raw_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read one Content-Length-delimited response off a raw socket: (head, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    if length:
        while len(body) < int(length.group(1)):
            piece = sock.recv(65536)
            if not piece:
                break
            body += piece
    return head, body


# -- credential swap -----------------------------------------------------------


def test_sdk_generate_reaches_upstream_with_a_pool_key_not_the_secret(
    gateway, fake_upstream, test_id
):
    response = sdk(gateway, test_id).models.generate_content(model=MODEL, contents="hi")

    assert response.text == "Hello from fake Gemini."
    [seen] = fake_upstream.matching(test_id)
    assert seen.header("x-goog-api-key") in FAKE_GEMINI_KEYS
    assert "key" not in {pair.split("=", 1)[0] for pair in seen.query.split("&") if pair}
    assert "authorization" not in seen.headers
    assert SECRET not in json.dumps(seen.headers) + seen.query + seen.body.decode()


@pytest.mark.parametrize(
    ("api_version", "prefix"),
    [(None, "/v1/"), ("v1beta", "/v1beta/"), ("v1", "/v1/")],
    ids=["sdk-default", "v1beta", "v1"],
)
def test_sdk_generate_works_under_each_api_version(
    gateway, fake_upstream, test_id, api_version, prefix
):
    client = sdk(gateway, test_id, api_version=api_version)
    assert client.models.generate_content(model=MODEL, contents="hi").text
    [seen] = fake_upstream.matching(test_id)
    assert seen.path == f"{prefix}models/{MODEL}:generateContent"


def test_client_authorization_header_is_not_forwarded(gateway, fake_upstream, test_id):
    response, _ = post(gateway, GENERATE, headers=authed(test_id, authorization=f"Bearer {SECRET}"))
    assert response.status == 200
    [seen] = fake_upstream.matching(test_id)
    assert "authorization" not in seen.headers
    assert seen.header("x-goog-api-key") in FAKE_GEMINI_KEYS
    assert SECRET not in json.dumps(seen.headers)


@pytest.mark.parametrize(
    ("query", "forwarded"),
    [
        (f"key={SECRET}&alt=sse", "alt=sse"),
        (f"alt=sse&key={SECRET}&foo=1", "alt=sse&foo=1"),
    ],
    ids=["key-first", "key-between"],
)
def test_query_key_is_accepted_and_stripped_other_params_kept_in_order(
    gateway, fake_upstream, test_id, query, forwarded
):
    response, body = post(gateway, f"{STREAM}?{query}", headers={"x-test-id": test_id})
    assert response.status == 200
    assert body.startswith(b"data: ")
    [seen] = fake_upstream.matching(test_id)
    assert seen.query == forwarded
    assert seen.header("x-goog-api-key") in FAKE_GEMINI_KEYS
    assert SECRET not in json.dumps(seen.headers) + seen.query + seen.body.decode()


def test_keys_rotate_round_robin_on_one_keep_alive_connection(gateway, fake_upstream, test_id):
    conn = gateway.connection("gemini")  # one connection: one worker, one key pool
    try:
        for _ in range(6):
            conn.request("POST", GENERATE, body=BODY, headers=authed(test_id))
            response = conn.getresponse()
            response.read()
            assert response.status == 200
    finally:
        conn.close()
    keys = [seen.header("x-goog-api-key") for seen in fake_upstream.matching(test_id)]
    assert len(keys) == 6
    assert set(keys) == set(FAKE_GEMINI_KEYS)
    assert keys[:3] == keys[3:]


# -- streaming -----------------------------------------------------------------


def test_sdk_sse_chunks_arrive_spaced_as_upstream_sent_them(gateway, fake_upstream, test_id):
    gap = 0.3
    client = sdk(
        gateway, test_id, headers={"x-fake-gap-ms": str(int(gap * 1000)), "x-fake-events": "4"}
    )
    arrivals: list[tuple[str, float]] = []
    start = time.monotonic()
    for chunk in client.models.generate_content_stream(model=MODEL, contents="hi"):
        arrivals.append((chunk.text, time.monotonic() - start))

    assert [text for text, _ in arrivals] == [f"chunk{i} " for i in range(4)]
    [seen] = fake_upstream.matching(test_id)
    assert seen.query == "alt=sse"
    times = [t for _, t in arrivals]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(gap * 0.6 < g < gap * 2.5 for g in gaps), gaps
    # Not bunched: upstream sends the last chunk 3 gaps after the first.
    assert times[0] < times[-1] - 2 * gap


def test_raw_sse_first_chunk_arrives_before_upstream_sends_the_second(gateway, test_id):
    conn = gateway.connection("gemini")
    try:
        start = time.monotonic()
        conn.request(
            "POST",
            f"{STREAM}?alt=sse",
            body=BODY,
            headers=authed(test_id, **{"content-type": "application/json", "x-fake-gap-ms": "400"}),
        )
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("content-type").startswith("text/event-stream")
        assert response.getheader("transfer-encoding") == "chunked"
        assert response.getheader("x-accel-buffering") == "no"
        first = response.read1(65536)
        first_at = time.monotonic() - start
        rest = response.read()
        total = time.monotonic() - start
    finally:
        conn.close()

    assert first.startswith(b"data: {")
    assert first_at < 0.35  # upstream sends the second frame 0.4 s after the first
    assert total > 0.7  # 3 frames, 2 gaps of 0.4 s
    frames = [f for f in (first + rest).split(b"\r\n\r\n") if f]
    assert len(frames) == 3
    assert json.loads(frames[-1].removeprefix(b"data: "))["candidates"][0]["finishReason"] == "STOP"


def test_json_array_stream_without_alt_sse_is_relayed_incrementally(gateway, test_id):
    conn = gateway.connection("gemini")
    try:
        start = time.monotonic()
        conn.request(
            "POST",
            STREAM,
            body=BODY,
            headers=authed(test_id, **{"content-type": "application/json", "x-fake-gap-ms": "400"}),
        )
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("content-type").startswith("application/json")
        first = response.read1(65536)
        first_at = time.monotonic() - start
        rest = response.read()
    finally:
        conn.close()

    assert first.startswith(b"[{")
    assert first_at < 0.35  # the second piece leaves upstream 0.4 s after the first
    pieces = json.loads(first + rest)
    assert isinstance(pieces, list) and len(pieces) == 3
    assert [p["candidates"][0]["content"]["parts"][0]["text"] for p in pieces] == [
        "chunk0 ",
        "chunk1 ",
        "chunk2 ",
    ]


def test_stream_longer_than_the_silence_timeout_runs_to_its_end(gateway, test_id):
    # The gateway's read timeout is 2 s; this stream lasts ~3.5 s but is never quiet 2 s.
    client = sdk(gateway, test_id, headers={"x-fake-gap-ms": "700", "x-fake-events": "6"})
    text = "".join(
        c.text for c in client.models.generate_content_stream(model=MODEL, contents="hi")
    )
    assert text == "".join(f"chunk{i} " for i in range(6))


def test_raw_sse_body_is_cut_not_ended_cleanly_when_upstream_drops(gateway, test_id):
    conn = gateway.connection("gemini")
    try:
        conn.request(
            "POST",
            f"{STREAM}?alt=sse",
            body=BODY,
            headers=authed(
                test_id, **{"content-type": "application/json", "x-fake-scenario": "drop"}
            ),
        )
        response = conn.getresponse()
        assert response.status == 200
        with pytest.raises((http.client.IncompleteRead, http.client.HTTPException, OSError)):
            response.read()
    finally:
        conn.close()


def test_sdk_stream_raises_when_upstream_drops_mid_stream(gateway, test_id):
    client = sdk(gateway, test_id, headers={"x-fake-scenario": "drop"})
    received = []
    with pytest.raises(SDK_FAILURES):
        for chunk in client.models.generate_content_stream(model=MODEL, contents="hi"):
            received.append(chunk.text)
    assert received == ["chunk0 ", "chunk1 "]


def test_stall_mid_stream_aborts_the_body_after_the_silence_timeout(gateway, test_id):
    conn = gateway.connection("gemini")
    try:
        start = time.monotonic()
        conn.request(
            "POST",
            f"{STREAM}?alt=sse",
            body=BODY,
            headers=authed(
                test_id, **{"content-type": "application/json", "x-fake-scenario": "stall-mid:5"}
            ),
        )
        response = conn.getresponse()
        assert response.status == 200
        with pytest.raises((http.client.IncompleteRead, http.client.HTTPException, OSError)):
            response.read()
        elapsed = time.monotonic() - start
    finally:
        conn.close()
    assert 1.5 < elapsed < 3.5  # the gateway's 2 s silence timeout, not the 5 s stall


# -- other endpoints -------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1beta", "v1"])
def test_sdk_count_tokens(gateway, fake_upstream, test_id, version):
    result = sdk(gateway, test_id, api_version=version).models.count_tokens(
        model=MODEL, contents="hi"
    )
    assert result.total_tokens > 0
    [seen] = fake_upstream.matching(test_id)
    assert seen.path == f"/{version}/models/{MODEL}:countTokens"


@pytest.mark.parametrize("version", ["v1beta", "v1"])
def test_embed_content_single(gateway, fake_upstream, test_id, version):
    body = json.dumps({"content": {"parts": [{"text": "hi"}]}}).encode()
    response, answer = post(
        gateway, f"/{version}/models/gemini-embedding-001:embedContent", body, authed(test_id)
    )
    assert response.status == 200
    assert json.loads(answer) == {"embedding": {"values": [0.1, 0.2, 0.3]}}
    [seen] = fake_upstream.matching(test_id)
    assert (seen.path, seen.body) == (f"/{version}/models/gemini-embedding-001:embedContent", body)


@pytest.mark.parametrize("version", ["v1beta", "v1"])
def test_batch_embed_contents_returns_one_embedding_per_request(gateway, test_id, version):
    one = {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "a"}]}}
    body = json.dumps({"requests": [one, one]}).encode()
    response, answer = post(
        gateway, f"/{version}/models/gemini-embedding-001:batchEmbedContents", body, authed(test_id)
    )
    assert response.status == 200
    assert len(json.loads(answer)["embeddings"]) == 2


def test_sdk_embed_content(gateway, test_id):
    result = sdk(gateway, test_id).models.embed_content(
        model="gemini-embedding-001", contents=["a", "b"]
    )
    assert len(result.embeddings) == 2


@pytest.mark.parametrize("version", ["v1beta", "v1"])
def test_models_list_keeps_its_query(gateway, fake_upstream, test_id, version):
    response, body = get(gateway, f"/{version}/models?pageSize=50&pageToken=abc", authed(test_id))
    assert response.status == 200
    assert "models/gemini-2.5-flash" in [m["name"] for m in json.loads(body)["models"]]
    [seen] = fake_upstream.matching(test_id)
    assert (seen.path, seen.query) == (f"/{version}/models", "pageSize=50&pageToken=abc")


@pytest.mark.parametrize("version", ["v1beta", "v1"])
def test_models_get(gateway, fake_upstream, test_id, version):
    response, body = get(gateway, f"/{version}/models/{MODEL}", authed(test_id))
    assert response.status == 200
    assert json.loads(body)["name"] == f"models/{MODEL}"
    [seen] = fake_upstream.matching(test_id)
    assert seen.path == f"/{version}/models/{MODEL}"


def test_sdk_models_list_and_get(gateway, test_id):
    client = sdk(gateway, test_id)
    assert f"models/{MODEL}" in [m.name for m in client.models.list()]
    assert client.models.get(model=MODEL).name == f"models/{MODEL}"


def test_unknown_model_is_the_upstreams_own_404(gateway, test_id):
    response, body = get(gateway, "/v1beta/models/gemini-nope", authed(test_id))
    assert response.status == 404
    assert json.loads(body)["error"]["message"] == "models/gemini-nope is not found"


# -- upstream answers passed through ---------------------------------------------


# 429 is not here: it benches the key (see test_live_gemini_keys.py), which would
# leak state into the other tests sharing this gateway.
@pytest.mark.parametrize("status", [500, 503])
def test_upstream_error_status_body_and_headers_pass_through(gateway, test_id, status):
    response, body = post(
        gateway, GENERATE, headers=authed(test_id, **{"x-fake-scenario": f"error:{status}"})
    )
    assert response.status == status
    assert response.getheader("retry-after") == "7"
    assert json.loads(body) == {
        "error": {"code": status, "message": "Fake upstream error.", "status": STATUS_NAMES[status]}
    }
    assert int(response.getheader("content-length")) == len(body)
    assert_no_secret(response, body)


@pytest.mark.parametrize(
    ("status", "error_class"),
    [(500, errors.ServerError), (503, errors.ServerError)],
)
def test_sdk_raises_the_upstream_error(gateway, test_id, status, error_class):
    client = sdk(gateway, test_id, headers={"x-fake-scenario": f"error:{status}"})
    with pytest.raises(error_class) as caught:
        client.models.generate_content(model=MODEL, contents="hi")
    assert caught.value.code == status
    assert caught.value.status == STATUS_NAMES[status]


# -- the gateway's own errors ------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("", {}),
        ("", {"x-goog-api-key": "wrong-secret-value-1234"}),
        ("?key=wrong-secret-value-1234", {}),
        ("?alt=sse&key=wrong-secret-value-1234", {}),
        ("", {"x-goog-api-key": SECRET[:-1]}),
        ("", {"x-goog-api-key": "caf\xe9-secret-\xff-value"}),
    ],
    ids=["missing", "wrong-header", "wrong-query", "wrong-query-later", "prefix", "latin1-bytes"],
)
def test_bad_secret_is_401_and_nothing_is_forwarded(
    gateway, fake_upstream, test_id, query, headers
):
    response, body = post(gateway, GENERATE + query, headers={"x-test-id": test_id, **headers})
    assert response.status == 401
    google_error(response, body, "UNAUTHENTICATED")
    assert fake_upstream.matching(test_id) == []
    assert b"wrong-secret-value" not in body
    assert b"caf" not in body


def test_sdk_with_wrong_secret_raises_client_error_401(gateway, fake_upstream, test_id):
    client = sdk(gateway, test_id, api_key="not-the-secret-at-all")
    with pytest.raises(errors.ClientError) as caught:
        client.models.generate_content(model=MODEL, contents="hi")
    assert caught.value.code == 401
    assert fake_upstream.matching(test_id) == []


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_anthropic_paths_are_404_on_the_gemini_port(gateway, fake_upstream, test_id, path):
    response, body = post(
        gateway,
        path,
        headers={
            "x-api-key": SECRET,
            "x-goog-api-key": SECRET,
            "x-test-id": test_id,
            "anthropic-version": "2023-06-01",
        },
    )
    assert response.status == 404
    google_error(response, body, "NOT_FOUND")
    assert fake_upstream.matching(test_id) == []


def test_unknown_action_is_404_and_not_forwarded(gateway, fake_upstream, test_id):
    response, body = post(gateway, f"/v1beta/models/{MODEL}:deleteModel", headers=authed(test_id))
    assert response.status == 404
    google_error(response, body, "NOT_FOUND")
    assert fake_upstream.matching(test_id) == []


def test_body_over_the_limit_is_413_before_it_is_read(gateway, fake_upstream, test_id):
    # The test gateway allows 1 MiB. Send only headers that announce 5 MiB: the
    # answer must come without the body ever being sent.
    sock = socket.create_connection(("127.0.0.1", gateway.gemini_port), timeout=5)
    try:
        sock.sendall(
            f"POST {GENERATE} HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n".encode()
            + f"x-goog-api-key: {SECRET}\r\nx-test-id: {test_id}\r\n".encode()
            + f"content-length: {5 * 1024 * 1024}\r\n\r\n".encode()
        )
        head, body = read_raw_response(sock)
    finally:
        sock.close()
    assert head.startswith(b"HTTP/1.1 413")
    error = json.loads(body)["error"]
    assert error["code"] == 413
    assert isinstance(error["status"], str) and error["status"]
    assert isinstance(error["message"], str) and error["message"]
    assert_no_secret(None, head, body)
    assert fake_upstream.matching(test_id) == []


def test_unconfigured_gemini_is_503(gateway_api_key, fake_upstream, test_id):
    response, body = post(gateway_api_key, GENERATE, headers=authed(test_id))
    assert response.status == 503
    google_error(response, body, "UNAVAILABLE")
    assert fake_upstream.matching(test_id) == []


def test_unconfigured_gemini_still_checks_the_secret_first(gateway_api_key, test_id):
    response, body = post(
        gateway_api_key,
        GENERATE,
        headers={"x-goog-api-key": "wrong-secret-value-1234", "x-test-id": test_id},
    )
    assert response.status == 401
    google_error(response, body, "UNAUTHENTICATED")


def test_unreachable_upstream_is_502_without_its_address(gateway_unreachable, test_id):
    response, body = post(gateway_unreachable, GENERATE, headers=authed(test_id))
    assert response.status == 502
    error = google_error(response, body, "UNAVAILABLE")
    assert "127.0.0.1" not in error["message"]
    assert not re.search(r":\d{2,5}\b", error["message"])


def test_upstream_silent_before_headers_is_504_after_the_timeout(gateway, test_id):
    start = time.monotonic()
    response, body = post(
        gateway, GENERATE, headers=authed(test_id, **{"x-fake-scenario": "stall:4"})
    )
    elapsed = time.monotonic() - start
    assert response.status == 504
    google_error(response, body, "DEADLINE_EXCEEDED")
    assert 1.8 < elapsed < 3.5  # the gateway's 2 s silence timeout, not the 4 s stall


def test_health_needs_no_secret(gateway):
    response, body = get(gateway, "/health")
    assert (response.status, json.loads(body)) == (200, {"status": "ok"})
