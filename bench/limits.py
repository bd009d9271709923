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
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402 - the shared rig (targets, wrk, CPU accounting)

LIMITS = "concurrency=100000 rpm=100000000 tokens_per_day=1000000000000"


def measure(
    upstream_port: int, redis_pid: int | None, **env: str
) -> tuple[float, float, float]:
    """(shim CPU per request, redis-server CPU per request, req/s)."""
    shim = run.start_shim(upstream_port, **env)
    try:
        run.wrk(shim.port, 32)  # warm-up
        before = run.cpu_seconds(shim.process.pid)
        redis_before = run.cpu_seconds(redis_pid) if redis_pid else 0.0
        rate, done = run.wrk(shim.port, 32)
        used = run.cpu_seconds(shim.process.pid) - before
        redis_used = run.cpu_seconds(redis_pid) - redis_before if redis_pid else 0.0
        return used / done, redis_used / done, rate
    finally:
        shim.stop()


def in_process_seconds(state_url: str, rounds: int) -> float:
    """admit + finish of one limited call through the real Limiter, CPU seconds per call."""
    sys.path.insert(0, str(run.ROOT))
    from shim.access import AccessRecord
    from shim.limits import Limiter, parse_limits
    from shim.state import open_state

    limiter = Limiter(open_state(state_url))
    limits = parse_limits(LIMITS.split())
    start = time.process_time()
    for index in range(rounds):
        record = AccessRecord(f"r{index}", "anthropic", "POST")
        record.client = "bench"
        limiter.admit(record, limits)
        record.input_tokens, record.output_tokens = 10, 2
        limiter.finish(record)
    return (time.process_time() - start) / rounds


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
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        inner = [
            ("memory://", in_process_seconds("memory://", 20_000)),
            ("redis:// (client side only)", in_process_seconds(redis_url, 5_000)),
        ]
        rows = [
            ("no limits (baseline)", measure(upstream_port, None)),
            ("limited, memory://", measure(upstream_port, None, **named)),
            (
                "limited, redis://",
                measure(
                    upstream_port,
                    redis.pid,
                    SHIM_STATE_URL=redis_url,
                    **named,
                ),
            ),
        ]
    finally:
        upstream.kill()
        redis.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    base_cpu, _, base_rate = rows[0][1]
    width = max(len(name) for name, _ in rows)
    print(
        f"{'set-up':<{width}}  {'shim CPU/req':>12}  {'ratio':>6}  {'+ redis CPU/req':>15}  "
        f"{'req/s':>8}  {'ratio':>6}"
    )
    for name, (cpu, redis_cpu, rate) in rows:
        print(
            f"{name:<{width}}  {cpu * 1e6:9.0f} µs  {cpu / base_cpu:5.2f}×  "
            f"{redis_cpu * 1e6:12.0f} µs  {rate:8.0f}  {rate / base_rate:5.2f}×"
        )
    print()
    for name, seconds in inner:
        share = seconds / base_cpu
        print(f"limiter admit + finish, {name:<28} {seconds * 1e6:7.1f} µs  ({share:.1%} of call)")


if __name__ == "__main__":
    main()
