"""What the soak adds up to: access lines against client outcomes against the fake's usage.

``analyse`` builds the report (the JSON's keys; tests/test_soak.py reads them) from the
results, the access lines, the fake's usage, the metrics and the samples; ``growth`` fits a
worker's RSS, descriptors or greenlets against its requests; ``idle_level`` is what an idle
worker holds. Judging the report and printing it is soak_verdicts.py's.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

from soak_plan import Plan
from soak_wire import Result

MiB = 2**20


def access_lines(path: Path) -> list[dict]:
    lines = []
    with open(path, "rb") as log:
        for raw in log:
            if b'"event":"access"' in raw:
                try:
                    lines.append(json.loads(raw))
                except ValueError:
                    pass
    return lines


def metric_total(text: str, name: str, skip_provider: str = "none") -> float:
    total = 0.0
    for labels, value in re.findall(rf"^{name}{{([^}}]*)}} (\S+)$", text, re.M):
        if f'provider="{skip_provider}"' not in labels:
            total += float(value)
    return total


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def growth(samples: list[dict], plan: Plan, key) -> list[dict]:  # noqa: ANN001
    """Per worker pid, over its stable stretch after warm-up: slope of ``key`` per 100k requests."""
    by_pid: dict[int, list[dict]] = defaultdict(list)
    for s in samples:
        if s["label"] == "load" and s["handled"] is not None:
            by_pid[s["pid"]].append(s)
    out = []
    for pid, rows in by_pid.items():
        born = rows[0]["t"]
        # After the run's warm-up and the worker's own: a new worker warms up like the first.
        kept = [r for r in rows if r["t"] >= plan.warmup_s and r["t"] >= born + plan.warmup_s]
        xs = [r["handled"] for r in kept]
        if len(kept) < 4 or max(xs) - min(xs) < 100:
            out.append({"pid": pid, "samples": len(rows), "fitted": len(kept), "per_100k": None})
            continue
        ys = [key(r) for r in kept]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
            (x - mx) ** 2 for x in xs
        )
        out.append(
            {
                "pid": pid,
                "samples": len(rows),
                "fitted": len(kept),
                "requests": max(xs) - min(xs),
                "per_100k": slope * 100_000,
            }
        )
    return out


def analyse(
    plan: Plan,
    results: list[Result],
    lines: list[dict],
    fake: dict,
    metrics_text: str,
    samples: list[dict],
    idle: dict,
    after: dict,
    events: list[dict],
) -> dict:
    by_id: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        by_id[line.get("request_id")].append(line)
    ours = {r.id for r in results}
    outcomes = Counter(r.outcome for r in results)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        by_kind[r.kind][r.outcome] += 1
    unaccounted, mismatched_status = [], []
    for r in results:
        found = by_id.get(r.id, [])
        lost = r.outcome == "lost_on_reuse" and not found  # shim never read it: no line is right
        if len(found) != 1 and not lost:
            unaccounted.append(
                {
                    "id": r.id,
                    "outcome": r.outcome,
                    "status": r.status,
                    "start": round(r.start, 2),
                    "lines": len(found),
                    "detail": r.detail,
                }
            )
        elif found and r.status is not None and found[0]["status"] != r.status:
            mismatched_status.append({"id": r.id, "client": r.status, "line": found[0]["status"]})
    phantom = [i for i in by_id if i and i.startswith("soak-") and i not in ours]
    shim_failures = [
        asdict(r) | {"delays": len(r.delays)}
        for r in results
        if r.outcome in ("TRUNCATED", "corrupt", "client_timeout", "error_unshaped")
    ]

    def tokens(line: dict) -> int:
        keys = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens")
        return sum(line.get(k) or 0 for k in keys)

    usage = fake["usage"]
    token_rows = []
    log_tokens = fake_tokens = 0
    for r in results:
        found = by_id.get(r.id, [])
        mine = sum(tokens(line) for line in found)
        theirs = usage.get(r.id, 0)
        log_tokens += mine
        fake_tokens += theirs
        if mine != theirs:
            token_rows.append(
                {
                    "id": r.id,
                    "outcome": r.outcome,
                    "access_line": mine,
                    "fake_sent": theirs,
                    "expect": r.expect,
                    "error": found[0].get("error") if found else None,
                    "usage_unread": found[0].get("usage_unread") if found else None,
                }
            )
    api_lines = [line for line in lines if line.get("provider") in ("anthropic", "gemini")]
    metric_requests = metric_total(metrics_text, "shim_requests_total")

    # Latency and chunk delay in the first and the last tenth of the run.
    tenth = plan.duration_s / 10
    added = {"first": [], "last": []}
    delays = {"first": [], "last": []}
    for r in results:
        where = "first" if r.start < tenth else "last" if r.start >= 9 * tenth else None
        if where and r.detail.startswith("added "):
            added[where].append(float(r.detail.split()[1]))
        for at, delay in r.delays:
            if at < tenth:
                delays["first"].append(delay)
            elif at >= 9 * tenth:
                delays["last"].append(delay)
    latency = {
        f"{what}_{where}_{name}": pct(values[where], q)
        for what, values in (("added_ms", added), ("delay_ms", delays))
        for where in ("first", "last")
        for name, q in (("p50", 0.5), ("p99", 0.99))
    }
    latency["samples"] = {k: len(v) for k, v in added.items()}

    return {
        "plan": asdict(plan) | {"rate_per_s": plan.rate},
        "calls": len(results),
        "answered": sum(1 for r in results if r.status is not None),
        "outcomes": dict(outcomes),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "access_lines": len(lines),
        "access_lines_api": len(api_lines),
        "access_lines_ours": sum(len(by_id.get(i, [])) for i in ours),
        "metric_requests_api": metric_requests,
        "unaccounted": unaccounted,
        "not_complete": [
            {k: v for k, v in asdict(r).items() if k not in ("delays", "latency_ms")}
            for r in results
            if r.outcome != "complete"
        ],
        "phantom_lines": phantom,
        "status_mismatches": mismatched_status,
        "shim_failures": shim_failures,
        "tokens": {
            "access_lines": log_tokens,
            "fake_sent": fake_tokens,
            "mismatches": token_rows,
            "undecodable": fake["undecodable"],
            "fake_stream_ends": fake["stream_ends"],
        },
        "latency": latency,
        "rss_growth_mib": growth(samples, plan, lambda r: r["rss"] / MiB),
        "fds_growth": growth(samples, plan, lambda r: r["fds"]["total"]),
        "greenlets_growth": growth(
            [s for s in samples if s["greenlets"] is not None], plan, lambda r: r["greenlets"]
        ),
        "idle": idle,
        "after": after,
        "events": events,
        "samples": samples,
    }


def idle_level(rows: list[dict]) -> dict:
    """The fds (all but client and upstream sockets) and greenlets of idle workers: the max."""
    return {
        "greenlets": max((r["greenlets"] or 0) for r in rows),
        "fixed_fds": max(
            r["fds"]["total"] - r["fds"].get("client", 0) - r["fds"].get("upstream", 0)
            for r in rows
        ),
        "client_sockets": max(r["fds"].get("client", 0) for r in rows),
        "upstream_sockets": max(r["fds"].get("upstream", 0) for r in rows),
        "pids": sorted(r["pid"] for r in rows),
    }
