"""Usage, limits and records on the real wire: compressed answers, odd shapes, every exit path.

Live: real gunicorn+gevent (2 workers, state on a real redis-server) in front
of the fake upstream, which compresses whatever the client offers and
flushes after each event, as the real APIs do. Each call is made with
``http.client`` so the test sees the bytes exactly as shim relayed them.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import socket
import threading
import time
import uuid

import pytest

from tests.conftest import start_gateway
from tests.fake_upstream import FAKE_API_KEY, FAKE_GEMINI_KEYS
from tests.test_live_observability import metric

CODINGS = ("gzip", "deflate", "br", "zstd")
SECRETS = {name: f"{name}-usage-{uuid.uuid4().hex}"
           for name in ("plain", "dora", "ed", "flo", "gus")}
LIMITS = {"dora": "tokens_per_day=2500", "ed": "concurrency=1", "flo": "concurrency=1",
          "gus": "tokens_per_day=10000"}


def write_clients(tmp) -> str:
    path = tmp / "clients.txt"
    path.write_text("".join(
        f"{name} {hashlib.sha256(secret.encode()).hexdigest()} {LIMITS.get(name, '')}\n"
        for name, secret in SECRETS.items()
    ))
    return str(path)


def usage_env(tmp, fake_upstream, redis_server, **overrides: str) -> dict:
    return {
        "SHIM_CLIENTS_FILE": write_clients(tmp),
        "SHIM_SHARED_SECRET": "",
        "SHIM_ANTHROPIC_API_KEY": FAKE_API_KEY,
        "SHIM_GEMINI_KEYS": ",".join(FAKE_GEMINI_KEYS),
        "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
        "SHIM_GEMINI_UPSTREAM": fake_upstream.url,
        "SHIM_WORKERS": "2",
        "SHIM_STATE_URL": redis_server.url,
        **overrides,
    }


@pytest.fixture(scope="module")
def gw(fake_upstream, redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("usage")
    gateway = start_gateway(usage_env(tmp, fake_upstream, redis_server), tmp / "gunicorn.log")
    yield gateway
    gateway.stop()


def access_line(gateway, request_id: str) -> dict:
    return gateway.access_line(request_id)


def scrape(gateway) -> str:
    return gateway.metrics_text()


# shape -> (port attribute, path, body, the model the answer names, stop reason)
SHAPES = {
    "anthropic_json": ("anthropic_port", "/v1/messages", {}, "end_turn"),
    "anthropic_sse": ("anthropic_port", "/v1/messages", {"stream": True}, "end_turn"),
    "anthropic_chunked_json": ("anthropic_port", "/v1/messages", {}, "end_turn"),
    "anthropic_big_json": ("anthropic_port", "/v1/messages", {}, "end_turn"),
    "gemini_json": ("gemini_port", ":generateContent", None, "STOP"),
    "gemini_sse": ("gemini_port", ":streamGenerateContent?alt=sse", None, "STOP"),
    "gemini_array": ("gemini_port", ":streamGenerateContent", None, "STOP"),
    "gemini_sse_big_event": ("gemini_port", ":streamGenerateContent?alt=sse", None, "STOP"),
}
EXTRA = {
    "anthropic_chunked_json": {"x-fake-scenario": "chunked-json"},
    # Over 1 MiB even compressed: random-ish text does not shrink much.
    "anthropic_big_json": {"x-fake-pad-bytes": str(1_300_000)},
    # The usage-carrying event is larger than the old 256 KiB tap buffer.
    "gemini_sse_big_event": {"x-fake-pad-bytes": str(600_000)},
}


def call(gateway, client: str, shape: str, coding: str, test_id: str, request_id: str,
         tokens: tuple[int, int] = (1234, 56), extra: dict | None = None):
    port_name, path, body_extra, _ = SHAPES[shape]
    model = f"usage-{shape.replace('_', '-')}-{coding}"
    headers = {
        "content-type": "application/json",
        "accept-encoding": coding,
        "x-fake-encoding": coding,
        "x-test-id": test_id,
        "x-request-id": request_id,
        "x-fake-input-tokens": str(tokens[0]),
        "x-fake-output-tokens": str(tokens[1]),
        "x-fake-events": "4",
        **EXTRA.get(shape, {}),
        **(extra or {}),
    }
    if port_name == "anthropic_port":
        model = "claude-" + model
        headers["x-api-key"] = SECRETS[client]
        body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
        body.update(body_extra)
    else:
        model = "gemini-" + model
        headers["x-goog-api-key"] = SECRETS[client]
        path = f"/v1beta/models/{model}{path}"
        body = {"contents": [{"parts": [{"text": "hi"}]}]}
    conn = http.client.HTTPConnection("127.0.0.1", getattr(gateway, port_name), timeout=20)
    try:
        conn.request("POST", path, json.dumps(body), headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read(), model
    finally:
        conn.close()


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_compressed_answer_is_relayed_as_sent_and_its_usage_is_read(
    gw, fake_upstream, shape, coding, test_id
):
    provider = "anthropic" if shape.startswith("anthropic") else "gemini"
    before = scrape(gw)
    request_id = f"usage-{shape}-{coding}-{test_id[:8]}"
    status, headers, body, model = call(gw, "plain", shape, coding, test_id, request_id)

    assert status == 200
    assert headers.get("Content-Encoding") == coding
    assert body == fake_upstream.sent[test_id]  # byte for byte, still compressed
    line = access_line(gw, request_id)
    assert line["model"] == model
    assert (line["input_tokens"], line["output_tokens"]) == (1234, 56)
    assert line["stop_reason"] == SHAPES[shape][3]
    assert line["usage_unread"] is None
    # The metrics are fed just after the access line is written: wait for them too.
    for kind, count in (("input", 1234), ("output", 56)):
        start = metric(before, "shim_tokens_total", 0.0, provider=provider, kind=kind)

        def rise(kind: str = kind, start: float = start) -> float:
            return metric(scrape(gw), "shim_tokens_total", 0.0, provider=provider,
                          kind=kind) - start

        wait_for(lambda count=count, rise=rise: rise() >= count, 3)
        assert rise() == count


def test_a_client_with_a_token_budget_is_stopped_whatever_it_accepts(gw, test_id):
    statuses = []
    for index, coding in enumerate(("gzip", "br", "zstd", "deflate", "gzip")):
        status, headers, body, _ = call(
            gw, "dora", "anthropic_sse" if index % 2 else "anthropic_json", coding,
            test_id, f"dora-{index}-{test_id[:8]}", tokens=(1990, 10))
        statuses.append(status)
        if status == 429:
            assert json.loads(body)["error"]["type"] == "rate_limit_error"
            assert int(headers["Retry-After"]) >= 1
    # 2,000 tokens a call, 2,500 a day: the call that crosses the line completes,
    # then every call is refused.
    assert statuses == [200, 200, 429, 429, 429]


def test_parallel_calls_overshoot_a_token_budget_by_less_than_one_reservation(
    gw, redis_server, test_id
):
    # One call teaches shim this client's call size (2,000 tokens), then ten
    # overlapping compressed streams arrive at once, across both workers.
    assert call(gw, "gus", "anthropic_json", "gzip", test_id, f"gus-warm-{test_id[:8]}",
                tokens=(1990, 10))[0] == 200
    results: list[tuple] = []

    def one(index: int) -> None:
        results.append(call(gw, "gus", "anthropic_sse", "gzip", test_id,
                            f"gus-{index}-{test_id[:8]}", tokens=(1990, 10),
                            extra={"x-fake-gap-ms": "150", "x-fake-events": "8"}))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    statuses = sorted(result[0] for result in results)
    # used 2,000 + 4 reservations of 2,000 reach the 10,000 limit: the fifth waits.
    assert statuses == [200] * 4 + [429] * 6
    for status, headers, body, _ in results:
        if status == 429:
            assert headers["Retry-After"] == "2"  # held by calls in flight, not used up
            assert "in flight" in json.loads(body)["error"]["message"]
    day = int(time.time() // 86_400)

    def counted() -> int:
        return int(redis_server.command("GET", f"shim:{{gus}}:t{day}").split(b"\r\n")[1])

    # Each stream is counted as its record closes, just after its last byte went out.
    assert wait_for(lambda: counted() >= 10_000, 5)
    assert counted() == 10_000  # the bound: < limit + one reservation (12,000)
    status, headers, _, _ = call(gw, "gus", "anthropic_json", "gzip", test_id,
                                 f"gus-after-{test_id[:8]}")
    assert status == 429 and int(headers["Retry-After"]) > 2  # used up: until 00:00 UTC


def test_a_stream_abandoned_after_message_start_still_counts_its_input_tokens(
    gw, fake_upstream, test_id
):
    request_id = f"abandon-{test_id[:8]}"
    sock = socket.create_connection(("127.0.0.1", gw.anthropic_port))
    body = json.dumps({"model": "claude-abandoned", "max_tokens": 16, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    sock.sendall(
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        + f"x-api-key: {SECRETS['plain']}\r\naccept-encoding: gzip\r\n".encode()
        + b"x-fake-gap-ms: 300\r\nx-fake-events: 30\r\nx-fake-input-tokens: 777\r\n"
        + f"x-test-id: {test_id}\r\nx-request-id: {request_id}\r\n".encode()
        + f"content-length: {len(body)}\r\n\r\n".encode() + body
    )
    received = b""
    while b"\r\n\r\n" not in received or len(received.split(b"\r\n\r\n", 1)[1]) < 40:
        received += sock.recv(65536)
    assert b"content-encoding: gzip" in received.lower()
    sock.close()  # gone after message_start, mid-generation

    line = access_line(gw, request_id)
    assert line["error"] == "client_gone"
    assert line["model"] == "claude-abandoned"
    assert line["input_tokens"] == 777
    assert line["stop_reason"] is None


@pytest.mark.parametrize("coding", ["gzip", "identity"])
def test_a_gemini_json_array_stream_cut_short_still_counts_the_chunks_that_came(
    gw, fake_upstream, test_id, coding
):
    """Issue #19 (found by the soak): the array was parsed only whole, so a cut one counted 0."""
    request_id = f"cut-array-{coding}-{test_id[:8]}"
    sock = socket.create_connection(("127.0.0.1", gw.gemini_port))
    body = json.dumps({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}).encode()
    sock.sendall(
        b"POST /v1beta/models/gemini-2.5-flash:streamGenerateContent HTTP/1.1\r\nHost: x\r\n"
        + f"x-goog-api-key: {SECRETS['plain']}\r\naccept-encoding: {coding}\r\n".encode()
        + b"content-type: application/json\r\nx-fake-gap-ms: 300\r\nx-fake-events: 30\r\n"
        + b"x-fake-input-tokens: 321\r\nx-fake-output-tokens: 45\r\n"
        + f"x-test-id: {test_id}\r\nx-request-id: {request_id}\r\n".encode()
        + f"content-length: {len(body)}\r\n\r\n".encode() + body
    )
    received = b""
    deadline = time.monotonic() + 10
    while received.count(b"\r\n") < 12 and time.monotonic() < deadline:  # a few chunks in
        received += sock.recv(65536)
    sock.close()  # gone mid-array

    line = access_line(gw, request_id)
    assert line["error"] == "client_gone"
    assert line["input_tokens"] == 321
    assert line["output_tokens"] == 45
    assert line.get("usage_unread") is None


