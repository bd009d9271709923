"""Upstream key loading (file or environment list) and the Gemini key pool.

``load_keys`` is the one parser for key lists: one key per line, ``#``
comments and blank lines ignored. ``KeyPool`` hands keys out round-robin and
identifies each by a short stable hash (``key_id``) so logs can say which key
was used without ever holding the key itself.

Standard library only: settings.py (loaded by gunicorn's master) imports it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from shim.limits import StateUnavailable

if TYPE_CHECKING:
    from shim.state import State

# How often a worker looks at benches other instances put in shared state.
SYNC_EVERY_S = 0.5
# A key rejected as invalid is benched this long for the other instances.
DISABLED_BENCH_S = 86_400.0


def header_safe(value: str) -> bool:
    """True if ``value`` can travel in an HTTP header as it is: printable ASCII, no spaces."""
    return value.isascii() and value.isprintable() and " " not in value


def read_text(path: str, error: type[ValueError]) -> str:
    """The UTF-8 text of a config file, or ``error`` naming the file (never its content)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        raise error(f"file {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"file {path!r} cannot be read ({type(exc).__name__})") from None


class KeyFileError(ValueError):
    """A key list that cannot be used; the message never contains a key."""


def load_keys(*, path: str | None = None, text: str | None = None) -> tuple[str, ...]:
    """Parse keys from ``text`` or from the file at ``path``; raise KeyFileError if none."""
    if text is None:
        if path is None:
            raise ValueError("load_keys needs path or text")
        text = read_text(path, KeyFileError)
    keys: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        key = line.split("#", 1)[0].strip()
        if not key:
            continue
        if not header_safe(key):
            where = f"line {number}" if path else f"entry {len(keys) + 1}"
            raise KeyFileError(f"{where}: expected a key of printable ASCII without spaces")
        if key not in keys:
            keys.append(key)
    if not keys:
        raise KeyFileError("no keys found" + (f" in {path!r}" if path else ""))
    return tuple(keys)


def key_id(key: str) -> str:
    """Return a short stable identifier of ``key`` that is safe to log."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


class KeyPool:
    """Round-robin over a fixed set of keys, skipping keys that are cooling down or disabled.

    Benches are kept in this worker and, when ``shared`` is a store shared by
    every instance (Redis), written there too and read back from it at most
    every ``SYNC_EVERY_S``: one instance's 429 benches the key for all. A
    failing shared store is skipped (benches stay per worker until it is back).
    Times are wall-clock seconds, the clock instances share. Keys are
    addressed by ``key_id`` outside this class so callers never hold or log one.
    """

    def __init__(
        self,
        keys: tuple[str, ...],
        clock: Callable[[], float] = time.time,
        shared: State | None = None,
    ):
        self._keys = keys
        self._ids = {key: key_id(key) for key in keys}
        self._by_id = {ident: key for key, ident in self._ids.items()}
        self._next = 0
        self._clock = clock
        self._cooling_until: dict[str, float] = {}  # key id -> wall-clock time it is back
        self._disabled: set[str] = set()
        self._on_change: Callable[[dict[str, int]], None] | None = None
        self._shared = shared
        self._synced = float("-inf")

    def on_change(self, callback: Callable[[dict[str, int]], None]) -> None:
        """Call ``callback(states())`` now and whenever a key's state changes."""
        self._on_change = callback
        callback(self.states())

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.states())

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KeyPool(size={len(self._keys)}, ids={list(self._ids.values())})"

    def next_key(self) -> str | None:
        """Return the next available key in turn, or None when none is available now."""
        now = self._clock()
        if self._shared is not None and now - self._synced >= SYNC_EVERY_S:
            self._sync(now)
        count = len(self._keys)
        for step in range(count):
            key = self._keys[(self._next + step) % count]
            ident = self._ids[key]
            if ident in self._disabled:
                continue
            until = self._cooling_until.get(ident)
            if until is not None:
                if until > now:
                    continue
                del self._cooling_until[ident]
                self._changed()
            self._next = (self._next + step + 1) % count
            return key
        return None

    def _sync(self, now: float) -> None:
        self._synced = now
        try:
            benched = self._shared.benched_keys(now)  # type: ignore[union-attr]
        except StateUnavailable:
            return
        changed = False
        for ident, until in benched.items():
            if ident in self._by_id and until > self._cooling_until.get(ident, 0.0):
                self._cooling_until[ident] = until
                changed = True
        if changed:
            self._changed()

    def _share(self, ident: str, until: float) -> None:
        if self._shared is not None:
            try:
                self._shared.bench_key(ident, until)
            except StateUnavailable:
                pass  # this worker still benches it; the others learn from their own 429

    def id_of(self, key: str) -> str:
        return self._ids.get(key) or key_id(key)

    def cool_down(self, ident: str, seconds: float) -> None:
        """Bench the key ``ident`` for ``seconds`` (a longer bench already set is kept)."""
        if ident in self._by_id:
            until = self._clock() + max(0.0, seconds)
            self._cooling_until[ident] = max(until, self._cooling_until.get(ident, 0.0))
            self._changed()
            self._share(ident, until)

    def disable(self, ident: str) -> None:
        """Take the key ``ident`` out of rotation for the life of the process."""
        if ident in self._by_id:
            self._disabled.add(ident)
            self._cooling_until.pop(ident, None)
            self._changed()
            self._share(ident, self._clock() + DISABLED_BENCH_S)

    def seconds_until_available(self) -> float | None:
        """Seconds until the soonest benched key returns; None if every key is disabled."""
        now = self._clock()
        waits = [
            max(0.0, until - now)
            for ident, until in self._cooling_until.items()
            if ident not in self._disabled
        ]
        usable = len(self._keys) - len(self._disabled)
        if usable > len(waits):
            return 0.0
        return min(waits) if waits else None

    def states(self) -> dict[str, int]:
        """Count keys by state: available, cooling, disabled."""
        now = self._clock()
        cooling = sum(
            1
            for ident, until in self._cooling_until.items()
            if until > now and ident not in self._disabled
        )
        disabled = len(self._disabled)
        return {
            "available": len(self._keys) - cooling - disabled,
            "cooling": cooling,
            "disabled": disabled,
        }
