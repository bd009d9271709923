"""The OAuth credentials file: parse it, and write a refreshed pair back atomically.

``SHIM_ANTHROPIC_CREDENTIALS_FILE`` is Claude Code's own ``~/.claude/.credentials.json``::

    {"claudeAiOauth": {"accessToken": "sk-ant-oat01-…", "refreshToken": "sk-ant-ort01-…",
                       "expiresAt": 1747909518727, "scopes": [...], "subscriptionType": "max"}}

or a flat object with the same three keys. ``expiresAt`` is epoch *milliseconds*.
Every other field (Claude Code's scopes, subscription type, whatever it adds
later) survives a rewrite untouched.

Errors (``CredentialsFileError``) never contain a token: they name the file
and the field. Refreshing (HTTP, locking) lives in ``shim.oauth``; this module
is standard library only because settings.py (loaded by gunicorn's master)
validates the file at start-up.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from shim.secret_files import header_safe, read_text, write_private_file

# Where Claude Code refreshes since v2.1.81; before that console.anthropic.com/v1/oauth/token.
DEFAULT_TOKEN_URL = "https://platform.claude.com/v1/oauth/token"
# Claude Code's public OAuth client id: tokens from its login are bound to it.
CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
NESTED_KEY = "claudeAiOauth"
# Before this many epoch milliseconds (March 1973) a value is surely seconds, not milliseconds.
_MIN_EXPIRES_AT_MS = 100_000_000_000


class CredentialsFileError(ValueError):
    """A credentials file that cannot be used; the message never contains a token."""


@dataclass(frozen=True)
class OAuthCredentials:
    """One access/refresh pair and when the access token expires (epoch seconds)."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_at: float


@dataclass(frozen=True)
class CredentialsDocument:
    """The parsed file: the pair, plus the whole JSON object to write back around it."""

    credentials: OAuthCredentials
    document: dict = field(repr=False)
    nested: bool


def parse_credentials(text: str) -> CredentialsDocument:
    """Parse the file's text (either layout) or raise CredentialsFileError."""
    try:
        document = json.loads(text)
    except ValueError:
        raise CredentialsFileError("expected a JSON object (it is not valid JSON)") from None
    if not isinstance(document, dict):
        raise CredentialsFileError("expected a JSON object")
    nested = NESTED_KEY in document
    section = document[NESTED_KEY] if nested else document
    where = f"{NESTED_KEY}." if nested else ""
    if not isinstance(section, dict):
        raise CredentialsFileError(f"expected {NESTED_KEY} to be an object")
    tokens = []
    for name in ("accessToken", "refreshToken"):
        value = section.get(name)
        if not isinstance(value, str) or not value:
            raise CredentialsFileError(f"{where}{name}: expected a non-empty string")
        if not header_safe(value):
            raise CredentialsFileError(f"{where}{name}: expected printable ASCII without spaces")
        tokens.append(value)
    expires_at = section.get("expiresAt")
    if isinstance(expires_at, bool) or not isinstance(expires_at, (int, float)):
        raise CredentialsFileError(f"{where}expiresAt: expected epoch milliseconds (a number)")
    if expires_at < _MIN_EXPIRES_AT_MS:
        raise CredentialsFileError(
            f"{where}expiresAt: expected epoch milliseconds, got {expires_at!r} (seconds?)"
        )
    return CredentialsDocument(
        OAuthCredentials(tokens[0], tokens[1], expires_at / 1000), document, nested
    )


def read_credentials(path: str) -> CredentialsDocument:
    """Read and parse the file at ``path``; the error names the file, never a token."""
    text = read_text(path, CredentialsFileError)
    try:
        return parse_credentials(text)
    except CredentialsFileError as exc:
        raise CredentialsFileError(f"file {path!r}: {exc}") from None


def with_credentials(parsed: CredentialsDocument, new: OAuthCredentials) -> dict:
    """Return the document with ``new`` in place of the old pair, every other field kept."""
    document = dict(parsed.document)
    section = dict(document[NESTED_KEY]) if parsed.nested else document
    section["accessToken"] = new.access_token
    section["refreshToken"] = new.refresh_token
    section["expiresAt"] = int(new.expires_at * 1000)
    if parsed.nested:
        document[NESTED_KEY] = section
    return document


def write_credentials(path: str, document: dict) -> None:
    """Replace the file at ``path`` with ``document`` atomically, mode 0600.

    A symlink is written through: the new file replaces the link's *target*,
    so the link stays a link (a dotfiles setup, or a file shared with Claude
    Code through a link, keeps working).
    """
    write_private_file(os.path.realpath(path), json.dumps(document, indent=2).encode() + b"\n")
