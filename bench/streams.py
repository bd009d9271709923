"""Streams at scale: N concurrent SSE streams through shim and the naive passthrough, one run.

    .venv/bin/python bench/streams.py             # 8,192 streams (BENCH_STREAMS=N to change)

Starts bench/upstream.py, then direct (client -> upstream, the floor and a check
that this client keeps up), naive (bench/naive.py, 2 workers) and shim (2
workers, logging + metrics on, as deployed), one at a time. Against each it
opens BENCH_STREAMS streams at 500 new a second; every stream carries a delta
every 2 s and lives long enough (12 deltas, 22 s) that all of them are open at
once at the end of the ramp. Measures TTFT p50/p99 (request sent -> first
delta), chunk delay p99 (arrival - upstream's send stamp), how many completed,
and the RSS the open streams added per stream; then small non-streaming calls
(wrk c=32) so a fix for streams cannot quietly cost short calls. Prints one
table and writes bench/results/streams.json. Loopback only; bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402
from run import (  # noqa: E402 - bench/ is a folder of scripts, not a package
    ROOT,
    Target,
    cpu_seconds,
    free_port,
    rss_kib,
    start_naive,
    start_shim,
    streams,
    wait_port,
    wrk,
)

COUNT = int(os.environ.get("BENCH_STREAMS", "8192"))
DELTAS = 12
INTERVAL_MS = 2000
RAMP_PER_S = 500
# BENCH_TARGETS=shim measures shim alone (while working on it; the table wants both);
# BENCH_SHIM_ROOT=/path/to/other/checkout runs that checkout's shim instead.
TARGETS = os.environ.get("BENCH_TARGETS", "naive,shim").split(",")


def ramp(target: Target) -> dict:
    pid = target.process.pid if target.process else None
    if pid:
        # Idle means warmed up: both workers have imported and served everything once.
        wrk(target.port, 8, seconds=1)
        asyncio.run(streams(target.port, 64, 2, 100))
    idle = rss_kib(pid) if pid else 0
    cpu = cpu_seconds(pid) if pid else 0.0

    async def run() -> tuple[dict, int]:
        task = asyncio.create_task(
            streams(target.port, COUNT, DELTAS, INTERVAL_MS, ramp_per_s=RAMP_PER_S)
        )
        # Every stream is open just after the ramp ends (each lives ~22 s).
        await asyncio.sleep(COUNT / RAMP_PER_S + 2)
        held = rss_kib(pid) if pid else 0
        return await task, held

    result, held = asyncio.run(run())
    if pid:
        # Every stream was opened, relayed and closed: its whole cost.
        result["cpu_ms_per_stream"] = (cpu_seconds(pid) - cpu) / COUNT * 1000
        result["rss_idle_mib"] = idle / 1024
        result["kib_per_stream"] = (held - idle) / COUNT
    return result


def main() -> None:
    other = os.environ.get("BENCH_SHIM_ROOT")
    if other:  # another checkout's shim (an older commit, for a before/after)
        run.ROOT = Path(other).resolve()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = COUNT * 2 + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "upstream.py"), str(upstream_port)]
    )
    wait_port(upstream_port)
    results: dict[str, dict] = {}
    try:
        results["direct"] = ramp(Target("direct", upstream_port))
        print("measured direct", file=sys.stderr, flush=True)
        starts = (
            ("naive", lambda: start_naive(upstream_port, COUNT)),
            ("shim", lambda: start_shim(upstream_port, SHIM_WORKER_CONNECTIONS=str(COUNT))),
        )
        for name, start in starts:
            if name not in TARGETS:
                continue
            target = start()
            try:
                results[name] = ramp(target)
                time.sleep(2)
                wrk(target.port, 32)  # warm-up
                results[name]["rps_c32"] = wrk(target.port, 32)[0]
            finally:
                target.stop()
            print(f"measured {name}", file=sys.stderr, flush=True)
    finally:
        upstream.kill()
    rows = [
        ("streams complete", "complete", "{:.0f}"),
        ("TTFT p50 (ms)", "ttft_p50_ms", "{:.0f}"),
        ("TTFT p99 (ms)", "ttft_p99_ms", "{:.0f}"),
        ("chunk delay p99 (ms)", "delay_p99_ms", "{:.0f}"),
        ("RSS idle (MiB)", "rss_idle_mib", "{:.0f}"),
        ("RSS per open stream (KiB)", "kib_per_stream", "{:.1f}"),
        ("CPU per stream, 12 deltas (ms)", "cpu_ms_per_stream", "{:.2f}"),
        ("short calls c=32 (req/s)", "rps_c32", "{:.0f}"),
    ]
    print(f"{COUNT} streams, {RAMP_PER_S}/s ramp, a delta every {INTERVAL_MS / 1000:.0f} s")
    header = f"{'measure':<30}{'direct':>10}{'naive':>10}{'shim':>10}{'shim/naive':>12}"
    print(header)
    print("-" * len(header))
    for label, key, fmt in rows:
        cells = [results.get(n, {}).get(key) for n in ("direct", "naive", "shim")]
        text = "".join(f"{fmt.format(v) if v is not None else '-':>10}" for v in cells)
        shim, naive = cells[2], cells[1]
        ratio = f"{shim / naive:>11.2f}x" if shim is not None and naive else f"{'-':>12}"
        print(f"{label:<30}{text}{ratio}")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    name = "streams-other.json" if os.environ.get("BENCH_SHIM_ROOT") else "streams.json"
    (out / name).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
