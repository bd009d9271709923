"""Anthropic port, live: real gunicorn+gevent, real fake upstream, the official SDK and raw HTTP."""

from __future__ import annotations

import gzip
import json
import socket
import time

import anthropic
import httpx2
import pytest

from tests.conftest import ALL_SECRETS, SECRET
from tests.fake_upstream import FAKE_API_KEY, FAKE_OAUTH_TOKEN, OAUTH_BETA

MODEL = "claude-test-model"  # not a real model name: the SDK warns about deprecated ones
MESSAGES = [{"role": "user", "content": "hi"}]


_clients: list[anthropic.Anthropic] = []


@pytest.fixture(autouse=True)
def _close_sdk_clients():
    yield
    while _clients:
        _clients.pop().close()


def sdk(gateway, test_id: str, **kwargs) -> anthropic.Anthropic:
    """An SDK client pointed at the gateway; closed after the test."""
    kwargs.setdefault("api_key", SECRET)
    client = anthropic.Anthropic(
        base_url=gateway.anthropic_url,
        max_retries=0,
        timeout=20,
        default_headers={"x-test-id": test_id},
        **kwargs,
    )
    _clients.append(client)
    return client


def post(gateway, path: str, body: bytes, headers: dict[str, str], provider: str = "anthropic"):
    conn = gateway.connection(provider)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def message_body(**extra) -> bytes:
    return json.dumps({"model": MODEL, "max_tokens": 16, "messages": MESSAGES, **extra}).encode()


def assert_no_secret(*texts: str | bytes) -> None:
    for text in texts:
        text = text.decode("latin-1") if isinstance(text, bytes) else text
        for secret in ALL_SECRETS:
            assert secret not in text


# -- credential swap -----------------------------------------------------------


@pytest.mark.parametrize("presented_as", ["api_key", "auth_token"])
def test_sdk_message_reaches_upstream_with_oauth_token_not_secret(
    gateway, fake_upstream, test_id, presented_as
):
    client = sdk(
        gateway,
        test_id,
        **{presented_as: SECRET, **({"api_key": None} if presented_as == "auth_token" else {})},
    )
    message = client.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)

    assert message.content[0].text == "Hello from fake Claude."
    [seen] = fake_upstream.matching(test_id)
    assert seen.header("authorization") == f"Bearer {FAKE_OAUTH_TOKEN}"
    assert "x-api-key" not in seen.headers
    assert OAUTH_BETA in seen.header("anthropic-beta").split(",")
    assert SECRET not in json.dumps(seen.headers) + seen.query + seen.body.decode()


def test_oauth_beta_merged_after_client_betas_in_order(gateway, fake_upstream, test_id):
    client = sdk(gateway, test_id)
    client.messages.create(
        model=MODEL,
        max_tokens=16,
        messages=MESSAGES,
        extra_headers={"anthropic-beta": "b-two, b-one,b-two"},
    )
    [seen] = fake_upstream.matching(test_id)
    assert seen.header("anthropic-beta") == f"b-two,b-one,{OAUTH_BETA}"


def test_api_key_gateway_sends_x_api_key_and_leaves_betas_untouched(
    gateway_api_key, fake_upstream, test_id
):
    client = sdk(gateway_api_key, test_id)
    client.messages.create(
        model=MODEL,
        max_tokens=16,
        messages=MESSAGES,
        extra_headers={"anthropic-beta": "b-two , b-one"},
    )
    [seen] = fake_upstream.matching(test_id)
    assert seen.header("x-api-key") == FAKE_API_KEY
    assert "authorization" not in seen.headers
    assert seen.header("anthropic-beta") == "b-two , b-one"


def test_body_query_and_end_to_end_headers_forwarded_unchanged(gateway, fake_upstream, test_id):
    body = b'{"messages": [{"role":"user","content":"h\\u00e9"}],   "model":"m","max_tokens":1}'
    response, _ = post(
        gateway,
        "/v1/messages?beta=true",
        body,
        {
            "x-api-key": SECRET,
            "content-type": "application/json",
            "x-test-id": test_id,
            "anthropic-version": "2023-06-01",
            "x-claude-code-session-id": "sess-123",
            "user-agent": "claude-cli/2.1 (external, cli)",
        },
    )
    assert response.status == 200
    [seen] = fake_upstream.matching(test_id)
    assert (seen.path, seen.query, seen.body) == ("/v1/messages", "beta=true", body)
    assert seen.header("anthropic-version") == "2023-06-01"
    assert seen.header("x-claude-code-session-id") == "sess-123"
    assert seen.header("user-agent") == "claude-cli/2.1 (external, cli)"


# -- streaming -----------------------------------------------------------------


