"""The files that hold secrets, and the secrets read from them.

Upstream keys (``shim.keys``), client digests (``shim.clients``), the OAuth
credentials file (``shim.credentials``) and the OAuth refresh note
(``shim.oauth_gate``) are read and written here the same way: a read error
names the file, never its content; a secret that goes out in a header is
checked to fit one (``header_safe``); a secret is named in logs by a short
hash (``key_id``), never itself; a file shim rewrites is replaced atomically,
mode 0600 (``write_private_file``). Parsing each file's format is its own
module's.

Standard library only: settings.py (loaded by gunicorn's master) reads
through it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile


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


def read_text_and_stat(path: str) -> tuple[str, os.stat_result]:
    """The UTF-8 text of ``path`` and the stat of the very file read (OSError, UnicodeDecodeError).

    Stat what is opened, before reading: a write racing the read changes it,
    so a caller comparing stats reads the file again next time.
    """
    with open(path, encoding="utf-8") as handle:
        stat = os.fstat(handle.fileno())
        return handle.read(), stat


def key_id(key: str) -> str:
    """Return a short stable identifier of ``key`` that is safe to log."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def write_private_file(path: str, data: bytes) -> None:
    """Replace the file at ``path`` with ``data`` atomically, mode 0600.

    A temporary file in the same directory, fsynced, then ``os.replace``: a
    reader (another worker, Claude Code) sees the old file or the new one,
    never half of either, and a crash leaves the old content in place with no
    temporary file behind.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=".shim-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    # The rename itself is durable only once the directory is synced.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
