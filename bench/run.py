"""shim against the naive passthrough of its own stack, nginx and direct, in one run.

One command (needs wrk and nginx from Debian: apt-get install wrk nginx):

    .venv/bin/python bench/run.py            # BENCH_QUICK=1 for a shorter run

Starts bench/upstream.py, then one target at a time on the same loopback:
direct (client -> upstream), naive (bench/naive.py: Flask + requests +
gunicorn/gevent as a tutorial writes it, 2 workers), nginx (proxy_pass, the
floor), shim (2 workers, logging + metrics on, as deployed). Prints one table
with ratios against the naive passthrough measured in this run and writes
bench/results/latest.json. Traffic goes to 127.0.0.1 only; every load is
bounded in count and time.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-shared-secret-000000000000"
QUICK = os.environ.get("BENCH_QUICK") == "1"
REPEATS = 1 if QUICK else 3
WRK_SECONDS = 3 if QUICK else 6
BODY = b'{"model":"claude-bench","max_tokens":1,"messages":[{"role":"user","content":"hi"}]}'
GEMINI_PATH = "/v1beta/models/gemini-bench:generateContent"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def tree(pid: int) -> list[int]:
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            pids += tree(int(child))
    return pids


def cpu_seconds(pid: int) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for each in tree(pid):
        fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def rss_kib(pid: int) -> int:
    total = 0
    for each in tree(pid):
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


@dataclass
class Target:
    name: str
    port: int
    gemini_port: int | None = None
    process: subprocess.Popen | None = None
    workdir: str | None = None
    results: dict = field(default_factory=dict)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGQUIT if self.name == "nginx" else signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_naive(upstream: int, connections: int = 4096) -> Target:
    port = free_port()
    env = {**os.environ, "NAIVE_UPSTREAM": f"http://127.0.0.1:{upstream}", "NAIVE_SECRET": SECRET}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            "gevent",
            "-w",
            "2",
            "--worker-connections",
            str(connections),
            "-b",
            f"127.0.0.1:{port}",
            "naive:app",
        ],
        # Not the repository root: gunicorn would load shim's gunicorn.conf.py from there.
        cwd=ROOT / "bench",
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return Target("naive", port, port, process)


def start_shim(upstream: int, **extra_env: str) -> Target:
    port, gemini = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHIM_", "PROMETHEUS_"))}
    env.update(
        SHIM_SHARED_SECRET=SECRET,
        SHIM_ANTHROPIC_API_KEY="sk-ant-bench",
        SHIM_GEMINI_KEYS="AIzaBenchKey0000000000000000000",
        SHIM_ANTHROPIC_UPSTREAM=f"http://127.0.0.1:{upstream}",
        SHIM_GEMINI_UPSTREAM=f"http://127.0.0.1:{upstream}",
        SHIM_BIND_HOST="127.0.0.1",
        SHIM_ANTHROPIC_PORT=str(port),
        SHIM_GEMINI_PORT=str(gemini),
        SHIM_METRICS_PORT=str(free_port()),
        SHIM_WORKERS="2",
        SHIM_WORKER_CONNECTIONS="4096",
        SHIM_GEMINI_KEYS_FILE="",
    )
    env.update(extra_env)
    log = open(os.devnull, "wb")  # noqa: SIM115 - access lines are written, as deployed
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )
    wait_port(port)
    wait_port(gemini)
    return Target("shim", port, gemini, process)


def start_nginx(upstream: int) -> Target:
    port = free_port()
    work = tempfile.mkdtemp(prefix="shim-bench-nginx-")
    os.chmod(work, 0o777)
    Path(work, "nginx.conf").write_text(f"""
worker_processes 2;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log error;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {work}; proxy_temp_path {work};
    fastcgi_temp_path {work}; uwsgi_temp_path {work}; scgi_temp_path {work};
    upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
