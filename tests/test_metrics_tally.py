"""The per-client/model metrics are summed in memory and written once a second (shim.metrics).

The flush writes a histogram's sum and buckets directly (one write per bucket
used, not two per observation); this checks that the result is exactly what
``Histogram.observe`` would have written, so a prometheus-client upgrade that
changes those internals fails here.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from shim import metrics

VALUES = [0.0004, 0.05, 0.05, 0.3, 2.0, 7.5, 1e9, 0.1]


def samples(registry: CollectorRegistry, name: str) -> dict:
    return {
        (s.name.replace(name + "_b", "b"), tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_a_flushed_tally_writes_what_histogram_observe_would():
    direct_registry, tally_registry = CollectorRegistry(), CollectorRegistry()
    buckets = (0.001, 0.01, 0.1, 1.0, 5.0, float("inf"))
    direct = Histogram("h_direct", "d", ["model"], buckets=buckets, registry=direct_registry)
    tallied = Histogram("h_tally", "t", ["model"], buckets=buckets, registry=tally_registry)
    tally = metrics._Tally()
    for value in VALUES:
        direct.labels("m").observe(value)
        tally.add([], [(tallied, value, "m")])
    assert samples(tally_registry, "h_tally") == {}  # nothing written before the flush
    tally.flush()
    got = {(k[0].replace("h_tally", "h"), k[1]): v for k, v in samples(tally_registry,
                                                                      "h_tally").items()}
    want = {(k[0].replace("h_direct", "h"), k[1]): v for k, v in samples(direct_registry,
                                                                        "h_direct").items()}
    assert got == want


def test_counter_increments_are_summed_and_written_once_by_the_flush():
    registry = CollectorRegistry()
    counter = Counter("c_tally", "c", ["client", "model"], registry=registry)
    tally = metrics._Tally()
    for amount in (1, 2, 3):
        tally.add([(counter, amount, "alice", "m")])
    tally.add([(counter, 5, "bob", "m")])
    tally.flush()
    values = {tuple(s.labels.values()): s.value for f in registry.collect() for s in f.samples
              if s.name == "c_tally_total"}
    assert values == {("alice", "m"): 6, ("bob", "m"): 5}
    tally.flush()  # an empty flush writes nothing more
    values = {tuple(s.labels.values()): s.value for f in registry.collect() for s in f.samples
              if s.name == "c_tally_total"}
    assert values == {("alice", "m"): 6, ("bob", "m"): 5}
