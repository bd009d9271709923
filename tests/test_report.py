"""python -m shim.report: a fixture log in, hand-computed costs out, per grouping and format."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json

import pytest

from shim import report

NOW = dt.datetime(2026, 1, 3, 0, 0, tzinfo=dt.UTC)


def line(ts: str, client: str | None, model: str | None, **fields: object) -> str:
    entry = {
        "ts": ts,
        "level": "info",
        "event": "access",
        "logger": "shim.access",
        "client": client,
        "model": model,
        "status": 200,
        "error": None,
        "duration_ms": 1000.0,
        "ttfb_ms": 100.0,
        "input_tokens": None,
        "output_tokens": None,
        "cache_read_tokens": None,
        "cache_creation_tokens": None,
    }
    entry.update(fields)
    return json.dumps(entry)


# Hand-computed (list prices, USD per million tokens, shim/prices.json):
# 1 alice sonnet 4.5 ($3 in, $15 out, $0.30 read, $3.75 write):
#     1000*3 + 2000*15 + 10000*0.30 + 4000*3.75 = 3000+30000+3000+15000 = 51000 -> $0.051
# 2 alice gemini 2.5 flash ($0.30 in, $2.50 out, $0.03 read; prompt includes the cache):
#     (5000-1000)*0.30 + 1000*2.50 + 1000*0.03 = 1200+2500+30 = 3730 -> $0.00373
# 3 bob opus 4.5 ($5 in, $25 out): 2000*5 + 400*25 = 10000+10000 = 20000 -> $0.02
# 4 bob, a 529 with no tokens: an error, $0
# 5 carol a model no price matches: 700 tokens, cost unknown
LOG = (
    "\n".join(
        [
            line(
                "2026-01-01T10:00:00.000Z",
                "alice",
                "claude-sonnet-4-5-20250929",
                input_tokens=1000,
                output_tokens=2000,
                cache_read_tokens=10000,
                cache_creation_tokens=4000,
                ttfb_ms=100.0,
                duration_ms=1000.0,
            ),
            line(
                "2026-01-01T11:00:00.000Z",
                "alice",
                "gemini-2.5-flash",
                input_tokens=5000,
                output_tokens=1000,
                cache_read_tokens=1000,
                ttfb_ms=300.0,
                duration_ms=3000.0,
            ),
            line(
                "2026-01-02T09:00:00.000Z",
                "bob",
                "claude-opus-4-5-20251101",
                input_tokens=2000,
                output_tokens=400,
                ttfb_ms=200.0,
                duration_ms=2000.0,
            ),
            line(
                "2026-01-02T10:00:00.000Z",
                "bob",
                "claude-opus-4-5-20251101",
                status=529,
                error="upstream_overloaded",
                ttfb_ms=None,
                duration_ms=50.0,
            ),
            line(
                "2026-01-02T10:00:00.000Z", "carol", "llama-9", input_tokens=500, output_tokens=200
            ),
            "not json at all",
            '{"event":"access", broken',
            json.dumps({"ts": "2026-01-01T00:00:00.000Z", "event": "log", "message": "started"}),
            "[2026-01-01 00:00:00 +0000] [7] [INFO] Booting worker with pid: 7",
            "",
        ]
    )
    + "\n"
)
SKIPPED = 4  # the blank line is not counted


def run(tmp_path, *args: str, log: str = LOG, env: dict | None = None) -> str:
    path = tmp_path / "access.log"
    path.write_text(log)
    out = io.StringIO()
    assert report.main([*args, str(path)], environ=env or {}, now=NOW, out=out) == 0
    return out.getvalue()


def rows(tmp_path, by: str, *args: str) -> dict[str, dict]:
    document = json.loads(run(tmp_path, "--by", by, "--format", "json", *args))
    return {row["key"]: row for row in [*document["rows"], document["total"]]}


def test_by_client_costs_and_counts(tmp_path):
    got = rows(tmp_path, "client")
    assert got["alice"]["usd"] == pytest.approx(0.051 + 0.00373)
    assert got["alice"]["calls"] == 2 and got["alice"]["cache_write_tokens"] == 4000
    assert got["bob"]["usd"] == pytest.approx(0.02)
    assert (got["bob"]["calls"], got["bob"]["errors"]) == (2, 1)
    assert got["carol"]["usd"] is None and got["carol"]["unpriced_tokens"] == 700
    assert got["TOTAL"]["usd"] is None
    assert got["TOTAL"]["usd_priced"] == pytest.approx(0.07473)
    assert got["TOTAL"]["input_tokens"] == 1000 + 5000 + 2000 + 500


def test_by_model(tmp_path):
    got = rows(tmp_path, "model")
    assert got["claude-sonnet-4-5-20250929"]["usd"] == pytest.approx(0.051)
    assert got["gemini-2.5-flash"]["usd"] == pytest.approx(0.00373)
    assert got["claude-opus-4-5-20251101"]["usd"] == pytest.approx(0.02)
    assert got["llama-9"]["usd"] is None


def test_by_day_and_percentiles(tmp_path):
    got = rows(tmp_path, "day")
    assert set(got) == {"2026-01-01", "2026-01-02", "TOTAL"}
    assert got["2026-01-01"]["usd"] == pytest.approx(0.05473)
    # Nearest rank over 100, 300: p50 = 100, p95 = 300.
    assert (got["2026-01-01"]["ttfb_p50_ms"], got["2026-01-01"]["ttfb_p95_ms"]) == (100.0, 300.0)
    # Durations 1000, 3000, 2000, 50, 1000: sorted 50 1000 1000 2000 3000.
    assert got["TOTAL"]["duration_p50_ms"] == 1000.0
    assert got["TOTAL"]["duration_p95_ms"] == 3000.0


def test_malformed_and_foreign_lines_are_counted_and_skipped(tmp_path):
    document = json.loads(run(tmp_path, "--format", "json"))
    assert document["skipped_lines"] == SKIPPED
    assert document["total"]["calls"] == 5
    assert f"{SKIPPED} lines skipped" in run(tmp_path)


def test_table_shows_unknown_cost_and_the_plan(tmp_path):
    text = run(tmp_path, "--by", "client", env={"SHIM_SUBSCRIPTION_USD_MONTH": "200"})
    assert "$0.05" in text.splitlines()[1] and text.startswith("client")
    carol = next(row for row in text.splitlines() if row.startswith("carol"))
    assert carol.endswith("?") and "$" not in carol
    # 2026-01-01T10:00 to 2026-01-02T10:00 is one day: $0.07473 * 30 = $2.24.
    assert "API-equivalent $0.07+? over 1.0 days = $2.24 per 30 days+? vs plan $200.00" in text


def test_csv_has_a_row_per_group_and_the_total(tmp_path):
    table = list(csv.DictReader(io.StringIO(run(tmp_path, "--by", "client", "--format", "csv"))))
    assert [row["client"] for row in table] == ["alice", "bob", "carol", "TOTAL"]
    assert float(table[1]["usd"]) == pytest.approx(0.02)
    assert table[2]["usd"] == ""  # unknown, never a guess


def test_since_relative_and_date(tmp_path):
    # NOW is 2026-01-03T00:00Z: 24h keeps the lines of 2026-01-02.
    assert set(rows(tmp_path, "day", "--since", "24h")) == {"2026-01-02", "TOTAL"}
    assert set(rows(tmp_path, "day", "--since", "2026-01-02")) == {"2026-01-02", "TOTAL"}
    assert set(rows(tmp_path, "day", "--since", "7d")) == {"2026-01-01", "2026-01-02", "TOTAL"}


def test_since_rejects_nonsense(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, "--since", "yesterday")
    assert "--since" in capsys.readouterr().err


def test_gzip_rotated_logs_are_read_with_plain_ones(tmp_path):
    rotated = tmp_path / "access.log.1.gz"
    rotated.write_bytes(gzip.compress(LOG.encode()))
    out = io.StringIO()
    plain = tmp_path / "access.log"
    plain.write_text(LOG)
    args = ["--format", "json", str(rotated), str(plain)]
    assert report.main(args, environ={}, now=NOW, out=out) == 0
    assert json.loads(out.getvalue())["total"]["calls"] == 10


def test_gemini_long_prompt_uses_the_long_context_price(tmp_path):
    # 2.5 Pro above 200k prompt tokens: $2.50 in, $15 out -> 300000*2.5 + 1000*15 = 765000.
    log = (
        line(
            "2026-01-01T00:00:00.000Z",
            "a",
            "gemini-2.5-pro",
            input_tokens=300_000,
            output_tokens=1000,
        )
        + "\n"
    )
    assert rows(tmp_path, "model")  # the fixture log, for contrast
    document = json.loads(run(tmp_path, "--format", "json", log=log))
    assert document["total"]["usd"] == pytest.approx(0.765)


def test_price_file_override(tmp_path):
    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps(
            {
                "families": {
                    "llama": {
                        "input": 1,
                        "output": 2,
                        "cache_read": None,
                        "cache_write": None,
                        "as_of": "2026-01-01",
                        "source": "our own contract",
                    }
                }
            }
        )
    )
    got = rows(tmp_path, "client", "--since", "2026-01-01")
    assert got["carol"]["usd"] is None
    document = json.loads(
        run(tmp_path, "--by", "client", "--format", "json", env={"SHIM_PRICES_FILE": str(prices)})
    )
    carol = next(row for row in document["rows"] if row["key"] == "carol")
    assert carol["usd"] == pytest.approx((500 * 1 + 200 * 2) / 1e6)


def test_a_bad_price_file_stops_the_report_naming_the_variable(tmp_path, capsys):
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"families": {"llama": {"input": "cheap"}}}))
    out = io.StringIO()
    code = report.main(
        [str(tmp_path / "none.log")], environ={"SHIM_PRICES_FILE": str(prices)}, out=out
    )
    assert code == 2
    assert "SHIM_PRICES_FILE" in capsys.readouterr().err


def _json_report(result: report.Tally, by: str) -> str:
    table = report.price_data.table(None)
    return report.render_json(report.build(result, by, table))


@pytest.mark.parametrize("by", report.GROUPINGS)
def test_a_file_tallied_in_ranges_reports_exactly_as_one_pass(tmp_path, by):
    path = tmp_path / "access.log"
    path.write_text(LOG * 3 + LOG.rstrip("\n"))  # the last line without its newline
    name = str(path)
    table = report.price_data.table(None)
    whole = _json_report(report.tally(report._lines([name]), by, table), by)
    for parts in (1, 2, 3, 7):
        spans = report.ranges(name, parts)
        assert spans[0][0] == 0 and spans[-1][1] == path.stat().st_size
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        result = report.Tally()
        for start, end in spans:  # in this process, in order, as tally_file merges them
            result.merge(report.tally(report.range_lines(name, start, end), by, table))
        assert _json_report(result, by) == whole
    assert _json_report(report.tally_file(name, by, table, parts=2), by) == whole


def test_a_big_plain_file_is_read_in_parallel_with_the_same_output(tmp_path, monkeypatch):
    one_pass = run(tmp_path, "--by", "client", "--format", "json")
    monkeypatch.setattr(report, "SPLIT_AT", 1)
    monkeypatch.setattr(report.os, "cpu_count", lambda: 2)
    assert report._parallel(str(tmp_path / "access.log"))
    assert run(tmp_path, "--by", "client", "--format", "json") == one_pass