""")
    process = subprocess.Popen(
        ["nginx", "-p", work, "-c", f"{work}/nginx.conf"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return Target("nginx", port, port, process, work)


def wrk(
    port: int, connections: int, path: str = "/v1/messages", seconds: int = WRK_SECONDS
) -> tuple[float, int]:
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write(
        f"wrk.method = \"POST\"\nwrk.body = '{BODY.decode()}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["x-api-key"] = "{SECRET}"\n'
        f'wrk.headers["x-goog-api-key"] = "{SECRET}"\n'
    )
    script.close()
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t2",
                f"-c{connections}",
                f"-d{seconds}s",
                "-s",
                script.name,
                f"http://127.0.0.1:{port}{path}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(script.name)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    failed = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    ok = total - (int(failed.group(1)) if failed else 0)
    return ok / seconds, ok


def added_latency(direct_port: int, port: int, rounds: int) -> tuple[float, float]:
    """Alternate direct and target calls on keep-alive connections; return p50, p99 added ms."""
    direct = http.client.HTTPConnection("127.0.0.1", direct_port)
    target = http.client.HTTPConnection("127.0.0.1", port)
    headers = {"content-type": "application/json", "x-api-key": SECRET}
    added = []
    for _ in range(rounds):
        times = []
        for conn in (direct, target):
            start = time.perf_counter()
            conn.request("POST", "/v1/messages", body=BODY, headers=headers)
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
            times.append(time.perf_counter() - start)
        added.append((times[1] - times[0]) * 1000)
    direct.close()
    target.close()
    added.sort()
    return added[len(added) // 2], added[int(len(added) * 0.99) - 1]


async def one_stream(port: int, deltas: int, interval_ms: int, path: str = "/v1/messages"):
    """Open a stream; return (ttft, [delays], bunched) measured against upstream's stamps."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
    body = BODY[:-1] + b',"stream":true}'
    start = time.time()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
        f"x-api-key: {SECRET}\r\nx-goog-api-key: {SECRET}\r\nx-bench-deltas: {deltas}\r\n"
        f"x-bench-interval-ms: {interval_ms}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    delays, arrivals, ttft, buffer = [], [], None, b""
    while True:
        data = await reader.read(65536)
        if not data:
            break
        now = time.time()
        buffer += data
        for stamp in re.findall(rb'"text":"(\d+\.\d+)"', buffer):
            ttft = ttft if ttft is not None else now - start
            delays.append(now - float(stamp))
            arrivals.append(now)
        buffer = buffer[buffer.rfind(b"\n") + 1 :] if b'"text":"' in buffer else buffer[-256:]
    writer.close()
    pairs = zip(arrivals, arrivals[1:], strict=False)
    bunched = any(b - a < interval_ms / 1000 / 5 for a, b in pairs)
    return ttft, delays, bunched and interval_ms >= 50, len(delays) == deltas


async def streams(
    port: int,
    count: int,
    deltas: int,
    interval_ms: int,
    ramp_per_s: float = 500,
    path: str = "/v1/messages",
) -> dict:
    tasks = []
    for index in range(count):
        tasks.append(asyncio.create_task(one_stream(port, deltas, interval_ms, path)))
        if ramp_per_s and index % 50 == 49:
            await asyncio.sleep(50 / ramp_per_s)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    good = [r for r in results if not isinstance(r, BaseException)]
    delays = sorted(d for r in good for d in r[1])
    ttfts = sorted(r[0] for r in good if r[0] is not None)

    def p99(xs: list[float]) -> float:
        return xs[max(0, int(len(xs) * 0.99) - 1)] * 1000 if xs else float("nan")

    return {
        "streams": count,
        "complete": sum(1 for r in good if r[3]),
        "bunched": sum(1 for r in good if r[2]),
        "delay_p99_ms": p99(delays),
        "ttft_p99_ms": p99(ttfts),
        "ttft_p50_ms": statistics.median(ttfts) * 1000 if ttfts else float("nan"),
    }


