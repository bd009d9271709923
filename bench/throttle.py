"""What the failed-secret throttle costs per request: old per-worker dict vs shared table vs Redis.

In-process, through the real AuthThrottle (issue #14). The common case is a
client with no failures: ``blocked_for`` of an address not in the table.
The rest cost only callers that sent wrong secrets. Ratios are against a
~800 us request CPU budget (bench/README.md: shim spends 0.8-0.9 ms of CPU
per small call). Starts a loopback redis-server (Debian's) for the Redis rows.
Run:
    .venv/bin/python bench/throttle.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shim.throttle import AuthThrottle, RedisFailures  # noqa: E402
from tests.conftest import RedisServer, free_port  # noqa: E402

REQUEST_US = 800.0


class DictThrottle:
    """The per-worker check as it was before issue #14 (an OrderedDict lookup)."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, list[float]] = OrderedDict()

    def blocked_for(self, address: str | None) -> float:
        entry = self._entries.get(address or "")
        if entry is None:
            return 0.0
        return max(0.0, entry[2] - time.monotonic())


def per_call_us(action: Callable[[], object], rounds: int) -> float:
    """Best of 5 runs, CPU microseconds per call."""
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(rounds):
            action()
        best = min(best, time.process_time() - start)
    return best / rounds * 1e6


def wall_us(action: Callable[[], object], rounds: int) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        action()
    return (time.perf_counter() - start) / rounds * 1e6


def contended_failed_us(rounds: int) -> float:
    """Wall us per failed() while 2 processes count the same address (2 cores)."""
    throttle = AuthThrottle(10**9, 3600, 60)
    start = time.perf_counter()
    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            for _ in range(rounds):
                throttle.failed("192.0.2.200")
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    return (time.perf_counter() - start) / rounds * 1e6


def main() -> None:
    rounds = 200_000
    old = DictThrottle()
    local = AuthThrottle(10, 60, 300)
    addresses = [f"10.{i // 250}.{i % 250}.1" for i in range(1000)]  # 1,000 clients, cycled
    cycle = iter(range(1 << 62))

    rows: list[tuple[str, float, str]] = []
    rows.append(("old per-worker dict: clean address", per_call_us(
        lambda: old.blocked_for("192.0.2.1"), rounds), "cpu"))
    rows.append(("shared table: clean address", per_call_us(
        lambda: local.blocked_for("192.0.2.1"), rounds), "cpu"))
    rows.append(("shared table: clean, 1,000 addresses cycled", per_call_us(
        lambda: local.blocked_for(addresses[next(cycle) % 1000]), rounds), "cpu"))
    rows.append(("shared table: clean IPv6 (/64 grouped)", per_call_us(
        lambda: local.blocked_for("2001:db8:1:2::1234"), rounds), "cpu"))
    rows.append(("shared table: clean, address never seen (hash miss)", per_call_us(
        lambda: local.blocked_for(f"172.16.{next(cycle) % 65536}.{next(cycle) % 250}"),
        rounds // 4), "cpu"))

    # max 10**9: the address stays below its limit, so every call is a full check + count.
    failing = AuthThrottle(10**9, 3600, 300, table=local.table)
    failing.failed("192.0.2.9")
    rows.append(("shared table: failing address, check + count", per_call_us(
        lambda: (failing.blocked_for("192.0.2.9"), failing.failed("192.0.2.9")),
        rounds // 4), "cpu"))
    rows.append(("shared table: failed(), 2 processes, same slot", contended_failed_us(
        rounds // 4), "wall"))

    with tempfile.TemporaryDirectory() as work:
        redis = RedisServer(free_port(), Path(work) / "redis.log").start()
        try:
            shared = AuthThrottle(
                10**9, 3600, 300, table=local.table, shared=RedisFailures(redis.url)
            )
            shared.failed("192.0.2.10")
            rows.append(("shared + Redis: clean address", per_call_us(
                lambda: shared.blocked_for("192.0.2.1"), rounds), "cpu"))
            rows.append(("shared + Redis: failing address, check", wall_us(
                lambda: shared.blocked_for("192.0.2.10"), 5000), "wall"))
            rows.append(("shared + Redis: failing address, check + count", wall_us(
                lambda: (shared.blocked_for("192.0.2.10"), shared.failed("192.0.2.10")),
                5000), "wall"))
        finally:
            redis.kill()

    print(f"{'per check':<52} {'us':>8}  {'of ~800 us':>10}  clock")
    print("-" * 82)
    for name, micros, clock in rows:
        print(f"{name:<52} {micros:8.2f}  {micros / REQUEST_US:10.2%}  {clock}")


if __name__ == "__main__":
    main()