def test_sdk_stream_events_arrive_spaced_as_upstream_sent_them(gateway, test_id):
    client = sdk(gateway, test_id)
    gap = 0.3
    arrivals: list[tuple[str, float]] = []
    start = time.monotonic()
    with client.messages.stream(
        model=MODEL,
        max_tokens=16,
        messages=MESSAGES,
        extra_headers={"x-fake-gap-ms": str(int(gap * 1000)), "x-fake-events": "4"},
    ) as stream:
        for event in stream:
            arrivals.append((event.type, time.monotonic() - start))
        text = stream.get_final_text()

    assert text == "chunk0 chunk1 chunk2 chunk3 "
    deltas = [t for kind, t in arrivals if kind == "content_block_delta"]
    assert len(deltas) == 4
    gaps = [b - a for a, b in zip(deltas, deltas[1:], strict=False)]
    assert all(gap * 0.6 < g < gap * 2.5 for g in gaps), gaps
    # The first event must not wait for the rest: 9 frames are 8 gaps apart upstream.
    assert arrivals[0][1] < arrivals[-1][1] - 6 * gap


def test_raw_stream_first_chunk_arrives_before_upstream_sends_the_second(gateway, test_id):
    conn = gateway.connection("anthropic")
    start = time.monotonic()
    conn.request(
        "POST",
        "/v1/messages",
        body=message_body(stream=True),
        headers={
            "authorization": f"Bearer {SECRET}",
            "content-type": "application/json",
            "x-fake-gap-ms": "400",
            "x-test-id": test_id,
        },
    )
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("content-type").startswith("text/event-stream")
    assert response.getheader("transfer-encoding") == "chunked"
    first = response.read1(65536)
    first_at = time.monotonic() - start
    rest = response.read()
    total = time.monotonic() - start

    assert first.startswith(b"event: message_start\n")
    assert first_at < 0.35  # upstream sends the second frame 0.4 s after the first
    assert total > 3.0  # 9 frames, 8 gaps of 0.4 s
    conn.close()
    assert (first + rest).endswith(b'event: message_stop\ndata: {"type": "message_stop"}\n\n')


def test_stream_longer_than_the_silence_timeout_runs_to_its_end(gateway, test_id):
    # The gateway's read timeout is 2 s; this stream lasts ~5.6 s but is never quiet 2 s.
    client = sdk(gateway, test_id)
    with client.messages.stream(
        model=MODEL,
        max_tokens=16,
        messages=MESSAGES,
        extra_headers={"x-fake-gap-ms": "700", "x-fake-events": "6"},
    ) as stream:
        text = stream.get_final_text()
    assert text == "".join(f"chunk{i} " for i in range(6))


def test_stall_mid_stream_ends_with_an_error_event(gateway, fake_upstream, test_id):
    response, body = post(
        gateway,
        "/v1/messages",
        message_body(stream=True),
        {
            "x-api-key": SECRET,
            "content-type": "application/json",
            "x-fake-scenario": "stall-mid:5",
            "x-test-id": test_id,
        },
    )
    assert response.status == 200
    assert body.startswith(b"event: message_start")
    assert b"message_stop" not in body
    last = body.strip().split(b"\n\n")[-1]
    assert last.startswith(b"event: error\ndata: ")
    assert json.loads(last.split(b"data: ", 1)[1])["error"]["type"] == "timeout_error"


@pytest.mark.parametrize(
    ("encoding", "failure"),
    [
        # Identity: shim appends the provider's `event: error` frame.
        ("identity", anthropic.APIError),
        # Compressed: a frame cannot be appended to upstream's compressed stream,
        # so the chunked body is aborted and the transport raises.
        ("gzip", httpx2.RemoteProtocolError),
    ],
)
def test_sdk_sees_a_failure_when_upstream_drops_mid_stream(gateway, test_id, encoding, failure):
    client = sdk(gateway, test_id)
    with pytest.raises(failure):
        with client.messages.stream(
            model=MODEL,
            max_tokens=16,
            messages=MESSAGES,
            extra_headers={"x-fake-scenario": "drop", "x-fake-encoding": encoding},
        ) as stream:
            for _ in stream:
                pass


