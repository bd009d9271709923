"""Anthropic Messages API: routes, where the secret arrives, the upstream credential.

Clients present the shared secret the way the SDKs and Claude Code send an
API key: ``x-api-key`` (ANTHROPIC_API_KEY) or ``Authorization: Bearer``
(ANTHROPIC_AUTH_TOKEN). Upstream gets either the configured API key as
``x-api-key``, or the subscription OAuth token as a Bearer with the
``oauth-2025-04-20`` beta merged into ``anthropic-beta``.
"""

from __future__ import annotations

from shim.errors import GatewayError, ProviderNotConfigured, anthropic_error_body
from shim.providers.base import Provider, Route

OAUTH_BETA = "oauth-2025-04-20"



def merge_beta(client_value: str | None, beta: str) -> str:
    """Return the client's comma-separated betas, order kept, duplicates dropped, ``beta`` added."""
    merged: list[str] = []
    for item in (client_value or "").split(","):
        item = item.strip()
        if item and item not in merged:
            merged.append(item)
    if beta not in merged:
        merged.append(beta)
    return ",".join(merged)


class Anthropic(Provider):
    name = "anthropic"
    routes = (
        Route("/v1/messages", "messages", ("POST",)),
        Route("/v1/messages/count_tokens", "count_tokens", ("POST",)),
        Route("/v1/models", "models", ("GET",)),
        Route("/v1/models/<model_id:model_id>", "model", ("GET",)),
    )
    client_credential_headers = frozenset({"x-api-key", "authorization"})

    def __init__(self, upstream: str, api_key: str | None, oauth_token: str | None):
        super().__init__(upstream)
        self._api_key = api_key
        self._oauth_token = oauth_token
        self._bearer = f"Bearer {oauth_token}" if oauth_token else None

    def __repr__(self) -> str:
        mode = "oauth" if self._oauth_token else "api_key" if self._api_key else "none"
        return f"Anthropic(upstream={self.upstream!r}, credential={mode})"

    @property
    def configured(self) -> bool:
        return bool(self._api_key or self._oauth_token)

    @property
    def credential_kind(self) -> str:
        return "oauth" if self._oauth_token else "api_key" if self._api_key else "none"

    def presented_secrets(self, environ: dict) -> list[bytes]:
        presented = []
        api_key = environ.get("HTTP_X_API_KEY")
        if api_key is not None:
            presented.append(api_key.encode("latin-1"))
        authorization = environ.get("HTTP_AUTHORIZATION")
        if authorization is not None and authorization[:7].lower() == "bearer ":
            presented.append(authorization[7:].strip().encode("latin-1"))
        return presented

    def add_credential(self, headers: dict[str, str]) -> str | None:
        if self._bearer is not None:
            headers["authorization"] = self._bearer
            headers["anthropic-beta"] = merge_beta(headers.get("anthropic-beta"), OAUTH_BETA)
            return "oauth"
        if self._api_key is not None:
            headers["x-api-key"] = self._api_key
            return "api_key"
        raise ProviderNotConfigured(
            "The gateway has no Anthropic credential configured "
            "(SHIM_ANTHROPIC_TOKEN or SHIM_ANTHROPIC_API_KEY)."
        )

    def error_body(self, error: GatewayError) -> bytes:
        return anthropic_error_body(error.kind, error.message)

    def stream_error_frame(self, error: GatewayError, content_type: str) -> bytes | None:
        # An SSE client understands an `error` event; anything else gets an aborted body.
        if not content_type.startswith("text/event-stream"):
            return None
        return b"event: error\ndata: " + self.error_body(error) + b"\n\n"