def spread(values: list[float]) -> dict:
    """min / median / max of repeated runs (the table shows the median)."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def measure(target: Target, direct: Target) -> dict:
    r: dict = {}
    pid = target.process.pid if target.process else None
    wrk(target.port, 32)  # warm-up
    cpu0 = cpu_seconds(pid) if pid else 0.0
    runs, done = [], 0
    for _ in range(REPEATS):
        rate, count = wrk(target.port, 32)
        runs.append(rate)
        done += count
    r["rps_c32"] = spread(runs)
    if pid:
        r["cpu_ms_per_req"] = (cpu_seconds(pid) - cpu0) / done * 1000
    r["rps_c128"] = spread([wrk(target.port, 128)[0] for _ in range(REPEATS)])
    if target.gemini_port and target.name != "direct":
        r["gemini_rps_c32"] = spread(
            [wrk(target.gemini_port, 32, GEMINI_PATH)[0] for _ in range(REPEATS)]
        )
    if target.name != "direct":
        r["added_p50_ms"], r["added_p99_ms"] = added_latency(
            direct.port, target.port, 150 if QUICK else 400
        )
    r["stream_c1"] = asyncio.run(streams(target.port, 1, 20, 100))
    # Chunk delays at c=64 swing by 2x between rounds on a shared 2-core box:
    # repeat, and report the round with the median p99 (all rounds in the JSON).
    rounds = [asyncio.run(streams(target.port, 64, 20, 100)) for _ in range(REPEATS)]
    rounds.sort(key=lambda result: result["delay_p99_ms"])
    r["stream_c64"] = {
        **rounds[len(rounds) // 2],
        "rounds": rounds,
        "bunched": sum(result["bunched"] for result in rounds),
    }
    if pid:
        r["rss_idle_mib"] = rss_kib(pid) / 1024
        held = 256 if QUICK else 4096

        async def hold() -> tuple[dict, int]:
            task = asyncio.create_task(streams(target.port, held, 4, 2000))
            await asyncio.sleep(held / 500 + 3)
            rss = rss_kib(pid)
            return await task, rss

        held_result, rss_streams = asyncio.run(hold())
        r["held_streams"] = held_result
        r["kib_per_stream"] = (rss_streams - r["rss_idle_mib"] * 1024) / held
    return r


ROWS = [
    ("throughput c=32 (req/s, median)", "rps_c32", "higher"),
    ("throughput c=128 (req/s, median)", "rps_c128", "higher"),
    ("CPU per request (ms)", "cpu_ms_per_req", "lower"),
    ("added latency p50, c=1 (ms)", "added_p50_ms", "lower"),
    ("added latency p99, c=1 (ms)", "added_p99_ms", "lower"),
    ("stream c=1: delay p99 (ms)", ("stream_c1", "delay_p99_ms"), "lower"),
    ("stream c=64: delay p99 (ms, median round)", ("stream_c64", "delay_p99_ms"), "lower"),
    ("stream c=64: TTFT p99 (ms)", ("stream_c64", "ttft_p99_ms"), "lower"),
    ("stream c=64: bunched streams (all rounds)", ("stream_c64", "bunched"), "lower"),
    ("held streams, 2 s deltas (complete)", ("held_streams", "complete"), "higher"),
    ("held streams: delay p99 (ms)", ("held_streams", "delay_p99_ms"), "lower"),
    ("held streams: TTFT p99 (ms)", ("held_streams", "ttft_p99_ms"), "lower"),
    ("RSS idle (MiB)", "rss_idle_mib", "lower"),
    ("RSS growth per open stream (KiB)", "kib_per_stream", "lower"),
    ("Gemini port throughput c=32 (req/s, median)", "gemini_rps_c32", "higher"),
]


def value(results: dict, key) -> float | None:  # noqa: ANN001
    found = results.get(key[0], {}).get(key[1]) if isinstance(key, tuple) else results.get(key)
    return found["median"] if isinstance(found, dict) else found


def main() -> None:
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "upstream.py"), str(upstream_port)]
    )
    wait_port(upstream_port)
    direct = Target("direct", upstream_port)
    targets = [direct]
    try:
        for start in (start_naive, start_nginx, start_shim):
            targets.append(start(upstream_port))
            try:
                targets[-1].results = measure(targets[-1], direct)
            finally:
                targets[-1].stop()
            print(f"measured {targets[-1].name}", file=sys.stderr, flush=True)
        direct.results = measure(direct, direct)
    finally:
        upstream.kill()
    by_name = {t.name: t.results for t in targets}
    header = (
        f"{'measure':<44}{'direct':>10}{'naive':>10}{'nginx':>10}{'shim':>10}{'shim/naive':>12}"
    )
    print(header)
    print("-" * len(header))
    for label, key, _ in ROWS:
        cells = []
        for name in ("direct", "naive", "nginx", "shim"):
            v = value(by_name[name], key)
            cells.append(
                f"{v:>10.1f}" if isinstance(v, float) else f"{v if v is not None else '-':>10}"
            )
        shim, naive = value(by_name["shim"], key), value(by_name["naive"], key)
        ratio = f"{shim / naive:>11.2f}x" if shim is not None and naive else f"{'-':>12}"
        print(f"{label:<44}{''.join(cells)}{ratio}")
    for name in ("naive", "shim"):
        for key in ("rps_c32", "rps_c128", "gemini_rps_c32"):
            runs = by_name[name].get(key)
            if isinstance(runs, dict):
                print(
                    f"  {name} {key}: min {runs['min']:.0f} / median {runs['median']:.0f}"
                    f" / max {runs['max']:.0f}"
                )
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(by_name, indent=2))


if __name__ == "__main__":
    main()
