"""Recognise Anthropic's subscription refusals in an error answer, from a decoded copy.

A subscription (OAuth) credential can be refused for reasons that say
nothing about the request and everything about the credential or the
account (issue #15): third-party traffic billed to extra usage, a token only
Claude Code may use, a disabled organization, OAuth switched off for the
organization, OAuth not accepted at all. Upstream says so only in the error
*message*; this module turns that text into one word of a fixed vocabulary
(``KINDS``) for the access line, a counter and readiness.

What lives here: the vocabulary, the message prefixes, and the bounded
decode + parse of a small, whole error body. What does not: the client's
answer, which is relayed exactly as upstream sent it (status, headers,
bytes, compressed or not); the body given here is a copy.

Matching is on the message prefix, not on the exact status (the provider
only asks for 400, 401, 403 and 429): upstream has sent the same refusal as
400 and as 429, and reworded the tail ("…draw from your extra usage…" /
"…draw from extra usage…", with a varying credit sentence). A body that is
not an Anthropic error, not decodable or too large is simply not classified.
"""

from __future__ import annotations

import orjson

from shim.decode import decoded

# (kind, message prefix, blocks): ``blocks`` means the credential cannot serve
# anyone, so readiness reports the provider unavailable (see shim.readiness).
REFUSALS: tuple[tuple[str, str, bool], ...] = (
    ("third_party_extra_usage", "Third-party apps now draw from", False),
    ("claude_code_only", "This credential is only authorized for use with Claude Code", False),
    ("org_disabled", "This organization has been disabled", True),
    (
        "oauth_not_allowed",
        "OAuth authentication is currently not allowed for this organization",
        True,
    ),
    ("oauth_not_supported", "OAuth authentication is currently not supported", False),
)
KINDS = tuple(kind for kind, _, _ in REFUSALS)
BLOCKING = frozenset(kind for kind, _, blocks in REFUSALS if blocks)
# An error answer is a few hundred bytes; anything larger is not one of these.
MAX_ERROR_BYTES = 65_536


def classify_message(message: str) -> str | None:
    """Return the refusal kind whose prefix ``message`` starts with, or None."""
    for kind, prefix, _ in REFUSALS:
        if message.startswith(prefix):
            return kind
    return None


def classify(body: bytes, content_encoding: str | None) -> str | None:
    """Return the refusal kind of a whole Anthropic error body (as sent, maybe compressed)."""
    if len(body) > MAX_ERROR_BYTES:
        return None
    body = decoded(body, content_encoding, MAX_ERROR_BYTES)
    if body is None:
        return None
    # Most error answers are not refusals: skip parsing unless a prefix could be there.
    if b'"message"' not in body:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return classify_message(message) if isinstance(message, str) else None
