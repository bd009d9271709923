"""Faults, live: stalls, drops, hang-ups, bad input, restarts and dead workers.

Each test states the README's "What happens when…" row it proves. Times are
measured from the moment the fault starts; the main test gateway's silence
timeout is 2 s, the api-key gateway's is the default 600 s (so anything it
does within seconds is not the timeout at work).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import SECRET, start_gateway
from tests.fake_upstream import FAKE_GEMINI_KEYS, FAKE_OAUTH_TOKEN

MESSAGE = json.dumps(
    {"model": "claude-test-model", "max_tokens": 16, "stream": True,
     "messages": [{"role": "user", "content": "hi"}]}
).encode()
GEMINI_STREAM = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"


def raw_request(port: int, path: str, headers: dict[str, str], body: bytes = MESSAGE,
                method: str = "POST") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    # Connection: close, so the end of the response is the end of the socket.
    lines = [f"{method} {path} HTTP/1.1", "Host: shim.test", "Connection: close",
             f"Content-Length: {len(body)}",
             "Content-Type: application/json", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def request(port: int, method: str, path: str, body: bytes = b"", **headers: str):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def works(gw) -> bool:
    """/health answers and a normal call succeeds on both ports."""
    ok = request(gw.anthropic_port, "GET", "/health")[0] == 200
    ok &= request(gw.gemini_port, "GET", "/health")[0] == 200
    status, _ = request(gw.anthropic_port, "POST", "/v1/messages",
                        MESSAGE.replace(b'"stream": true', b'"stream": false'),
                        **{"x-api-key": SECRET, "content-type": "application/json"})
    ok &= status == 200
    if gw.gemini_configured:
        status, _ = request(gw.gemini_port, "POST",
                            "/v1beta/models/gemini-2.5-flash:generateContent", b"{}",
                            **{"x-goog-api-key": SECRET, "content-type": "application/json"})
        ok &= status == 200
    return ok


# -- upstream faults ------------------------------------------------------------------


def test_stall_before_headers_is_504_and_upstream_is_closed(gateway, fake_upstream, test_id):
    start = time.monotonic()
    status, body = request(gateway.anthropic_port, "POST", "/v1/messages", MESSAGE, **{
        "x-api-key": SECRET, "x-fake-scenario": "stall:6", "x-test-id": test_id})
    elapsed = time.monotonic() - start
    print(f"stall before headers -> 504 after {elapsed:.2f} s")
    assert status == 504
    assert json.loads(body)["error"]["type"] == "timeout_error"
    assert 1.9 < elapsed < 3.0
    assert wait_for(lambda: test_id in fake_upstream.stream_ends, 2)
    how, when = fake_upstream.stream_ends[test_id]
    assert how == "client_gone" and when - start < 3.0


def test_stall_mid_stream_ends_with_timeout_error_event_and_closes_upstream(
    gateway, fake_upstream, test_id
):
    start = time.monotonic()
    sock = raw_request(gateway.anthropic_port, "/v1/messages", {
        "x-api-key": SECRET, "x-fake-scenario": "stall-mid:8", "x-test-id": test_id})
    data = read_all(sock)
    elapsed = time.monotonic() - start
    sock.close()
    print(f"stall mid-stream -> error event and end after {elapsed:.2f} s")
    assert b"event: message_start" in data
    assert data.endswith(b"0\r\n\r\n")  # a complete chunked body: the frame is the signal
    frame = data.rsplit(b"event: error\ndata: ", 1)[1].split(b"\n\n")[0]
    assert json.loads(frame)["error"]["type"] == "timeout_error"
    assert 1.9 < elapsed < 2.6
    assert wait_for(lambda: test_id in fake_upstream.stream_ends, 2)
    assert fake_upstream.stream_ends[test_id][0] == "client_gone"


def test_stall_mid_stream_on_gemini_aborts_the_body(gateway, test_id):
    sock = raw_request(gateway.gemini_port, GEMINI_STREAM, {
        "x-goog-api-key": SECRET, "x-fake-scenario": "stall-mid:8", "x-test-id": test_id},
        body=b"{}")
    start = time.monotonic()
    data = read_all(sock)
    sock.close()
    assert b'"chunk1 "' in data
    assert not data.endswith(b"0\r\n\r\n")  # no terminating chunk: the client sees a cut
    assert time.monotonic() - start < 3.0


def test_drop_mid_stream_ends_with_an_error_event_after_the_events_so_far(gateway, test_id):
    sock = raw_request(gateway.anthropic_port, "/v1/messages", {
        "x-api-key": SECRET, "x-fake-scenario": "drop", "x-test-id": test_id})
    data = read_all(sock)
    sock.close()
    assert data.index(b"event: message_start") < data.index(b"event: content_block_start")
    assert b"message_stop" not in data
    frame = data.rsplit(b"event: error\ndata: ", 1)[1].split(b"\n\n")[0]
    assert json.loads(frame)["error"]["type"] == "api_error"


def test_drop_mid_stream_on_gemini_aborts_the_body(gateway, test_id):
    sock = raw_request(gateway.gemini_port, GEMINI_STREAM, {
        "x-goog-api-key": SECRET, "x-fake-scenario": "drop", "x-test-id": test_id}, body=b"{}")
    data = read_all(sock)
    sock.close()
    assert b'"chunk0 "' in data
    assert not data.endswith(b"0\r\n\r\n")
    # The abort is on purpose and its cause is logged: no traceback (issue #19).
    assert wait_for(lambda: "stream aborted so the client sees it fail"
                    in gateway.log_path.read_text(), 5)
    assert "StreamAborted" not in gateway.log_path.read_text()


def test_tls_failure_toward_upstream_is_502(gateway_unreachable):
    status, body = request(gateway_unreachable.gemini_port, "GET", "/v1beta/models",
                           **{"x-goog-api-key": SECRET})
    assert status == 502
    assert json.loads(body)["error"]["status"] == "UNAVAILABLE"
    assert "SSLError" in gateway_unreachable.log_text()


# -- client faults -----------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_client_hangup_while_upstream_is_quiet_closes_upstream_at_once(
    gateway_api_key, gateway, fake_upstream, test_id, provider
):
    # The api-key gateway's silence timeout is 600 s: only the hang-up can end this.
    gw = gateway_api_key if provider == "anthropic" else gateway
    if provider == "anthropic":
        sock = raw_request(gw.anthropic_port, "/v1/messages", {
            "x-api-key": SECRET, "x-fake-scenario": "stall-mid:30", "x-test-id": test_id})
        read_until(sock, b"content_block_start")
    else:
        # Gemini's stream on the 2 s gateway: the hang-up must beat the timeout by far.
        sock = raw_request(gw.gemini_port, GEMINI_STREAM, {
            "x-goog-api-key": SECRET, "x-fake-scenario": "stall-mid:30", "x-test-id": test_id},
            body=b"{}")
        read_until(sock, b'"chunk1 "')
    hung_up = time.monotonic()
    sock.close()
    assert wait_for(lambda: test_id in fake_upstream.stream_ends, 3)
    how, when = fake_upstream.stream_ends[test_id]
    print(f"hang-up to upstream closed ({provider}): {(when - hung_up) * 1000:.0f} ms")
    assert how == "client_gone"
    assert when - hung_up < 1.0


def test_slow_reader_of_a_fast_stream_holds_back_upstream_not_memory(
    gateway_api_key, fake_upstream, test_id
):
    before = gateway_api_key.rss_kib()
    sock = raw_request(gateway_api_key.anthropic_port, "/v1/messages", {
        "x-api-key": SECRET, "x-fake-scenario": "bulk:48", "x-test-id": test_id})
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    read_until(sock, b"\r\n\r\n")
    time.sleep(2.0)  # read nothing: upstream must be held back by TCP, not queued in shim
    sent_while_stalled = fake_upstream.bulk_sent.get(test_id, 0)
    grown_mib = (gateway_api_key.rss_kib() - before) / 1024
    rest = read_all(sock)
    sock.close()
    print(f"stalled reader: upstream wrote {sent_while_stalled / 2**20:.1f} MiB of 48, "
          f"gateway RSS grew {grown_mib:.1f} MiB")
    assert sent_while_stalled < 16 * 1024 * 1024  # of 48 MiB offered
    assert grown_mib < 16
    assert len(rest) > 47 * 1024 * 1024 and rest.endswith(b"0\r\n\r\n")  # then all arrived


BAD_INPUTS = [
    # (port attr, raw request bytes, expected status)
    ("anthropic_port", b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000
     + b"\r\nContent-Length: 2\r\n\r\n{}", 431),
    ("gemini_port", b"GET /v1beta/models?x=" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ("anthropic_port", b"BREW /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: " + SECRET.encode()
     + b"\r\nContent-Length: 0\r\n\r\n", 405),
    ("anthropic_port", b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: " + SECRET.encode()
     + b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400),
    ("gemini_port", b"POST /v1beta/models/m:generateContent HTTP/1.1\r\nHost: x\r\n"
     b"x-goog-api-key: " + SECRET.encode() + b"\r\nContent-Length: 5\r\n\r\n{nope", 400),
    ("anthropic_port", b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: " + SECRET.encode()
     + b"\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nnot json!", 400),
    ("anthropic_port",
     b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
]


@pytest.mark.parametrize(("port_attr", "raw", "status"), BAD_INPUTS,
                         ids=["huge-header", "huge-request-line", "unknown-method",
                              "broken-chunked-body", "malformed-json-gemini",
                              "wrong-content-type", "bad-content-length"])
def test_bad_input_gets_a_provider_shaped_4xx_and_the_worker_keeps_serving(
    gateway, port_attr, raw, status
):
    sock = socket.create_connection(("127.0.0.1", getattr(gateway, port_attr)), timeout=10)
    sock.sendall(raw)
    answer = read_all(sock) if status in (431, 414) else read_until(sock, b"}")
    sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status}".encode()), head
    parsed = json.loads(body[: body.rindex(b"}") + 1])
    if port_attr == "gemini_port":
        assert parsed["error"]["code"] == status
    else:
        assert parsed["type"] == "error" and parsed["error"]["type"]
    assert works(gateway)


# -- restarts ---------------------------------------------------------------------------


@pytest.fixture
def own_gateway(fake_upstream, tmp_path):
    """A gateway this test may stop or maim."""
    started = []

    def start(**env: str):
        gw = start_gateway(
            {
                "SHIM_ANTHROPIC_TOKEN": FAKE_OAUTH_TOKEN,
                "SHIM_GEMINI_KEYS": ",".join(FAKE_GEMINI_KEYS),
                "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
                "SHIM_GEMINI_UPSTREAM": fake_upstream.url,
                **env,
            },
            tmp_path / f"gunicorn{len(started)}.log",
        )
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


def test_sigterm_lets_an_inflight_stream_finish_and_idle_connections_do_not_hold_exit(
    own_gateway, test_id
):
    gw = own_gateway(SHIM_GRACEFUL_TIMEOUT_S="20", SHIM_WORKERS="1")
    idle = http.client.HTTPConnection("127.0.0.1", gw.anthropic_port, timeout=10)
    idle.request("GET", "/health")
    idle.getresponse().read()  # a keep-alive connection now sits idle
    sock = raw_request(gw.anthropic_port, "/v1/messages", {
        "x-api-key": SECRET, "x-fake-gap-ms": "400", "x-fake-events": "6", "x-test-id": test_id})
    read_until(sock, b"message_start")
    gw.process.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    data = read_all(sock)
    finished_at = time.monotonic()
    sock.close()
    idle.close()

    assert data.endswith(b"0\r\n\r\n")
    assert b"event: message_stop" in data
    assert data.count(b"event: content_block_delta") == 6
    assert finished_at - stopped_at > 2.5  # the stream really ran on after the signal
    gw.process.wait(timeout=5)
    assert time.monotonic() - finished_at < 3.0  # nothing held the exit past the stream
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gw.anthropic_port), timeout=2).close()


def test_a_stopping_worker_closes_idle_connections_quietly_and_serves_accepted_ones(
    own_gateway, test_id
):
    """Issue #19 (found by the soak): a stop used to write an unasked-for 500 on these."""
    gw = own_gateway(SHIM_GRACEFUL_TIMEOUT_S="20", SHIM_WORKERS="1")
    idle = socket.create_connection(("127.0.0.1", gw.anthropic_port), timeout=10)
    idle.sendall(b"GET /health HTTP/1.1\r\nHost: shim.test\r\n\r\n")
    assert read_until(idle, b"ok").startswith(b"HTTP/1.1 200")  # now idle, kept alive
    fresh = socket.create_connection(("127.0.0.1", gw.anthropic_port), timeout=10)
    # A stream keeps the worker in its grace period while the two are looked at.
    stream = raw_request(gw.anthropic_port, "/v1/messages", {
        "x-api-key": SECRET, "x-fake-gap-ms": "400", "x-fake-events": "8", "x-test-id": test_id})
    read_until(stream, b"message_start")  # by now the worker has accepted `fresh`
    gw.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)

    idle.settimeout(5)
    assert idle.recv(65536) == b""  # closed, with nothing written on it
    fresh.sendall(b"GET /v1/models HTTP/1.1\r\nHost: shim.test\r\nx-api-key: "
                  + SECRET.encode() + b"\r\n\r\n")
    answer = read_all(fresh)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"connection: close" in answer.lower()
    assert b"event: message_stop" in read_all(stream)
    for sock in (idle, fresh, stream):
        sock.close()
    gw.process.wait(timeout=10)
    assert "error handling request" not in gw.log_path.read_text()


