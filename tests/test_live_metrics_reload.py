"""A SIGHUP reload keeps the metrics: counters count on across it (found by bench/soak.py, #19)."""

from __future__ import annotations

import os
import re
import signal
import time

from tests.conftest import SECRET, start_gateway
from tests.fake_upstream import FAKE_OAUTH_TOKEN


def anthropic_requests(gateway) -> float:
    text = gateway.metrics_text()
    return sum(
        float(value)
        for labels, value in re.findall(r"^shim_requests_total\{([^}]*)\} (\S+)$", text, re.M)
        if 'provider="anthropic"' in labels
    )


def test_counters_survive_a_sighup_reload(fake_upstream, tmp_path):
    gw = start_gateway(
        {"SHIM_ANTHROPIC_TOKEN": FAKE_OAUTH_TOKEN, "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url},
        tmp_path / "g.log",
    )
    try:
        for _ in range(5):
            conn = gw.connection("anthropic")
            conn.request("GET", "/v1/models", headers={"x-api-key": SECRET})
            conn.getresponse().read()
            conn.close()
        before = anthropic_requests(gw)
        assert before >= 5  # the five, and start_gateway's health checks
        (old,) = gw.pids()[1:]
        os.kill(gw.process.pid, signal.SIGHUP)  # gunicorn runs gunicorn.conf.py again
        deadline = time.monotonic() + 20
        while old in gw.pids()[1:] or not gw.pids()[1:]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert anthropic_requests(gw) == before  # was 0: the reload emptied the metrics directory
    finally:
        gw.stop()