def test_a_decompression_bomb_costs_a_log_line_and_the_client_still_gets_its_bytes(
    gw, fake_upstream, test_id
):
    request_id = f"bomb-{test_id[:8]}"
    # 40 MB of one repeated byte in the text: a few dozen KiB compressed.
    status, headers, body, _ = call(
        gw, "plain", "anthropic_chunked_json", "zstd", test_id, request_id,
        extra={"x-fake-pad-bytes": str(40_000_000), "x-fake-pad-char": "a"})
    assert status == 200
    assert body == fake_upstream.sent[test_id]
    assert len(body) < 200_000
    line = access_line(gw, request_id)
    assert line["usage_unread"] in ("decode_limit", "body_too_large")
    assert line["input_tokens"] is None  # never estimated
    assert '"event":"usage_unread"' in gw.log_text()


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def slots_held(redis_server, client: str) -> int:
    reply = redis_server.command("ZCARD", f"shim:{{{client}}}:slots")
    return int(reply.strip()[1:])


def test_a_header_the_server_refuses_still_ends_the_record_and_frees_the_slot(
    gw, fake_upstream, redis_server, test_id
):
    request_id = f"badheader-{test_id[:8]}"
    status, _, body, _ = call(
        gw, "ed", "anthropic_sse", "gzip", test_id, request_id,
        extra={"x-fake-scenario": "bad-header", "x-fake-gap-ms": "300", "x-fake-events": "20"})
    # gunicorn refuses the header after shim made the stream: a 500 in the port's shape.
    assert status == 500
    assert json.loads(body)["type"] == "error"
    line = access_line(gw, request_id)
    assert (line["status"], line["error"]) == (500, "unhandled_error")
    # The slot is free at once (concurrency=1 would refuse the next call for 15 min),
    # the stream gauge is back to zero and the upstream connection was closed.
    assert slots_held(redis_server, "ed") == 0
    status, _, _, _ = call(gw, "ed", "anthropic_json", "gzip", test_id, f"next-{request_id}")
    assert status == 200
    assert wait_for(lambda: metric(scrape(gw), "shim_streams_in_flight",
                                   provider="anthropic") == 0, 3)
    assert wait_for(lambda: fake_upstream.stream_ends.get(test_id, ("",))[0] == "client_gone", 8)


