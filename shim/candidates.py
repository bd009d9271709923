"""Where a client's secret can arrive, what it presented, and keeping it from going upstream.

A *candidate* is one distinct, non-empty value a client presented where its
port accepts the secret (which places, the provider says: ``presented_secrets``).
``shim.web`` refuses a request with more than one candidate (issue #14: one
request used to carry ~190 guesses), so each guess costs a request *and* a
count in the failed-secret throttle.

Stripping is wider than accepting. Every credential header and query
parameter known to either API is removed on *both* ports before the provider
adds its own credential, whether or not that port reads it: a Gemini secret
sent to the Anthropic port, or ``?key=`` on either, must never reach an
upstream (issue #14 found the Anthropic upstream receiving ``?key=<secret>``
in its URL). On top, any other header or query parameter whose value carries
the authenticated secret is dropped (defence in depth for clients that copy
it somewhere odd). Nothing here compares secrets: matching is ``shim.clients``.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote_to_bytes

# Where a client that brings its own upstream credential presents its shim secret
# (SHIM_ALLOW_CLIENT_CREDENTIALS; Claude Code: ANTHROPIC_CUSTOM_HEADERS).
SHIM_KEY_HEADER = "x-shim-key"
# Lower-case request headers that carry a credential to Anthropic or Google
# (x-goog-iam-authorization-token: Google's legacy IAM credential header;
# proxy-authorization is also hop-by-hop and dropped in shim.forward anyway).
CREDENTIAL_HEADERS = frozenset(
    {
        "x-api-key",
        "authorization",
        "proxy-authorization",
        "x-goog-api-key",
        "x-goog-iam-authorization-token",
        # shim's own: the gateway secret of a client that brings its own credential.
        SHIM_KEY_HEADER,
    }
)
# Query parameter names (percent-decoded, lower-cased) that carry a credential:
# Google's `key` and `access_token`/`oauth_token` system parameters, and the
# `api_key` spellings that Google API front ends (Cloud Endpoints) and
# hand-written clients use. Neither API has another parameter by these names.
CREDENTIAL_PARAMS = frozenset(
    {b"key", b"api_key", b"api-key", b"apikey", b"access_token", b"oauth_token"}
)
# Substrings one of those names must contain, for the fast path below.
_NAME_HINTS = ("key", "token")

# Where shim.web leaves the secret that authenticated this request (bytes),
# for shim.forward to keep out of the upstream request.
SECRET_ENVIRON = "shim.presented_secret"


def decode(text: str) -> bytes:
    """Percent-decode a raw query component (``+`` is a space) to bytes.

    WSGI hands the query over as latin-1 text, so latin-1 gives back the
    bytes on the wire (the same bytes a header value gives); text that is not
    WSGI's (a test's) falls back to UTF-8 rather than failing.
    """
    text = text.replace("+", " ")
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        raw = text.encode("utf-8")
    return unquote_to_bytes(raw)


def query_params(query: str) -> list[tuple[bytes, str]]:
    """Split a raw query into (decoded name, raw pair) so names can be matched exactly."""
    pairs = []
    for pair in query.split("&"):
        if pair:
            pairs.append((decode(pair.split("=", 1)[0]), pair))
    return pairs


def param_values(query: str, name: bytes) -> list[bytes]:
    """Return the decoded value of every parameter whose decoded name is exactly ``name``."""
    return [decode(pair.partition("=")[2]) for found, pair in query_params(query) if found == name]


def bearer(authorization: str | None) -> bytes | None:
    """Return the token of an ``Authorization: Bearer`` value (scheme case-insensitive)."""
    if authorization is not None and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip().encode("latin-1")
    return None


def distinct(presented: Iterable[bytes | None]) -> list[bytes]:
    """Return the distinct non-empty values, first occurrence first.

    The same secret in two places (``x-api-key`` and a Bearer, the header and
    ``?key=``) is one candidate; an empty value is nobody's secret, so no guess.
    """
    candidates: list[bytes] = []
    for value in presented:
        if value and value not in candidates:
            candidates.append(value)
    return candidates


def without_credentials(query: str, secret: bytes | None = None) -> str:
    """Return ``query`` without credential parameters or any pair carrying ``secret``.

    Other pairs stay raw and in order. Runs on every request with a query, so
    a query with no ``%``/``+``, no name hint and no raw secret is returned as is.
    """
    lowered = query.lower()
    if "%" not in query and "+" not in query and not any(h in lowered for h in _NAME_HINTS):
        if not secret or secret.decode("latin-1") not in query:
            return query
    kept = []
    for name, pair in query_params(query):
        if name.lower() in CREDENTIAL_PARAMS:
            continue
        # The whole pair, decoded: the secret as a name, a value, or across an `=`.
        if secret and secret in decode(pair):
            continue
        kept.append(pair)
    return "&".join(kept)
