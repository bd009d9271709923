"""Gemini key benches per (key, model) in the state stores: memory and a real redis-server."""

from __future__ import annotations

import uuid

import pytest

from shim.gemini_keys import MAX_SHARED_BENCHES, KeyPool
from shim.state import MemoryState, RedisState

NOON = 1_780_000_000 - 1_780_000_000 % 86_400 + 43_200
PRO, FLASH = "gemini-2.5-pro", "gemini-2.5-flash"


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        yield MemoryState()
        return
    server = request.getfixturevalue("redis_server")
    server.command("DEL", "shim:gemini:benched")
    yield RedisState(server.url)
    server.command("DEL", "shim:gemini:benched")


def test_a_model_bench_is_its_own_entry_beside_the_whole_key(store):
    ident = uuid.uuid4().hex[:8]
    store.bench_key(ident, NOON + 30, NOON, PRO)
    store.bench_key(ident, NOON + 10, NOON)
    store.bench_key(ident, NOON + 5, NOON, PRO)  # shorter: the longer one stays
    assert store.benched_keys(NOON) == {
        (ident, PRO): pytest.approx(NOON + 30),
        (ident, None): pytest.approx(NOON + 10),
    }
    assert store.benched_keys(NOON + 11) == {(ident, PRO): pytest.approx(NOON + 30)}
    assert store.benched_keys(NOON + 31) == {}


def test_benches_over_are_pruned_when_another_is_written(store, request):
    for n in range(5):
        store.bench_key(f"{n:08x}", NOON + 10, NOON, PRO)
    store.bench_key("ffffffff", NOON + 100, NOON + 20, FLASH)
    if "redis" in request.node.name:
        server = request.getfixturevalue("redis_server")
        assert server.command("HLEN", "shim:gemini:benched") == b":1\r\n"
        ttl = int(server.command("TTL", "shim:gemini:benched")[1:])
        assert 80 < ttl <= 140  # the hash goes with its last bench (80 s on), plus a minute


def test_the_shared_hash_refuses_new_fields_past_its_cap(redis_server):
    redis_server.command("DEL", "shim:gemini:benched")
    store = RedisState(redis_server.url)
    fill = " ".join(f"k{n} {NOON + 60}" for n in range(MAX_SHARED_BENCHES))
    redis_server.command("HSET", "shim:gemini:benched", fill)
    store.bench_key("abcdef01", NOON + 30, NOON, "invented-model")
    store.bench_key("k0", NOON + 90, NOON)  # an existing field may still grow
    benched = store.benched_keys(NOON)
    assert ("abcdef01", "invented-model") not in benched
    assert benched[("k0", None)] == pytest.approx(NOON + 90)
    redis_server.command("DEL", "shim:gemini:benched")


def test_a_model_bench_on_one_pool_is_seen_by_another_on_the_same_redis(redis_server):
    redis_server.command("DEL", "shim:gemini:benched")
    keys = ("key-one-0000000000", "key-two-0000000000")
    now = [float(NOON)]
    first = KeyPool(keys, clock=lambda: now[0], shared=RedisState(redis_server.url))
    second = KeyPool(keys, clock=lambda: now[0], shared=RedisState(redis_server.url))
    first.cool_down(first.id_of(keys[0]), 300, PRO)
    now[0] += 1  # past the sync interval
    assert [second.next_key(PRO) for _ in range(3)] == [keys[1]] * 3
    assert [second.next_key(FLASH) for _ in range(2)] == [keys[0], keys[1]]
    assert second.benches()[0] == {"state": "available", "benched_models": {PRO: 299}}
    redis_server.command("DEL", "shim:gemini:benched")
