"""Named clients: who presented which secret, without the file being a secret store.

``SHIM_CLIENTS_FILE`` holds one client per line, ``name sha256-hex-of-secret``
and optionally its limits (``concurrency=4 rpm=60 tokens_per_day=2000000``,
see shim.limits); ``#`` comments and blank lines are ignored. ``python -m shim.clients new NAME``
prints a fresh random secret (shown once) and the line to add. The single
``SHIM_SHARED_SECRET`` keeps working as the client ``default``.

Matching hashes each presented value once and compares the digest with every
entry using ``hmac.compare_digest``, without stopping at a match: no map keyed
by the secret, no early exit. The file is re-read when its modification time
changes (checked at most once a second); a malformed file keeps the last good
table and says why in the log.
"""

from __future__ import annotations

import contextlib
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

from shim.limits import NO_LIMITS, Limits, parse_limits

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
    """The clients shim accepts, reloaded from their file when it changes."""

    def __init__(
        self,
        shared_secret: str | None,
        path: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._default = (
            (Client(DEFAULT_CLIENT, digest(shared_secret.encode())),) if shared_secret else ()
        )
        self._path = path
        self._clock = clock
        self._entries: tuple[Client, ...] = self._default
        self._limits: dict[str, Limits] = {}
        self._mtime: float | None = None
        self._checked = float("-inf")
        if path:
            self._load(initial=True)

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
        self._maybe_reload()
        found = None
        for value in presented:
            candidate = digest(value)
            for name, expected, _ in self._entries:
                # Every entry is compared, match or not: no timing hint of which.
                if hmac.compare_digest(candidate, expected) and found is None:
                    found = name
        return found

    def _maybe_reload(self) -> None:
        if self._path is None:
            return
        now = self._clock()
        if now - self._checked < 1.0:
            return
        self._checked = now
        try:
            mtime = os.stat(self._path).st_mtime
        except OSError:
            return  # gone for a moment (an editor's rename): keep the last good table
        if mtime != self._mtime:
            self._load(initial=False)

    def _load(self, initial: bool) -> None:
        try:
            mtime = os.stat(self._path).st_mtime
            with open(self._path, encoding="utf-8") as handle:
                entries = parse_clients(handle.read())
        except (OSError, UnicodeDecodeError, ClientsFileError) as exc:
            reason = str(exc) if isinstance(exc, ClientsFileError) else type(exc).__name__
            if initial:
                raise ClientsFileError(reason) from None
            # Remember the bad version so it is reported once, not every second.
            with contextlib.suppress(OSError):
                self._mtime = os.stat(self._path).st_mtime
            log.warning(
                "clients file invalid; keeping the last good one",
                extra={"event": "clients_file_invalid", "reason": reason},
            )
            return
        self._entries = self._default + entries
        self._limits = {entry.name: entry.limits for entry in entries if entry.limits}
        self._mtime = mtime
        if not initial:
            log.info(
                "clients file reloaded",
                extra={"event": "clients_file_reloaded", "clients": len(entries)},
            )


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
