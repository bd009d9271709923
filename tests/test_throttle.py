"""The failed-secret throttle and its shared table: real processes, a real Redis, a fake clock.

Cross-process tests fork after the table exists, exactly as gunicorn's master
forks its workers, and count through the table's own lock.
"""

from __future__ import annotations

import os

import pytest

from shim.shared_table import WAYS, FailureTable
from shim.throttle import AuthThrottle, RedisFailures, address_group
from tests.conftest import closed_port


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("address", "group"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # an IPv4 client on a dual-stack socket
        ("fe80::1%eth0", "fe80::/64"),
        ("", ""),
        ("not:an:address", "not:an:address"),
    ],
)
def test_ipv4_counts_per_address_and_ipv6_per_64(address, group):
    assert address_group(address) == group


def test_one_ipv6_64_shares_one_count():
    throttle = AuthThrottle(3, 60, 30, clock=Clock())
    for host in ("::1", "::2", "::3"):
        throttle.failed("2001:db8:0:7" + host)
    assert throttle.blocked_for("2001:db8:0:7::ffff") == 30
    assert throttle.blocked_for("2001:db8:0:8::1") == 0


def test_cooloff_after_exactly_max_failures_then_a_fresh_window():
    clock = Clock()
    throttle = AuthThrottle(3, 60, 30, clock=clock)
    assert [throttle.failed("192.0.2.1") for _ in range(3)] == [False, False, True]
    assert throttle.blocked_for("192.0.2.1") == 30
    assert throttle.blocked_for("192.0.2.2") == 0
    clock.now += 29.5
    assert throttle.blocked_for("192.0.2.1") == pytest.approx(0.5)
    clock.now += 1
    assert throttle.blocked_for("192.0.2.1") == 0
    assert [throttle.failed("192.0.2.1") for _ in range(3)] == [False, False, True]


def test_failures_spread_over_more_than_the_window_never_add_up():
    clock = Clock()
    throttle = AuthThrottle(3, 60, 30, clock=clock)
    for _ in range(5):
        throttle.failed("192.0.2.3")
        throttle.failed("192.0.2.3")
        clock.now += 61
    assert throttle.blocked_for("192.0.2.3") == 0


def test_one_request_with_several_wrong_candidates_counts_each():
    throttle = AuthThrottle(5, 60, 30, clock=Clock())
    assert throttle.failed("192.0.2.4", count=3) is False
    assert throttle.failed("192.0.2.4", count=3) is True  # 6 >= 5
    assert throttle.blocked_for("192.0.2.4") == 30


def test_failures_during_a_cooloff_are_not_counted_toward_the_next():
    clock = Clock()
    throttle = AuthThrottle(2, 60, 30, clock=clock)
    throttle.failed("192.0.2.5", count=2)
    assert throttle.failed("192.0.2.5", count=10) is False  # a check that raced the cool-off
    clock.now += 31
    assert throttle.failed("192.0.2.5") is False
    assert throttle.failed("192.0.2.5") is True


def _fork(work) -> int:  # noqa: ANN001 - a () -> int run in the child
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = work()
        finally:
            os._exit(code)
    return pid


def test_processes_forked_after_the_table_share_one_exact_count():
    table = FailureTable()
    throttle = AuthThrottle(1000, 3600, 60, table=table)
    processes, each = 4, 300  # 1,200 failures racing for one slot; the 1,000th starts it

    def hammer() -> int:
        # Exit code: how many of this process's failures started the cool-off.
        return sum(throttle.failed("192.0.2.9") for _ in range(each))

    pids = [_fork(hammer) for _ in range(processes)]
    started = sum(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids)
    assert started == 1
    # Exactly 1,000 counted before it, then the 200 during the cool-off dropped.
    assert throttle.blocked_for("192.0.2.9") > 59
    entry = table.lookup(throttle._where("192.0.2.9")[1])
    assert entry is not None and entry.failures == 0


def test_lost_updates_do_not_happen_under_contention():
    table = FailureTable()
    throttle = AuthThrottle(10**9, 3600, 60, table=table)

    def hammer() -> int:
        for _ in range(500):
            throttle.failed("192.0.2.10")
        return 0

    pids = [_fork(hammer) for _ in range(4)]
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    entry = table.lookup(throttle._where("192.0.2.10")[1])
    assert entry is not None and entry.failures == 2000


