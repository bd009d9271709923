"""The image as a user builds and runs it: the Dockerfile unchanged, a real Docker engine.

Built with ``docker build --network host -t shim:test .`` and run as README says
(``--read-only --tmpfs /tmp``), with host networking against the fake upstream
on 127.0.0.1. One change from a user's ``docker run``, made at run time so the
Dockerfile keeps its shipped values: ``--health-interval 1s``, so "healthy"
takes a second rather than 15.

Needs an engine: ``scripts/test`` starts one with docker-offline when none runs.
Without one these tests fail under ``CI=true`` (a skipped proof is not a pass)
and are skipped with the reason elsewhere.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import threading
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

import anthropic
import pytest
from google import genai
from google.genai import types
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT, SECRET, free_port
from tests.fake_upstream import FAKE_API_KEY, FAKE_GEMINI_KEYS

UID = 10001
BUILD_TIMEOUT_S = 1200  # a cold build on a busy 2-core box with vfs storage takes minutes
GRACE_S = 15  # SHIM_GRACEFUL_TIMEOUT_S of the container docker stop is tried on


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(canonicalize_name(Requirement(line).name))
    return names


RUNTIME = requirement_names(ROOT / "requirements.txt")
TEST_ONLY = requirement_names(ROOT / "requirements-dev.txt") - RUNTIME
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=check
    )


def engine_problem() -> str | None:
    """Why no engine can be used, or None."""
    told = os.environ.get("SHIM_DOCKER_UNAVAILABLE")  # scripts/test tried and says why
    if told:
        return told
    if not shutil.which("docker"):
        return "no docker command"
    try:
        answer = docker("version", "--format", "{{.Server.Version}}", timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer within 20 s"
    if answer.returncode != 0:
        where = os.environ.get("DOCKER_HOST", "the default socket")
        return f"no Docker engine answers at {where}: {answer.stderr.strip()[:200]}"
    return None


@dataclass
class Image:
    id: str
    context_bytes: int


@pytest.fixture(scope="session")
def image(tmp_path_factory) -> Image:
    problem = engine_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true needs a Docker engine for the container tests: {problem}")
        pytest.skip(f"{problem} (./scripts/test starts one with docker-offline)")
    iidfile = tmp_path_factory.mktemp("image") / "iid"
    build = ["docker", "build", "--network", "host"]
    # The dependency stage first, tagged: untagged, it is a dangling image that any
    # `docker image prune` on this engine deletes, and with it the cache of every layer
    # (the next build reinstalls the dependencies and rebuilds the whole image: ~3 min).
    stage = subprocess.run(
        [*build, "--target", "build", "-t", "shim:test-build", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert stage.returncode == 0, stage.stdout[-3000:] + stage.stderr[-3000:]
    # Then exactly the user's command; the image is used by id, since other checkouts on
    # the same engine may tag their own shim:test meanwhile.
    built = subprocess.run(
        [*build, "--iidfile", str(iidfile), "-t", "shim:test", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    output = built.stdout + built.stderr
    # The legacy builder's "Sending build context to Docker daemon  12.3kB", BuildKit's
    # "transferring context: 12.3kB".
    size = re.search(
        r"(?:Sending build context to Docker daemon|transferring context:)\s+([\d.]+)\s*([kMG]?B)",
        output,
    )
    assert size, output[-2000:]
    scale = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[size.group(2)]
    return Image(iidfile.read_text().strip(), int(float(size.group(1)) * scale))


class Container:
    """One running container of the image, host networking, its own free ports."""

    def __init__(self, image: Image, fake, workdir: Path, **env: str):
        self.name = f"shim-test-{uuid.uuid4().hex[:12]}"
        self.anthropic_port, self.gemini_port, self.metrics_port = (
            free_port(),
            free_port(),
            free_port(),
        )
        values = {
            "SHIM_SHARED_SECRET": SECRET,
            "SHIM_ANTHROPIC_API_KEY": FAKE_API_KEY,
            "SHIM_GEMINI_KEYS": ",".join(FAKE_GEMINI_KEYS),
            "SHIM_ANTHROPIC_UPSTREAM": fake.url,
            "SHIM_GEMINI_UPSTREAM": fake.url,
            "SHIM_BIND_HOST": "127.0.0.1",
            "SHIM_ANTHROPIC_PORT": str(self.anthropic_port),
            "SHIM_GEMINI_PORT": str(self.gemini_port),
            "SHIM_METRICS_PORT": str(self.metrics_port),
            "SHIM_WORKERS": "1",
            **env,
        }
        # An env file, as compose's env_file: the secrets stay off the host's process list.
        self.env_file = workdir / f"{self.name}.env"
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        self.log_path = workdir / f"{self.name}.log"
        docker(
            "run",
            "--detach",
            "--name",
            self.name,
            "--network",
            "host",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--health-interval",
            "1s",
            "--env-file",
            str(self.env_file),
            image.id,
        )
        self._wait_until_serving()

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + 60
        pending = {self.anthropic_port, self.gemini_port}
        while pending:
            if self.inspect("{{.State.Running}}") != "true" or time.monotonic() > deadline:
                raise RuntimeError(f"container not serving:\n{self.logs()}")
            for port in list(pending):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                try:
                    conn.request("GET", "/health")
                    if conn.getresponse().status == 200:
                        pending.discard(port)
                except OSError:
                    time.sleep(0.2)
                finally:
                    conn.close()

    def inspect(self, template: str) -> str:
        return docker("inspect", "--format", template, self.name).stdout.strip()

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        return docker("exec", self.name, *command, check=False)

    def logs(self) -> str:
        result = docker("logs", self.name, check=False)
        return result.stdout + result.stderr

    def access_line(self, request_id: str, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.logs().splitlines():
                if request_id in line and '"event":"access"' in line:
                    return json.loads(line)
            time.sleep(0.2)
        raise AssertionError(f"no access line for {request_id}:\n{self.logs()[-3000:]}")

    def remove(self) -> None:
        self.log_path.write_text(self.logs())  # kept for a failure's post-mortem
        docker("rm", "--force", self.name, check=False)


@pytest.fixture(scope="module")
def container(image, fake_upstream, tmp_path_factory):
    running = Container(image, fake_upstream, tmp_path_factory.mktemp("container"))
    yield running
    running.remove()


# -- the image -------------------------------------------------------------------------------


def test_build_context_holds_only_what_the_image_copies(image):
    # .dockerignore is an allow-list: no .venv, tests, node_modules, bench results or .git.
    assert image.context_bytes < 1_000_000, image.context_bytes


def test_image_carries_oci_labels_with_the_projects_version(image):
    labels = json.loads(
        docker("image", "inspect", "--format", "{{json .Config.Labels}}", image.id).stdout
    )
    assert labels["org.opencontainers.image.version"] == VERSION
    assert "org.opencontainers.image.source" in labels


def test_image_ships_its_healthcheck_unchanged(image):
    check = json.loads(
        docker("image", "inspect", "--format", "{{json .Config.Healthcheck}}", image.id).stdout
    )
    assert "/health" in " ".join(check["Test"])
    second = 1_000_000_000
    assert (check["Interval"], check["Timeout"], check["StartPeriod"], check["Retries"]) == (
        15 * second,
        3 * second,
        10 * second,
        3,
    )


# -- the running container -------------------------------------------------------------------


def processes(container: Container) -> list[int]:
    """The container's gunicorn master and its workers, as host pids."""
    master = int(container.inspect("{{.State.Pid}}"))
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert children, "no gunicorn worker"
    return [master, *map(int, children)]


