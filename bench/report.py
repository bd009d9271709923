"""How fast python -m shim.report reads a log: lines per second over 1M synthetic access lines.

    .venv/bin/python bench/report.py          # BENCH_QUICK=1 for 200k lines

Writes a temporary log of realistic access lines (every field shim.access writes, four
clients, five models, 2 % gunicorn and other log lines mixed in), then times one full
report pass (read, parse, group, percentiles, pricing, render) for each --by. The goal
(issue #17) is >= 200k lines/s on a 2-core box, i.e. a 1 GB log in well under a minute.
A plain file this big is read in parallel byte ranges, one process per core; before that
(one process) it was 121-130k lines/s, now ~295k lines/s on 2 cores.
"""

from __future__ import annotations

import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shim import report  # noqa: E402

MODELS = (
    "claude-sonnet-4-5-20250929",
    "claude-opus-4-5-20251101",
    "claude-haiku-4-5-20251001",
    "gemini-2.5-pro",
    "gemini-2.5-flash",
)


def access_line(rng: random.Random, i: int) -> bytes:
    fields = {
        "ts": f"2026-01-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:{i % 60:02d}.{i % 1000:03d}Z",
        "level": "info",
        "event": "access",
        "logger": "shim.access",
        "message": "access",
        "request_id": f"{i:032x}",
        "client_ip": "10.0.0.7",
        "client": f"member{i % 4}",
        "client_credential": None,
        "provider": "anthropic",
        "method": "POST",
        "route": "/v1/messages",
        "model": MODELS[i % len(MODELS)],
        "stream": True,
        "status": 200 if i % 50 else 529,
        "upstream_status": 200,
        "duration_ms": round(rng.uniform(200, 60000), 2),
        "ttfb_ms": round(rng.uniform(100, 3000), 2),
        "bytes_in": rng.randrange(1000, 400000),
        "bytes_out": rng.randrange(500, 50000),
        "input_tokens": rng.randrange(1, 5000),
        "output_tokens": rng.randrange(1, 8000),
        "cache_read_tokens": rng.randrange(0, 150000),
        "cache_creation_tokens": rng.randrange(0, 20000),
        "stop_reason": "end_turn",
        "usage_unread": None,
        "gemini_key_id": None,
        "claude_session_id": "2f1c0a3e-6f1d-4c5b-9a7e-0d8c2b1e4f60",
        "quota_status": "allowed",
        "quota_reset": 1767225600,
        "quota_5h_utilization": 0.42,
        "quota_7d_utilization": 0.13,
        "quota_representative_claim": "five_hour",
        "quota_5h_reset": 1767225600,
        "quota_7d_reset": 1767830400,
        "quota_overage_status": None,
        "quota_overage_disabled_reason": None,
        "quota_fallback": None,
        "quota_fallback_percentage": None,
        "refusal": None,
        "error": None,
        "max_gap_ms": 812.5,
        "events": 143,
    }
    return orjson.dumps(fields) + b"\n"


def main() -> None:
    count = 200_000 if os.environ.get("BENCH_QUICK") else 1_000_000
    rng = random.Random(17)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "access.log"
        with open(path, "wb") as log:
            for i in range(count):
                log.write(access_line(rng, i))
                if i % 50 == 0:
                    log.write(b"[2026-01-01 00:00:00 +0000] [7] [INFO] Booting worker\n")
        size = path.stat().st_size
        print(f"{count:,} access lines, {size / 1e6:,.0f} MB ({size / count:,.0f} B/line)")
        for by in report.GROUPINGS:
            out = io.StringIO()
            started = time.perf_counter()
            report.main(["--by", by, str(path)], environ={}, out=out)
            took = time.perf_counter() - started
            print(
                f"--by {by:6}  {took:6.2f} s  {count / took:>10,.0f} lines/s  "
                f"{size / took / 1e6:6.0f} MB/s  (1 GB in {1e9 / (size / took):4.0f} s)"
            )


if __name__ == "__main__":
    main()
