"""Abuse, live and bounded: secret guessing, spoofed addresses, slow and silent clients.

Every loop here is bounded in count and time and talks only to 127.0.0.x.
Client addresses are told apart by the loopback source address they connect
from (127.0.0.2, 127.0.0.3, …), exactly as shim sees different callers.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import SECRET, closed_port, start_gateway
from tests.fake_upstream import FAKE_API_KEY
from tests.test_live_faults import worker_serving

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


# -- one throttle for the whole gateway (issue #14) -----------------------------------------


@pytest.fixture(scope="module")
def two_workers(fake_upstream, tmp_path_factory):
    gw = start_gateway(
        {
            "SHIM_ANTHROPIC_API_KEY": FAKE_API_KEY,
            "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
            "SHIM_WORKERS": "2",
            "SHIM_AUTH_FAILURES_MAX": "5",
            "SHIM_AUTH_COOLOFF_S": "3",
        },
        tmp_path_factory.mktemp("two_workers") / "gunicorn.log",
    )
    yield gw
    gw.stop()


def post(conn: http.client.HTTPConnection, secret: str) -> int:
    conn.request(
        "POST",
        "/v1/messages",
        BODY,
        {"x-api-key": secret, "content-type": "application/json"},
    )
    response = conn.getresponse()
    response.read()
    return response.status


def connect(gw, source: str) -> tuple[http.client.HTTPConnection, int]:
    """A keep-alive connection from ``source``, and the pid of the worker holding it."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", gw.anthropic_port, timeout=10, source_address=(source, 0)
    )
    conn.request("GET", "/health")
    conn.getresponse().read()
    return conn, worker_serving(gw, conn.sock)


def one_connection_per_worker(gw, source: str) -> list[http.client.HTTPConnection]:
    by_worker: dict[int, http.client.HTTPConnection] = {}
    for _ in range(100):
        conn, pid = connect(gw, source)
        if pid in by_worker:
            conn.close()
        else:
            by_worker[pid] = conn
        if len(by_worker) == 2:
            return list(by_worker.values())
    raise AssertionError("the kernel never handed a connection to the second worker")


def test_guesses_alternating_between_workers_are_counted_once(two_workers):
    first, second = one_connection_per_worker(two_workers, "127.0.0.7")
    statuses = [post((first, second)[i % 2], f"guess-{i}-000000000000") for i in range(5)]
    assert statuses == [401] * 5  # 3 on one worker, 2 on the other: 5 in all
    # The right secret is refused by both workers now, on the same connections and new ones.
    assert [post(first, SECRET), post(second, SECRET)] == [429, 429]
    assert [call_from("127.0.0.7", two_workers.anthropic_port, SECRET)[0] for _ in range(6)] == [
        429
    ] * 6
    assert call_from("127.0.0.8", two_workers.anthropic_port, SECRET)[0] == 200  # another address
    time.sleep(3.1)  # the cool-off ends, for both workers
    assert [post(first, SECRET), post(second, SECRET)] == [200, 200]
    first.close()
    second.close()


def test_a_concurrent_burst_over_fresh_connections_gets_max_failures_guesses(two_workers):
    guesses = 24
    barrier = threading.Barrier(guesses)
    workers: list[int] = []

    def guess(i: int) -> int:
        conn, pid = connect(two_workers, "127.0.0.9")
        workers.append(pid)
        barrier.wait(timeout=10)
        try:
            return post(conn, f"burst-{i}-0000000000")
        finally:
            conn.close()

    with ThreadPoolExecutor(guesses) as pool:
        statuses = list(pool.map(guess, range(guesses)))
    assert set(workers) == set(two_workers.pids()[1:])  # both workers took guesses
    # 5 compared, every other one refused unchecked, even those racing the 5th on
    # the other worker (they wait for its check: shim.throttle, "Exactness").
    assert statuses.count(401) == 5, statuses
    assert statuses.count(429) == guesses - 5


@pytest.fixture(scope="module")
def two_instances_on_redis(fake_upstream, redis_server, tmp_path_factory):
    instances = [
        start_gateway(
            {
                "SHIM_ANTHROPIC_API_KEY": FAKE_API_KEY,
                "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
                "SHIM_WORKERS": "2",
                "SHIM_AUTH_FAILURES_MAX": "5",
                "SHIM_AUTH_COOLOFF_S": "30",
                "SHIM_STATE_URL": redis_server.url,
            },
            tmp_path_factory.mktemp(f"redis_{name}") / "gunicorn.log",
        )
        for name in ("a", "b")
    ]
    yield instances
    for gw in instances:
        gw.stop()


def test_two_instances_on_one_redis_share_the_count(two_instances_on_redis, redis_server):
    a, b = two_instances_on_redis
    source = "127.0.0.10"
    assert [call_from(source, a.anthropic_port, f"ga-{i}-00000000000")[0] for i in range(3)] == [
        401
    ] * 3
    assert [call_from(source, b.anthropic_port, f"gb-{i}-00000000000")[0] for i in range(2)] == [
        401
    ] * 2
    # Five in all: both instances refuse the address now, the right secret included.
    for gw in (a, b):
        for _ in range(4):
            status, headers, _ = call_from(source, gw.anthropic_port, SECRET)
            assert status == 429
            assert 25 <= int(headers["retry-after"]) <= 30
    assert redis_server.command("EXISTS", f"shim:auth:{{{source}}}:cooloff").startswith(b":1")
    # Another address is served by both.
    for gw in (a, b):
        assert call_from("127.0.0.11", gw.anthropic_port, SECRET)[0] == 200
    assert "ga-" not in a.log_text() and "gb-" not in b.log_text()


def test_with_redis_unreachable_each_instance_still_counts_on_its_own(
    fake_upstream, tmp_path
):
    gw = start_gateway(
        {
            "SHIM_ANTHROPIC_API_KEY": FAKE_API_KEY,
            "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
            "SHIM_WORKERS": "2",
            "SHIM_AUTH_FAILURES_MAX": "3",
            "SHIM_AUTH_COOLOFF_S": "30",
            "SHIM_STATE_URL": f"redis://127.0.0.1:{closed_port()}/0",
        },
        tmp_path / "gunicorn.log",
    )
    try:
        port = gw.anthropic_port
        assert [call_from("127.0.0.12", port, f"g-{i}-000000000000")[0] for i in range(3)] == [
            401
        ] * 3
        assert call_from("127.0.0.12", port, SECRET)[0] == 429  # not open
        assert call_from("127.0.0.13", port, SECRET)[0] == 200  # not closed
        lines = [json.loads(line) for line in gw.log_text().splitlines()]
        assert any(
            line.get("event") == "state_unavailable" and line.get("operation") == "auth_failed"
            for line in lines
        )
    finally:
        gw.stop()