def test_runs_as_uid_10001_on_a_read_only_root(container):
    assert container.inspect("{{.Config.User}}") == "shim"
    assert container.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
    for pid in processes(container):  # the kernel's view, from the host
        status = Path(f"/proc/{pid}/status").read_text()
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
        assert set(uids) == {str(UID)}, (pid, uids)
    probe = container.exec("sh", "-c", "touch /app/probe")
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr


def test_every_file_it_holds_open_is_on_the_tmpfs(container):
    # gunicorn's worker heartbeat file (unlinked once open) and prometheus-client's
    # multiprocess files; the failed-secret table is a memfd. Nothing else is written.
    files = {
        os.readlink(fd)
        for pid in processes(container)
        for fd in Path(f"/proc/{pid}/fd").iterdir()
        if os.readlink(fd).startswith("/")
    }
    assert any(f.startswith("/tmp/wgunicorn-") for f in files), files
    assert any(re.match(r"/tmp/shim-metrics-\w+/\w+\.db$", f) for f in files), files
    assert {f for f in files if not f.startswith(("/tmp/", "/memfd:", "/dev/null"))} == set()
    mounts = container.exec("cat", "/proc/mounts").stdout
    assert re.search(r"^tmpfs /tmp tmpfs ", mounts, re.M)


def test_the_anthropic_port_proxies_an_sdk_call(container, test_id):
    with anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{container.anthropic_port}",
        api_key=SECRET,
        max_retries=0,
        timeout=20,
        default_headers={"x-test-id": test_id},
    ) as client:
        message = client.messages.create(
            model="claude-container", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
    assert message.content[0].text and message.usage.input_tokens == 12


def test_the_gemini_port_proxies_an_sdk_call(container, test_id):
    client = genai.Client(
        vertexai=False,
        api_key=SECRET,
        http_options=types.HttpOptions(
            base_url=f"http://127.0.0.1:{container.gemini_port}",
            headers={"x-test-id": test_id},
            timeout=20_000,
            retry_options=types.HttpRetryOptions(attempts=1),
        ),
    )
    try:
        answer = client.models.generate_content(model="gemini-2.5-flash", contents="hi")
    finally:
        client.close()
    assert answer.text and answer.usage_metadata.prompt_token_count == 5


@pytest.mark.parametrize("coding", ["br", "zstd"])
@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_compressed_answers_are_relayed_and_their_usage_read(
    container, fake_upstream, provider, coding, test_id
):
    # brotli and backports.zstd arrived in the image: the usage reader decodes a copy.
    request_id = f"container-{provider}-{coding}-{test_id[:8]}"
    headers = {
        "content-type": "application/json",
        "accept-encoding": coding,
        "x-fake-encoding": coding,
        "x-fake-input-tokens": "4321",
        "x-test-id": test_id,
        "x-request-id": request_id,
    }
    if provider == "anthropic":
        port, path = container.anthropic_port, "/v1/messages"
        headers["x-api-key"] = SECRET
        body = {
            "model": "claude-container",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "hi"}],
        }
    else:
        port, path = container.gemini_port, "/v1beta/models/gemini-2.5-flash:generateContent"
        headers["x-goog-api-key"] = SECRET
        body = {"contents": [{"parts": [{"text": "hi"}]}]}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("POST", path, json.dumps(body), headers)
        response = conn.getresponse()
        relayed = response.read()
    finally:
        conn.close()
    assert response.status == 200
    assert response.getheader("Content-Encoding") == coding
    assert relayed == bytes(fake_upstream.sent[test_id])  # still compressed, byte for byte
    assert container.access_line(request_id)["input_tokens"] == 4321


