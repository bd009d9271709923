"""The OAuth credentials file as one worker sees it: re-read when it changes, written back.

The file is the shared truth between the workers of a box, and with Claude
Code (issue #15), which rewrites it in place without shim's lock. So a
worker looks at it (one ``stat``) at most every ``reload_interval_s``, and
reads it again when its signature (mtime, inode, size) moved. A file that
does not parse (mid-write, mid-edit, gone) is reported once per signature
and otherwise ignored: the worker keeps the pair it has (``unusable`` says
so, for a refresher waiting for a write to end). Writing a refreshed pair
back re-reads the file first: fields added meanwhile are kept, and a pair
someone else wrote meanwhile (a new login) is left in place.

What is not here: the file's format (``shim.credentials``), deciding which
pair to use and when to refresh (``shim.oauth``).
"""

from __future__ import annotations

import logging
import os
import time

from shim.credentials import (
    CredentialsDocument,
    CredentialsFileError,
    OAuthCredentials,
    read_credentials,
    with_credentials,
    write_credentials,
)
from shim.secret_files import key_id

log = logging.getLogger("shim.oauth")


class CredentialsFile:
    """One worker's view of the credentials file at ``path``."""

    def __init__(self, path: str, reload_interval_s: float = 1.0):
        self.path = path
        self.reload_interval_s = reload_interval_s
        self._checked_at = float("-inf")  # monotonic time of the last stat of the file
        self._signature: tuple[int, int, int] | None = None
        self.unusable: object = None  # the file's signature when it last failed to parse

    def __repr__(self) -> str:
        return f"CredentialsFile({self.path!r})"

    def load(self) -> CredentialsDocument:
        """Read the file as it is now; CredentialsFileError or OSError if it cannot be used."""
        parsed = read_credentials(self.path)
        self._signature = _signature(os.stat(self.path))
        self._checked_at = time.monotonic()
        return parsed

    def changed(self, force: bool = False) -> CredentialsDocument | None:
        """The file's content if it changed and parses, else None (looked at every interval)."""
        now = time.monotonic()
        if not force and now < self._checked_at + self.reload_interval_s:
            return None
        self._checked_at = now
        signature = None
        try:
            signature = _signature(os.stat(self.path))
            if signature == self._signature or signature == self.unusable:
                return None
            parsed = read_credentials(self.path)
        except (OSError, CredentialsFileError) as exc:
            # Mid-write (Claude Code rewrites in place), mid-edit or gone: keep
            # the token we have, read it again once it changes, say why once.
            if self.unusable != (signature or "missing"):
                self.unusable = signature or "missing"
                log.warning(
                    "credentials file unusable; keeping the current token",
                    extra={"event": "oauth_file_unusable", "error": str(exc)},
                )
            return None
        self._signature, self.unusable = signature, None
        return parsed

    def write_back(self, parsed: CredentialsDocument, new: OAuthCredentials) -> CredentialsDocument:
        """Write ``new`` in place of ``parsed``'s pair; the document the worker now holds.

        The file is read again just before: fields Claude Code added meanwhile
        are kept, and a pair someone else wrote meanwhile (a new login) is not
        overwritten; it is adopted at the next reload instead.
        """
        try:
            on_disk = read_credentials(self.path)
        except (OSError, CredentialsFileError):
            on_disk = None
        base = parsed
        if on_disk is not None:
            if on_disk.credentials.refresh_token not in (
                parsed.credentials.refresh_token,
                new.refresh_token,
            ):
                log.warning(
                    "another pair was written to the credentials file meanwhile; left in place",
                    extra={"event": "oauth_file_changed", "credential": ident(new.access_token)},
                )
                return CredentialsDocument(new, with_credentials(parsed, new), parsed.nested)
            base = on_disk
        document = with_credentials(base, new)
        try:
            write_credentials(self.path, document)
            self._signature = _signature(os.stat(self.path))
        except OSError as exc:
            # The old refresh token is spent: this worker keeps the new pair in
            # memory, but the other workers will fail until the file is fixed.
            log.error(
                "new token could not be written back",
                extra={"event": "oauth_write_failed", "error": type(exc).__name__},
            )
        return CredentialsDocument(new, document, base.nested)


def ident(token: str) -> str:
    """The loggable id of an OAuth access token."""
    return "oauth:" + key_id(token)


def _signature(stat: os.stat_result) -> tuple[int, int, int]:
    return (stat.st_mtime_ns, stat.st_ino, stat.st_size)
