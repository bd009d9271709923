"""Abuse, live and bounded: secret guessing, spoofed addresses, slow and silent clients.

Every loop here is bounded in count and time and talks only to 127.0.0.x.
Client addresses are told apart by the loopback source address they connect
from (127.0.0.2, 127.0.0.3, …), exactly as shim sees different callers.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.conftest import SECRET, start_gateway
from tests.fake_upstream import FAKE_API_KEY

BODY = json.dumps(
    {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
).encode()


@pytest.fixture(scope="module")
def strict_gateway(fake_upstream, tmp_path_factory):
    gw = start_gateway(
        {
            "SHIM_ANTHROPIC_API_KEY": FAKE_API_KEY,
            "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
            "SHIM_AUTH_FAILURES_MAX": "3",
            "SHIM_AUTH_COOLOFF_S": "2",
            "SHIM_BODY_TIMEOUT_S": "1.5",
            "SHIM_IDLE_TIMEOUT_S": "2",
        },
        tmp_path_factory.mktemp("strict") / "gunicorn.log",
    )
    yield gw
    gw.stop()


def call_from(source: str, port: int, secret: str, **headers: str) -> tuple[int, dict, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(
        f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nConnection: close\r\nx-api-key: {secret}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(BODY)}\r\n{extra}\r\n".encode()
        + BODY
    )
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    parsed = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return status, parsed, body


def test_guessing_address_is_cooled_off_without_a_comparison_and_others_are_not_slowed(
    strict_gateway,
):
    port = strict_gateway.anthropic_port
    statuses = [call_from("127.0.0.2", port, f"guess-{i}-0000000000")[0] for i in range(3)]
    assert statuses == [401, 401, 401]

    # Now even the right secret is refused from that address, without being checked.
    status, headers, body = call_from("127.0.0.2", port, SECRET)
    assert status == 429
    assert json.loads(body)["error"]["type"] == "rate_limit_error"
    assert 1 <= int(headers["retry-after"]) <= 2

    # Another address is unaffected, and fast.
    start = time.monotonic()
    assert call_from("127.0.0.3", port, SECRET)[0] == 200
    assert time.monotonic() - start < 1.0

    time.sleep(2.1)  # the cool-off ends
    assert call_from("127.0.0.2", port, SECRET)[0] == 200

    log = strict_gateway.log_text()
    lines = [json.loads(line) for line in log.splitlines()]
    throttled = [line for line in lines if line.get("event") == "auth_throttled"]
    assert throttled and all(line["client_ip"] == "127.0.0.2" for line in throttled)
    assert "guess-" not in log


def test_a_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(strict_gateway):
    port = strict_gateway.anthropic_port
    # 127.0.0.4 is not a trusted proxy: its X-Forwarded-For is its own claim.
    for i in range(3):
        status, _, _ = call_from(
            "127.0.0.4", port, "wrong-secret-0000000", **{"X-Forwarded-For": f"10.9.9.{i}"}
        )
        assert status == 401
    assert call_from("127.0.0.4", port, SECRET, **{"X-Forwarded-For": "10.9.9.200"})[0] == 429


def test_a_trickled_body_gets_408_and_does_not_hold_others(strict_gateway):
    port = strict_gateway.anthropic_port
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow.sendall(
        f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {SECRET}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(BODY)}\r\n\r\n".encode()
        + BODY[:5]
    )
    start = time.monotonic()
    # While it trickles, a normal caller is served.
    assert call_from("127.0.0.5", port, SECRET)[0] == 200
    for byte in BODY[5:12]:
        try:
            slow.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break  # the gateway already gave up on this body
        time.sleep(0.3)
    answer = b""
    try:
        while chunk := slow.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    elapsed = time.monotonic() - start
    slow.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "timeout_error"
    assert 1.4 < elapsed < 3.5


def test_silent_and_header_trickling_connections_are_closed_after_the_idle_timeout(
    strict_gateway,
):
    port = strict_gateway.anthropic_port
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(30)]
    trickle = socket.create_connection(("127.0.0.1", port), timeout=10)
    trickle.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n")
    start = time.monotonic()
    assert call_from("127.0.0.6", port, SECRET)[0] == 200  # served despite them
    for _ in range(4):
        trickle.sendall(b"x-slow: 1\r\n")
        time.sleep(0.2)
    closed_at = []
    for sock in [*silent, trickle]:
        try:
            data = sock.recv(1024)
        except ConnectionResetError:
            data = b""
        closed_at.append(time.monotonic() - start)
        assert data == b"" or data.startswith(b"HTTP/1.1 4")
        sock.close()
    assert max(closed_at) < 4.0  # the 2 s idle timeout, not forever
