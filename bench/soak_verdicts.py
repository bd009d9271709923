"""The soak's verdicts: each criterion PASS, FAIL or n/a from the report, and the printed table.

Reads only the report dict soak_report.py's ``analyse`` built (and ``idle_level`` filled).
"""

from __future__ import annotations

GREENLET_SLACK = 2  # the tally and self-stats threads start with the first traffic
FD_SLACK = 2


def verdicts(report: dict, smoke: bool) -> list[tuple[str, bool | None, str]]:
    """(criterion, passed, detail); passed None when this run cannot judge it."""
    idle, after = report["idle"], report["after"]
    tokens = report["tokens"]
    out = []
    growths = [g for g in report["rss_growth_mib"] if g["per_100k"] is not None]
    worst = max((g["per_100k"] for g in growths), default=None)
    out.append(
        (
            "RSS growth <= 2 MiB per 100k requests per worker, after warm-up",
            None if smoke or worst is None else worst <= 2.0,
            "n/a"
            if worst is None
            else f"worst {worst:.2f} MiB/100k over {len(growths)} stable worker stretch(es)",
        )
    )
    out.append(
        (
            "descriptors back to idle after the load",
            after["client_sockets"] == 0 and after["fixed_fds"] <= idle["fixed_fds"] + FD_SLACK,
            f"fixed {after['fixed_fds']} vs idle {idle['fixed_fds']}, client sockets "
            f"{after['client_sockets']}, pooled upstream {after['upstream_sockets']}",
        )
    )
    out.append(
        (
            "greenlets back to idle after the load",
            after["greenlets"] <= idle["greenlets"] + GREENLET_SLACK,
            f"{after['greenlets']} vs idle {idle['greenlets']}",
        )
    )
    out.append(
        (
            "0 unaccounted calls (answered or visibly failed, one access line each)",
            not report["unaccounted"]
            and not report["phantom_lines"]
            and not report["status_mismatches"],
            f"{len(report['unaccounted'])} unaccounted, {len(report['phantom_lines'])} phantom, "
            f"{len(report['status_mismatches'])} whose line's status is not the client's",
        )
    )
    out.append(
        (
            "no clean-looking truncation, corrupt or stuck answer",
            not report["shim_failures"],
            f"{len(report['shim_failures'])}",
        )
    )
    out.append(
        (
            "token totals: access lines == what the fake sent",
            tokens["access_lines"] == tokens["fake_sent"] and not tokens["undecodable"],
            f"{tokens['access_lines']} vs {tokens['fake_sent']}, "
            f"{len(tokens['mismatches'])} call(s) differ",
        )
    )
    out.append(
        (
            "metric count == access lines (API ports)",
            report["metric_requests_api"] == report["access_lines_api"],
            f"shim_requests_total {report['metric_requests_api']:.0f} vs "
            f"{report['access_lines_api']} lines",
        )
    )
    lat = report["latency"]
    first, last = lat["added_ms_first_p99"], lat["added_ms_last_p99"]
    judged = (
        None if smoke or first is None or last is None else last <= max(first * 1.2, first + 0.5)
    )
    out.append(
        (
            "p99 added latency, last tenth within 20 % of the first",
            judged,
            "n/a" if first is None or last is None else f"{last:.2f} vs {first:.2f} ms",
        )
    )
    return out


def print_table(report: dict, checks: list, smoke: bool) -> None:
    p = report["plan"]
    label = "SMOKE " if smoke else ""
    print(
        f"{label}soak: {p['duration_s']:.0f} s at ~{p['rate_per_s']:.0f} calls/s through shim "
        f"(2 workers), a session every {p['session_every_s']} s with a "
        f"{p['long_events']}-event stream {p['long_gap_ms']} ms apart"
    )
    rows = [
        ("calls sent", report["calls"]),
        ("answered (a status line came back)", report["answered"]),
        ("access lines for these calls", report["access_lines_ours"]),
        ("access lines, API ports (all)", report["access_lines_api"]),
        ("shim_requests_total, API ports", f"{report['metric_requests_api']:.0f}"),
    ]
    rows += [(f"  outcome {k}", v) for k, v in sorted(report["outcomes"].items())]
    t = report["tokens"]
    rows += [
        ("tokens in access lines", t["access_lines"]),
        ("tokens the fake sent", t["fake_sent"]),
    ]
    lat = report["latency"]
    for what in ("added_ms", "delay_ms"):
        for where in ("first", "last"):
            p50, p99 = lat[f"{what}_{where}_p50"], lat[f"{what}_{where}_p99"]
            name = "added latency" if what == "added_ms" else "chunk delay"
            rows.append(
                (
                    f"{name} p50 / p99, {where} tenth (ms)",
                    "-" if p50 is None else f"{p50:.2f} / {p99:.2f}",
                )
            )
    for g in report["rss_growth_mib"]:
        if g["per_100k"] is not None:
            rows.append(
                (
                    f"RSS growth, worker {g['pid']} (MiB/100k req)",
                    f"{g['per_100k']:+.2f} over {g['requests']:.0f} req",
                )
            )
    idle, after = report["idle"], report["after"]
    rows += [
        ("idle: greenlets / fixed fds per worker", f"{idle['greenlets']} / {idle['fixed_fds']}"),
        ("after: greenlets / fixed fds per worker", f"{after['greenlets']} / {after['fixed_fds']}"),
    ]
    width = max(len(r[0]) for r in rows) + 2
    for name, value in rows:
        print(f"{name:<{width}}{value}")
    print("-" * (width + 30))
    for name, passed, detail in checks:
        mark = "PASS" if passed else "n/a " if passed is None else "FAIL"
        print(f"{mark}  {name}: {detail}")