def test_client_hangup_closes_the_upstream_stream(gateway, fake_upstream, test_id):
    sock = socket.create_connection(("127.0.0.1", gateway.anthropic_port))
    body = message_body(stream=True)
    sock.sendall(
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        + f"x-api-key: {SECRET}\r\nx-fake-gap-ms: 300\r\nx-fake-events: 40\r\n".encode()
        + f"x-test-id: {test_id}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    received = b""
    while b"message_start" not in received:
        received += sock.recv(65536)
    hung_up = time.monotonic()
    sock.close()
    deadline = hung_up + 3
    while test_id not in fake_upstream.stream_ends and time.monotonic() < deadline:
        time.sleep(0.05)
    how, when = fake_upstream.stream_ends[test_id]
    assert how == "client_gone"
    assert when - hung_up < 2.0


# -- other endpoints -------------------------------------------------------------


def test_count_tokens(gateway, fake_upstream, test_id):
    result = sdk(gateway, test_id).messages.count_tokens(model=MODEL, messages=MESSAGES)
    assert result.input_tokens > 0
    [seen] = fake_upstream.matching(test_id)
    assert seen.path == "/v1/messages/count_tokens"


def test_models_list_keeps_query_and_retrieve_works(gateway, fake_upstream, test_id):
    client = sdk(gateway, test_id)
    ids = [model.id for model in client.models.list(limit=1000)]
    assert "claude-haiku-4-5-20251001" in ids
    assert client.models.retrieve("claude-haiku-4-5-20251001").id == "claude-haiku-4-5-20251001"
    listed, retrieved = fake_upstream.matching(test_id)
    assert "limit=1000" in listed.query
    assert retrieved.path == "/v1/models/claude-haiku-4-5-20251001"


def test_unknown_model_is_the_upstreams_own_404(gateway, test_id):
    with pytest.raises(anthropic.NotFoundError) as caught:
        sdk(gateway, test_id).models.retrieve("claude-nope")
    assert caught.value.body["error"]["message"] == "model: claude-nope"


# -- upstream answers passed through ---------------------------------------------


@pytest.mark.parametrize("status", [400, 429, 500, 529])
def test_upstream_error_status_body_and_headers_pass_through(gateway, test_id, status):
    response, body = post(
        gateway,
        "/v1/messages",
        message_body(),
        {
            "x-api-key": SECRET,
            "content-type": "application/json",
            "x-fake-scenario": f"error:{status}",
            "x-test-id": test_id,
        },
    )
    assert response.status == status
    assert response.getheader("retry-after") == "7"
    assert response.getheader("x-should-retry") == "true"
    assert response.getheader("request-id") == "req_fake_0001"
    assert response.getheader("anthropic-ratelimit-requests-remaining") == "0"
    assert json.loads(body) == {
        "type": "error",
        "error": {"type": json.loads(body)["error"]["type"], "message": "Fake upstream error."},
        "request_id": "req_fake_error",
    }
    assert int(response.getheader("content-length")) == len(body)


def test_sdk_raises_rate_limit_error_from_upstream_429(gateway, test_id):
    with pytest.raises(anthropic.RateLimitError):
        sdk(gateway, test_id).messages.create(
            model=MODEL,
            max_tokens=16,
            messages=MESSAGES,
            extra_headers={"x-fake-scenario": "error:429"},
        )


def test_gzip_body_relayed_compressed_with_matching_headers(gateway, test_id):
    response, body = post(
        gateway,
        "/v1/messages",
        message_body(),
        {
            "x-api-key": SECRET,
            "content-type": "application/json",
            "accept-encoding": "gzip",
            "x-fake-scenario": "gzip",
            "x-test-id": test_id,
        },
    )
    assert response.status == 200
    assert response.getheader("content-encoding") == "gzip"
    assert int(response.getheader("content-length")) == len(body)
    assert json.loads(gzip.decompress(body))["content"][0]["text"] == "Hello from fake Claude."


def test_sdk_reads_gzip_answer(gateway, test_id):
    message = sdk(gateway, test_id).messages.create(
        model=MODEL, max_tokens=16, messages=MESSAGES, extra_headers={"x-fake-scenario": "gzip"}
    )
    assert message.content[0].text == "Hello from fake Claude."


def test_close_delimited_upstream_body_arrives_whole(gateway, test_id):
    response, body = post(
        gateway,
        "/v1/messages",
        message_body(),
        {
            "x-api-key": SECRET,
            "content-type": "application/json",
            "x-fake-scenario": "close-delimited",
            "x-test-id": test_id,
        },
    )
    assert response.status == 200
    assert json.loads(body)["content"][0]["text"] == "Hello from fake Claude."


def test_upstream_redirect_is_relayed_not_followed(gateway, fake_upstream, test_id):
    response, _ = post(
        gateway,
        "/v1/messages",
        message_body(),
        {
            "x-api-key": SECRET,
            "content-type": "application/json",
            "x-fake-scenario": "redirect",
            "x-test-id": test_id,
        },
    )
    assert response.status == 302
    assert len(fake_upstream.matching(test_id)) == 1


# -- the gateway's own errors ------------------------------------------------------


def anthropic_error(body: bytes, kind: str) -> dict:
    parsed = json.loads(body)
    assert parsed["type"] == "error"
    assert parsed["error"]["type"] == kind
    assert isinstance(parsed["error"]["message"], str) and parsed["error"]["message"]
    return parsed


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-api-key": "wrong-secret-value-1234"},
        {"authorization": "Bearer wrong-secret-value-1234"},
        {"authorization": f"Basic {SECRET}"},
        {"x-api-key": SECRET[:-1]},
        {"x-api-key": "caf\xe9-secret-\xff-value"},
    ],
    ids=["missing", "wrong-key", "wrong-bearer", "basic-scheme", "prefix", "latin1-bytes"],
)
def test_bad_secret_is_401_and_nothing_is_forwarded(gateway, fake_upstream, test_id, headers):
    response, body = post(
        gateway,
        "/v1/messages",
        message_body(),
        {"content-type": "application/json", "x-test-id": test_id, **headers},
    )
    assert response.status == 401
    anthropic_error(body, "authentication_error")
    assert fake_upstream.matching(test_id) == []
    assert b"wrong-secret-value" not in body
    assert_no_secret(body)


