"""What reading usage from compressed answers costs, against identity, in one run.

    .venv/bin/python bench/usage.py          # BENCH_QUICK=1 for a shorter run

Two parts, each printed as a table with ratios against identity measured in
the same run:

1. In process (no server): the usage reader alone (``shim.usage``) on a
   typical Claude Code stream (message_start, 100 text deltas, message_delta,
   message_stop; one chunk per event, each compressed with a flush as the
   upstream sends it) and on a small JSON message: microseconds per answer.
2. Live: bench/upstream.py (``x-bench-encoding``) behind shim (2 gevent
   workers, access log and metrics on, as deployed); the CPU-seconds of
   shim's process tree per request for JSON calls and for streams (deltas
   paced 5 ms apart, so each arrives on its own as in real use), each
   coding against identity. This is the number the goal is about: within
   5 % of identity for a typical Claude Code stream.

Traffic goes to 127.0.0.1 only; every load is bounded in count.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import SECRET, cpu_seconds, free_port, start_shim, wait_port  # noqa: E402
from upstream import END, START, Encoder  # noqa: E402

from shim import usage  # noqa: E402
from shim.access import AccessRecord  # noqa: E402
from shim.providers.anthropic import Anthropic  # noqa: E402

QUICK = os.environ.get("BENCH_QUICK") == "1"
CODINGS = ("identity", "gzip", "deflate", "br", "zstd")
DELTAS = 100
STREAMS = 100 if QUICK else 300
CALLS = 1500 if QUICK else 4000
CONCURRENCY = 16
# Deltas paced as a model streams them: each arrives on its own, as in real use. Unpaced
# (0 ms) the upstream outruns shim and several events share one read, which flatters
# whichever coding happens to be sent faster.
INTERVAL_MS = 5
ROOT = Path(__file__).resolve().parent.parent


def stream_events() -> list[bytes]:
    deltas = [
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"' + f"token {i} of the answer ".encode() + b'"}}\n\n'
        for i in range(DELTAS)
    ]
    message_delta, message_stop = END.split(b"\n\n")[:2]
    return [START, *deltas, message_delta + b"\n\n", message_stop + b"\n\n"]


def coded(chunks: list[bytes], coding: str) -> list[bytes]:
    if coding == "identity":
        return chunks
    encoder = Encoder(coding)
    out = [encoder.piece(c) for c in chunks]
    out[-1] += encoder.end()
    return out


def in_process() -> list[tuple[str, float, float, float, float]]:
    provider = Anthropic("http://upstream.invalid", "sk-bench", None)
    events = stream_events()
    body = (
        b'{"id":"msg_1","type":"message","role":"assistant","model":"claude-bench",'
        b'"content":[{"type":"text","text":"' + b"hello " * 200 + b'"}],"stop_reason":"end_turn",'
        b'"usage":{"input_tokens":10,"output_tokens":2}}'
    )
    rows = []
    for coding in CODINGS:
        chunks = coded(events, coding)
        whole = b"".join(coded([body], coding))
        encoding = None if coding == "identity" else coding

        def one_stream(chunks=chunks, encoding=encoding) -> None:
            record = AccessRecord("r", "anthropic", "POST")
            tap = usage.tap_for("text/event-stream", encoding, b"\n\n", provider.usage_markers)
            for piece in chunks:
                tap.feed(piece)
            tap.read(lambda data: provider.read_usage(data, record))
            assert record.output_tokens == 20 and record.model == "claude-bench"

        def one_json(whole=whole, encoding=encoding) -> None:
            record = AccessRecord("r", "anthropic", "POST")
            usage.read_whole(whole, encoding, lambda data: provider.read_usage(data, record))
            assert record.input_tokens == 10

        n = 300 if QUICK else 1000
        stream_us = min(timeit.repeat(one_stream, number=n, repeat=3)) / n * 1e6
        json_us = min(timeit.repeat(one_json, number=n * 5, repeat=3)) / (n * 5) * 1e6
        rows.append((coding, stream_us, json_us, sum(map(len, chunks)), len(whole)))
    return rows


def drive(port: int, coding: str, stream: bool, count: int) -> float:
    """Make ``count`` calls at CONCURRENCY; return wall seconds."""
    body = json.dumps({"model": "claude-bench", "max_tokens": 1, "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"x-api-key": SECRET, "content-type": "application/json",
               "x-bench-deltas": str(DELTAS), "x-bench-interval-ms": str(INTERVAL_MS)}
    if coding != "identity":
        headers["x-bench-encoding"] = coding
        headers["accept-encoding"] = coding
    remaining = [count]
    lock = threading.Lock()
    failures = []

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            with lock:
                if remaining[0] <= 0:
                    break
                remaining[0] -= 1
            conn.request("POST", "/v1/messages", body, headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                failures.append(response.status)
        conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} calls failed: {failures[:5]}")
    return time.perf_counter() - started


def live() -> list[tuple[str, float, float]]:
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, str(ROOT / "bench" / "upstream.py"),
                                 str(upstream_port)])
    wait_port(upstream_port)
    shim = start_shim(upstream_port)
    pid = shim.process.pid
    rows = []
    try:
        drive(shim.port, "gzip", True, 50)  # warm up both workers
        for coding in CODINGS:
            cpu = cpu_seconds(pid)
            drive(shim.port, coding, False, CALLS)
            json_ms = (cpu_seconds(pid) - cpu) / CALLS * 1000
            cpu = cpu_seconds(pid)
            drive(shim.port, coding, True, STREAMS)
            stream_ms = (cpu_seconds(pid) - cpu) / STREAMS * 1000
            rows.append((coding, json_ms, stream_ms))
    finally:
        shim.stop()
        upstream.terminate()
        upstream.wait()
    return rows


def main() -> None:
    rows = in_process()
    base = rows[0]
    print(f"usage reader alone, in process ({DELTAS}-delta Claude Code stream, small JSON)")
    print(f"{'coding':<10}{'stream us':>11}{'ratio':>8}{'json us':>10}{'ratio':>8}"
          f"{'stream B':>10}{'json B':>8}")
    for coding, stream_us, json_us, stream_bytes, json_bytes in rows:
        print(f"{coding:<10}{stream_us:>11.1f}{stream_us / base[1]:>7.2f}x{json_us:>10.1f}"
              f"{json_us / base[2]:>7.2f}x{stream_bytes:>10}{json_bytes:>8}")
    print()
    rows = live()
    base = rows[0]
    print(f"shim live, CPU per request (2 workers, c={CONCURRENCY}; {CALLS} JSON calls, "
          f"{STREAMS} streams of {DELTAS} deltas {INTERVAL_MS} ms apart, per coding)")
    print(f"{'coding':<10}{'json ms':>9}{'ratio':>8}{'stream ms':>11}{'ratio':>8}")
    for coding, json_ms, stream_ms in rows:
        print(f"{coding:<10}{json_ms:>9.3f}{json_ms / base[1]:>7.2f}x{stream_ms:>11.3f}"
              f"{stream_ms / base[2]:>7.2f}x")


if __name__ == "__main__":
    main()
