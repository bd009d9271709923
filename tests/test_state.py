"""The state stores and the limiter: one contract, run against memory and a real redis-server."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from shim.access import AccessRecord
from shim.clients import ClientsFileError, parse_clients
from shim.gemini_keys import KeyPool
from shim.limit_types import IN_FLIGHT_RETRY_S, LEASE_S, Lease, Limits, parse_limits
from shim.limits import MAX_PENDING_SETTLES, RENEW_EVERY_S, Limiter, LimitExceeded, tokens_used
from shim.settings import ConfigError, Settings
from shim.state import MemoryState, RedisState, open_state
from shim.store import StateUnavailable
from tests.conftest import RedisServer, closed_port, free_port, settings_env

# Mid-day UTC, so a test never straddles midnight by accident.
NOON = 1_780_000_000 - 1_780_000_000 % 86_400 + 43_200
DIGEST = "ab" * 32


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        return MemoryState()
    return RedisState(request.getfixturevalue("redis_server").url)


@pytest.fixture
def client() -> str:
    # Redis is shared by the session: every test limits a client of its own.
    return f"c-{uuid.uuid4().hex[:12]}"


def test_concurrency_counts_calls_in_flight_and_frees_a_slot_when_one_ends(store, client):
    limits = Limits(concurrency=2)
    assert store.admit(client, limits, "a", NOON).limit == ""
    assert store.admit(client, limits, "b", NOON).limit == ""
    refused = store.admit(client, limits, "c", NOON + 1)
    assert refused.limit == "concurrency" and refused.retry_after == 1.0
    store.finish(client, limits, Lease("a"), 0, NOON + 2)
    assert store.admit(client, limits, "c", NOON + 2).limit == ""
    assert store.admit(client, limits, "d", NOON + 2).limit == "concurrency"


def test_a_slot_nobody_released_expires_after_the_lease(store, client):
    limits = Limits(concurrency=1)
    assert store.admit(client, limits, "crashed", NOON).limit == ""
    assert store.admit(client, limits, "next", NOON + LEASE_S - 1).limit == "concurrency"
    assert store.admit(client, limits, "next", NOON + LEASE_S + 1).limit == ""


def test_rpm_allows_a_burst_of_rpm_then_one_call_per_interval(store, client):
    limits = Limits(rpm=3)
    for _ in range(3):
        assert store.admit(client, limits, "x", NOON).limit == ""
    refused = store.admit(client, limits, "x", NOON)
    assert refused.limit == "rpm"
    assert refused.retry_after == pytest.approx(20.0)
    assert store.admit(client, limits, "x", NOON + 19.5).limit == "rpm"
    assert store.admit(client, limits, "x", NOON + 20.01).limit == ""
    assert store.admit(client, limits, "x", NOON + 20.02).limit == "rpm"
    # After a quiet minute the whole burst is back, and no more.
    later = NOON + 100
    assert [store.admit(client, limits, "x", later).limit for _ in range(4)] == ["", "", "", "rpm"]


def test_a_refused_call_does_not_use_up_rate_or_slots(store, client):
    limits = Limits(concurrency=1, rpm=2)
    assert store.admit(client, limits, "a", NOON).limit == ""
    assert store.admit(client, limits, "b", NOON).limit == "concurrency"
    store.finish(client, limits, Lease("a"), 0, NOON)
    # The refused call took no rate: the second of two per minute is still there.
    assert store.admit(client, limits, "c", NOON).limit == ""


def held(store, client: str, limits: Limits, lease_id: str, now: float) -> Lease:
    """Admit one call and return the lease the Limiter would keep for it."""
    admission = store.admit(client, limits, lease_id, now)
    assert admission.limit == "", admission
    return Lease(lease_id, admission.reserved)


def test_tokens_per_day_refuse_after_the_day_is_used_up_until_utc_midnight(store, client):
    limits = Limits(tokens_per_day=100)
    store.finish(client, limits, held(store, client, limits, "a", NOON), 60, NOON)
    # The call that crosses the line completes.
    store.finish(client, limits, held(store, client, limits, "b", NOON + 1), 60, NOON + 1)
    refused = store.admit(client, limits, "c", NOON + 2)
    assert refused.limit == "tokens_per_day"
    assert refused.retry_after == pytest.approx(43_200 - 2)
    assert store.admit(client, limits, "d", NOON + 43_200).limit == ""


def test_calls_in_flight_hold_reservations_that_stop_admission_before_any_is_counted(store, client):
    limits = Limits(tokens_per_day=320)  # r = 320 // 32 = 10 while no call is larger
    leases = []
    for index in range(40):  # all in flight at once: none has finished
        admission = store.admit(client, limits, f"a{index}", NOON)
        if admission.limit:
            break
        assert admission.reserved == 10
        leases.append(Lease(f"a{index}", admission.reserved))
    assert len(leases) == 32  # 0 used + 31 x 10 in flight < 320; 32 x 10 is not
    assert admission == ("tokens_per_day", IN_FLIGHT_RETRY_S, 0, True)
    for lease in leases:
        store.finish(client, limits, lease, 7, NOON + 1)  # real counts replace reservations
    # 224 used, nothing in flight: (320 - 224) / 10 -> 10 more in flight, then refused.
    second = [store.admit(client, limits, f"b{index}", NOON + 2) for index in range(11)]
    assert [a.limit for a in second] == [""] * 10 + ["tokens_per_day"]
    for index, admission in enumerate(second[:10]):
        store.finish(client, limits, Lease(f"b{index}", admission.reserved), 7, NOON + 3)
    # 294 used: one more call fits; it reports 30, 4 over the day (< r + its excess of 20).
    store.finish(client, limits, held(store, client, limits, "c", NOON + 4), 30, NOON + 4)
    refused = store.admit(client, limits, "d", NOON + 5)
    assert refused.limit == "tokens_per_day" and not refused.in_flight
    assert refused.retry_after == pytest.approx(43_200 - 5)


def test_parallel_admits_from_many_instances_never_reserve_past_the_budget(redis_server, client):
    limits = Limits(tokens_per_day=320)
    admitted: list[str] = []

    def box(name: str) -> None:  # one instance: its own connection, ten calls at once
        store = RedisState(redis_server.url)
        for index in range(10):
            if store.admit(client, limits, f"{name}.{index}", NOON).limit == "":
                admitted.append(f"{name}.{index}")

    threads = [threading.Thread(target=box, args=(f"box{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(admitted) == 32
    assert int(redis_server.command("GET", f"shim:{{{client}}}:reserved").split()[1]) == 320


def test_the_reservation_grows_to_the_largest_call_of_the_last_two_days(store, client):
    limits = Limits(tokens_per_day=3200)  # r = 100
    store.finish(client, limits, held(store, client, limits, "a", NOON), 500, NOON)
    store.finish(client, limits, held(store, client, limits, "b", NOON), 40, NOON)
    assert held(store, client, limits, "c", NOON + 1).reserved == 500
    assert held(store, client, limits, "d", NOON + 86_400).reserved == 500  # yesterday's
    assert held(store, client, limits, "e", NOON + 2 * 86_400).reserved == 100
    # A call that used nothing (failed upstream) still gives its reservation back.
    lease = held(store, client, limits, "f", NOON + 3 * 86_400)
    fill = [store.admit(client, limits, f"g{i}", NOON + 3 * 86_400).limit for i in range(32)]
    assert fill == [""] * 31 + ["tokens_per_day"]  # 32 x 100 in flight fill the 3200
    store.finish(client, limits, lease, 0, NOON + 3 * 86_400)
    assert store.admit(client, limits, "h", NOON + 3 * 86_400).limit == ""


def test_a_reservation_nobody_released_expires_with_its_lease(store, client):
    limits = Limits(concurrency=100, tokens_per_day=100)  # r = 3: 34 fit in flight
    for index in range(34):
        assert store.admit(client, limits, f"crashed{index}", NOON).limit == ""
    assert store.admit(client, limits, "x", NOON + LEASE_S - 1).in_flight
    later = NOON + LEASE_S + 1
    # Expired leases gave back exactly what they held: the same 34 fit again.
    outcomes = [store.admit(client, limits, f"y{i}", later).limit for i in range(35)]
    assert outcomes == [""] * 34 + ["tokens_per_day"]


def test_a_renewed_lease_keeps_its_slot_and_reservation_past_the_first_expiry(store, client):
    limits = Limits(concurrency=1, tokens_per_day=64)  # r = 2: 32 fit in flight
    lease = held(store, client, limits, "long", NOON)
    store.renew(client, lease, NOON + LEASE_S - 10)
    later = NOON + LEASE_S + 10
    assert store.admit(client, limits, "next", later).limit == "concurrency"
    # The reservation is still held too: with the slot freed, 31 more fit, not 32.
    wide = Limits(tokens_per_day=64)
    assert [store.admit(client, wide, f"w{i}", later).limit for i in range(32)] == (
        [""] * 31 + ["tokens_per_day"]
    )
    # LEASE_S after its last renewal (and after those 31), it has run out.
    assert store.admit(client, limits, "next", later + LEASE_S + 1).limit == ""


def test_renewing_a_lease_already_settled_does_not_bring_it_back(store, client):
    limits = Limits(concurrency=1)
    lease = held(store, client, limits, "a", NOON)
    store.finish(client, limits, lease, 0, NOON + 1)
    store.renew(client, lease, NOON + 2)
    assert store.admit(client, limits, "b", NOON + 3).limit == ""


def test_clients_do_not_share_counts(store, client):
    limits = Limits(rpm=1)
    assert store.admit(client, limits, "a", NOON).limit == ""
    assert store.admit(client + "-other", limits, "a", NOON).limit == ""
    assert store.admit(client, limits, "b", NOON).limit == "rpm"


def test_key_benches_keep_the_longer_one_and_expire(store):
    ident = uuid.uuid4().hex[:8]
    store.bench_key(ident, NOON + 30, NOON)
    store.bench_key(ident, NOON + 10, NOON)
    assert store.benched_keys(NOON)[(ident, None)] == pytest.approx(NOON + 30)
    assert (ident, None) not in store.benched_keys(NOON + 31)


def test_a_cool_down_on_one_pool_is_seen_by_another_pool_on_the_same_store(redis_server):
    keys = ("key-one-0000000000", "key-two-0000000000")
    now = [float(NOON)]
    # Two instances: separate pools, separate Redis connections, one Redis.
    first = KeyPool(keys, clock=lambda: now[0], shared=RedisState(redis_server.url))
    second = KeyPool(keys, clock=lambda: now[0], shared=RedisState(redis_server.url))
    assert second.next_key() == keys[0]
    first.cool_down(first.id_of(keys[1]), 30)
    now[0] += 1  # past the sync interval
    assert [second.next_key() for _ in range(3)] == [keys[0]] * 3
    assert second.states() == {"available": 1, "cooling": 1, "disabled": 0}
    assert second.seconds_until_available() == 0.0
    first.disable(first.id_of(keys[0]))
    now[0] += 1
    assert second.next_key() is None
    assert second.seconds_until_available() == pytest.approx(28)
    now[0] += 29
    assert second.next_key() == keys[1]
    redis_server.command("DEL", "shim:gemini:benched")


def test_an_unreachable_redis_is_reported_quickly_and_not_retried_at_once():
    store = RedisState(f"redis://:hunter2-password@127.0.0.1:{closed_port()}/0")
    with pytest.raises(StateUnavailable) as caught:
        store.admit("alice", Limits(rpm=1), "a", NOON)
    assert "hunter2" not in str(caught.value) and "hunter2" not in repr(store)
    started = time.perf_counter()
    with pytest.raises(StateUnavailable):
        store.benched_keys(NOON)
    assert time.perf_counter() - started < 0.05  # skipped, not another connect


def record_for(client: str) -> AccessRecord:
    record = AccessRecord("r1", "anthropic", "POST")
    record.client = client
    return record


def test_limiter_refuses_with_retry_after_and_counts_the_rejection(client):
    rejected = []
    limiter = Limiter(MemoryState(), on_reject=lambda *a: rejected.append(a), clock=lambda: NOON)
    limits = Limits(rpm=1)
    limiter.admit(record_for(client), limits)
    record = record_for(client)
    with pytest.raises(LimitExceeded) as caught:
        limiter.admit(record, limits)
    assert caught.value.status == 429
    assert caught.value.headers == (("Retry-After", "60"),)
    assert record.error == "limit_rpm"
    assert rejected == [(client, "rpm")]


def test_limiter_settles_slots_and_tokens_when_the_record_closes(client):
    limiter = Limiter(MemoryState(), clock=lambda: NOON)
    limits = Limits(concurrency=1, tokens_per_day=20)
    record = record_for(client)
    limiter.admit(record, limits)
    with pytest.raises(LimitExceeded):
        limiter.admit(record_for(client), limits)
    record.input_tokens, record.output_tokens, record.cache_read_tokens = 12, 6, 3
    assert tokens_used(record) == 21
    limiter.finish(record)
    limiter.finish(record)  # settled once, however often it is called
    with pytest.raises(LimitExceeded) as caught:
        limiter.admit(record_for(client), limits)
    assert caught.value.limit == "tokens_per_day"


def test_limiter_keeps_the_reservation_in_the_lease_and_says_when_to_retry(client):
    limiter = Limiter(MemoryState(), clock=lambda: NOON)
    limits = Limits(tokens_per_day=64)  # r = 2: 32 calls fit in flight
    records = [record_for(client) for _ in range(32)]
    for record in records:
        limiter.admit(record, limits)
    assert records[0].lease.reserved == 2 and records[0].lease.id != records[1].lease.id
    refused = record_for(client)
    with pytest.raises(LimitExceeded) as caught:
        limiter.admit(refused, limits)
    assert caught.value.headers == (("Retry-After", "2"),)
    assert "in flight" in caught.value.message and refused.error == "limit_tokens_per_day"
    limiter.finish(records[0])  # no usage reported: the reservation is simply given back
    limiter.admit(record_for(client), limits)


def test_limiter_renews_a_long_call_and_swallows_a_failing_store(client):
    now = [float(NOON)]
    limiter = Limiter(MemoryState(), clock=lambda: now[0])
    limits = Limits(concurrency=1)
    record = record_for(client)
    limiter.admit(record, limits)
    now[0] = NOON + LEASE_S - 10
    limiter.renew(record)
    now[0] = NOON + LEASE_S + 10
    with pytest.raises(LimitExceeded):
        limiter.admit(record_for(client), limits)
    limiter.finish(record)
    limiter.renew(record)  # after the end: nothing held, nothing asked
    limiter.admit(record_for(client), limits)
    assert RENEW_EVERY_S == LEASE_S / 3

    failures: list[str] = []
    dead = Limiter(
        RedisState(f"redis://127.0.0.1:{closed_port()}/0"), on_state_error=failures.append
    )
    record = record_for(client)
    record.limits, record.lease = limits, Lease("x")  # as if admitted before Redis went away
    dead.renew(record)
    assert failures == ["renew"]


def test_a_stream_renews_its_lease_as_it_sends_once_renew_every_has_passed(client):
    now = [float(NOON)]
    limiter = Limiter(MemoryState(), clock=lambda: now[0])
    limits = Limits(concurrency=1)
    record = record_for(client)
    limiter.admit(record, limits)
    assert record.renew_at == pytest.approx(time.perf_counter() + RENEW_EVERY_S, abs=5)
    record.sent(100)  # early in the call: no renewal due
    now[0] = NOON + LEASE_S - 10
    record.renew_at = time.perf_counter() - 1  # as if RENEW_EVERY_S had passed
    record.sent(100)  # the next chunk renews
    assert record.renew_at > time.perf_counter() + RENEW_EVERY_S - 5
    now[0] = NOON + LEASE_S + 10
    with pytest.raises(LimitExceeded):  # still held past the first expiry
        limiter.admit(record_for(client), limits)
    limiter.finish(record)
    limiter.admit(record_for(client), limits)


def test_limiter_without_limits_never_touches_the_store():
    class Exploding:
        def admit(self, *args):
            raise AssertionError("store used")

    Limiter(Exploding()).admit(record_for("dave"), Limits())


def test_limiter_fails_open_with_one_warning_and_a_count(caplog):
    failures = []
    limiter = Limiter(
        RedisState(f"redis://127.0.0.1:{closed_port()}/0"), on_state_error=failures.append
    )
    with caplog.at_level(logging.WARNING, logger="shim.limits"):
        for _ in range(3):
            record = record_for("alice")
            limiter.admit(record, Limits(rpm=1))  # no exception: served
            assert record.lease is None
    assert failures == ["admit"] * 3
    warnings = [r for r in caplog.records if getattr(r, "event", "") == "state_unavailable"]
    assert len(warnings) == 1


# -- a settle the store failed is retried, and counts its tokens once ------------------------


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, to starve, stop and resume without touching others."""
    server = RedisServer(free_port(), tmp_path / "redis.log").start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.process.send_signal(signal.SIGCONT)
    server.kill()