def test_a_call_sent_right_after_a_stream_that_outlived_the_stop_is_served(
    own_gateway, test_id
):
    """Issue #19 (the soak's resets on reuse): the stream's headers said keep-alive."""
    gw = own_gateway(SHIM_GRACEFUL_TIMEOUT_S="20", SHIM_WORKERS="1")
    conn = http.client.HTTPConnection("127.0.0.1", gw.anthropic_port, timeout=10)
    conn.request("POST", "/v1/messages", body=MESSAGE, headers={
        "x-api-key": SECRET, "content-type": "application/json", "x-fake-gap-ms": "300",
        "x-fake-events": "6", "x-test-id": test_id})
    stream = conn.getresponse()
    assert stream.getheader("connection", "").lower() != "close"  # kept alive when it began
    gw.process.send_signal(signal.SIGTERM)
    assert b"event: message_stop" in stream.read()
    conn.request("GET", "/v1/models", headers={"x-api-key": SECRET})  # at once, same socket
    after = conn.getresponse()
    assert after.status == 200
    assert after.getheader("connection", "").lower() == "close"
    after.read()
    conn.close()
    gw.process.wait(timeout=10)


def test_sigterm_past_the_grace_period_ends_the_stream_with_an_error_event(
    own_gateway, fake_upstream, test_id
):
    gw = own_gateway(SHIM_GRACEFUL_TIMEOUT_S="1", SHIM_WORKERS="1")
    sock = raw_request(gw.anthropic_port, "/v1/messages", {
        "x-api-key": SECRET, "x-fake-gap-ms": "500", "x-fake-events": "30", "x-test-id": test_id})
    read_until(sock, b"message_start")
    gw.process.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    data = read_all(sock)
    elapsed = time.monotonic() - stopped_at
    sock.close()
    print(f"SIGTERM with 1 s grace -> stream ended with error event after {elapsed:.2f} s")

    assert b"message_stop" not in data
    frame = data.rsplit(b"event: error\ndata: ", 1)[1].split(b"\n\n")[0]
    assert json.loads(frame)["error"]["type"] == "overloaded_error"
    assert elapsed < 4.0  # grace 1 s + gunicorn's 1 s polling + the kill
    assert wait_for(lambda: test_id in fake_upstream.stream_ends, 3)
    assert fake_upstream.stream_ends[test_id][0] == "client_gone"


