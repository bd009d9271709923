"""Named clients: who presented which secret, without the file being a secret store.

``SHIM_CLIENTS_FILE`` holds one client per line, ``name sha256-hex-of-secret``
and optionally its limits (``concurrency=4 rpm=60 tokens_per_day=2000000``,
see shim.limits); ``#`` comments and blank lines are ignored. ``python -m shim.clients new NAME``
prints a fresh random secret (shown once) and the line to add. The single
``SHIM_SHARED_SECRET`` keeps working as the client ``default``.

Matching hashes each presented value once and compares the digest with every
entry using ``hmac.compare_digest``, without stopping at a match: no map keyed
by the secret, no early exit. The file is re-read when it changes (checked at
most once a second, see ``ClientTable``); a missing or malformed file keeps the
last good table, logs an error at every check and shows in ``/health/ready``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

from shim.limit_types import NO_LIMITS, Limits, parse_limits
from shim.secret_files import read_text_and_stat

log = logging.getLogger("shim.clients")

DEFAULT_CLIENT = "default"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DIGEST = re.compile(r"[0-9a-f]{64}")


class ClientsFileError(ValueError):
    """A clients file that cannot be used; the message never contains a digest or secret."""


def digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


class Client(NamedTuple):
    name: str
    digest: bytes
    limits: Limits = NO_LIMITS


def parse_clients(text: str) -> tuple[Client, ...]:
    """Parse ``name sha256hex [limit=N ...]`` lines into Clients, or raise ClientsFileError."""
    entries: list[Client] = []
    names: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        parts = content.split()
        if len(parts) < 2 or not _NAME.fullmatch(parts[0]) or not _DIGEST.fullmatch(parts[1]):
            raise ClientsFileError(
                f"line {number}: expected 'name sha256-hex [limit=N ...]' "
                "(name: letters, digits, . _ -)"
            )
        try:
            limits = parse_limits(parts[2:])
        except ValueError as exc:
            raise ClientsFileError(f"line {number}: {exc}") from None
        if parts[0] in names or parts[0] == DEFAULT_CLIENT:
            raise ClientsFileError(f"line {number}: client {parts[0]!r} is named twice or reserved")
        names.add(parts[0])
        entries.append(Client(parts[0], bytes.fromhex(parts[1]), limits))
    return tuple(entries)


class ClientTable:
    """The clients shim accepts, reloaded from their file when it changes.

    A change is any difference in (device, inode, size, mtime_ns, ctime_ns):
    a file replaced by rename keeps its mtime under ``rsync -a``/``cp -p`` but
    gets a new inode, and a rewrite in place with its mtime set back still
    moves ctime, which no user-level tool can set. A missing or unusable file
    keeps the last good table (refusing everyone because a config manager
    is mid-deploy would be worse), logs an error at every check, and shows
    in ``state()`` for readiness.
    """

    def __init__(
        self,
        shared_secret: str | None,
        path: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        check_interval_s: float = 1.0,
    ):
        self._default = (
            (Client(DEFAULT_CLIENT, digest(shared_secret.encode())),) if shared_secret else ()
        )
        self._path = path
        self._clock = clock
        self._interval = check_interval_s
        self._entries: tuple[Client, ...] = self._default
        self._limits: dict[str, Limits] = {}
        self._seen: tuple[int, ...] | None = None  # fingerprint of the last good file
        self._problem: str | None = None  # why the file on disk is not in use, if it is not
        self._loaded_at: float | None = None  # wall clock of the last good load
        self._checked = float("-inf")
        if path:
            problem = self._load()
            if problem is not None:
                raise ClientsFileError(problem)

    def __repr__(self) -> str:
        return f"ClientTable(clients={self.names})"

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self._entries]

    def limits(self, name: str | None) -> Limits | None:
        """The limits of client ``name`` as the file says now; None when it has none."""
        return self._limits.get(name)  # type: ignore[arg-type]

    def match(self, presented: list[bytes]) -> str | None:
        """Return the name of the client whose secret is among ``presented``, else None."""
        self.check()
        found = None
        for value in presented:
            candidate = digest(value)
            for name, expected, _ in self._entries:
                # Every entry is compared, match or not: no timing hint of which.
                if hmac.compare_digest(candidate, expected) and found is None:
                    found = name
        return found

    def state(self) -> dict | None:
        """The clients file for readiness (no path, names or digests); None without a file."""
        if self._path is None:
            return None
        self.check()
        return {
            "state": "ok" if self._problem is None else self._problem.split(":", 1)[0],
            "clients": len(self._entries) - len(self._default),
            "loaded_at": _iso(self._loaded_at),
            "error": self._problem,
        }

    def check(self) -> None:
        """Reload the file if it changed; at most once per check interval."""
        if self._path is None:
            return
        now = self._clock()
        if now - self._checked < self._interval:
            return
        self._checked = now
        try:
            seen = _fingerprint(os.stat(self._path))
        except OSError as exc:
            self._fail(_reason(exc))
            return
        # A file that was bad is read again at every check, so its error is
        # logged at every check too, until it is fixed or replaced.
        if seen != self._seen or self._problem is not None:
            problem = self._load()
            if problem is not None:
                self._fail(problem)

    def _load(self) -> str | None:
        """Read and install the file; return why it cannot be used, or None."""
        try:
            # The fingerprint is of the file read: a write racing the read
            # changes it, so the next check reads the file again.
            text, stat = read_text_and_stat(self._path)  # type: ignore[arg-type]
            if not text and self._seen is not None:
                # A tool that truncates before it writes shows an empty file for a
                # moment: that is not "no clients" (say so with a comment line).
                raise ClientsFileError("empty file (to name no clients, write a comment line)")
            entries = parse_clients(text)
        except (OSError, UnicodeDecodeError, ClientsFileError) as exc:
            return _reason(exc)
        seen = _fingerprint(stat)
        initial = self._seen is None
        recovered = self._problem is not None
        self._entries = self._default + entries
        self._limits = {entry.name: entry.limits for entry in entries if entry.limits}
        self._seen = seen
        self._problem = None
        self._loaded_at = time.time()
        if not initial:
            log.info(
                "clients file reloaded",
                extra={
                    "event": "clients_file_reloaded",
                    "clients": len(entries),
                    "recovered": recovered,
                },
            )
        return None

    def _fail(self, problem: str) -> None:
        self._problem = problem
        log.error(
            "clients file unusable; keeping the last good table",
            extra={
                "event": "clients_file_missing"
                if problem.startswith("missing")
                else "clients_file_invalid",
                "reason": problem,
                "clients": len(self._entries) - len(self._default),
            },
        )


def _fingerprint(stat: os.stat_result) -> tuple[int, ...]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _reason(exc: Exception) -> str:
    """Why the file cannot be used, as ``state: detail``; never its content."""
    if isinstance(exc, FileNotFoundError):
        return "missing: no such file"
    if isinstance(exc, ClientsFileError):
        return f"invalid: {exc}"
    if isinstance(exc, UnicodeDecodeError):
        return "invalid: not UTF-8"
    return f"unreadable: {type(exc).__name__}"


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


def main(argv: list[str]) -> int:
    """``python -m shim.clients new NAME``: a new secret and its clients-file line."""
    if len(argv) != 2 or argv[0] != "new" or not _NAME.fullmatch(argv[1]):
        sys.stderr.write("usage: python -m shim.clients new NAME\n")
        return 2
    secret = secrets.token_urlsafe(32)
    sys.stdout.write(
        f"# give this secret to the client (shown once): {secret}\n"
        f"{argv[1]} {hashlib.sha256(secret.encode()).hexdigest()}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
