"""Secrets at rest and in reprs; dependencies pinned, used, and past known gunicorn fixes."""

from __future__ import annotations

import json
import re

import pytest
from packaging.version import Version

from shim.errors import AuthThrottled, UpstreamUnreachable
from shim.keys import KeyPool
from shim.providers.anthropic import Anthropic
from shim.providers.gemini import Gemini
from shim.settings import Settings
from shim.throttle import AuthThrottle
from tests.conftest import ROOT, SECRET, settings_env
from tests.fake_upstream import FAKE_GEMINI_KEYS, FAKE_OAUTH_TOKEN

REQUIREMENTS = dict(
    line.split("==")
    for line in (ROOT / "requirements.txt").read_text().splitlines()
    if "==" in line and not line.startswith("#")
)


def test_every_runtime_dependency_is_pinned_and_gunicorn_is_past_the_smuggling_fixes():
    lines = [
        line
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert all("==" in line for line in lines)
    # gunicorn 22/23 fixed request smuggling (chunked/Content-Length handling).
    assert Version(REQUIREMENTS["gunicorn"]) >= Version("23")


IMPORTED_AS = {
    "Flask": "flask",
    "Werkzeug": "werkzeug",
    "prometheus-client": "prometheus_client",
    "backports.zstd": "backports",
}
# Used by another dependency rather than imported by shim itself.
INDIRECT = {
    "packaging": "gunicorn's gevent worker imports it (gunicorn >= 23)",
    "hiredis": "redis-py parses replies with it when installed (tests/test_state.py checks)",
}


@pytest.mark.parametrize("name", sorted(REQUIREMENTS))
def test_no_unused_runtime_dependency(name):
    if name in INDIRECT:
        return
    module = IMPORTED_AS.get(name, name)
    sources = [p.read_text() for p in (ROOT / "shim").rglob("*.py")]
    sources.append((ROOT / "gunicorn.conf.py").read_text())
    pattern = re.compile(rf"^\s*(import|from) {re.escape(module)}\b", re.M)
    assert any(pattern.search(text) for text in sources), f"{name} is never imported"


def test_reprs_and_strs_carry_no_secret():
    settings = Settings.from_env(settings_env())
    pool = KeyPool(FAKE_GEMINI_KEYS)
    objects = [
        settings,
        pool,
        AuthThrottle(3, 60, 60),
        Anthropic("https://a.test", None, FAKE_OAUTH_TOKEN),
        Gemini("https://g.test", pool),
        UpstreamUnreachable(),
        AuthThrottled(headers=(("Retry-After", "5"),)),
    ]
    for obj in objects:
        text = repr(obj) + str(obj)
        for secret in (SECRET, FAKE_OAUTH_TOKEN, *FAKE_GEMINI_KEYS):
            assert secret not in text, type(obj).__name__


def test_a_world_readable_key_file_is_loaded_with_a_warning(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("\n".join(FAKE_GEMINI_KEYS))
    path.chmod(0o644)
    loose = Settings.from_env(settings_env(SHIM_GEMINI_KEYS="", SHIM_GEMINI_KEYS_FILE=str(path)))
    assert loose.gemini_keys == FAKE_GEMINI_KEYS
    assert any("SHIM_GEMINI_KEYS_FILE" in w and "chmod 600" in w for w in loose.warnings)
    path.chmod(0o600)
    tight = Settings.from_env(settings_env(SHIM_GEMINI_KEYS="", SHIM_GEMINI_KEYS_FILE=str(path)))
    assert tight.warnings == ()
    assert all(key not in json.dumps(loose.warnings) for key in FAKE_GEMINI_KEYS)


def test_security_policy_exists_and_says_how_to_rotate():
    text = (ROOT / "SECURITY.md").read_text()
    for topic in ("Threat model", "Rotating", "SHIM_SHARED_SECRET", "does not defend"):
        assert topic.lower() in text.lower()
