"""The status page on the metrics listener, live: real gunicorn, real calls, a real browser.

Two named clients call both ports (JSON and SSE, compressed too, one upstream
error, quota headers); the page fetched over HTTP must show what a person
reads: both clients, both models, the upstream's token counts, the quota
bars, the key pool. Then headless Chromium renders it for a phone-sized
screenshot (``docs/status-page.png``).
"""

from __future__ import annotations

import hashlib
import html
import http.client
import io
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from shim import report
from shim.secret_files import key_id
from shim.status import quantile
from tests.conftest import ALL_SECRETS, ROOT, start_gateway
from tests.fake_upstream import FAKE_API_KEY, FAKE_GEMINI_KEYS

SECRETS = {name: f"{name}-status-{uuid.uuid4().hex}" for name in ("alice", "bob")}
CLAUDE, GEMINI = "claude-status-page", "gemini-status-page"
# client -> (input, output) tokens the fake upstream reports for each of that client's calls
TOKENS = {"alice": (200_000, 20_000), "bob": (300, 7)}
# Prices for the test's Claude model only (SHIM_PRICES_FILE); its Gemini model has none.
PRICES = {"families": {"claude-status": {"input": 3.0, "output": 15.0, "cache_read": 0.3,
                                         "cache_write": 3.75, "as_of": "2026-12-01",
                                         "source": "test"}}}
CALLS = (  # (port, stream, coding)
    ("anthropic", False, None), ("anthropic", True, "gzip"),
    ("gemini", False, "br"), ("gemini", True, None),
)
RESET_5H, RESET_7D = int(time.time()) + 2 * 3600, int(time.time()) + 4 * 86400
QUOTA = {"status": "allowed_warning", "5h-utilization": "0.42", "7d-utilization": "0.91",
         "5h-reset": str(RESET_5H), "7d-reset": str(RESET_7D),
         "representative-claim": "seven_day"}


