"""A cost and usage report from shim's access lines (issue #17, item 2).

    python -m shim.report [--since 24h|7d|DATE] [--by client|model|day]
                          [--format table|csv|json] [FILE ...]

Reads JSON access lines (``event: "access"``, see shim.access) from the files, ``*.gz``
included, or from stdin, in one pass, and prints per group: calls, errors, tokens by kind,
TTFB and duration p50/p95 and the API-equivalent USD at list prices (shim.prices).
Any other line (not JSON, another event, gunicorn's) is counted and skipped.

Decisions, so the numbers can be read right:
- Percentiles are exact (nearest rank): 16 bytes a call kept in memory, ~50 MB for a
  3M-line month. Fine up to well past a gigabyte of log.
- A cost is never guessed: tokens of a model no price matches, or of a kind its price
  lacks (Gemini cache writes), are counted as unpriced, and that group's USD shows "?"
  (nothing priced) or "$x+?" (x plus an unknown amount); JSON gives usd null then.
- The plan comparison projects the window's cost to 30 days: window = --since (or the
  first line) to the last line read. Calendar months are not used, so "last 7 days"
  and "whole log" answer the same question: what would this rate cost a month by API.
- Errors: lines with status >= 400 or an error set.
- Speed: a plain file of 16 MB or more is cut at line boundaries into one byte range per
  core, tallied in forked processes and merged in file order (exact: the raw values are
  merged, groups and token slots keep first-seen order), so the output is the same as one
  pass. Stdin and *.gz are read in this process. ~300k lines/s on 2 cores (bench/report.py).

Not here: the prices themselves (shim.prices), reading settings (shim.settings).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import io
import math
import os
import re
import sys
from array import array
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import IO, Any

import orjson

from shim import prices as price_data
from shim.settings import ConfigError, report_settings

# A cheap prefilter before parsing: every access line holds it, however its JSON is spaced.
ACCESS = b'"access"'
GROUPINGS = ("client", "model", "day")
FORMATS = ("table", "csv", "json")
NONE_KEY = "(none)"
_RELATIVE = re.compile(r"(\d+)\s*([mhdw])")
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_TS = "%Y-%m-%dT%H:%M:%S"


class Group:
    """What one group's calls add up to; tokens kept by model and tier so they can be priced."""

    __slots__ = ("calls", "errors", "ttfb", "duration", "tokens")

    def __init__(self) -> None:
        self.calls = self.errors = 0
        self.ttfb = array("d")
        self.duration = array("d")
        # (model, long_context) -> [input, output, cache_read, cache_write]
        self.tokens: dict[tuple[str | None, bool], list[int]] = {}

    def merge(self, other: Group) -> None:
        self.calls += other.calls
        self.errors += other.errors
        self.ttfb.extend(other.ttfb)
        self.duration.extend(other.duration)
        for key, counts in other.tokens.items():
            mine = self.tokens.setdefault(key, [0, 0, 0, 0])
            for i, n in enumerate(counts):
                mine[i] += n


@dataclass
class Tally:
    """Everything one pass over the log found."""

    groups: dict[str, Group] = field(default_factory=dict)
    skipped: int = 0  # not JSON, not an access line, or a field of the wrong type
    before: int = 0  # access lines older than --since
    first: str | None = None
    last: str | None = None

    def merge(self, other: Tally) -> None:
        """Add a later part of the log: groups and token slots keep first-seen order."""
        for key, group in other.groups.items():
            mine = self.groups.get(key)
            if mine is None:
                self.groups[key] = group
            else:
                mine.merge(group)
        self.skipped += other.skipped
        self.before += other.before
        if other.first is not None and (self.first is None or other.first < self.first):
            self.first = other.first
        if other.last is not None and (self.last is None or other.last > self.last):
            self.last = other.last


_NUMBERS = (int, float)
_UNSEEN = object()


