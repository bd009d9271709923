"""What one render of the status page costs with 50 models and 100 clients (issue #17).

    .venv/bin/python bench/status_page.py

In process: 100 clients × 50 models of finished calls are fed through
``shim.metrics.observe`` (this process's registry, so no multiprocess files),
then the page is rendered from ``metrics.families`` as the metrics listener
does. Prints the collect and the render time separately, and the page's size.
The page is served on the loopback metrics port, never on the API ports.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shim import metrics, status  # noqa: E402
from shim.access import AccessRecord  # noqa: E402
from shim.prices import table  # noqa: E402

CLIENTS, MODELS, ROUNDS = 100, 50, 20


def feed() -> None:
    for c in range(CLIENTS):
        for m in range(MODELS):
            record = AccessRecord(f"r{c}-{m}", "anthropic", "POST")
            record.client, record.model = f"client-{c:03d}", f"claude-m{m:02d}"
            record.route = "/v1/messages"
            record.status, record.upstream_status = 200, 200
            record.input_tokens, record.output_tokens = 1000 + m, 100 + c
            record.stream, record.ttfb = bool(m % 2), 0.05
            metrics.observe(record, {"duration_ms": 400.0 + m})


def main() -> None:
    feed()
    prices, rates = table(), status.Rates()
    collect = render = 0.0
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        families = metrics.families(None)
        t1 = time.perf_counter()
        html = status.render(families, rates, prices=prices, plan_usd=200.0)
        t2 = time.perf_counter()
        collect += t1 - t0
        render += t2 - t1
    print(f"status page, {CLIENTS} clients x {MODELS} models ({CLIENTS * MODELS} rows), "
          f"mean of {ROUNDS} renders")
    print(f"  collect the metric families : {collect / ROUNDS * 1000:8.1f} ms")
    print(f"  render the page             : {render / ROUNDS * 1000:8.1f} ms")
    print(f"  page size                   : {len(html) / 1024:8.1f} KiB")


if __name__ == "__main__":
    main()
