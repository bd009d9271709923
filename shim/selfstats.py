"""Each worker's own vital signs as gauges: live greenlets, open descriptors, resident memory.

A leak shows here before it shows anywhere else (issue #19): a stream that
never ends keeps a greenlet and two descriptors, a cache that only grows keeps
memory. Each worker refreshes the gauges from a greenlet of its own every
``SHIM_SELF_STATS_S`` (0: off), started by gunicorn.conf.py's
``post_worker_init``; nothing on the request path touches them.

The gauges are multiprocess ``liveall``: one sample per live worker, labelled
``pid``, and gunicorn.conf.py's ``child_exit`` removes a dead worker's file
(``mark_process_dead``), so a replaced worker's values disappear from the
scrape instead of lingering beside its successor's.

What it costs: counting greenlets walks every object the garbage collector
tracks (``gc.get_objects``), and under gevent that walk holds the worker's
loop. Measured on the 2-core box (``shim_worker_self_stats_seconds`` during
3,000 streams held open through 2 workers, ~1,500 each, when each stream still
had two greenlets; it has one since the hang-up watcher became a callback):
45-55 ms per refresh, against ~10 ms idle. So at the default, once a minute one
chunk of every open stream waits up to ~50 ms longer, and the walk costs under
0.1 % of a core. The gauge ``shim_worker_self_stats_seconds`` publishes each
refresh's own time, so the cost stays visible where it is paid. Reading
``/proc/self/fd`` and ``/proc/self/statm`` costs well under a millisecond.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable

from prometheus_client import Gauge

log = logging.getLogger("shim.selfstats")

GREENLETS = Gauge(
    "shim_worker_greenlets",
    "Greenlets alive in this worker (one per connection, plus a fixed few)",
    multiprocess_mode="liveall",
)
OPEN_FDS = Gauge(
    "shim_worker_open_fds",
    "Descriptors open in this worker (two per stream, plus listeners and pooled connections)",
    multiprocess_mode="liveall",
)
RESIDENT_BYTES = Gauge(
    "shim_worker_resident_memory_bytes",
    "Resident memory (RSS) of this worker",
    multiprocess_mode="liveall",
)
HANDLED = Gauge(
    "shim_worker_requests",
    "Requests this worker has handled since it started (gunicorn's count)",
    multiprocess_mode="liveall",
)
REFRESH_SECONDS = Gauge(
    "shim_worker_self_stats_seconds",
    "How long this worker's last self-stats refresh took (it walks the gc's objects)",
    multiprocess_mode="liveall",
)

_PAGE = os.sysconf("SC_PAGE_SIZE")

try:
    from greenlet import greenlet as _Greenlet
except ImportError:  # pragma: no cover - gevent (hence greenlet) is a runtime dependency
    _Greenlet = None


def greenlets() -> int:
    """Greenlets not yet dead (started or not) among the objects the gc tracks."""
    if _Greenlet is None:
        return 0
    return sum(1 for o in gc.get_objects() if isinstance(o, _Greenlet) and not o.dead)


def open_fds() -> int:
    """Descriptors open in this process, not counting the one listing them."""
    return len(os.listdir("/proc/self/fd")) - 1


def resident_bytes() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE


def refresh(handled: Callable[[], int] | None = None) -> None:
    """Set every gauge from this process now."""
    start = time.perf_counter()
    GREENLETS.set(greenlets())
    OPEN_FDS.set(open_fds())
    RESIDENT_BYTES.set(resident_bytes())
    if handled is not None:
        HANDLED.set(handled())
    REFRESH_SECONDS.set(time.perf_counter() - start)


def start(interval_s: float, handled: Callable[[], int] | None = None) -> threading.Thread | None:
    """Refresh now, then every ``interval_s`` from a daemon thread (a greenlet under gevent).

    Returns the thread, or None when ``interval_s`` is 0 (off).
    """
    if not interval_s:
        return None
    refresh(handled)

    def loop() -> None:
        while True:
            time.sleep(interval_s)
            try:
                refresh(handled)
            except OSError:
                # /proc unreadable (EMFILE at the limit, say): skip one round, say so.
                log.warning("self-stats refresh failed", extra={"event": "self_stats_failed"})

    thread = threading.Thread(target=loop, name="self-stats", daemon=True)
    thread.start()
    return thread