def test_a_full_bucket_evicts_the_entry_that_ends_first_and_reuses_stale_ones():
    clock = Clock()
    table = FailureTable(slots=WAYS)  # one bucket: every address collides
    throttle = AuthThrottle(3, 60, 30, clock=clock, table=table)
    for i in range(WAYS):
        throttle.failed(f"192.0.2.{20 + i}")
        clock.now += 1
    throttle.failed("192.0.2.99")  # evicts .20, whose window ends first
    assert throttle.blocked_for("192.0.2.20") == 0
    throttle.failed("192.0.2.99", count=2)
    assert throttle.blocked_for("192.0.2.99") == 30
    clock.now += 200  # everything stale: a new address takes a slot without evicting a live one
    throttle.failed("192.0.2.100", count=3)
    assert throttle.blocked_for("192.0.2.100") == 30


def test_repr_names_no_address():
    throttle = AuthThrottle(3, 60, 60)
    throttle.failed("192.0.2.77")
    assert "192.0.2.77" not in repr(throttle)


def test_two_instances_on_one_redis_share_the_count(redis_server):
    first = AuthThrottle(5, 60, 30, shared=RedisFailures(redis_server.url))
    second = AuthThrottle(5, 60, 30, shared=RedisFailures(redis_server.url))
    address = "192.0.2.40"
    assert [first.failed(address) for _ in range(3)] == [False] * 3
    assert [second.failed(address) for _ in range(2)] == [False, True]
    assert second.blocked_for(address) == pytest.approx(30, abs=0.5)
    # The first instance saw this address fail, so it asks Redis and learns of the cool-off.
    assert first.blocked_for(address) == pytest.approx(30, abs=0.5)
    # An address with no failures here is not asked about at all, and is served.
    assert first.blocked_for("192.0.2.41") == 0
    assert redis_server.command("EXISTS", f"shim:auth:{{{address}}}:cooloff").startswith(b":1")


def test_an_unreachable_redis_falls_back_to_the_local_count():
    errors: list[str] = []
    throttle = AuthThrottle(
        3,
        60,
        30,
        shared=RedisFailures(f"redis://127.0.0.1:{closed_port()}/0"),
        on_state_error=errors.append,
    )
    # Neither open (the local count still cools the address off) nor closed.
    assert [throttle.failed("192.0.2.50") for _ in range(3)] == [False, False, True]
    assert throttle.blocked_for("192.0.2.50") > 29
    assert throttle.blocked_for("192.0.2.51") == 0
    assert errors and set(errors) <= {"auth_failed", "auth_check"}


def test_the_last_allowed_guess_is_checked_alone():
    clock = Clock()
    throttle = AuthThrottle(3, 60, 30, clock=clock)
    other_worker = AuthThrottle(3, 60, 30, clock=clock, table=throttle.table)
    throttle.failed("192.0.2.60", count=2)
    assert throttle.blocked_for("192.0.2.60") == 0  # takes the last check
    # The same instant on another worker: waits instead of being compared.
    assert 0 < other_worker.blocked_for("192.0.2.60") <= 1
    assert throttle.failed("192.0.2.60") is True  # the check failed: cool-off
    assert other_worker.blocked_for("192.0.2.60") == 30


def test_a_check_whose_secret_was_right_lapses_after_a_second():
    clock = Clock()
    throttle = AuthThrottle(3, 60, 30, clock=clock)
    throttle.failed("192.0.2.61", count=2)
    assert throttle.blocked_for("192.0.2.61") == 0  # right secret: never given back
    assert throttle.blocked_for("192.0.2.61") == pytest.approx(1.0)
    clock.now += 1.01
    assert throttle.blocked_for("192.0.2.61") == 0
    assert throttle.failed("192.0.2.61") is True


def test_an_address_without_failures_takes_no_check():
    throttle = AuthThrottle(1, 60, 30, clock=Clock())
    assert [throttle.blocked_for("192.0.2.62") for _ in range(3)] == [0, 0, 0]
