"""gunicorn.conf.py: binds both ports from validated settings, imports nothing heavy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, SECRET


def conf_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIM_")}
    env.update(
        SHIM_SHARED_SECRET=SECRET,
        SHIM_ANTHROPIC_API_KEY="sk-ant-api03-conf-test-key",
        SHIM_GEMINI_KEYS_FILE="",
        SHIM_BIND_HOST="127.0.0.1",
        SHIM_ANTHROPIC_PORT="18001",
        SHIM_GEMINI_PORT="18002",
        SHIM_WORKERS="3",
        SHIM_METRICS_PORT="18003",
    )
    env.update(overrides)
    return env


LOAD_CONF = """
import json, runpy, sys
ns = runpy.run_path("gunicorn.conf.py")
heavy = [m for m in ("ssl", "requests", "urllib3", "flask", "gevent", "shim.app", "shim.forward")
         if m in sys.modules]
names = ("bind", "workers", "worker_class", "control_socket_disable", "accesslog", "timeout",
         "keepalive", "forwarded_allow_ips", "graceful_timeout")
print(json.dumps({"heavy": heavy, "preload": ns.get("preload_app", False),
                  **{k: ns.get(k) for k in names}}))
"""


def load_conf(**overrides: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", LOAD_CONF],
        cwd=ROOT,
        env=conf_env(**overrides),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(result.stdout)


def test_master_config_imports_no_network_or_web_stack():
    # gevent patches workers at boot; ssl/requests imported in the master stay unpatched.
    assert load_conf()["heavy"] == []


def test_binds_both_ports_with_gevent_workers_from_settings():
    conf = load_conf()
    assert conf["bind"] == ["127.0.0.1:18001", "127.0.0.1:18002", "127.0.0.1:18003"]
    assert (conf["workers"], conf["worker_class"]) == (3, "shim.worker.ShimWorker")
    assert conf["preload"] is False
    assert conf["control_socket_disable"] is True
    assert conf["accesslog"] is None  # gunicorn's access line would carry ?key=


def test_bad_environment_stops_gunicorn_with_a_message_naming_the_variable():
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT,
        env=conf_env(SHIM_ANTHROPIC_PORT="abc", SHIM_HTTP_TIMEOUT_S="-3"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "SHIM_ANTHROPIC_PORT: expected an integer 1-65535, got 'abc'" in output
    assert "SHIM_HTTP_TIMEOUT_S" in output
    assert SECRET not in output
    assert "Traceback" not in output


WORKER_IMPORTS = """
import sys
import gunicorn.workers.ggevent
before = set(sys.modules)
import shim.worker
print(sorted(set(sys.modules) - before))
"""


def test_worker_class_adds_no_imports_to_the_master_beyond_gunicorns_gevent_worker():
    # gunicorn's master loads the worker class: it must stay as light as gunicorn's own.
    result = subprocess.run(
        [sys.executable, "-c", WORKER_IMPORTS],
        cwd=ROOT,
        env=conf_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    added = set(json.loads(result.stdout.replace("'", '"')))
    assert {name.split(".")[0].lstrip("_") for name in added} <= {"shim", "json"}
    assert added & {"shim.app", "shim.forward", "shim.providers"} == set()


def test_worker_class_is_a_gevent_worker():
    from gunicorn.workers.ggevent import GeventWorker

    from shim.worker import ShimWorker

    assert issubclass(ShimWorker, GeventWorker)


LOAD_REDACTED = """
import json, runpy
ns = runpy.run_path("gunicorn.conf.py")
print(json.dumps(ns["logconfig_dict"]["filters"]["secrets"]["secrets"]))
"""


def test_gunicorns_logs_redact_the_apps_secrets_the_redis_password_too():
    result = subprocess.run(
        [sys.executable, "-c", LOAD_REDACTED],
        cwd=ROOT,
        env=conf_env(SHIM_STATE_URL="redis://:redis-pw-0123456789@127.0.0.1:6399/0"),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    redacted = json.loads(result.stdout)
    assert {SECRET, "sk-ant-api03-conf-test-key", "redis-pw-0123456789"} <= set(redacted)