def call(gateway, client: str, provider: str, stream: bool, coding: str | None,
         **extra: str) -> int:
    tokens = TOKENS[client]
    headers = {"content-type": "application/json", "x-fake-input-tokens": str(tokens[0]),
               "x-fake-output-tokens": str(tokens[1]), **extra}
    if coding:
        headers |= {"accept-encoding": coding, "x-fake-encoding": coding}
    if provider == "anthropic":
        headers["x-api-key"] = SECRETS[client]
        path = "/v1/messages"
        body = {"model": CLAUDE, "max_tokens": 16, "stream": stream,
                "messages": [{"role": "user", "content": "hi"}]}
    else:
        headers["x-goog-api-key"] = SECRETS[client]
        action = ":streamGenerateContent?alt=sse" if stream else ":generateContent"
        path = f"/v1beta/models/{GEMINI}{action}"
        body = {"contents": [{"parts": [{"text": "hi"}]}]}
    conn = gateway.connection(provider, timeout=20)
    try:
        conn.request("POST", path, json.dumps(body), headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def get(gateway, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.metrics_port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("content-type", ""), response.read().decode()
    finally:
        conn.close()


def text_of(page: str) -> str:
    """What a person reads: tags dropped, entities decoded, whitespace squeezed."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


@pytest.fixture(scope="module")
def gw(fake_upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("status")
    clients = tmp / "clients.txt"
    clients.write_text("".join(f"{name} {hashlib.sha256(secret.encode()).hexdigest()}\n"
                               for name, secret in SECRETS.items()))
    prices = tmp / "prices.json"
    prices.write_text(json.dumps(PRICES))
    gateway = start_gateway({
        "SHIM_PRICES_FILE": str(prices),
        "SHIM_SUBSCRIPTION_USD_MONTH": "200",
        "SHIM_CLIENTS_FILE": str(clients),
        "SHIM_SHARED_SECRET": "",
        "SHIM_ANTHROPIC_API_KEY": FAKE_API_KEY,
        "SHIM_GEMINI_KEYS": ",".join(FAKE_GEMINI_KEYS),
        "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
        "SHIM_GEMINI_UPSTREAM": fake_upstream.url,
        "SHIM_WORKERS": "2",
    }, tmp / "gunicorn.log")
    gateway.prices_path = prices
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def page(gw):
    """The page after both clients called both ports, and the number of calls made."""
    made = 0
    for client in SECRETS:
        for provider, stream, coding in CALLS:
            assert call(gw, client, provider, stream, coding) == 200
            made += 1
    quota = json.dumps(QUOTA)
    assert call(gw, "alice", "anthropic", False, None, **{"x-fake-quota-headers": quota}) == 200
    assert call(gw, "bob", "gemini", False, None, **{"x-fake-scenario": "error:500"}) == 500
    made += 2
    # Metrics are fed just after each access line: wait until every call is counted.
    deadline = time.monotonic() + 5
    while True:
        status, content_type, body = get(gw, "/status")
        counted = re.search(r"<td>calls</td><td>([\d,]+)</td>", body)
        if counted and int(counted.group(1).replace(",", "")) == made:
            break
        assert time.monotonic() < deadline, f"calls never reached {made}:\n{body}"
        time.sleep(0.1)
    assert status == 200
    assert content_type.startswith("text/html")
    return body


def row(page: str, *first: str) -> list[str]:
    """The cells of the table row whose first cells read ``first``."""
    for tr in re.findall(r"<tr>(.*?)</tr>", page):
        cells = [text_of(c).strip() for c in re.findall(r"<td>(.*?)</td>", tr)]
        if cells[: len(first)] == list(first):
            return cells
    raise AssertionError(f"no row {first}")


def test_status_page_is_served_on_root_and_status_and_metrics_is_unchanged(gw, page):
    assert get(gw, "/")[0] == 200 and "shim status" in get(gw, "/")[2]
    status, content_type, body = get(gw, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert "shim_client_model_requests_total" in body


def test_status_page_is_one_self_contained_page_for_a_phone(page):
    assert '<meta http-equiv="refresh" content="5">' in page
    assert 'name="viewport"' in page
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)


def test_each_client_and_model_shows_its_calls_and_the_upstreams_token_counts(page):
    for client, (input_tokens, output_tokens) in TOKENS.items():
        for model in (CLAUDE, GEMINI):
            cells = row(page, client, model)
            # One extra call each: alice's with quota headers, bob's upstream 500.
            extra = (client, model) in {("alice", CLAUDE), ("bob", GEMINI)}
            calls = 2 + extra
            errors = 1 if (client, model) == ("bob", GEMINI) else 0
            ok_calls = calls - errors
            assert cells[2:4] == [str(calls), str(errors)], cells
            assert cells[4:6] == [f"{input_tokens * ok_calls:,}", f"{output_tokens * ok_calls:,}"]


def test_the_api_equivalent_cost_is_shown_beside_the_plan_and_never_guessed(page):
    # alice's 3 Claude calls: 600,000 input x $3/M + 60,000 output x $15/M = $1.80 + $0.90.
    assert row(page, "alice", CLAUDE)[-1] == "$2.70"
    # No price covers the Gemini model: unknown, not estimated.
    assert row(page, "alice", GEMINI)[-1] == "?"
    assert re.search(r"API-equivalent cost since start: <b>\$2\.70\+\?</b> · plan \$200\.00",
                     page)


def test_the_report_gives_the_same_numbers_as_the_page_for_the_same_calls(gw, page):
    out = io.StringIO()
    code = report.main(["--by", "client", "--format", "json", str(gw.log_path)],
                       environ={"SHIM_PRICES_FILE": str(gw.prices_path)}, out=out)
    assert code == 0
    rows = {row["key"]: row for row in json.loads(out.getvalue())["rows"]}
    for client in SECRETS:
        cells = [row(page, client, model) for model in (CLAUDE, GEMINI)]
        as_int = lambda text: int(text.replace(",", ""))  # noqa: E731
        assert rows[client]["calls"] == sum(as_int(c[2]) for c in cells)
        assert rows[client]["errors"] == sum(as_int(c[3]) for c in cells)
        assert rows[client]["input_tokens"] == sum(as_int(c[4]) for c in cells)
        assert rows[client]["output_tokens"] == sum(as_int(c[5]) for c in cells)
    # The priced part of alice's cost, on the page and in the report: the Claude row.
    assert f"${rows['alice']['usd_priced']:,.2f}" == row(page, "alice", CLAUDE)[-1] == "$2.70"


def test_latency_per_model_and_errors_by_kind_are_shown(page):
    for model in (CLAUDE, GEMINI):
        cells = row(page, model)
        assert all(re.fullmatch(r"\d+ ms|[\d.]+ s", c) for c in cells[2:]), cells
    assert row(page, "answered 5xx")[1] == "1"
    assert "interpolated within histogram buckets" in text_of(page)


def test_quota_bars_show_use_resets_and_the_binding_window(page):
    text = text_of(page)
    assert "status allowed_warning" in text
    assert "binding window seven_day" in text
    assert "5h window: 42% used" in text and "7d window: 91% used" in text
    assert 'style="width:42.0%"' in page and 'class="fill warn" style="width:91.0%"' in page
    assert time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(RESET_7D)) in text


def test_gemini_key_pool_counts_are_shown(page):
    assert f"available {len(FAKE_GEMINI_KEYS)}" in text_of(page)
    assert "cooling 0" in text_of(page)


def test_each_gemini_key_is_shown_by_its_id_and_state_never_the_key(page):
    for key in FAKE_GEMINI_KEYS:
        assert row(page, key_id(key))[1] == "available"
        assert key not in page


def test_a_benched_key_shows_cooling_until_when_and_a_model_bench_its_model(gw, page):
    """Benches keys for the rest of the module: the screenshot below shows them."""
    whole, model = key_id(FAKE_GEMINI_KEYS[0]), key_id(FAKE_GEMINI_KEYS[1])
    deadline = time.monotonic() + 10
    while True:
        call(gw, "alice", "gemini", False, None, **{
            "x-fake-limited-keys": "0", "x-fake-retry-delay": "600s",
            "x-fake-quota": "GenerateRequestsPerDayPerProject-FreeTier"})
        call(gw, "alice", "gemini", False, None, **{
            "x-fake-limited-keys": "1", "x-fake-retry-delay": "600s"})
        body = get(gw, "/status")[2]
        cooling, benched = row(body, whole), row(body, model)
        if cooling[1] == "cooling" and GEMINI in benched[3]:
            break
        assert time.monotonic() < deadline, body
    assert re.fullmatch(r"until \d{4}-\d\d-\d\d \d\d:\d\d UTC \(in \d+h \d\dm\)", cooling[2])
    assert benched[1] == "available" and benched[3].startswith(f"{GEMINI} until ")
    for key in FAKE_GEMINI_KEYS:
        assert key not in body


def test_no_secret_key_or_token_is_on_the_page(page):
    for secret in (*ALL_SECRETS, *SECRETS.values()):
        assert secret not in page
        assert hashlib.sha256(secret.encode()).hexdigest() not in page


def test_a_real_browser_renders_the_page_for_a_phone(gw, page, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing (scripts/test installs Debian's package)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    shot = tmp_path / "status-page.png"
    subprocess.run(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=420,1200", f"http://127.0.0.1:{gw.metrics_port}/status"],
        check=True, capture_output=True, timeout=60,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000
    docs = Path(ROOT) / "docs"
    docs.mkdir(exist_ok=True)
    shutil.copyfile(shot, docs / "status-page.png")


@pytest.mark.parametrize(("buckets", "q", "expected"), [
    ({0.1: 0, 0.5: 10, float("inf"): 10}, 0.5, 0.3),  # halfway into the (0.1, 0.5] bucket
    ({0.1: 5, 0.5: 10, float("inf"): 10}, 0.5, 0.1),  # exactly the first bucket's bound
    ({0.1: 0, 0.5: 0, float("inf"): 4}, 0.95, 0.5),  # past the last bound: that bound
    ({0.1: 0, float("inf"): 0}, 0.5, None),  # nothing observed
])
def test_percentiles_are_interpolated_within_the_bucket(buckets, q, expected):
    found = quantile(buckets, q)
    assert found is None if expected is None else found == pytest.approx(expected)
