"""Fixtures: a real fake upstream, real gunicorn+gevent gateways, and an in-process app.

Live gateways are session-scoped (started once, on free loopback ports) and
log to files under pytest's tmp dir, never to a pipe nobody reads.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from shim import create_app
from shim.settings import Settings
from tests.fake_upstream import FAKE_API_KEY, FAKE_GEMINI_KEYS, FAKE_OAUTH_TOKEN, FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-shared-secret-0123456789abc"
# Every secret a test run uses: none may ever show up in a response or a log line.
ALL_SECRETS = (SECRET, FAKE_API_KEY, FAKE_OAUTH_TOKEN, *FAKE_GEMINI_KEYS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_port() -> int:
    """A loopback port with nothing listening (connection refused)."""
    return free_port()


@dataclass
class Gateway:
    """A running gunicorn serving shim, and how to reach it."""

    process: subprocess.Popen
    anthropic_port: int
    gemini_port: int
    log_path: Path
    gemini_configured: bool = True
    metrics_port: int = 0

    @property
    def anthropic_url(self) -> str:
        return f"http://127.0.0.1:{self.anthropic_port}"

    @property
    def gemini_url(self) -> str:
        return f"http://127.0.0.1:{self.gemini_port}"

    def pids(self) -> list[int]:
        """The master and its workers."""
        children = []
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            children += (task / "children").read_text().split()
        return [self.process.pid, *map(int, children)]

    def rss_kib(self) -> int:
        total = 0
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_lines(self) -> list[dict]:
        """Every access line written so far (whole lines only: one may be half written)."""
        text = self.log_text()
        return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()
                if '"event":"access"' in line]

    def access_line(self, match: str | Callable[[dict], bool], timeout: float = 5,
                    newest: bool = False) -> dict:
        """The access line with request id ``match`` (or that ``match`` accepts), waiting for it.

        A stream's line is written as its record closes, just after its last byte.
        """
        accepts = match if callable(match) else (lambda line: line["request_id"] == match)
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.access_lines() if accepts(line)]
            if found:
                return found[-1] if newest else found[0]
            assert time.monotonic() < deadline, f"no access line matching {match!r}"
            time.sleep(0.05)

    def metrics_text(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def connection(self, provider: str, timeout: float = 10) -> http.client.HTTPConnection:
        port = self.anthropic_port if provider == "anthropic" else self.gemini_port
        return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                # Idle keep-alive connections left by SDK pools hold a graceful
                # stop for graceful_timeout; tests need not wait for that.
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_gateway(env_overrides: dict[str, str], log_path: Path) -> Gateway:
    anthropic_port, gemini_port, metrics_port = free_port(), free_port(), free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SHIM_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update(
        {
            "SHIM_SHARED_SECRET": SECRET,
            "SHIM_BIND_HOST": "127.0.0.1",
            "SHIM_ANTHROPIC_PORT": str(anthropic_port),
            "SHIM_GEMINI_PORT": str(gemini_port),
            "SHIM_METRICS_PORT": str(metrics_port),
            "SHIM_WORKERS": "1",
            # Keep the default key file out of play: tests say where keys come from.
            "SHIM_GEMINI_KEYS_FILE": "",
            # Many tests send wrong secrets from 127.0.0.1 on purpose; the
            # throttle has its own gateway in test_live_hardening.py.
            "SHIM_AUTH_FAILURES_MAX": "100000",
        }
    )
    env.update(env_overrides)
    with open(log_path, "wb") as log_file:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so workers die with it
        )
    gateway = Gateway(
        process,
        anthropic_port,
        gemini_port,
        log_path,
        bool(env.get("SHIM_GEMINI_KEYS")),
        metrics_port,
    )
    deadline = time.monotonic() + 20
    pending = {anthropic_port, gemini_port}
    while pending:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited ({process.returncode}):\n{gateway.log_text()}")
        if time.monotonic() > deadline:
            gateway.stop()
            raise RuntimeError(f"gateway did not become healthy:\n{gateway.log_text()}")
        for port in list(pending):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            try:
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    pending.discard(port)
            except OSError:
                time.sleep(0.05)
            finally:
                conn.close()
    return gateway


@dataclass
class RedisServer:
    """A real redis-server (Debian's package) on a loopback port, nothing persisted."""

    port: int
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "yes",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING")

    def command(self, *words: str) -> bytes:
        """Send one inline command and return the raw reply (for test setup only)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall((" ".join(words) + "\r\n").encode())
            return sock.recv(65536)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis") / "redis.log").start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def fake_upstream():
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def gateway(fake_upstream, tmp_path_factory):
    """OAuth upstream credential, three Gemini keys, 2 workers, a 2 s silence timeout."""
    gw = start_gateway(
        {
            "SHIM_ANTHROPIC_TOKEN": FAKE_OAUTH_TOKEN,
            "SHIM_GEMINI_KEYS": ",".join(FAKE_GEMINI_KEYS),
            "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
            "SHIM_GEMINI_UPSTREAM": fake_upstream.url,
            "SHIM_WORKERS": "2",
            "SHIM_HTTP_TIMEOUT_S": "2",
            "SHIM_MAX_BODY_BYTES": "1048576",
        },
        tmp_path_factory.mktemp("gateway") / "gunicorn.log",
    )
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def gateway_api_key(fake_upstream, tmp_path_factory):
    """API-key upstream credential for Anthropic; Gemini left unconfigured."""
    gw = start_gateway(
        {
            "SHIM_ANTHROPIC_API_KEY": FAKE_API_KEY,
            "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
            "SHIM_GEMINI_UPSTREAM": fake_upstream.url,
        },
        tmp_path_factory.mktemp("gateway_api_key") / "gunicorn.log",
    )
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def gateway_unreachable(fake_upstream, tmp_path_factory):
    """Anthropic's upstream refuses connections; Gemini's fails the TLS handshake.

    The Gemini upstream is the fake's plain-HTTP port addressed as https://,
    so the TLS handshake fails: a TLS failure without leaving loopback.
    """
    dead = f"http://127.0.0.1:{closed_port()}"
    gw = start_gateway(
        {
            "SHIM_ANTHROPIC_API_KEY": FAKE_API_KEY,
            "SHIM_GEMINI_KEYS": FAKE_GEMINI_KEYS[0],
            "SHIM_ANTHROPIC_UPSTREAM": dead,
            "SHIM_GEMINI_UPSTREAM": fake_upstream.url.replace("http://", "https://"),
        },
        tmp_path_factory.mktemp("gateway_unreachable") / "gunicorn.log",
    )
    yield gw
    gw.stop()


@pytest.fixture
def test_id() -> str:
    """A marker sent as ``x-test-id`` so a test finds its own requests at the fake."""
    return uuid.uuid4().hex


def settings_env(**overrides: str) -> dict[str, str]:
    env = {
        "SHIM_SHARED_SECRET": SECRET,
        "SHIM_ANTHROPIC_TOKEN": FAKE_OAUTH_TOKEN,
        "SHIM_GEMINI_KEYS": ",".join(FAKE_GEMINI_KEYS),
        "SHIM_ANTHROPIC_UPSTREAM": "https://anthropic.upstream.test",
        "SHIM_GEMINI_UPSTREAM": "https://gemini.upstream.test",
        "SHIM_GEMINI_KEYS_FILE": "",
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


@pytest.fixture
def make_client():
    """Build an in-process app from settings overrides; return its test client factory."""

    def build(**overrides: str):
        app = create_app(Settings.from_env(settings_env(**overrides)))
        return app.test_client()

    return build


ANTHROPIC_BASE = "http://localhost:8889"
GEMINI_BASE = "http://localhost:8890"