def tally(
    lines: Iterable[bytes],
    by: str,
    table: price_data.PriceTable,
    since: str | None = None,
    into: Tally | None = None,
) -> Tally:
    """Read access lines once; ``since`` is a timestamp string in the access line's form."""
    result = into or Tally()
    groups = result.groups
    skipped = before = 0
    # Compared as strings (the access line's ts sorts as text): no date parsing per line.
    first, last = result.first or "\uffff", result.last or ""
    long_at: dict[str | None, int | None] = {}  # model -> long-context threshold (None: none)
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    for line in lines:
        if ACCESS not in line:
            if line.strip():
                skipped += 1
            continue
        try:
            entry = loads(line)
        except decode_error:
            skipped += 1
            continue
        if type(entry) is not dict or entry.get("event") != "access":
            skipped += 1
            continue
        ts = entry.get("ts")
        if type(ts) is not str:
            skipped += 1
            continue
        if since is not None and ts < since:
            before += 1
            continue
        get = entry.get
        inp = get("input_tokens") or 0
        out = get("output_tokens") or 0
        read = get("cache_read_tokens") or 0
        write = get("cache_creation_tokens") or 0
        if (
            type(inp) is not int
            or type(out) is not int
            or type(read) is not int
            or (type(write) is not int)
        ):
            skipped += 1
            continue
        key = ts[:10] if by == "day" else get(by)
        if type(key) is not str:
            key = NONE_KEY if key is None else str(key)
        group = groups.get(key)
        if group is None:
            group = groups[key] = Group()
        if ts > last:
            last = ts
        if ts < first:
            first = ts
        group.calls += 1
        status = get("status")
        if get("error") or (type(status) is int and status >= 400):
            group.errors += 1
        ttfb = get("ttfb_ms")
        if type(ttfb) in _NUMBERS:
            group.ttfb.append(ttfb)
        duration = get("duration_ms")
        if type(duration) in _NUMBERS:
            group.duration.append(duration)
        if inp or out or read or write:
            model = get("model")
            if type(model) is not str:
                model = None
            threshold = long_at.get(model, _UNSEEN)
            if threshold is _UNSEEN:
                price = table.find(model)
                tier = price.long_context if price else None
                threshold = long_at[model] = tier.above_input_tokens if tier else None
            slot = (model, threshold is not None and inp > threshold)
            mine = group.tokens.get(slot)
            if mine is None:
                group.tokens[slot] = [inp, out, read, write]
            else:
                mine[0] += inp
                mine[1] += out
                mine[2] += read
                mine[3] += write
    result.skipped += skipped
    result.before += before
    if last:
        result.first, result.last = min(first, last), last
    return result


# --- pricing and summing up ------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    key: str
    calls: int
    errors: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    ttfb_p50_ms: float | None
    ttfb_p95_ms: float | None
    duration_p50_ms: float | None
    duration_p95_ms: float | None
    usd_priced: float  # what the priced tokens cost
    unpriced_tokens: int  # tokens no price covers: their cost is unknown

    @property
    def usd(self) -> float | None:
        """The cost, or None when some of it is unknown."""
        return None if self.unpriced_tokens else round(self.usd_priced, 6)


def percentile(values: array | list[float], p: float, ordered: bool = False) -> float | None:
    """Nearest-rank percentile of values (exact); ``ordered``: they are sorted already."""
    if not values:
        return None
    if not ordered:
        values = sorted(values)
    return values[max(0, math.ceil(p * len(values)) - 1)]


def cost(
    tokens: dict[tuple[str | None, bool], list[int]], table: price_data.PriceTable
) -> tuple[float, int]:
    """(USD of what a price covers, tokens none covers)."""
    usd, unpriced = 0.0, 0
    for (model, long), (inp, out, read, write) in tokens.items():
        price = table.find(model)
        if price is None:
            unpriced += inp + out + read + write
            continue
        rates = price.long_context if long and price.long_context else price
        if price.input_includes_cache_read:  # Gemini: the prompt count includes the cache
            inp = max(inp - read, 0)
        for n, rate in (
            (inp, rates.input),
            (out, rates.output),
            (read, rates.cache_read),
            (write, price.cache_write),
        ):
            if n and rate is None:
                unpriced += n
            elif n:
                usd += n * rate / 1_000_000
    return usd, unpriced


