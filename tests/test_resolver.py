"""The worker's caching resolver (issue #19): one lookup per name per TTL, failures never kept."""

import socket

import gevent
import pytest

from shim.resolver import CachingResolver


class CountingResolver:
    def __init__(self, fail: bool = False, delay_s: float = 0.0):
        self.calls = 0
        self.fail = fail
        self.delay_s = delay_s

    def getaddrinfo(self, host, port, family=0, socktype=0, proto=0, flags=0):
        self.calls += 1
        if self.delay_s:
            gevent.sleep(self.delay_s)
        if self.fail:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (f"10.0.0.{self.calls}", port))]

    def gethostbyname(self, host):
        return "10.9.9.9"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_name_is_looked_up_once_per_ttl_and_again_after_it():
    inner, clock = CountingResolver(), Clock()
    resolver = CachingResolver(inner, ttl_s=30, clock=clock)
    first = resolver.getaddrinfo("api.example.test", 443, 0, socket.SOCK_STREAM)
    for _ in range(100):
        assert resolver.getaddrinfo("api.example.test", 443, 0, socket.SOCK_STREAM) == first
    assert inner.calls == 1
    clock.now += 31
    assert resolver.getaddrinfo("api.example.test", 443, 0, socket.SOCK_STREAM) != first
    assert inner.calls == 2


def test_different_ports_or_families_are_different_questions():
    inner = CountingResolver()
    resolver = CachingResolver(inner, clock=Clock())
    resolver.getaddrinfo("h.test", 443)
    resolver.getaddrinfo("h.test", 80)
    resolver.getaddrinfo("h.test", 443, socket.AF_INET6)
    assert inner.calls == 3


def test_a_failure_reaches_every_waiter_and_is_never_kept():
    inner = CountingResolver(fail=True, delay_s=0.05)
    resolver = CachingResolver(inner, clock=Clock())
    waiters = [gevent.spawn(resolver.getaddrinfo, "gone.test", 443) for _ in range(5)]
    gevent.joinall(waiters)
    assert all(isinstance(w.exception, socket.gaierror) for w in waiters)
    assert inner.calls == 1  # concurrent misses shared one lookup
    with pytest.raises(socket.gaierror):
        resolver.getaddrinfo("gone.test", 443)
    assert inner.calls == 2  # the failure was not kept


def test_concurrent_misses_share_one_lookup():
    inner = CountingResolver(delay_s=0.05)
    resolver = CachingResolver(inner, clock=Clock())
    waiters = [gevent.spawn(resolver.getaddrinfo, "api.example.test", 443) for _ in range(50)]
    gevent.joinall(waiters)
    assert inner.calls == 1
    assert len({str(w.value) for w in waiters}) == 1


def test_the_table_is_bounded_and_other_methods_pass_through():
    inner = CountingResolver()
    resolver = CachingResolver(inner, clock=Clock())
    for index in range(1000):
        resolver.getaddrinfo(f"h{index}.test", 443)
    assert len(resolver._answers) <= 256
    assert resolver.gethostbyname("x.test") == "10.9.9.9"
