"""The shipped deployment files say what the README promises.

Static checks, plus two that run tools: compose's own parser reads
deploy/compose.yaml, and pip proves every runtime pin installs from wheels
alone on linux aarch64 and x86_64 (the image is run for real in
test_live_container.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from shim import openfiles
from shim.settings import Settings
from tests.conftest import ROOT, settings_env
from tests.test_gunicorn_conf import load_conf
from tests.test_live_nginx import DEPLOY as NGINX_TESTS_DEPLOY

DOCKERFILE = (ROOT / "Dockerfile").read_text()
TEMPLATE = (ROOT / "deploy" / "nginx" / "templates" / "shim.conf.template").read_text()
SNIPPET = (ROOT / "deploy" / "nginx" / "snippets" / "shim-proxy.conf").read_text()
COMPOSE = (ROOT / "deploy" / "compose.yaml").read_text()


def directives(text: str) -> list[str]:
    return [
        line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()
    ]


def final_stage(dockerfile: str) -> str:
    return dockerfile[dockerfile.rindex("\nFROM ") :]


def test_dockerfile_runs_the_tests_gunicorn_command_as_a_non_root_user():
    stage = final_stage(DOCKERFILE)
    user = re.search(r"^USER (\S+)", stage, re.M)
    assert user and user.group(1) not in ("root", "0")
    assert 'CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]' in stage


def test_dockerfile_health_checks_the_health_endpoint_and_exposes_both_ports():
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", DOCKERFILE, re.M)
    assert re.search(r"^EXPOSE 8889 8890$", DOCKERFILE, re.M)


def test_dockerfile_builds_dependencies_in_a_stage_of_their_own_on_a_multi_arch_base():
    froms = re.findall(r"^FROM (\S+)", DOCKERFILE, re.M)
    assert len(froms) == 2 and all(f.startswith("python:3.11-slim") for f in froms)
    stage = final_stage(DOCKERFILE)
    assert "pip install" not in stage and "apt-get" not in stage  # no compilers in the image
    assert "COPY --from=build /venv /venv" in stage


def test_dockerfile_labels_the_image_with_the_projects_version_and_source():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    stage = final_stage(DOCKERFILE)
    assert re.search(rf"^ARG SHIM_VERSION={re.escape(version)}$", stage, re.M)
    assert 'org.opencontainers.image.version="$SHIM_VERSION"' in stage
    assert 'org.opencontainers.image.source="$SHIM_SOURCE"' in stage


def test_dockerignore_lets_in_only_what_the_image_copies():
    # An allow-list: everything out ("*"), then the files the Dockerfile copies back in.
    # Whatever else lies in a checkout (.venv, .env, .git, tests and their node_modules,
    # bench results, credential files) never reaches the daemon.
    patterns = directives((ROOT / ".dockerignore").read_text())
    assert patterns[0] == "*"
    let_in = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert let_in == {"requirements.txt", "wsgi.py", "gunicorn.conf.py", "shim", "gemini_keys.txt"}
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE, re.M))
    copied = {name.rstrip("/") for line in copied for name in line.split()}
    assert copied <= let_in


def test_nginx_streams_unbuffered_over_http11_with_keepalive():
    lines = directives(SNIPPET)
    for expected in (
        "proxy_buffering off;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_request_buffering off;",
        "proxy_next_upstream off;",
    ):
        assert expected in lines
    assert directives(TEMPLATE).count("keepalive 32;") == 2


def test_nginx_waits_longer_than_shims_own_silence_timeout():
    read = int(re.search(r"proxy_read_timeout (\d+)s;", SNIPPET).group(1))
    assert read > 600  # SHIM_HTTP_TIMEOUT_S default: shim's 504 must win over nginx's cut


def test_nginx_body_limit_is_the_apis_and_its_refusal_is_provider_shaped():
    assert "client_max_body_size 32m;" in directives(SNIPPET)
    assert '"type":"request_too_large"' in TEMPLATE
    assert '"code":413' in TEMPLATE and '"status":"INVALID_ARGUMENT"' in TEMPLATE


def test_nginx_passes_the_client_address_and_gunicorn_trusts_only_the_proxy():
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in directives(SNIPPET)
    assert load_conf()["forwarded_allow_ips"] == "127.0.0.1,::1"


def test_shim_keeps_idle_connections_longer_than_nginx_does():
    nginx_idle = int(re.search(r"keepalive_timeout (\d+)s;", TEMPLATE).group(1))
    assert load_conf()["keepalive"] > nginx_idle


# -- deploy/compose.yaml, as compose itself reads it -------------------------------------------

DEFAULTS = Settings.from_env(settings_env())


@pytest.fixture(scope="module")
def compose(tmp_path_factory) -> dict:
    """``docker-compose config`` of the shipped file, beside an .env made from .env.example."""
    tool = shutil.which("docker-compose")
    if not tool:
        reason = "docker-compose missing (./scripts/test installs Debian's)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    # A copy: the checkout's own .env (a user's secrets, or none in CI) stays out of it.
    tree = tmp_path_factory.mktemp("compose")
    shutil.copytree(ROOT / "deploy", tree / "deploy")
    shutil.copy(ROOT / ".env.example", tree / ".env")
    parsed = subprocess.run(
        [tool, "-f", "deploy/compose.yaml", "config"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert parsed.returncode == 0, parsed.stderr
    config = yaml.safe_load(parsed.stdout)
    config["root"] = tree
    return config


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_runs_shim_and_nginx_with_env_and_restart(compose):
    shim, nginx = compose["services"]["shim"], compose["services"]["nginx"]
    assert "env_file: ../.env" in COMPOSE  # the .env made from .env.example was read:
    assert shim["environment"]["SHIM_GRACEFUL_TIMEOUT_S"] == "120"
    assert shim["build"]["context"] == str(compose["root"])  # the repository's Dockerfile
    assert shim["restart"] == nginx["restart"] == "unless-stopped"
    assert shim["environment"]["SHIM_TRUSTED_PROXIES"] == "*"
    assert "ports" not in shim  # only nginx is published


def test_compose_stop_grace_outlasts_shims_own_graceful_timeout(compose):
    shim = compose["services"]["shim"]
    graceful = max(
        DEFAULTS.graceful_timeout_s, float(shim["environment"]["SHIM_GRACEFUL_TIMEOUT_S"])
    )
    grace = seconds(shim["stop_grace_period"])
    # Longer, so streams end by shim's own drain; not so long that a stop hangs about.
    assert graceful < grace <= graceful + 30


def test_compose_health_is_the_images_check_on_the_port_nginx_uses(compose):
    shim, nginx = compose["services"]["shim"], compose["services"]["nginx"]
    # No override: the image's HEALTHCHECK (proved healthy in test_live_container.py) runs
    # GET /health on SHIM_ANTHROPIC_PORT, which is where nginx sends Anthropic traffic.
    assert "healthcheck" not in shim
    assert "SHIM_ANTHROPIC_PORT" in DOCKERFILE[DOCKERFILE.index("HEALTHCHECK") :]
    for port in ("SHIM_ANTHROPIC_PORT", "SHIM_GEMINI_PORT"):
        assert shim["environment"][port] == nginx["environment"][port]
    assert sorted(shim["expose"]) == sorted(
        nginx["environment"][p] for p in ("SHIM_ANTHROPIC_PORT", "SHIM_GEMINI_PORT")
    )
    assert nginx["depends_on"]["shim"]["condition"] == "service_healthy"


def test_compose_runs_shim_read_only_with_a_tmpfs_as_the_container_test_does(compose):
    shim = compose["services"]["shim"]
    assert shim["read_only"] is True and shim["tmpfs"] == ["/tmp"]


def test_compose_mounts_the_nginx_template_the_nginx_tests_run(compose):
    mounts = {}
    for volume in compose["services"]["nginx"]["volumes"]:
        source, target, mode = (
            volume.split(":")
            if isinstance(volume, str)
            else (volume["source"], volume["target"], "ro" if volume.get("read_only") else "rw")
        )
        mounts[target] = (Path(source).relative_to(compose["root"]), mode)
    shipped = NGINX_TESTS_DEPLOY.relative_to(ROOT)
    assert mounts == {
        "/etc/nginx/templates": (shipped / "templates", "ro"),
        "/etc/nginx/snippets": (shipped / "snippets", "ro"),
    }
    # nginx's image renders every *.template there: the one the nginx tests render, alone.
    assert sorted(p.name for p in (NGINX_TESTS_DEPLOY / "templates").iterdir()) == [
        "shim.conf.template"
    ]


# Descriptors for the default SHIM_WORKER_CONNECTIONS, and for ten times that.
DEFAULT_CONNECTIONS = Settings.from_env(settings_env()).worker_connections
ENOUGH_FILES = openfiles.needed(DEFAULT_CONNECTIONS * 10)


def test_systemd_unit_lets_each_worker_hold_its_streams():
    unit = directives((ROOT / "deploy" / "shim.service").read_text())
    limits = [line.split("=", 1)[1] for line in unit if line.startswith("LimitNOFILE=")]
    assert len(limits) == 1 and int(limits[0]) >= ENOUGH_FILES


def test_compose_lets_each_worker_hold_its_streams():
    shim = COMPOSE[COMPOSE.index("\n  shim:") : COMPOSE.index("\n  nginx:")]
    nofile = re.search(
        r"\n    ulimits:\n      nofile:\n        soft: (\d+)\n        hard: (\d+)", shim
    )
    assert nofile and int(nofile.group(1)) == int(nofile.group(2)) >= ENOUGH_FILES


# -- wheels: the pins install on the target boxes without a compiler -------------------------

# glibc 2.28 or newer (Debian 10+, Ubuntu 20.04+, Raspberry Pi OS 10+, the python:3.11-slim
# base): gevent 26.9.0 ships its aarch64 wheel as manylinux_2_28 only.
GLIBC_MINOR = 28
WHEEL_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shim-wheels"


def pinned(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier  # one exact pin each
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def platforms(arch: str) -> list[str]:
    return [f"manylinux_2_{minor}_{arch}" for minor in range(17, GLIBC_MINOR + 1)] + [
        f"manylinux2014_{arch}"
    ]


def pip_download(arch: str, target: Path, online: bool) -> subprocess.CompletedProcess:
    sources = (
        ["--index-url", "https://pypi.org/simple"]
        if online
        else ["--no-index", "--find-links", str(target)]  # a warm cache needs no network
    )
    # PyPI alone: none of this machine's pip configuration (local mirrors, find-links,
    # constraints) may stand in for it; its CA bundle (PIP_CERT) is kept.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CERT"}
    env["PIP_CONFIG_FILE"] = os.devnull
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--disable-pip-version-check",
            "--only-binary=:all:",  # wheels alone: no sdist, so no compiler
            *(arg for platform in platforms(arch) for arg in ("--platform", platform)),
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            *sources,
            "--dest",
            str(target),
            "--requirement",
            str(ROOT / "requirements.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.mark.parametrize("arch", ["aarch64", "x86_64"])
def test_every_runtime_pin_installs_from_wheels_on_linux(arch):
    # With their dependencies (greenlet, zope.interface, markupsafe...): those are compiled too.
    target = WHEEL_CACHE / f"cp311-{arch}"
    target.mkdir(parents=True, exist_ok=True)
    fetched = pip_download(arch, target, online=False)
    if fetched.returncode != 0:  # a cold cache, or a pin that changed: ask PyPI
        fetched = pip_download(arch, target, online=True)
    assert fetched.returncode == 0, fetched.stdout[-2000:] + fetched.stderr[-2000:]
    used = re.findall(r"^\s*(?:Saved|File was already downloaded) (\S+)$", fetched.stdout, re.M)
    supported = {
        *cpython_tags((3, 11), abis=["cp311"], platforms=platforms(arch)),
        *compatible_tags((3, 11), interpreter="cp311", platforms=platforms(arch)),
    }
    wheels = {}
    for path in used:
        name, version, _, tags = parse_wheel_filename(Path(path).name)
        assert tags & supported, path  # a wheel for this platform (or any), for CPython 3.11
        wheels[name] = str(version)
    pins = pinned(ROOT / "requirements.txt")
    assert {name: wheels.get(name) for name in pins} == pins
    assert {"greenlet", "zope-interface", "markupsafe"} <= set(wheels)