def summarize(
    key: str,
    group: Group,
    table: price_data.PriceTable,
    ttfb: list[float] | None = None,
    duration: list[float] | None = None,
) -> Row:
    """One row; ``ttfb`` and ``duration``: the group's values sorted, when already at hand."""
    ttfb = sorted(group.ttfb) if ttfb is None else ttfb
    duration = sorted(group.duration) if duration is None else duration
    sums = [0, 0, 0, 0]
    for counts in group.tokens.values():
        for i, n in enumerate(counts):
            sums[i] += n
    usd, unpriced = cost(group.tokens, table)
    return Row(
        key,
        group.calls,
        group.errors,
        *sums,
        percentile(ttfb, 0.50, ordered=True),
        percentile(ttfb, 0.95, ordered=True),
        percentile(duration, 0.50, ordered=True),
        percentile(duration, 0.95, ordered=True),
        usd,
        unpriced,
    )


@dataclass(frozen=True)
class Report:
    by: str
    rows: list[Row]
    total: Row
    skipped: int
    before: int
    start: str | None  # the window: --since, or the first line read
    end: str | None  # the last line read
    plan_usd_month: float | None

    @property
    def days(self) -> float | None:
        if not self.start or not self.end:
            return None
        return max((_parse_ts(self.end) - _parse_ts(self.start)).total_seconds(), 0) / 86400

    @property
    def usd_per_30_days(self) -> float | None:
        """The window's priced cost at the same rate for 30 days; None under an hour."""
        days = self.days
        if days is None or days < 1 / 24:
            return None
        return round(self.total.usd_priced * 30 / days, 2)


def build(
    result: Tally,
    by: str,
    table: price_data.PriceTable,
    since: str | None = None,
    plan_usd_month: float | None = None,
) -> Report:
    rows = []
    all_ttfb: list[float] = []
    all_duration: list[float] = []
    everything = Group()
    for key, group in sorted(result.groups.items()):
        ttfb, duration = sorted(group.ttfb), sorted(group.duration)
        rows.append(summarize(key, group, table, ttfb, duration))
        all_ttfb += ttfb
        all_duration += duration
    for group in result.groups.values():  # the tokens in first-seen order, as they were read
        everything.calls += group.calls
        everything.errors += group.errors
        for slot, counts in group.tokens.items():
            mine = everything.tokens.setdefault(slot, [0, 0, 0, 0])
            for i, n in enumerate(counts):
                mine[i] += n
    # Sorted runs, one a group: sorting them whole is a merge, far cheaper than a sort.
    all_ttfb.sort()
    all_duration.sort()
    return Report(
        by,
        rows,
        summarize("TOTAL", everything, table, all_ttfb, all_duration),
        result.skipped,
        result.before,
        since or result.first,
        result.last,
        plan_usd_month,
    )


# --- output ----------------------------------------------------------------------------------


def _usd(row: Row) -> str:
    if row.unpriced_tokens and not row.usd_priced:
        return "?"
    text = f"${row.usd_priced:,.2f}"
    return text + "+?" if row.unpriced_tokens else text


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def summary_line(report: Report) -> str:
    """The month line: the window's API-equivalent cost, per 30 days, against the plan."""
    total = report.total
    cost_text = _usd(total)
    days = report.days
    if days is None:
        return "no access lines in the window"
    text = f"API-equivalent {cost_text} over {days:.1f} days"
    projected = report.usd_per_30_days
    if projected is None:
        text += " (under an hour: not projected to a month)"
    else:
        text += f" = ${projected:,.2f} per 30 days" + ("+?" if total.unpriced_tokens else "")
    if report.plan_usd_month is not None:
        text += f" vs plan ${report.plan_usd_month:,.2f}"
    return text


COLUMNS = (
    "calls",
    "errors",
    "input",
    "output",
    "cache_read",
    "cache_write",
    "ttfb_p50",
    "ttfb_p95",
    "dur_p50",
    "dur_p95",
    "usd",
)


