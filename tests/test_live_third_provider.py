"""Adding a provider is one module and one registry line: a test-only one serves live.

``tests/echo_provider.py`` declares routes, where its secret arrives, its
upstream credential and its error shape; ``tests/echo_wsgi.py`` appends it to
``shim.providers.REGISTRY``. Real gunicorn (2 workers) then serves it on a
port of its own, next to the two real providers, without any other change.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, SECRET, Gateway, free_port
from tests.fake_upstream import FAKE_API_KEY, FAKE_GEMINI_KEYS


@pytest.fixture(scope="module")
def echo_gateway(fake_upstream, tmp_path_factory):
    ports = {name: free_port() for name in ("anthropic", "gemini", "metrics", "echo")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIM_")}
    env.update({
        "SHIM_SHARED_SECRET": SECRET,
        "SHIM_BIND_HOST": "127.0.0.1",
        "SHIM_ANTHROPIC_PORT": str(ports["anthropic"]),
        "SHIM_GEMINI_PORT": str(ports["gemini"]),
        "SHIM_METRICS_PORT": str(ports["metrics"]),
        "SHIM_WORKERS": "2",
        "SHIM_GEMINI_KEYS_FILE": "",
        "SHIM_ANTHROPIC_API_KEY": FAKE_API_KEY,
        "SHIM_GEMINI_KEYS": FAKE_GEMINI_KEYS[0],
        "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
        "SHIM_GEMINI_UPSTREAM": fake_upstream.url,
        "ECHO_PORT": str(ports["echo"]),
        "ECHO_UPSTREAM": fake_upstream.url,
    })
    log_path = tmp_path_factory.mktemp("echo") / "gunicorn.log"
    binds = [arg for port in ports.values() for arg in ("-b", f"127.0.0.1:{port}")]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *binds,
             "tests.echo_wsgi:app"],
            cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    gateway = Gateway(process, ports["anthropic"], ports["gemini"], log_path, True,
                      ports["metrics"])
    deadline = time.monotonic() + 20
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", ports["echo"], timeout=1)
        try:
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                break
        except OSError:
            pass
        finally:
            conn.close()
        assert process.poll() is None and time.monotonic() < deadline, gateway.log_text()
        time.sleep(0.1)
    gateway.echo_port = ports["echo"]
    yield gateway
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=10)


def call(port: int, headers: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        body = json.dumps({"model": "claude-echo", "max_tokens": 8,
                           "messages": [{"role": "user", "content": "hi"}]})
        conn.request("POST", "/v1/messages", body, {"content-type": "application/json",
                                                    "accept-encoding": "gzip", **headers})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_registered_test_only_provider_serves_a_call_through_the_live_gateway(
    echo_gateway, fake_upstream, test_id
):
    status, _ = call(echo_gateway.echo_port, {"x-echo-key": SECRET, "x-test-id": test_id})
    assert status == 200
    seen = fake_upstream.matching(test_id)
    assert len(seen) == 1 and seen[0].header("x-api-key") == FAKE_API_KEY
    assert "x-echo-key" not in seen[0].headers and SECRET not in json.dumps(seen[0].headers)
    line = echo_gateway.access_line(
        lambda line: line["provider"] == "echo" and line["route"] == "/v1/messages"
    )
    assert (line["status"], line["upstream_status"], line["client"]) == (200, 200, "default")


def test_its_errors_and_readiness_come_from_it_and_the_others_are_untouched(echo_gateway):
    status, body = call(echo_gateway.echo_port, {"x-echo-key": "wrong-secret-000000000000"})
    assert status == 401
    assert json.loads(body)["echo_error"]["kind"] == "authentication"
    conn = http.client.HTTPConnection("127.0.0.1", echo_gateway.echo_port, timeout=5)
    try:
        conn.request("GET", "/health/ready")
        report = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    assert set(report["providers"]) == {"anthropic", "gemini", "echo"}
    assert report["providers"]["echo"]["ready"] is True
    # The real providers still answer on their own ports, in their own shapes.
    status, body = call(echo_gateway.anthropic_port, {"x-api-key": SECRET})
    assert status == 200
    status, body = call(echo_gateway.anthropic_port, {"x-echo-key": SECRET})
    assert status == 401 and json.loads(body)["type"] == "error"
