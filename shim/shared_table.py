"""A fixed-size failure table in shared memory: one count per address for every worker.

What lives here: the memory layout, the cross-process lock and the salted
hash that places an address in the table. What does not: the throttle's
policy (when to refuse, /64 grouping, Redis), which is shim.throttle's.

The gunicorn master creates the table (``FailureTable.for_workers`` from
gunicorn.conf.py) before it forks, so every worker inherits the same pages:
an anonymous ``memfd`` mapped ``MAP_SHARED``. Standard library only, so the
master may import it without importing anything gevent must patch first.

Layout: ``SLOTS`` slots of 40 bytes (2.5 MiB), grouped in buckets of ``WAYS``
slots. A slot is ``tag u64, failures u32, checks in flight u32, window start
f64, cool-off until f64, last check taken f64`` (``time.monotonic`` seconds:
one clock for every process on the box). An address's bucket and tag come
from a BLAKE2b hash keyed with a salt drawn at each start, so nobody outside
can aim addresses at one bucket; tag 0 marks an empty slot.

Lock: a POSIX record lock (``fcntl.lockf``) on one byte per bucket of the
memfd, held only while a failure is counted or a check of an address with
failures is taken (two syscalls, ~2 us). POSIX
locks belong to a process, which is right here: a gevent worker never yields
while it holds one, so greenlets of one worker cannot interleave inside. The
per-request check of an address with no entry takes no lock: it reads the
bucket's four tags (aligned 8-byte words, written whole) and finds none.

Exactness: an address with failures must *take a check* (``take_check``)
before its secret is compared, and ``add`` gives it back: while ``failures +
checks in flight`` reaches the limit, further checks wait (a short 429) instead
of being compared, so guesses landing on several workers at the same instant
cannot all slip past the last allowed one. A check whose secret was right is
never given back; it lapses after ``CHECK_S``.

Full bucket: a new address takes an empty or stale slot, else evicts the one
whose window or cool-off ends first. Evicting a live entry hands its
address a fresh count, so that takes ``WAYS`` other addresses failing in the
same bucket within its window; the salted hash spreads addresses over the
``SLOTS / WAYS`` buckets, so in practice a flood of tens of thousands of
guessing addresses at once (the old per-worker dict dropped its oldest entry
past 10,000 addresses).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import secrets
import struct
import tempfile
from typing import NamedTuple

SLOTS = 65_536
WAYS = 4
# A check not given back by then (its secret was right, or its worker died) lapses.
CHECK_S = 1.0
_SLOT = struct.Struct("<QIIddd")
_TAGS = struct.Struct("<" + "Q32x" * WAYS)
_BUCKET_BYTES = _SLOT.size * WAYS


class Entry(NamedTuple):
    failures: int
    window_start: float
    until: float


class FailureTable:
    """Failed-secret counts by address, shared by every process forked after it was made."""

    def __init__(self, slots: int = SLOTS):
        if slots < WAYS or slots & (slots - 1):
            raise ValueError("slots must be a power of two, at least WAYS")
        self.slots = slots
        self._buckets = slots // WAYS
        size = slots * _SLOT.size
        if hasattr(os, "memfd_create"):
            self._fd = os.memfd_create("shim-auth-failures")
        else:  # not Linux: an unlinked temporary file serves the same
            self._fd = os.dup(tempfile.TemporaryFile().fileno())
        os.ftruncate(self._fd, size)
        self._memory = mmap.mmap(self._fd, size, mmap.MAP_SHARED)
        self._salt = secrets.token_bytes(16)

    def __repr__(self) -> str:
        return f"FailureTable(slots={self.slots}, pid={os.getpid()})"

    def locate(self, key: str) -> tuple[int, int]:
        """(bucket, tag) of ``key``; the tag is never 0."""
        digest = hashlib.blake2b(key.encode(), digest_size=16, key=self._salt).digest()
        bucket = int.from_bytes(digest[:8], "little") % self._buckets
        return bucket, int.from_bytes(digest[8:], "little") or 1

    def lookup(self, where: tuple[int, int]) -> Entry | None:
        """The entry at ``where`` (from ``locate``), or None; no lock taken."""
        bucket, tag = where
        offset = bucket * _BUCKET_BYTES
        tags = _TAGS.unpack_from(self._memory, offset)
        if tag not in tags:
            return None
        found, failures, _, start, until, _ = _SLOT.unpack_from(
            self._memory, offset + tags.index(tag) * _SLOT.size
        )
        return Entry(failures, start, until) if found == tag else None

    def take_check(
        self, where: tuple[int, int], now: float, max_failures: int, window_s: float
    ) -> float:
        """Take one check for ``where``; 0 when taken, else the seconds to wait.

        Only an address already in the table takes one; ``add`` gives it back.
        """
        bucket, tag = where
        offset = bucket * _BUCKET_BYTES
        with self._locked(bucket):
            tags = _TAGS.unpack_from(self._memory, offset)
            if tag not in tags:
                return 0.0
            offset += tags.index(tag) * _SLOT.size
            _, failures, checks, start, until, taken = _SLOT.unpack_from(self._memory, offset)
            if until > now:
                return until - now
            if now - start > window_s:
                failures, start = 0, now
            if now - taken > CHECK_S:
                checks = 0
            if failures + checks >= max_failures:
                return max(taken + CHECK_S - now, 0.001)
            _SLOT.pack_into(self._memory, offset, tag, failures, checks + 1, start, until, now)
            return 0.0

    def add(
        self,
        where: tuple[int, int],
        count: int,
        now: float,
        max_failures: int,
        window_s: float,
        cooloff_s: float,
        give_back: bool = False,
    ) -> float:
        """Count ``count`` failures; return the cool-off's end if they start one, else 0.

        ``give_back``: the failed check was taken with ``take_check``. Failures
        arriving while a cool-off runs are not counted. After a cool-off the
        count starts again from 0.
        """
        bucket, tag = where
        with self._locked(bucket):
            offset = self._slot_for(bucket, tag, now, window_s)
            _, failures, checks, start, until, taken = _SLOT.unpack_from(self._memory, offset)
            if give_back:
                checks = max(checks - 1, 0)
            if until > now:
                _SLOT.pack_into(self._memory, offset, tag, failures, checks, start, until, taken)
                return 0.0
            if now - start > window_s:
                failures, start = 0, now
            failures += count
            started = 0.0
            if failures >= max_failures:
                started = until = now + cooloff_s
                failures, start = 0, until  # a fresh window after the cool-off
            _SLOT.pack_into(self._memory, offset, tag, failures, checks, start, until, taken)
            return started

    def block(self, where: tuple[int, int], until: float, now: float, window_s: float) -> None:
        """Make ``where`` cool off until ``until`` (a cool-off another instance started)."""
        bucket, tag = where
        with self._locked(bucket):
            offset = self._slot_for(bucket, tag, now, window_s)
            _, _, checks, _, current, taken = _SLOT.unpack_from(self._memory, offset)
            if until > current:
                _SLOT.pack_into(self._memory, offset, tag, 0, checks, until, until, taken)

    def _slot_for(self, bucket: int, tag: int, now: float, window_s: float) -> int:
        """Offset of ``tag``'s slot in ``bucket``, claiming one if needed; lock held."""
        base = bucket * _BUCKET_BYTES
        tags = _TAGS.unpack_from(self._memory, base)
        if tag in tags:
            return base + tags.index(tag) * _SLOT.size
        victim, victim_ends = base, float("inf")
        for way in range(WAYS):
            offset = base + way * _SLOT.size
            found, _, _, start, until, _ = _SLOT.unpack_from(self._memory, offset)
            ends = max(start + window_s, until)
            if found == 0 or ends < now:
                victim = offset
                break
            if ends < victim_ends:
                victim, victim_ends = offset, ends
        _SLOT.pack_into(self._memory, victim, tag, 0, 0, now, 0.0, 0.0)
        return victim

    def _locked(self, bucket: int) -> _BucketLock:
        return _BucketLock(self._fd, bucket)

    # -- made once in the gunicorn master, inherited by every worker ----------------------

    @classmethod
    def for_workers(cls) -> FailureTable:
        """The table this process's future children inherit; made on the first call."""
        global _inherited
        if _inherited is None:  # a config reload (SIGHUP) keeps the counts
            _inherited = cls()
        return _inherited


class _BucketLock:
    """An exclusive POSIX record lock on byte ``bucket`` of the table's memfd."""

    __slots__ = ("_fd", "_bucket")

    def __init__(self, fd: int, bucket: int):
        self._fd, self._bucket = fd, bucket

    def __enter__(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, self._bucket)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._bucket)


# Set once, in the gunicorn master before it forks (gunicorn.conf.py), and only
# read after: a worker finds the master's table here. None outside gunicorn.
_inherited: FailureTable | None = None


def inherited() -> FailureTable | None:
    """The table the gunicorn master made before forking this worker, if any."""
    return _inherited
