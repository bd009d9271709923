"""What logging + metrics cost per request, against a request's whole CPU, in one run.

1. live: shim (gunicorn, 2 gevent workers, logs + metrics on, as deployed) in
   front of bench/upstream.py, driven by wrk at c=32 on small non-streaming
   POSTs (bench/run.py's rig); CPU-seconds of the gunicorn process tree
   divided by requests is the CPU per request.
2. the observability path alone, in-process, with the real objects: an access
   record filled as a forwarded call fills it, its JSON line through the secret
   filter written to /dev/null, and the multiprocess metrics it feeds.

Prints a table and the ratio (2) / (1). Run: .venv/bin/python bench/observability.py
Needs wrk (apt-get install wrk). Sends traffic only to 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECRET = "bench-shared-secret-000000000000"
ROUNDS = 20_000

sys.path.insert(0, str(HERE))
import run  # noqa: E402 - the shared rig (targets, wrk, CPU accounting)


def live_cpu_per_request() -> tuple[float, float]:
    """CPU-seconds per request and req/s of shim as deployed, at c=32 (bench/run.py's rig)."""
    upstream_port = run.free_port()
    upstream = subprocess.Popen([sys.executable, str(HERE / "upstream.py"), str(upstream_port)])
    try:
        run.wait_port(upstream_port)
        shim = run.start_shim(upstream_port)
        try:
            run.wrk(shim.port, 32)  # warm-up
            before = run.cpu_seconds(shim.process.pid)
            rate, done = run.wrk(shim.port, 32)
            return (run.cpu_seconds(shim.process.pid) - before) / done, rate
        finally:
            shim.stop()
    finally:
        upstream.kill()
        upstream.wait()


def observability_path_seconds() -> float:
    directory = tempfile.mkdtemp(prefix="shim-bench-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    sys.path.insert(0, str(ROOT))
    from shim import logs, metrics
    from shim.access import AccessRecord
    from shim.providers.anthropic import Anthropic

    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.SecretFilter([SECRET, "sk-ant-bench", "AIzaBenchKey000000000"]))
    access = logging.getLogger("shim.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    provider = Anthropic("http://127.0.0.1:1", "sk-ant-bench", None)
    answer = {
        "type": "message",
        "model": "claude-bench",
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 10, "output_tokens": 2},
    }
    headers = {"anthropic-ratelimit-unified-status": "allowed"}
    start = time.process_time()
    for index in range(ROUNDS):
        record = AccessRecord(f"req{index}", "anthropic", "POST", metrics.observe)
        record.route, record.model, record.bytes_in = "/v1/messages", "claude-bench", 80
        record.upstream_status = record.status = 200
        provider.read_headers(headers, record)
        provider.read_usage(answer, record)
        record.sent(190)
        record.close()
    used = (time.process_time() - start) / ROUNDS
    shutil.rmtree(directory, ignore_errors=True)
    return used


def main() -> None:
    if not shutil.which("wrk"):
        raise SystemExit("bench needs wrk: apt-get install wrk")
    per_request, rate = live_cpu_per_request()
    observe = observability_path_seconds()
    rows = [
        ("CPU per request, shim as deployed (c=32)", f"{per_request * 1e6:8.0f} µs"),
        ("throughput (2xx only)", f"{rate:8.0f} req/s"),
        ("access line + metrics per request", f"{observe * 1e6:8.1f} µs"),
        ("share of a request's CPU", f"{observe / per_request:8.1%}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