def integer(reply: bytes) -> int:
    """An integer (or integer string, or nil as 0) out of a raw RESP reply."""
    lines = reply.split(b"\r\n")
    if lines[0] in (b"$-1", b"*-1"):
        return 0
    return int(lines[1] if lines[0].startswith(b"$") else lines[0][1:])


def wait_until(condition, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@contextlib.contextmanager
def scripts_refused(server: RedisServer) -> Iterator[None]:
    """Redis answers every script with an error (NOPERM), so nothing a script does lands."""
    server.command("ACL", "SETUSER", "default", "-evalsha", "-eval")
    try:
        yield
    finally:
        server.command("ACL", "SETUSER", "default", "+@all")


def settled_in_redis(server: RedisServer, client: str) -> tuple[int, int, int]:
    """(tokens counted today, calls in flight, tokens reserved) as Redis holds them."""
    return (
        integer(server.command("GET", f"shim:{{{client}}}:t{NOON // 86_400}")),
        integer(server.command("ZCARD", f"shim:{{{client}}}:slots")),
        integer(server.command("GET", f"shim:{{{client}}}:reserved")),
    )


def test_a_settle_redis_refused_is_resent_by_the_timer_and_counted_once(own_redis, client):
    monotonic = [0.0]  # the store's own clock: when its pause after a failure ends
    errors: list[str] = []
    limiter = Limiter(
        RedisState(own_redis.url, clock=lambda: monotonic[0]),
        on_state_error=errors.append,
        clock=lambda: NOON,
    )
    limits = Limits(concurrency=1, tokens_per_day=1000)
    record = record_for(client)
    limiter.admit(record, limits)
    record.input_tokens, record.output_tokens = 30, 10
    with scripts_refused(own_redis):
        limiter.finish(record)
    assert errors == ["finish"] and limiter.pending_settles() == 1
    assert settled_in_redis(own_redis, client) == (0, 1, 31)  # nothing landed
    monotonic[0] += 2  # past the store's pause; no further call comes
    wait_until(lambda: limiter.pending_settles() == 0)
    assert settled_in_redis(own_redis, client) == (40, 0, 0)  # counted once, slot freed
    limiter.admit(record_for(client), limits)


def test_a_settle_that_landed_though_its_reply_was_lost_is_not_counted_twice(own_redis, client):
    monotonic = [0.0]
    limiter = Limiter(RedisState(own_redis.url, clock=lambda: monotonic[0]), clock=lambda: NOON)
    limits = Limits(tokens_per_day=1000)
    warm = record_for(client)  # a call that used nothing: Redis now knows the finish script
    limiter.admit(warm, limits)
    limiter.finish(warm)
    record = record_for(client)
    limiter.admit(record, limits)
    record.output_tokens = 40
    own_redis.process.send_signal(signal.SIGSTOP)  # hung: the script waits in its socket
    try:
        limiter.finish(record)  # times out after 250 ms
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
    assert limiter.pending_settles() == 1
    # Redis ran the script when it woke; only the reply was lost.
    wait_until(lambda: settled_in_redis(own_redis, client) == (40, 0, 0))
    monotonic[0] += 2
    wait_until(lambda: limiter.pending_settles() == 0)
    assert settled_in_redis(own_redis, client) == (40, 0, 0)


def test_pending_settles_are_resent_as_soon_as_a_call_finds_redis_back(own_redis, client):
    monotonic = [0.0]
    limiter = Limiter(RedisState(own_redis.url, clock=lambda: monotonic[0]), clock=lambda: NOON)
    limits = Limits(concurrency=5, tokens_per_day=1000)
    records = [record_for(client) for _ in range(3)]
    for record in records:
        limiter.admit(record, limits)
        record.input_tokens = 5
    with scripts_refused(own_redis):
        for record in records:
            limiter.finish(record)  # the first fails at Redis, the rest at the store's pause
    assert limiter.pending_settles() == 3
    monotonic[0] += 2
    started = time.monotonic()
    limiter.admit(record_for(client), limits)  # served by Redis: the retrier is woken
    wait_until(lambda: limiter.pending_settles() == 0, timeout=0.8)
    assert time.monotonic() - started < 0.8  # well before the retrier's own 1.2 s tick
    tokens, in_flight, _ = settled_in_redis(own_redis, client)
    assert (tokens, in_flight) == (15, 1)


def test_pending_settles_are_bounded_and_a_drop_is_logged_and_counted(caplog):
    errors: list[str] = []
    # Never past its pause: every resend is skipped without touching the network.
    dead = RedisState(f"redis://127.0.0.1:{closed_port()}/0", clock=lambda: 0.0)
    limiter = Limiter(dead, on_state_error=errors.append, clock=lambda: NOON)
    limits = Limits(concurrency=1)
    retriers_before = retriers()
    with caplog.at_level(logging.WARNING, logger="shim.limits"):
        for index in range(MAX_PENDING_SETTLES + 2):
            record = record_for("alice")
            record.limits, record.lease = limits, Lease(f"l{index}")  # as if admitted earlier
            limiter.finish(record)
    assert limiter.pending_settles() == MAX_PENDING_SETTLES
    assert errors.count("settle_dropped") == 2
    drops = [r for r in caplog.records if getattr(r, "event", "") == "settle_dropped"]
    assert len(drops) == 1  # rate-limited like the other state warnings
    assert retriers() == retriers_before + 1  # one retrier for the whole queue


def retriers() -> int:
    return sum(thread.name == "shim-settle-retry" for thread in threading.enumerate())


def test_a_retried_settle_counts_tokens_only_for_a_lease_still_held(store, client):
    limits = Limits(tokens_per_day=1000)
    landed = held(store, client, limits, "landed", NOON)
    store.finish(client, limits, landed, 40, NOON)
    store.finish(client, limits, landed, 40, NOON, retry=True)  # its first try had landed
    lost = held(store, client, limits, "lost", NOON)
    store.finish(client, limits, lost, 25, NOON, retry=True)  # its first try never landed
    # 65 counted: one more call of up to 1000 - 65 fits, not one that crossed 1000 already.
    store.finish(client, limits, held(store, client, limits, "x", NOON), 934, NOON)
    assert store.admit(client, limits, "y", NOON).limit == ""
    store.finish(client, limits, Lease("y", 31), 1, NOON)
    assert store.admit(client, limits, "z", NOON).limit == "tokens_per_day"


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ([], Limits()),
        (["rpm=60"], Limits(rpm=60)),
        (["concurrency=4", "tokens_per_day=2000000"], Limits(4, 0, 2_000_000)),
    ],
)
def test_limits_parse(words, expected):
    assert parse_limits(words) == expected