def _cells(row: Row) -> list[str]:
    return [
        f"{row.calls:,}",
        f"{row.errors:,}",
        f"{row.input_tokens:,}",
        f"{row.output_tokens:,}",
        f"{row.cache_read_tokens:,}",
        f"{row.cache_write_tokens:,}",
        _ms(row.ttfb_p50_ms),
        _ms(row.ttfb_p95_ms),
        _ms(row.duration_p50_ms),
        _ms(row.duration_p95_ms),
        _usd(row),
    ]


def render_table(report: Report) -> str:
    header = [report.by, *COLUMNS]
    body = [[row.key, *_cells(row)] for row in (*report.rows, report.total)]
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join((first, *rest)).rstrip()

    out = [line(header), *(line(cells) for cells in body[:-1])]
    out += ["-" * len(out[0]), line(body[-1]), "", summary_line(report)]
    out.append(f"times in ms; {report.skipped} lines skipped (not access lines)")
    return "\n".join(out) + "\n"


def _fields(row: Row) -> dict[str, Any]:
    return {
        "key": row.key,
        "calls": row.calls,
        "errors": row.errors,
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "cache_read_tokens": row.cache_read_tokens,
        "cache_write_tokens": row.cache_write_tokens,
        "ttfb_p50_ms": row.ttfb_p50_ms,
        "ttfb_p95_ms": row.ttfb_p95_ms,
        "duration_p50_ms": row.duration_p50_ms,
        "duration_p95_ms": row.duration_p95_ms,
        "usd": row.usd,
        "usd_priced": round(row.usd_priced, 6),
        "unpriced_tokens": row.unpriced_tokens,
    }


def render_csv(report: Report) -> str:
    out = io.StringIO()
    rows = [_fields(row) for row in (*report.rows, report.total)]
    writer = csv.DictWriter(out, fieldnames=[report.by, *list(rows[0])[1:]], lineterminator="\n")
    writer.writeheader()
    for fields in rows:
        fields[report.by] = fields.pop("key")
        writer.writerow({k: "" if v is None else v for k, v in fields.items()})
    return out.getvalue()