def worker_serving(gw, client: socket.socket) -> int:
    """The worker pid holding the server side of ``client``'s connection."""
    local_port = client.getsockname()[1]
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == local_port:
            inodes.add(fields[9])
    for pid in gw.pids()[1:]:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return pid
    raise AssertionError("no worker holds the connection")


def test_a_dead_worker_is_replaced_and_the_other_workers_stream_runs_on(own_gateway, test_id):
    gw = own_gateway(SHIM_WORKERS="2")
    sock = raw_request(gw.anthropic_port, "/v1/messages", {
        "x-api-key": SECRET, "x-fake-gap-ms": "300", "x-fake-events": "8", "x-test-id": test_id})
    read_until(sock, b"message_start")
    serving = worker_serving(gw, sock)
    other = next(pid for pid in gw.pids()[1:] if pid != serving)
    os.kill(other, signal.SIGKILL)
    data = read_all(sock)
    sock.close()

    assert b"event: message_stop" in data and data.endswith(b"0\r\n\r\n")
    assert wait_for(lambda: len(gw.pids()) == 3 and other not in gw.pids(), 10)
    assert works(gw)


def test_after_a_fault_storm_both_ports_still_serve(gateway, fake_upstream):
    # A bounded, mixed storm on loopback: 4 threads x 12 requests, every kind of fault.
    faults = [
        ("anthropic", {"x-api-key": SECRET, "x-fake-scenario": "drop"}),
        ("anthropic", {"x-api-key": SECRET, "x-fake-scenario": "stall-mid:3"}),
        ("anthropic", {"x-api-key": SECRET, "x-fake-scenario": "error:529"}),
        ("anthropic", {"x-api-key": "wrong-secret-000000"}),
        ("gemini", {"x-goog-api-key": SECRET, "x-fake-scenario": "drop"}),
        ("gemini", {"x-goog-api-key": SECRET, "x-fake-scenario": "error:500"}),
        ("hangup", {"x-api-key": SECRET, "x-fake-gap-ms": "200", "x-fake-events": "20"}),
        ("garbage", {}),
    ]
    errors: list[BaseException] = []

    def storm(offset: int) -> None:
        try:
            for index in range(12):
                kind, headers = faults[(index + offset) % len(faults)]
                if kind == "garbage":
                    sock = socket.create_connection(("127.0.0.1", gateway.gemini_port), timeout=10)
                    sock.sendall(b"\x16\x03\x01garbage\r\n\r\n")
                    read_all(sock)
                elif kind == "hangup":
                    sock = raw_request(gateway.anthropic_port, "/v1/messages", headers)
                    read_until(sock, b"message_start")
                elif kind == "gemini":
                    sock = raw_request(gateway.gemini_port, GEMINI_STREAM, headers, body=b"{}")
                    read_all(sock)
                else:
                    sock = raw_request(gateway.anthropic_port, "/v1/messages", headers)
                    read_all(sock)
                sock.close()
        except BaseException as exc:  # noqa: BLE001 - reported below, with the thread's index
            errors.append(exc)

    threads = [threading.Thread(target=storm, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert works(gateway)