def test_sdk_with_wrong_secret_raises_authentication_error(gateway, test_id):
    with pytest.raises(anthropic.AuthenticationError):
        sdk(gateway, test_id, api_key="not-the-secret-at-all").messages.create(
            model=MODEL, max_tokens=16, messages=MESSAGES
        )


def test_body_over_the_limit_is_413_before_it_is_read(gateway, fake_upstream, test_id):
    # The test gateway allows 1 MiB. Send only headers that announce 5 MiB: the
    # answer must come without the body ever being sent.
    sock = socket.create_connection(("127.0.0.1", gateway.anthropic_port), timeout=5)
    sock.sendall(
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        + f"x-api-key: {SECRET}\r\nx-test-id: {test_id}\r\n".encode()
        + f"content-length: {5 * 1024 * 1024}\r\n\r\n".encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
        data = sock.recv(65536)
        if not data:
            break
        answer += data
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413")
    anthropic_error(answer.split(b"\r\n\r\n", 1)[1], "request_too_large")
    assert fake_upstream.matching(test_id) == []


def test_chunked_body_over_the_limit_is_413(gateway, fake_upstream, test_id):
    conn = gateway.connection("anthropic")
    big = (b"x" * 65536 for _ in range(32))  # 2 MiB, no Content-Length
    conn.request(
        "POST",
        "/v1/messages",
        body=big,
        encode_chunked=True,
        headers={
            "x-api-key": SECRET,
            "content-type": "application/json",
            "x-test-id": test_id,
            "transfer-encoding": "chunked",
        },
    )
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert response.status == 413
    anthropic_error(body, "request_too_large")
    assert fake_upstream.matching(test_id) == []


def test_body_at_the_limit_is_forwarded_whole(gateway, fake_upstream, test_id):
    padding = 1024 * 1024 - len(message_body(pad=""))
    body = message_body(pad="p" * padding)
    assert len(body) == 1024 * 1024
    response, _ = post(
        gateway,
        "/v1/messages",
        body,
        {"x-api-key": SECRET, "content-type": "application/json", "x-test-id": test_id},
    )
    assert response.status == 200
    [seen] = fake_upstream.matching(test_id)
    assert seen.body == body


def test_unreachable_upstream_is_502(gateway_unreachable, test_id):
    response, body = post(
        gateway_unreachable,
        "/v1/messages",
        message_body(),
        {"x-api-key": SECRET, "content-type": "application/json"},
    )
    assert response.status == 502
    parsed = anthropic_error(body, "api_error")
    assert "127.0.0.1" not in parsed["error"]["message"]


def test_upstream_silent_before_headers_is_504_after_the_timeout(gateway, test_id):
    start = time.monotonic()
    response, body = post(
        gateway,
        "/v1/messages",
        message_body(),
        {
            "x-api-key": SECRET,
            "content-type": "application/json",
            "x-fake-scenario": "stall:4",
            "x-test-id": test_id,
        },
    )
    elapsed = time.monotonic() - start
    assert response.status == 504
    anthropic_error(body, "timeout_error")
    assert 1.8 < elapsed < 3.5  # the gateway's 2 s silence timeout, not the 4 s stall


def test_gemini_paths_are_404_on_the_anthropic_port(gateway, fake_upstream, test_id):
    response, body = post(
        gateway,
        "/v1beta/models/gemini-2.5-flash:generateContent",
        b"{}",
        {"x-api-key": SECRET, "x-goog-api-key": SECRET, "x-test-id": test_id},
    )
    assert response.status == 404
    anthropic_error(body, "not_found_error")
    assert fake_upstream.matching(test_id) == []


def test_head_root_probe_and_health_need_no_secret(gateway):
    conn = gateway.connection("anthropic")
    conn.request("HEAD", "/")
    head = conn.getresponse()
    assert (head.status, head.read()) == (200, b"")
    conn.request("GET", "/health")
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert (response.status, json.loads(body)) == (200, {"status": "ok"})
