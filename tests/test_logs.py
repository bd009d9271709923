"""Tracebacks pass through the secret filter like messages do (issue #14, item 5)."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import subprocess
import sys

import pytest

from shim.logs import FORMATTERS, REDACTED, SecretFilter
from tests.conftest import ROOT
from tests.fake_upstream import FAKE_API_KEY, FAKE_GEMINI_KEYS

KEY = FAKE_GEMINI_KEYS[0]

# A module whose source line, shown in any traceback through it, quotes a key:
# what a traceback prints is code and messages, and both can hold a secret.
LEAKY = f'''
def call_upstream():
    key = "{KEY}"
    raise RuntimeError("upstream refused " + key + " with {FAKE_API_KEY}")  # {KEY}
'''


@pytest.fixture
def leaky(tmp_path):
    path = tmp_path / "leaky_module.py"
    path.write_text(LEAKY)
    spec = importlib.util.spec_from_file_location("leaky_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def log_exception(fmt: str, leaky) -> str:  # noqa: ANN001 - a module
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(FORMATTERS[fmt]())
    handler.addFilter(SecretFilter([KEY, FAKE_API_KEY]))
    logger = logging.getLogger(f"tests.logs.{fmt}")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        try:
            leaky.call_upstream()
        except RuntimeError:
            logger.exception("upstream call crashed", extra={"event": "unhandled_error"})
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_traceback_quoting_secrets_is_redacted(fmt, leaky):
    out = log_exception(fmt, leaky)
    assert "Traceback" in out and "call_upstream" in out  # the traceback is still there
    assert KEY not in out and FAKE_API_KEY not in out
    assert REDACTED in out
    if fmt == "json":
        exception = json.loads(out)["exception"]
        assert "raise RuntimeError" in exception  # the source line, cleaned
        assert f"RuntimeError: upstream refused {REDACTED}" in exception


def test_gunicorn_s_own_log_config_redacts_its_tracebacks(tmp_path):
    """gunicorn's loggers get the filter through logconfig_dict; prove it in a fresh process."""
    (tmp_path / "leaky_module.py").write_text(LEAKY)
    script = f"""
import logging.config, sys
sys.path.insert(0, {str(tmp_path)!r})
from shim.logs import gunicorn_logconfig
logging.config.dictConfig(gunicorn_logconfig("json", [{KEY!r}, {FAKE_API_KEY!r}]))
import leaky_module
try:
    leaky_module.call_upstream()
except RuntimeError:
    logging.getLogger("gunicorn.error").exception("Error handling request")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    entry = json.loads(done.stdout)
    assert "call_upstream" in entry["exception"]
    assert KEY not in done.stdout and FAKE_API_KEY not in done.stdout