def test_worker_stopping_ends_every_record_whether_or_not_upstream_answered(
    fake_upstream, redis_server, tmp_path
):
    gateway = start_gateway(
        usage_env(tmp_path, fake_upstream, redis_server,
                  SHIM_GRACEFUL_TIMEOUT_S="2", SHIM_WORKERS="1"),
        tmp_path / "gunicorn.log",
    )
    waiting, streaming = f"wait-{uuid.uuid4().hex}", f"stream-{uuid.uuid4().hex}"
    results: dict[str, tuple] = {}

    def run(name: str, client: str, shape: str, extra: dict) -> None:
        try:
            results[name] = call(gateway, client, shape, "gzip", name, name, extra=extra)
        except http.client.IncompleteRead as exc:  # a compressed stream is cut by aborting
            results[name] = (200, {}, exc.partial, None)

    threads = [
        # Upstream says nothing for 30 s: the stop comes while shim waits for headers.
        threading.Thread(target=run, args=(waiting, "flo", "anthropic_json",
                                           {"x-fake-scenario": "stall:30"})),
        # A long stream, mid-way when the grace period ends.
        threading.Thread(target=run, args=(streaming, "ed", "anthropic_sse",
                                           {"x-fake-gap-ms": "400", "x-fake-events": "40"})),
    ]
    try:
        for thread in threads:
            thread.start()
        assert wait_for(lambda: fake_upstream.matching(waiting) and fake_upstream.matching(
            streaming), 5)
        time.sleep(0.5)
        gateway.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=10)
        gateway.process.wait(timeout=10)
    finally:
        gateway.stop()

    status, _, body, _ = results[waiting]
    assert status == 503  # the provider's retryable answer, not a dropped connection
    assert json.loads(body)["error"]["type"] == "overloaded_error"
    status, _, body, _ = results[streaming]
    assert status == 200 and b"message_stop" not in body  # cut, visibly (aborted or error)
    for request_id in (waiting, streaming):
        line = access_line(gateway, request_id)
        assert line["error"] == "worker_stopping", line
    # Both upstream connections were closed and both slots freed in the shared store.
    assert wait_for(lambda: waiting in fake_upstream.stream_ends
                    and streaming in fake_upstream.stream_ends, 5)
    assert slots_held(redis_server, "flo") == 0
    assert slots_held(redis_server, "ed") == 0
