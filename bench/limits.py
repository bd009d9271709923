"""What per-client limits cost per request, memory:// and Redis, against no limits, in one run.

Three shim set-ups in front of bench/upstream.py (bench/run.py's rig: gunicorn,
2 gevent workers, logs + metrics on), driven by wrk at c=32 on small
non-streaming POSTs:

1. baseline: the shared secret (client ``default``, no limits: the store is never asked);
2. a named client with all three limits (set high enough never to refuse), ``memory://``;
3. the same client, ``SHIM_STATE_URL=redis://`` on a local redis-server (Debian's).

CPU per request counts the gunicorn process tree, plus redis-server's CPU for (3),
so the ratio shows what a limited call costs the box. Run:
    .venv/bin/python bench/limits.py
Needs wrk and redis-server (apt-get install wrk redis-server). Loopback only.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402 - the shared rig (targets, wrk, CPU accounting)

LIMITS = "concurrency=100000 rpm=100000000 tokens_per_day=1000000000000"


def measure(upstream_port: int, redis_pid: int | None, **env: str) -> tuple[float, float]:
    shim = run.start_shim(upstream_port, **env)
    try:
        run.wrk(shim.port, 32)  # warm-up
        before = run.cpu_seconds(shim.process.pid)
        redis_before = run.cpu_seconds(redis_pid) if redis_pid else 0.0
        rate, done = run.wrk(shim.port, 32)
        used = run.cpu_seconds(shim.process.pid) - before
        if redis_pid:
            used += run.cpu_seconds(redis_pid) - redis_before
        return used / done, rate
    finally:
        shim.stop()


def main() -> None:
    for tool in ("wrk", "redis-server"):
        if not shutil.which(tool):
            raise SystemExit(f"bench needs {tool}: apt-get install {tool}")
    workdir = Path(tempfile.mkdtemp(prefix="shim-bench-limits-"))
    clients = workdir / "clients.txt"
    clients.write_text(f"bench {hashlib.sha256(run.SECRET.encode()).hexdigest()} {LIMITS}\n")
    named = {"SHIM_SHARED_SECRET": "", "SHIM_CLIENTS_FILE": str(clients)}
    upstream_port, redis_port = run.free_port(), run.free_port()
    upstream = subprocess.Popen([sys.executable, str(HERE / "upstream.py"), str(upstream_port)])
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    try:
        run.wait_port(upstream_port)
        run.wait_port(redis_port)
        rows = [
            ("no limits (baseline)", measure(upstream_port, None)),
            ("limited, memory://", measure(upstream_port, None, **named)),
            (
                "limited, redis:// (+ redis CPU)",
                measure(
                    upstream_port,
                    redis.pid,
                    SHIM_STATE_URL=f"redis://127.0.0.1:{redis_port}/0",
                    **named,
                ),
            ),
        ]
    finally:
        upstream.kill()
        redis.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    base_cpu, base_rate = rows[0][1]
    width = max(len(name) for name, _ in rows)
    print(f"{'set-up':<{width}}  {'CPU/request':>12}  {'ratio':>6}  {'req/s':>8}  {'ratio':>6}")
    for name, (cpu, rate) in rows:
        print(
            f"{name:<{width}}  {cpu * 1e6:9.0f} µs  {cpu / base_cpu:5.2f}×  "
            f"{rate:8.0f}  {rate / base_rate:5.2f}×"
        )


if __name__ == "__main__":
    main()
