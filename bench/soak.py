"""Soak: shim under a steady, mixed, faulty load with reloads and restarts; leaks and lost calls.

    .venv/bin/python bench/soak.py                # 30 minutes (run by hand, never in CI)
    .venv/bin/python bench/soak.py --smoke        # 45 s, fewer clients (tests/test_soak.py)
    .venv/bin/python bench/soak.py --minutes 3    # any length; --out FILE for the JSON

Starts the project's fake upstream (tests/fake_upstream.py, in a process of its
own: compressed answers, quota headers, Gemini 429s, faults by header) and shim
as deployed (gunicorn, 2 gevent workers, JSON logs to a file, metrics on, a
named-clients file with limits). Then, at a fixed rate, for the chosen time:
Claude Code-like sessions (model list, count_tokens, a long SSE stream of a few
hundred paced events, a burst of short tool calls on one keep-alive connection)
and independent SDK-like calls on both ports, with faults at low rates: client
hang-ups mid-stream, upstream drops and stalls, 429s and 529s, Gemini keys over
quota, wrong secrets from other loopback addresses (127.0.0.2-250), slow
readers, a client over its rpm limit. Meanwhile the clients file is rewritten
every minute, the master gets one SIGHUP, and the workers one rolling restart.

Every call carries its own id (``X-Request-Id`` and the fake's ``x-test-id``),
so each is followed end to end: what the client saw, the access line(s) shim
wrote, and the usage in the bytes the fake actually sent. Prints one table
with PASS/FAIL per criterion and writes bench/results/soak.json (smoke:
soak-smoke.json). Loopback only; bounded in time and count.

This file is the run: the load at the plan's rate, the timeline beside it
(``Control``) and ``main``. Its parts live beside it: soak_plan.py (the plans),
soak_wire.py (the client), soak_mix.py (the calls), soak_rig.py (the processes
and the sampler), soak_report.py (the analysis), soak_verdicts.py (the table).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

# bench/ is a folder of scripts, not a package: the siblings by name, and the project's fake.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from soak_mix import Mix  # noqa: E402
from soak_plan import FULL, SMOKE, Plan  # noqa: E402
from soak_report import access_lines, analyse, idle_level  # noqa: E402
from soak_rig import Sampler, Shim, free_port, run_upstream, wait_port  # noqa: E402
from soak_verdicts import print_table, verdicts  # noqa: E402
from soak_wire import Call, Client, Result  # noqa: E402

from tests.fake_upstream import FAKE_OAUTH_TOKEN, OAUTH_BETA  # noqa: E402


class Control(threading.Thread):
    """The timeline beside the load: sampling, clients-file edits, a SIGHUP, a rolling restart."""

    def __init__(self, plan: Plan, shim: Shim, sampler: Sampler, t0: float):
        super().__init__(daemon=True)
        self.plan, self.shim, self.sampler, self.t0 = plan, shim, sampler, t0
        self.events: list[dict] = []
        self.stop = threading.Event()

    def note(self, what: str, **extra) -> None:
        self.events.append({"t": round(time.time() - self.t0, 2), "event": what, **extra})

    def wait_until(self, at: float) -> bool:
        while time.time() - self.t0 < at:
            if self.stop.wait(min(self.plan.sample_s, at - (time.time() - self.t0))):
                return False
            self.tick()
        return True

    def tick(self) -> None:
        now = time.time() - self.t0
        if now >= self._next_sample:
            self.sampler.take()
            self._next_sample += self.plan.sample_s
        if now >= self._next_edit:
            self.shim.clients.edit()
            self.note("clients_file_edited", edits=self.shim.clients.edits)
            self._next_edit += self.plan.edit_every_s

    def run(self) -> None:
        p = self.plan
        self._next_sample, self._next_edit = 0.0, p.edit_every_s
        if not self.wait_until(p.sighup_at * p.duration_s):
            return
        before = self.shim.workers()
        os.kill(self.shim.process.pid, signal.SIGHUP)
        self.note("sighup", workers_before=before)
        if not self.wait_until(p.restart_at * p.duration_s):
            return
        for victim in self.shim.workers():  # rolling: one, its replacement up, then the next
            old = self.shim.workers()
            os.kill(victim, signal.SIGTERM)
            self.note("worker_sigterm", pid=victim)
            deadline = time.time() + p.grace_s + 20
            while time.time() < deadline and not self.stop.is_set():
                now = self.shim.workers()
                if victim not in now and len(now) >= 2:
                    self.note("worker_replaced", old=victim, new=sorted(set(now) - set(old)))
                    break
                self.stop.wait(0.2)
                self.tick()
        while not self.stop.is_set():
            self.stop.wait(0.2)
            self.tick()


async def load(
    plan: Plan, shim: Shim, upstream: int, t0: float, prefix: str = "soak"
) -> list[Result]:
    """Drive the mix at its fixed rate for plan.duration_s; return every call's result."""
    mix = Mix(plan, prefix)
    client = Client(shim.ports, t0)
    results: list[Result] = []
    tasks: set[asyncio.Task] = set()
    end = t0 + plan.duration_s

    def launch(coro) -> None:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def one(call: Call) -> None:
        results.append(await client.run(call, keep=mix.rng.random() < 0.5, timeout=60))

    async def session(number: int) -> None:
        name = ("cc-1", "cc-2")[number % 2]
        conn = None
        calls = [*mix.session_start(name), mix.long_stream(name)]
        calls += [mix.tool_call(name) for _ in range(mix.rng.randint(3, 6))]
        for call in calls:
            timeout = plan.long_events * plan.long_gap_ms / 1000 + 60
            result = await client.run(call, conn=conn, keep=True, timeout=timeout, session=True)
            results.append(result)
            conn = result._conn  # type: ignore[attr-defined]
        if conn is not None:
            conn[1].close()

    async def probes() -> None:
        """Added latency: the same small call straight to the fake, then through shim."""
        direct = None
        n = 0
        while time.time() < end:
            n += 1
            started = time.perf_counter()
            try:
                if direct is None:
                    direct = await asyncio.open_connection("127.0.0.1", upstream)
                body = b'{"model":"probe","max_tokens":1,"messages":[]}'
                direct[1].write(
                    b"POST /v1/messages HTTP/1.1\r\nHost: f\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {FAKE_OAUTH_TOKEN}\r\nanthropic-beta: {OAUTH_BETA}"
                    f"\r\nx-fake-encoding: identity\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await direct[1].drain()
                head = (await direct[0].readuntil(b"\r\n\r\n")).decode("latin-1").lower()
                length = re.search(r"content-length: *(\d+)", head)
                await direct[0].readexactly(int(length.group(1)))
                direct_ms = (time.perf_counter() - started) * 1000
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                direct, direct_ms = None, None
            call = mix.call(
                "probe",
                "anthropic",
                "POST",
                "/v1/messages",
                {"model": "probe", "max_tokens": 1, "messages": []},
                coding="",
            )
            result = await client.run(call, keep=True, timeout=30)
            results.append(result)
            if direct_ms is not None and result.outcome == "complete":
                result.detail = f"added {result.latency_ms - direct_ms:.3f}"
            await asyncio.sleep(0.5)

    launch(probes())
    next_short = next_session = time.time()
    sessions = 0
    while (now := time.time()) < end:
        while next_short <= now:
            launch(one(mix.short()))
            next_short += 1 / plan.short_per_s
        while next_session <= now:
            launch(session(sessions))
            sessions += 1
            next_session += plan.session_every_s
        await asyncio.sleep(0.01)
    while tasks:
        await asyncio.wait(set(tasks))
    for conns in client.idle.values():
        for _, writer in conns:
            writer.close()
    return results


def settle(sampler: Sampler, plan: Plan, timeout: float) -> dict:
    """Wait until the workers are at rest (two looks in a row agree, no client socket open).

    Each look comes after a self-stats refresh, so greenlets are counted after the last
    call ended. Returns the last look, at rest or not (the timeout).
    """
    deadline = time.time() + timeout
    last: dict = {}
    while True:
        time.sleep(plan.sample_s * 1.5)
        rows = sampler.take("after")
        level = idle_level(rows) if rows else {}
        if level and level == last and level["client_sockets"] == 0:
            return level
        if time.time() > deadline:
            return level
        last = level


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="45 s at about half the rate (what tests/test_soak.py runs)",
    )
    parser.add_argument(
        "--minutes",
        type=float,
        help="run this long instead (with --smoke: at the smoke rates, RSS and latency not judged)",
    )
    parser.add_argument("--out", help="the JSON file (default bench/results/soak[-smoke].json)")
    parser.add_argument("--upstream", nargs=2, metavar=("PORT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        run_upstream(int(args.upstream[0]), args.upstream[1])
        return 0
    plan = SMOKE if args.smoke else FULL
    if args.minutes:
        plan = Plan(
            **{**asdict(plan), "duration_s": args.minutes * 60, "warmup_s": args.minutes * 12}
        )
    out = (
        Path(args.out)
        if args.out
        else ROOT / "bench" / "results" / ("soak-smoke.json" if args.smoke else "soak.json")
    )
    work = Path(tempfile.mkdtemp(prefix="shim-soak-"))
    upstream_port = free_port()
    usage_file = work / "fake-usage.json"
    fake = subprocess.Popen(
        [sys.executable, __file__, "--upstream", str(upstream_port), str(usage_file)],
        start_new_session=True,
    )
    shim = None
    try:
        wait_port(upstream_port, timeout=20)
        shim = Shim(plan, upstream_port, work)
        ports = {"shim": set(shim.ports.values()) | {shim.metrics_port}, "upstream": upstream_port}
        print(f"shim log: {shim.log_path}", file=sys.stderr, flush=True)
        # Warm-up: a few calls of every kind fill the upstream pools; then the idle level.
        t0 = time.time()
        sampler = Sampler(shim, ports, t0)
        warm = Plan(
            **{
                **asdict(plan),
                "duration_s": 3,
                "short_per_s": 10,
                "session_every_s": 100,
                "long_events": 10,
            }
        )
        asyncio.run(load(warm, shim, upstream_port, time.time(), prefix="warm"))
        idle = settle(sampler, plan, 30)
        t0 = time.time()
        sampler = Sampler(shim, ports, t0)
        control = Control(plan, shim, sampler, t0)
        control.start()
        results = asyncio.run(load(plan, shim, upstream_port, t0))
        control.stop.set()
        control.join(timeout=plan.grace_s + 30)
        after = settle(sampler, plan, plan.grace_s + 30)
        metrics_text = shim.scrape()
    finally:
        if shim is not None:
            shim.stop()
        fake.send_signal(signal.SIGTERM)
        fake.wait(timeout=300)
    fake_report = json.loads(usage_file.read_text())
    lines = access_lines(shim.log_path)
    report = analyse(
        plan,
        results,
        lines,
        fake_report,
        metrics_text,
        sampler.samples,
        idle,
        after,
        control.events,
    )
    report["shim_log"] = str(shim.log_path)
    checks = verdicts(report, args.smoke)
    report["checks"] = [{"criterion": c, "passed": p, "detail": d} for c, p, d in checks]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print_table(report, checks, args.smoke)
    print(f"JSON: {out}")
    return 0 if all(p is not False for _, p, _ in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
