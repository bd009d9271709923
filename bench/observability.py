"""What logging + metrics cost per request, against a request's whole CPU, in one run.

1. live: shim (gunicorn, 2 gevent workers, logs + metrics on, as deployed) in
   front of bench/fast_upstream.py, driven by wrk at c=32 for DURATION s of
   small non-streaming POSTs; CPU-seconds of the gunicorn process tree divided
   by requests is the CPU per request.
2. the observability path alone, in-process, with the real objects: an access
   record filled as a forwarded call fills it, its JSON line through the secret
   filter written to /dev/null, and the multiprocess metrics it feeds.

Prints a table and the ratio (2) / (1). Run: .venv/bin/python bench/observability.py
Needs wrk (apt-get install wrk). Sends traffic only to 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(os.environ.get("BENCH_ROOT") or Path(__file__).resolve().parent.parent)
SECRET = "bench-shared-secret-000000000000"
DURATION = int(os.environ.get("BENCH_DURATION", "10"))
ROUNDS = 20_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree_cpu_seconds(pid: int) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    for each in pids:
        fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def live_cpu_per_request() -> tuple[float, float]:
    upstream_port, api_port, gemini_port = free_port(), free_port(), free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "fast_upstream.py"), str(upstream_port)]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIM_")}
    env.update(
        SHIM_SHARED_SECRET=SECRET,
        SHIM_ANTHROPIC_API_KEY="sk-ant-bench",
        SHIM_ANTHROPIC_UPSTREAM=f"http://127.0.0.1:{upstream_port}",
        SHIM_BIND_HOST="127.0.0.1",
        SHIM_ANTHROPIC_PORT=str(api_port),
        SHIM_GEMINI_PORT=str(gemini_port),
        SHIM_METRICS_PORT=str(free_port()),
        SHIM_WORKERS="2",
        SHIM_GEMINI_KEYS_FILE="",
    )
    log = open(os.devnull, "wb")  # noqa: SIM115 - the access lines are written for real
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write(
        'wrk.method = "POST"\nwrk.body = \'{"model":"m","max_tokens":1,"messages":'
        '[{"role":"user","content":"hi"}]}\'\nwrk.headers["Content-Type"] = '
        f'"application/json"\nwrk.headers["x-api-key"] = "{SECRET}"\n'
    )
    script.close()
    try:
        time.sleep(2.5)
        url = f"http://127.0.0.1:{api_port}/v1/messages"
        subprocess.run(
            ["wrk", "-t1", "-c32", "-d2s", "-s", script.name, url], capture_output=True, check=True
        )  # warm-up
        before = tree_cpu_seconds(gateway.pid)
        out = subprocess.run(
            ["wrk", "-t1", "-c32", f"-d{DURATION}s", "-s", script.name, url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        used = tree_cpu_seconds(gateway.pid) - before
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if non_2xx:
            raise SystemExit(f"{non_2xx.group(1)} failed requests: {out}")
        return used / requests, requests / DURATION
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait()
        upstream.kill()
        upstream.wait()
        log.close()
        os.unlink(script.name)


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
