"""Upstream key loading (file or environment list) and the Gemini key pool.

``load_keys`` is the one parser for key lists: one key per line, ``#``
comments and blank lines ignored. ``KeyPool`` hands keys out round-robin and
identifies each by a short stable hash (``key_id``) so logs can say which key
was used without ever holding the key itself.

Standard library only: settings.py (loaded by gunicorn's master) imports it.
"""

from __future__ import annotations

import hashlib
import itertools


class KeyFileError(ValueError):
    """A key list that cannot be used; the message never contains a key."""


def load_keys(*, path: str | None = None, text: str | None = None) -> tuple[str, ...]:
    """Parse keys from ``text`` or from the file at ``path``; raise KeyFileError if none."""
    if text is None:
        if path is None:
            raise ValueError("load_keys needs path or text")
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            raise KeyFileError(f"file {path!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"file {path!r} cannot be read ({type(exc).__name__})") from None
    keys: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        key = line.split("#", 1)[0].strip()
        if not key:
            continue
        if not (key.isascii() and key.isprintable()) or " " in key:
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
    """Round-robin over a fixed set of keys, one pool per worker process."""

    def __init__(self, keys: tuple[str, ...]):
        self._keys = keys
        self._ids = {key: key_id(key) for key in keys}
        self._cycle = itertools.cycle(keys) if keys else None

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KeyPool(size={len(self._keys)}, ids={list(self._ids.values())})"

    def next_key(self) -> str | None:
        """Return the next key in turn, or None when the pool is empty."""
        return next(self._cycle) if self._cycle is not None else None

    def id_of(self, key: str) -> str:
        return self._ids.get(key) or key_id(key)
