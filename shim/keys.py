"""Upstream key lists: one key per line, from a file or an environment variable.

``load_keys`` is the one parser for key lists: one key per line, ``#``
comments and blank lines ignored, duplicates dropped, every key fit for a
header. Errors never contain a key.

The pool that hands the keys out is ``shim.gemini_keys.KeyPool``; reading
files and naming a key in logs (``key_id``) is ``shim.secret_files``. Both
are still importable from here (settings.py, bench/candidates.py).

Standard library only: settings.py (loaded by gunicorn's master) imports it.
"""

from __future__ import annotations

from shim.gemini_keys import KeyPool as KeyPool  # old import path
from shim.secret_files import header_safe as header_safe  # old import path
from shim.secret_files import key_id as key_id  # old import path
from shim.secret_files import read_text


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