def render_json(report: Report) -> str:
    document = {
        "by": report.by,
        "window": {"from": report.start, "to": report.end, "days": report.days},
        "rows": [_fields(row) for row in report.rows],
        "total": _fields(report.total),
        "usd_per_30_days": report.usd_per_30_days,
        "plan_usd_month": report.plan_usd_month,
        "skipped_lines": report.skipped,
        "lines_before_since": report.before,
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n"


RENDER = {"table": render_table, "csv": render_csv, "json": render_json}


# --- the command -----------------------------------------------------------------------------


def _parse_ts(ts: str) -> dt.datetime:
    return dt.datetime.strptime(ts[:19], _TS).replace(tzinfo=dt.UTC)


def since_cutoff(raw: str, now: dt.datetime) -> str:
    """--since as the access line's timestamp form: 24h, 7d, 30m, 2w, a date or a UTC time."""
    value = raw.strip()
    relative = _RELATIVE.fullmatch(value)
    if relative:
        moment = now - dt.timedelta(seconds=int(relative[1]) * _UNITS[relative[2]])
    else:
        try:
            moment = dt.datetime.fromisoformat(value.removesuffix("Z"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected 24h, 7d, 30m, 2w, a date YYYY-MM-DD or a UTC time, got {raw!r}"
            ) from None
        if moment.tzinfo is not None:
            moment = moment.astimezone(dt.UTC)
    return moment.strftime(_TS) + ".000Z"


# A plain file at least this big is read in parallel byte ranges, one process per core.
SPLIT_AT = 16 << 20


def ranges(name: str, parts: int) -> list[tuple[int, int]]:
    """Up to ``parts`` byte ranges of the file covering it whole, each cut after a newline."""
    size = os.path.getsize(name)
    cuts = [0]
    with open(name, "rb") as stream:
        for k in range(1, parts):
            at = max(size * k // parts, cuts[-1])
            if at >= size:
                break
            stream.seek(at)
            stream.readline()  # on to the start of the next line
            at = stream.tell()
            if at >= size:
                break
            if at > cuts[-1]:
                cuts.append(at)
    cuts.append(size)
    return list(zip(cuts, cuts[1:], strict=False))


def range_lines(name: str, start: int, end: int) -> Iterator[bytes]:
    """The lines in bytes [start, end) of a file; ``end`` is a line's start or the file's end."""
    with open(name, "rb", buffering=1 << 20) as stream:
        stream.seek(start)
        left = end - start
        for line in stream:
            yield line
            left -= len(line)
            if left <= 0:
                break


def _tally_range(
    name: str, start: int, end: int, by: str, table: price_data.PriceTable, since: str | None
) -> Tally:
    return tally(range_lines(name, start, end), by, table, since)


def tally_file(
    name: str,
    by: str,
    table: price_data.PriceTable,
    since: str | None = None,
    parts: int | None = None,
) -> Tally:
    """One plain file, its ranges tallied in parallel (forked processes) and merged in order."""
    spans = ranges(name, parts or os.cpu_count() or 1)
    if len(spans) == 1:
        return _tally_range(name, *spans[0], by, table, since)
    with ProcessPoolExecutor(len(spans) - 1, mp_context=get_context("fork")) as pool:
        later = [pool.submit(_tally_range, name, *span, by, table, since) for span in spans[1:]]
        result = _tally_range(name, *spans[0], by, table, since)  # this process reads the first
        for future in later:
            result.merge(future.result())
    return result


def _parallel(name: str) -> bool:
    if name == "-" or name.endswith(".gz") or (os.cpu_count() or 1) < 2:
        return False
    try:
        return os.path.getsize(name) >= SPLIT_AT
    except OSError:
        return False


def tally_files(
    names: list[str], by: str, table: price_data.PriceTable, since: str | None = None
) -> Tally:
    """All the files in order: big plain ones in parallel ranges, the rest (stdin, .gz) read
    in this process; the same Tally as one pass over them all."""
    result = Tally()
    for name in names or ["-"]:
        if _parallel(name):
            result.merge(tally_file(name, by, table, since))
        else:
            result.merge(tally(_lines([name]), by, table, since))
    return result


def _open(name: str) -> IO[bytes]:
    if name == "-":
        return sys.stdin.buffer
    if name.endswith(".gz"):
        return io.BufferedReader(gzip.open(name, "rb"), buffer_size=1 << 20)
    return open(name, "rb", buffering=1 << 20)  # noqa: SIM115 - closed by _lines


def _lines(names: list[str]) -> Iterator[bytes]:
    for name in names or ["-"]:
        stream = _open(name)
        try:
            yield from stream
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        prog="python -m shim.report",
        description="Cost and usage from shim's access lines (files, *.gz, or stdin).",
        epilog="Settings: SHIM_PRICES_FILE (price overrides), SHIM_SUBSCRIPTION_USD_MONTH.",
    )
    cli.add_argument("--since", help="24h, 7d, 30m, 2w, YYYY-MM-DD or a UTC time")
    cli.add_argument("--by", choices=GROUPINGS, default="model")
    cli.add_argument("--format", choices=FORMATS, default="table")
    cli.add_argument("files", nargs="*", metavar="FILE", help="access logs; - or none: stdin")
    return cli


def main(
    argv: list[str] | None = None,
    environ: dict[str, str] | None = None,
    now: dt.datetime | None = None,
    out: IO[str] | None = None,
) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    out = out or sys.stdout
    try:
        since = None
        if args.since:
            since = since_cutoff(args.since, now or dt.datetime.now(dt.UTC))
    except argparse.ArgumentTypeError as exc:
        cli.error(f"--since: {exc}")
    try:
        settings = report_settings(environ)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    table = price_data.table(settings["prices_file"])
    try:
        result = tally_files(args.files, args.by, table, since)
    except (OSError, EOFError) as exc:  # EOFError: a .gz cut short
        sys.stderr.write(f"cannot read {getattr(exc, 'filename', None)!r}: {exc}\n")
        return 2
    report = build(result, args.by, table, since, settings["subscription_usd_month"])
    out.write(RENDER[args.format](report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
