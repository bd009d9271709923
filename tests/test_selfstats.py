"""shim.selfstats: a worker's greenlets, descriptors and memory, read from this process."""

from __future__ import annotations

import os

import greenlet
from prometheus_client import REGISTRY

from shim import selfstats


def gauge(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    assert value is not None, name
    return value


def test_a_paused_greenlet_counts_until_it_ends():
    parent = greenlet.getcurrent()  # this thread's main greenlet exists from here on
    before = selfstats.greenlets()
    paused = greenlet.greenlet(lambda: parent.switch("paused") and None)
    assert paused.switch() == "paused"
    assert selfstats.greenlets() == before + 1
    paused.switch()  # let it finish: a dead greenlet is not counted, even while referenced
    assert paused.dead
    assert selfstats.greenlets() == before


def test_open_descriptors_follow_opens_and_closes():
    before = selfstats.open_fds()
    read_end, write_end = os.pipe()
    try:
        assert selfstats.open_fds() == before + 2
    finally:
        os.close(read_end)
        os.close(write_end)
    assert selfstats.open_fds() == before


def test_refresh_sets_every_gauge():
    selfstats.refresh(handled=lambda: 42)
    assert gauge("shim_worker_greenlets") >= 1
    assert gauge("shim_worker_open_fds") >= 3  # stdin, stdout, stderr at least
    assert gauge("shim_worker_resident_memory_bytes") > 10 * 2**20
    assert gauge("shim_worker_requests") == 42
    assert 0 <= gauge("shim_worker_self_stats_seconds") < 5


def test_an_interval_of_zero_starts_nothing():
    assert selfstats.start(0) is None
