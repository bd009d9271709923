"""A fixed-size failure table in shared memory: one count per address for every worker.

What lives here: the memory layout, the cross-process lock and the salted
hash that places an address in the table. What does not: the throttle's
policy (when to refuse, /64 grouping, Redis), which is shim.throttle's.

The gunicorn master creates the table (``FailureTable.for_workers`` from
gunicorn.conf.py) before it forks, so every worker inherits the same pages:
an anonymous ``memfd`` mapped ``MAP_SHARED``. Standard library only, so the
master may import it without importing anything gevent must patch first.

Layout: ``SLOTS`` slots of 32 bytes (2 MiB), grouped in buckets of ``WAYS``
slots. A slot is ``tag u64, failures u32, pad u32, window start f64, cool-off
until f64`` (``time.monotonic`` seconds: one clock for every process on the
box). An address's bucket and tag come from a BLAKE2b hash keyed with a salt
drawn at each start, so nobody outside can aim addresses at one bucket; tag 0
marks an empty slot.

Lock: a POSIX record lock (``fcntl.lockf``) on one byte per bucket of the
memfd, held only while a failure is counted (two syscalls, ~2 us). POSIX
locks belong to a process, which is right here: a gevent worker never yields
while it holds one, so greenlets of one worker cannot interleave inside. The
per-request check takes no lock: it reads the bucket's four tags (aligned
8-byte words, written whole) and, only on a match, that slot. A read racing a
write of the same slot sees the slot before or after that write.

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
_SLOT = struct.Struct("<QIIdd")
_TAGS = struct.Struct("<" + "Q24x" * WAYS)
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
        found, failures, _, start, until = _SLOT.unpack_from(
            self._memory, offset + tags.index(tag) * _SLOT.size
        )
        return Entry(failures, start, until) if found == tag else None

    def add(
        self,
        where: tuple[int, int],
        count: int,
        now: float,
        max_failures: int,
        window_s: float,
        cooloff_s: float,
    ) -> float:
        """Count ``count`` failures; return the cool-off's end if they start one, else 0.

        Failures arriving while a cool-off runs (checks that raced it) are not
        counted. After a cool-off the count starts again from 0.
        """
        bucket, tag = where
        with self._locked(bucket):
            offset = self._slot_for(bucket, tag, now, window_s)
            _, failures, _, start, until = _SLOT.unpack_from(self._memory, offset)
            if until > now:
                return 0.0
            if now - start > window_s:
                failures, start = 0, now
            failures += count
            started = 0.0
            if failures >= max_failures:
                started = until = now + cooloff_s
                failures, start = 0, until  # a fresh window after the cool-off
            _SLOT.pack_into(self._memory, offset, tag, failures, 0, start, until)
            return started

    def block(self, where: tuple[int, int], until: float, now: float, window_s: float) -> None:
        """Make ``where`` cool off until ``until`` (a cool-off another instance started)."""
        bucket, tag = where
        with self._locked(bucket):
            offset = self._slot_for(bucket, tag, now, window_s)
            _, _, _, _, current = _SLOT.unpack_from(self._memory, offset)
            if until > current:
                _SLOT.pack_into(self._memory, offset, tag, 0, 0, until, until)

    def _slot_for(self, bucket: int, tag: int, now: float, window_s: float) -> int:
        """Offset of ``tag``'s slot in ``bucket``, claiming one if needed; lock held."""
        base = bucket * _BUCKET_BYTES
        tags = _TAGS.unpack_from(self._memory, base)
        if tag in tags:
            return base + tags.index(tag) * _SLOT.size
        victim, victim_ends = base, float("inf")
        for way in range(WAYS):
            offset = base + way * _SLOT.size
            found, _, _, start, until = _SLOT.unpack_from(self._memory, offset)
            ends = max(start + window_s, until)
            if found == 0 or ends < now:
                victim = offset
                break
            if ends < victim_ends:
                victim, victim_ends = offset, ends
        _SLOT.pack_into(self._memory, victim, tag, 0, 0, now, 0.0)
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