@pytest.mark.parametrize(
    "words", [["rpm=0"], ["rpm=-1"], ["rpm=x"], ["rpm"], ["speed=3"], ["rpm=1", "rpm=2"]]
)
def test_bad_limits_are_refused(words):
    with pytest.raises(ValueError):
        parse_limits(words)


def test_limits_in_the_clients_file_and_errors_that_name_the_line():
    clients = parse_clients(f"alice {DIGEST} rpm=5 concurrency=2\nbob {DIGEST}\n")
    assert [(c.name, c.limits) for c in clients] == [
        ("alice", Limits(concurrency=2, rpm=5)),
        ("bob", Limits()),
    ]
    with pytest.raises(ClientsFileError, match="line 2: unknown limit 'speed'"):
        parse_clients(f"alice {DIGEST}\nbob {DIGEST} speed=3\n")


@pytest.mark.parametrize(
    "url",
    [
        "memory://",
        "redis://127.0.0.1:6379/0",
        "rediss://:pw@redis.internal:6380",
        "unix:///run/redis.sock",
    ],
)
def test_state_url_accepted(url):
    assert Settings.from_env(settings_env(SHIM_STATE_URL=url)).state_url == url


@pytest.mark.parametrize(
    "url", ["postgres://x", "redis://", "redis://:s3cret-pw@host:99999", "redis://h/abc", "memory"]
)
def test_state_url_refused_without_echoing_it(url):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(settings_env(SHIM_STATE_URL=url))
    assert "SHIM_STATE_URL" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    assert "s3cret" not in repr(Settings.from_env(settings_env(SHIM_STATE_URL="redis://:s3cret@h")))


