"""Each live worker publishes its own greenlets, descriptors and memory (issue #19)."""

from __future__ import annotations

import os
import re
import signal
import time

from tests.conftest import start_gateway
from tests.fake_upstream import FAKE_OAUTH_TOKEN

GAUGES = (
    "shim_worker_greenlets",
    "shim_worker_open_fds",
    "shim_worker_resident_memory_bytes",
    "shim_worker_requests",
    "shim_worker_self_stats_seconds",
)


def by_pid(text: str, name: str) -> dict[int, float]:
    return {
        int(pid): float(value)
        for pid, value in re.findall(rf'^{name}{{pid="(\d+)"}} (\S+)$', text, re.M)
    }


def test_every_worker_publishes_its_gauges_by_pid(gateway):
    workers = set(gateway.pids()[1:])
    deadline = time.monotonic() + 15  # a worker publishes once it has booted
    while set(by_pid(text := gateway.metrics_text(), "shim_worker_requests")) != workers:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    for name in GAUGES:
        assert set(by_pid(text, name)) == workers, name
    assert all(fds >= 5 for fds in by_pid(text, "shim_worker_open_fds").values())
    assert all(count >= 1 for count in by_pid(text, "shim_worker_greenlets").values())


def test_a_replaced_workers_gauges_disappear(fake_upstream, tmp_path):
    gw = start_gateway(
        {
            "SHIM_ANTHROPIC_TOKEN": FAKE_OAUTH_TOKEN,
            "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
            "SHIM_SELF_STATS_S": "1",
            "SHIM_GRACEFUL_TIMEOUT_S": "2",
        },
        tmp_path / "g.log",
    )
    try:
        (old,) = gw.pids()[1:]
        assert set(by_pid(gw.metrics_text(), "shim_worker_greenlets")) == {old}
        os.kill(old, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while True:
            workers = set(gw.pids()[1:])
            if workers and old not in workers:
                shown = set(by_pid(gw.metrics_text(), "shim_worker_greenlets"))
                if shown == workers:
                    break
            assert time.monotonic() < deadline, (workers, shown)
            time.sleep(0.2)
    finally:
        gw.stop()
