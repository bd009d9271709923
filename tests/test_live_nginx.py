"""Through a real nginx (Debian's, installed by scripts/test) running the shipped config.

The shipped template and snippet are rendered as envsubst would, with two
test-only changes: loopback ports, and a 3 s ``proxy_read_timeout`` so that
"a call longer than nginx's read timeout is not cut" takes seconds, not
minutes (the shipped value is asserted in test_deploy.py).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import anthropic
import pytest

from tests.conftest import ROOT, SECRET, free_port
from tests.test_live_observability import wait_for_line

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
DEPLOY = ROOT / "deploy" / "nginx"
TEST_READ_TIMEOUT_S = 3
MIB = 1024 * 1024


def render(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), text)


@pytest.fixture(scope="session")
def nginx(gateway_api_key, tmp_path_factory):
    """nginx with the shipped config in front of the api-key gateway (default 32 MiB limit)."""
    assert os.path.exists(NGINX), "nginx missing: run ./scripts/test (it installs Debian's nginx)"
    work = tmp_path_factory.mktemp("nginx")
    work.chmod(0o777)  # nginx's workers run as nobody and write their temp files here
    snippet = (DEPLOY / "snippets" / "shim-proxy.conf").read_text()
    assert "proxy_read_timeout 660s;" in snippet
    snippet = snippet.replace(
        "proxy_read_timeout 660s;", f"proxy_read_timeout {TEST_READ_TIMEOUT_S}s;"
    )
    (work / "shim-proxy.conf").write_text(snippet)
    ports = {"anthropic": free_port(), "gemini": free_port()}
    site = render(
        (DEPLOY / "templates" / "shim.conf.template").read_text(),
        {
            "SHIM_HOST": "127.0.0.1",
            "SHIM_ANTHROPIC_PORT": str(gateway_api_key.anthropic_port),
            "SHIM_GEMINI_PORT": str(gateway_api_key.gemini_port),
            "NGINX_ANTHROPIC_PORT": f"127.0.0.1:{ports['anthropic']}",
            "NGINX_GEMINI_PORT": f"127.0.0.1:{ports['gemini']}",
        },
    ).replace("/etc/nginx/snippets/shim-proxy.conf", str(work / "shim-proxy.conf"))
    (work / "shim.conf").write_text(site)
    temp = {name: work / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir(mode=0o777)
    (work / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {work}/shim.conf;
}}
""")
    log = open(work / "stderr.log", "wb")  # noqa: SIM115 - owned by the process
    process = subprocess.Popen(
        [NGINX, "-p", str(work), "-c", str(work / "nginx.conf")], stdout=log, stderr=log
    )
    log.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", ports["anthropic"]), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "error.log").read_text()) from None
            time.sleep(0.05)
    yield ports
    process.send_signal(signal.SIGQUIT)
    process.wait(timeout=10)


def sdk(port: int, test_id: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{port}",
        api_key=SECRET,
        max_retries=0,
        timeout=30,
        default_headers={"x-test-id": test_id},
    )


MESSAGES = [{"role": "user", "content": "hi"}]


def test_stream_events_arrive_through_nginx_spaced_as_upstream_sent_them(nginx, test_id):
    with sdk(nginx["anthropic"], test_id) as client:
        arrivals = []
        start = time.monotonic()
        with client.messages.stream(
            model="claude-test-model",
            max_tokens=16,
            messages=MESSAGES,
            extra_headers={"x-fake-gap-ms": "300", "x-fake-events": "4"},
        ) as stream:
            for event in stream:
                arrivals.append((event.type, time.monotonic() - start))
    deltas = [t for kind, t in arrivals if kind == "content_block_delta"]
    gaps = [b - a for a, b in zip(deltas, deltas[1:], strict=False)]
    assert len(deltas) == 4 and all(0.18 < g < 0.75 for g in gaps), gaps
    assert arrivals[0][1] < arrivals[-1][1] - 6 * 0.3  # the first event was not held back


def test_a_call_longer_than_nginxs_read_timeout_is_not_cut(nginx, test_id):
    # 10 deltas 0.9 s apart: ~11 s in all, nearly 4x nginx's (test) 3 s read timeout.
    with sdk(nginx["anthropic"], test_id) as client:
        start = time.monotonic()
        with client.messages.stream(
            model="claude-test-model",
            max_tokens=16,
            messages=MESSAGES,
            extra_headers={"x-fake-gap-ms": "900", "x-fake-events": "10"},
        ) as stream:
            text = stream.get_final_text()
    assert time.monotonic() - start > 3 * TEST_READ_TIMEOUT_S
    assert text == "".join(f"chunk{i} " for i in range(10))


def post_raw(body_size: int, headers: dict) -> tuple[int, bytes]:
    body = b'{"model":"claude-test-model","max_tokens":1,"messages":[],"pad":"'
    body += b"p" * (body_size - len(body) - 2) + b'"}'
    assert len(body) == body_size
    conn = http.client.HTTPConnection("127.0.0.1", headers.pop("port"), timeout=60)
    try:
        conn.request(
            "POST",
            headers.pop("path"),
            body=body,
            headers={"content-type": "application/json", **headers},
        )
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_32_mib_body_passes_whole(nginx, fake_upstream, test_id):
    status, _ = post_raw(
        32 * MIB,
        {
            "port": nginx["anthropic"],
            "path": "/v1/messages",
            "x-api-key": SECRET,
            "x-test-id": test_id,
        },
    )
    assert status == 200
    [seen] = fake_upstream.matching(test_id)
    assert len(seen.body) == 32 * MIB


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_a_larger_body_gets_the_providers_413(nginx, fake_upstream, test_id, provider):
    path = "/v1/messages" if provider == "anthropic" else "/v1beta/models/m:generateContent"
    status, body = post_raw(
        32 * MIB + 1,
        {
            "port": nginx[provider],
            "path": path,
            "x-api-key": SECRET,
            "x-goog-api-key": SECRET,
            "x-test-id": test_id,
        },
    )
    assert status == 413
    error = json.loads(body)
    if provider == "anthropic":
        assert error["error"]["type"] == "request_too_large"
    else:
        assert (error["error"]["code"], error["error"]["status"]) == (413, "INVALID_ARGUMENT")
    assert fake_upstream.matching(test_id) == []


def test_logs_show_the_real_client_not_nginx_nor_a_spoofed_header(nginx, gateway_api_key):
    request_id = f"nginx-ip-{os.getpid()}-{time.monotonic_ns()}"
    # Call from 127.0.0.2: nginx sees that address, shim's peer is nginx on 127.0.0.1.
    sock = socket.create_connection(
        ("127.0.0.1", nginx["anthropic"]), timeout=10, source_address=("127.0.0.2", 0)
    )
    sock.sendall(
        b"GET /health HTTP/1.1\r\nHost: shim.test\r\nConnection: close\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\n" + f"X-Request-Id: {request_id}\r\n\r\n".encode()
    )
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200")
    line = wait_for_line(gateway_api_key, request_id)
    assert line["client_ip"] == "127.0.0.2"


def test_health_and_the_secret_check_work_through_nginx(nginx):
    conn = http.client.HTTPConnection("127.0.0.1", nginx["gemini"], timeout=10)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())) == (200, {"status": "ok"})
        conn.request("GET", "/v1beta/models", headers={"x-goog-api-key": "wrong-secret-0000"})
        response = conn.getresponse()
        assert json.loads(response.read())["error"]["status"] == "UNAUTHENTICATED"
        assert response.status == 401
    finally:
        conn.close()
