"""Bad input closes the door, live through real gunicorn (issue #14, item 5).

Raw sockets, because what is checked is the wire itself: whether a
``100 Continue`` was ever sent, when the connection closes, and what a
stacked Transfer-Encoding gets. Bodies are announced large but only a few
MiB are ever sent, and every wait is bounded; traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.conftest import SECRET, start_gateway
from tests.fake_upstream import FAKE_API_KEY, FAKE_GEMINI_KEYS

MAX_BODY = 65536
BODY = json.dumps(
    {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
).encode()
GIGABYTE = 1 << 30
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@pytest.fixture(scope="module")
def doors(fake_upstream, tmp_path_factory):
    gw = start_gateway(
        {
            "SHIM_ANTHROPIC_API_KEY": FAKE_API_KEY,
            "SHIM_GEMINI_KEYS": FAKE_GEMINI_KEYS[0],
            "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
            "SHIM_GEMINI_UPSTREAM": fake_upstream.url,
            "SHIM_MAX_BODY_BYTES": str(MAX_BODY),
        },
        tmp_path_factory.mktemp("doors") / "gunicorn.log",
    )
    yield gw
    gw.stop()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def head(secret: str, length: int | None = None, **headers: str) -> bytes:
    lines = [
        "POST /v1/messages HTTP/1.1",
        "Host: x",
        f"x-api-key: {secret}",
        "content-type: application/json",
    ]
    if length is not None:
        lines.append(f"content-length: {length}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_until_closed(sock: socket.socket, seconds: float) -> tuple[bytes, float | None]:
    """Everything the gateway sends, and when it closed (None: still open after ``seconds``)."""
    start = time.monotonic()
    data = b""
    while time.monotonic() - start < seconds:
        sock.settimeout(max(0.05, seconds - (time.monotonic() - start)))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, None
        except ConnectionResetError:
            return data, time.monotonic() - start
        if not chunk:
            return data, time.monotonic() - start
        data += chunk
    return data, None


def read_response(sock: socket.socket) -> tuple[int, dict, bytes, bytes]:
    """One final response on a kept-alive connection: status, headers, body, 1xx before it."""
    data = b""
    interim = b""
    while True:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed before a response: {data!r}"
            data += chunk
        top, _, data = data.partition(b"\r\n\r\n")
        if top.startswith(b"HTTP/1.1 1"):
            interim += top + b"\r\n\r\n"
            continue
        break
    lines = top.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    length = int(headers["content-length"])
    while len(data) < length:
        data += sock.recv(65536)
    return int(lines[0].split()[1]), headers, data[:length], interim


# -- Expect: 100-continue ------------------------------------------------------------------


@pytest.mark.parametrize(
    "secret, length, status",
    [("wrong-secret-000000000000", 1000, 401), (SECRET, GIGABYTE, 413)],
    ids=["wrong-secret", "oversized"],
)
def test_expect_continue_is_refused_without_inviting_the_body(doors, secret, length, status):
    sock = connect(doors.anthropic_port)
    sock.sendall(head(secret, length, Expect="100-continue"))
    answer, closed_after = read_until_closed(sock, 3.0)
    sock.close()
    assert b"100 Continue" not in answer
    assert answer.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"\r\nConnection: close\r\n" in answer
    assert closed_after is not None and closed_after < 2.0


def test_expect_continue_for_a_good_request_invites_the_body_then_answers(doors):
    sock = connect(doors.anthropic_port)
    sock.sendall(head(SECRET, len(BODY), Expect="100-continue"))
    sock.settimeout(3)
    assert sock.recv(len(CONTINUE)) == CONTINUE
    sock.sendall(BODY)
    status, headers, body, _ = read_response(sock)
    assert status == 200 and headers["connection"] == "keep-alive"
    # The connection is still good for the next request.
    sock.sendall(head(SECRET, len(BODY)) + BODY)
    assert read_response(sock)[0] == 200
    sock.close()


def test_expect_continue_with_the_body_sent_anyway_is_answered(doors):
    # curl sends the body after a second without a 100; a client may not wait at all.
    sock = connect(doors.anthropic_port)
    sock.sendall(head(SECRET, len(BODY), Expect="100-continue") + BODY)
    sock.settimeout(3)
    status, _, body, interim = read_response(sock)
    assert status == 200 and json.loads(body)["type"] == "message"
    assert interim in (b"", CONTINUE)
    sock.close()


# -- a refusal ends the connection, whatever the client keeps sending ------------------


class Blaster(threading.Thread):
    """Sends an announced-1-GiB body as fast as the gateway takes it, until refused."""

    def __init__(self, sock: socket.socket):
        super().__init__(daemon=True)
        self.sock = sock
        self.sent = 0
        self.stopped_after: float | None = None

    def run(self) -> None:
        start = time.monotonic()
        block = b"x" * 65536
        try:
            while self.sent < GIGABYTE and time.monotonic() - start < 10:
                self.sent += self.sock.send(block)
        except OSError:
            self.stopped_after = time.monotonic() - start


@pytest.mark.parametrize(
    "secret, status",
    [("wrong-secret-000000000000", 401), (SECRET, 413)],
    ids=["wrong-secret", "oversized"],
)
def test_a_refused_huge_body_is_not_drained_and_the_connection_closes(doors, secret, status):
    sock = connect(doors.anthropic_port)
    sock.sendall(head(secret, GIGABYTE))
    blaster = Blaster(sock)
    start = time.monotonic()
    blaster.start()
    answer, closed_after = read_until_closed(sock, 5.0)
    blaster.join(timeout=5)
    sock.close()
    assert answer.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"\r\nConnection: close\r\n" in answer
    assert closed_after is not None and closed_after < 2.5
    # The gateway stopped reading: the sender was cut off, far short of its gigabyte.
    assert blaster.stopped_after is not None and blaster.stopped_after < 3.0
    assert blaster.sent < 64 << 20
    assert time.monotonic() - start < 5.0


def test_a_401_on_a_small_body_also_ends_the_connection(doors):
    sock = connect(doors.anthropic_port)
    sock.sendall(head("wrong-secret-000000000000", len(BODY)) + BODY)
    answer, closed_after = read_until_closed(sock, 3.0)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 401 ") and b"\r\nConnection: close\r\n" in answer
    assert closed_after is not None and closed_after < 2.0


# -- Transfer-Encoding: only plain chunked --------------------------------------------------


def chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    "codings",
    [
        ["gzip, chunked"],
        ["deflate, chunked"],
        ["identity, chunked"],
        ["chunked, chunked"],
        ["chunked", "chunked"],
        ["identity"],
        ["gzip"],
        ["chunked, gzip"],
        ["br, chunked"],
    ],
)
@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_a_transfer_coding_other_than_plain_chunked_gets_501_in_the_port_s_shape(
    doors, provider, codings
):
    port = doors.anthropic_port if provider == "anthropic" else doors.gemini_port
    sock = connect(port)
    lines = "".join(f"Transfer-Encoding: {value}\r\n" for value in codings)
    sock.sendall(
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n"
        + f"x-api-key: {SECRET}\r\nx-goog-api-key: {SECRET}\r\n{lines}\r\n".encode()
        + chunked(BODY)
    )
    answer, closed_after = read_until_closed(sock, 3.0)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 501 "), answer[:200]
    assert b"\r\nConnection: close\r\n" in answer
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    if provider == "anthropic":
        assert error["type"] == "error"
        assert error["error"]["type"] == "invalid_request_error"
    else:
        assert error["error"]["code"] == 501
    assert closed_after is not None


@pytest.mark.parametrize("coding", ["chunked", "Chunked"])
def test_plain_chunked_is_still_served(doors, coding):
    sock = connect(doors.anthropic_port)
    sock.sendall(head(SECRET, None, Transfer_Encoding=coding) + chunked(BODY))
    sock.settimeout(5)
    status, headers, body, _ = read_response(sock)
    sock.close()
    assert status == 200 and json.loads(body)["type"] == "message"