def test_redis_replies_are_parsed_by_hiredis():
    import redis.utils

    # Pinned in requirements.txt for the CPU it saves per call (bench/limits.py).
    assert redis.utils.HIREDIS_AVAILABLE


def test_open_state_picks_the_store():
    assert isinstance(open_state("memory://"), MemoryState)
    assert isinstance(open_state("redis://127.0.0.1:1/0"), RedisState)


def test_shared_lock_excludes_across_instances_and_falls_back_without_redis(redis_server, tmp_path):
    from shim.locks import FileLock, LockTimeout
    from shim.oauth_shared import SharedLock

    name = f"test-{uuid.uuid4().hex[:8]}"
    first = SharedLock(RedisState(redis_server.url), name, 30, FileLock(str(tmp_path / "a.lock")))
    second = SharedLock(RedisState(redis_server.url), name, 30, FileLock(str(tmp_path / "b.lock")))
    with first.held(1):
        # Another box (its own file lock) still waits for the Redis lock.
        started = time.monotonic()
        with pytest.raises(LockTimeout), second.held(0.3):
            pass
        assert 0.25 < time.monotonic() - started < 2
    with second.held(1):  # released on exit
        pass
    # Redis gone: the box's own lock is used, and it still excludes within the box.
    fallback = FileLock(str(tmp_path / "c.lock"))
    dead = RedisState(f"redis://127.0.0.1:{closed_port()}/0")
    lonely = SharedLock(dead, name, 30, fallback)
    with lonely.held(1), pytest.raises(LockTimeout), fallback.held(0.2):
        pass