def test_the_healthcheck_reaches_healthy(container):
    deadline = time.monotonic() + 60
    status = ""
    while time.monotonic() < deadline:
        status = container.inspect("{{.State.Health.Status}}")
        if status == "healthy":
            break
        time.sleep(0.5)
    assert status == "healthy", container.inspect("{{json .State.Health}}")


def test_the_image_holds_no_compiler(container):
    found = container.exec(
        "sh",
        "-c",
        "for c in gcc cc c++ g++ clang; do command -v $c; done;"
        " ls /usr/bin /usr/local/bin /venv/bin | grep -E '(^|-)(gcc|g\\+\\+|clang)(-[0-9.]+)?$'",
    ).stdout.split()
    assert found == []


def test_the_image_holds_the_runtime_dependencies_and_no_test_dependency(container):
    # Every Python distribution anywhere in the image, the base's included.
    found = container.exec(
        "sh", "-c", "find / -xdev \\( -name '*.dist-info' -o -name '*.egg-info' \\) -prune"
    ).stdout.split()
    names = {canonicalize_name(Path(p).name.split("-")[0]) for p in found}
    assert RUNTIME <= names, RUNTIME - names
    assert TEST_ONLY and not (TEST_ONLY & names), TEST_ONLY & names


# -- stopping --------------------------------------------------------------------------------


def test_docker_stop_lets_a_stream_in_flight_finish_within_the_grace_period(
    image, fake_upstream, tmp_path, test_id
):
    stopping = Container(image, fake_upstream, tmp_path, SHIM_GRACEFUL_TIMEOUT_S=str(GRACE_S))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", stopping.anthropic_port, timeout=20)
        conn.request(
            "POST",
            "/v1/messages",
            json.dumps(
                {
                    "model": "claude-container",
                    "max_tokens": 16,
                    "stream": True,
                    "messages": [{"role": "user", "content": "hi"}],
                }
            ),
            {
                "content-type": "application/json",
                "x-api-key": SECRET,
                "x-test-id": test_id,
                "accept-encoding": "identity",
                "x-fake-gap-ms": "400",
                "x-fake-events": "6",
            },
        )
        response = conn.getresponse()
        assert response.status == 200
        first = response.read1()
        assert b"message_start" in first
        stop: dict = {}

        def docker_stop() -> None:
            began = time.monotonic()
            stop["result"] = docker("stop", "-t", str(GRACE_S + 5), stopping.name, timeout=60)
            stop["seconds"] = time.monotonic() - began

        stopper = threading.Thread(target=docker_stop)
        sent_stop = time.monotonic()
        stopper.start()
        rest = response.read()
        streamed_on = time.monotonic() - sent_stop
        conn.close()
        stopper.join(timeout=60)
        body = first + rest
        assert b"event: message_stop" in body and b"event: error" not in body
        assert body.count(b"event: content_block_delta") == 6
        assert streamed_on > 1.0  # the stream really ran on after SIGTERM
        assert stop["seconds"] < GRACE_S  # ended by gunicorn, not by docker's SIGKILL
        assert stopping.inspect("{{.State.ExitCode}}") == "0"
    finally:
        stopping.remove()
