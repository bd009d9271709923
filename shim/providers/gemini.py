"""Google Gemini API: routes under /v1beta and /v1, secret as x-goog-api-key or ?key=.

The client's ``key`` query parameter is the shared secret, so it is removed
from the forwarded query; the upstream key (next in the pool) travels in the
``x-goog-api-key`` header, never in a URL, so it cannot end up in an access log.
"""

from __future__ import annotations

import json
from urllib.parse import unquote_to_bytes

from shim.errors import GatewayError, ProviderNotConfigured
from shim.keys import KeyPool
from shim.providers.base import Provider, Route

ACTIONS = "generateContent,streamGenerateContent,countTokens,embedContent,batchEmbedContents"
_VERSION = "<any(v1beta,v1):version>"

STATUSES = {
    "invalid_request": "INVALID_ARGUMENT",
    "authentication": "UNAUTHENTICATED",
    "not_found": "NOT_FOUND",
    "method_not_allowed": "INVALID_ARGUMENT",
    "too_large": "INVALID_ARGUMENT",
    "upstream_unreachable": "UNAVAILABLE",
    "not_configured": "UNAVAILABLE",
    "upstream_timeout": "DEADLINE_EXCEEDED",
    "internal": "INTERNAL",
}


def query_params(query: str) -> list[tuple[bytes, str]]:
    """Split a raw query into (decoded name, raw pair) so names can be matched exactly."""
    pairs = []
    for pair in query.split("&"):
        if pair:
            name = pair.split("=", 1)[0]
            pairs.append((unquote_to_bytes(name.replace("+", " ")), pair))
    return pairs


def without_key(query: str) -> str:
    """Return ``query`` with every ``key`` parameter removed, other pairs raw and in order."""
    if "key" not in query.lower() and "%" not in query:
        return query
    return "&".join(pair for name, pair in query_params(query) if name != b"key")


class Gemini(Provider):
    name = "gemini"
    routes = (
        Route(f"/{_VERSION}/models", "models", ("GET",)),
        Route(f"/{_VERSION}/models/<model_id:model>", "model", ("GET",)),
        Route(f"/{_VERSION}/models/<model_id:model>:<any({ACTIONS}):action>", "action", ("POST",)),
    )
    client_credential_headers = frozenset({"x-goog-api-key", "authorization"})

    def __init__(self, upstream: str, keys: KeyPool):
        super().__init__(upstream)
        self.keys = keys

    def __repr__(self) -> str:
        return f"Gemini(upstream={self.upstream!r}, keys={self.keys!r})"

    @property
    def configured(self) -> bool:
        return len(self.keys) > 0

    def presented_secrets(self, environ: dict) -> list[bytes]:
        presented = []
        header = environ.get("HTTP_X_GOOG_API_KEY")
        if header is not None:
            presented.append(header.encode("latin-1"))
        query = environ.get("QUERY_STRING", "")
        if query:
            for name, pair in query_params(query):
                if name == b"key":
                    value = pair.partition("=")[2]
                    presented.append(unquote_to_bytes(value.replace("+", " ")))
        return presented

    def upstream_query(self, query: str) -> str:
        return without_key(query)

    def add_credential(self, headers: dict[str, str]) -> str | None:
        key = self.keys.next_key()
        if key is None:
            raise ProviderNotConfigured(
                "The gateway has no Gemini API key configured "
                "(SHIM_GEMINI_KEYS or SHIM_GEMINI_KEYS_FILE)."
            )
        headers["x-goog-api-key"] = key
        return self.keys.id_of(key)

    def error_body(self, error: GatewayError) -> bytes:
        return json.dumps(
            {
                "error": {
                    "code": error.status,
                    "message": error.message,
                    "status": STATUSES.get(error.kind, "INTERNAL"),
                }
            }
        ).encode()
