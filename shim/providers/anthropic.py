"""Anthropic Messages API: routes, where the secret arrives, the upstream credential.

Clients present the shared secret the way the SDKs and Claude Code send an
API key: ``x-api-key`` (ANTHROPIC_API_KEY) or ``Authorization: Bearer``
(ANTHROPIC_AUTH_TOKEN). Upstream gets either the configured API key as
``x-api-key``, or the subscription OAuth token as a Bearer with the
``oauth-2025-04-20`` beta merged into ``anthropic-beta``. With a credentials
file the token comes from a ``TokenRefresher`` (``shim.oauth``), and a 401 is
shown to it: it refreshes once and the core retries the call.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING

from shim import quota, refusals
from shim.access import AccessRecord
from shim.candidates import SECRET_ENVIRON, bearer
from shim.errors import GatewayError, ProviderNotConfigured
from shim.providers.base import Provider, Route

if TYPE_CHECKING:
    from shim.oauth import TokenRefresher
    from shim.settings import Settings
    from shim.state import RedisState

OAUTH_BETA = "oauth-2025-04-20"
# How each gateway error kind reads on Anthropic's wire (shim.errors).
ANTHROPIC_TYPES = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "not_found": "not_found_error",
    "method_not_allowed": "invalid_request_error",
    "too_large": "request_too_large",
    "rate_limited": "rate_limit_error",
    "request_timeout": "timeout_error",
    "upstream_unreachable": "api_error",
    "not_configured": "api_error",
    "upstream_timeout": "timeout_error",
    "shutting_down": "overloaded_error",
    "internal": "api_error",
}


def anthropic_error_body(kind: str, message: str) -> bytes:
    error = {"type": ANTHROPIC_TYPES.get(kind, "api_error"), "message": message}
    return json.dumps({"type": "error", "error": error}).encode()

_REFUSAL_STATUSES = frozenset({400, 401, 403, 429})
_USAGE_FIELDS = (
    ("input_tokens", "input_tokens"),
    ("output_tokens", "output_tokens"),
    ("cache_read_input_tokens", "cache_read_tokens"),
    ("cache_creation_input_tokens", "cache_creation_tokens"),
)


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
        Route("/v1/models/<model_id:model>", "model", ("GET",)),
    )
    # A real newline ends the SSE field line; inside JSON text it would be escaped.
    usage_markers = (b"event: message_start\n", b"event: message_delta\n")
    port_setting = "anthropic_port"

    @classmethod
    def from_settings(cls, settings: Settings, shared: RedisState | None) -> Anthropic:
        refresher = None
        if settings.anthropic_credentials_file:
            # Only a credentials-file deployment loads the refresher and its locks.
            from shim import logs, metrics
            from shim.locks import FileLock
            from shim.oauth import TokenRefresher
            from shim.oauth_shared import SharedLock

            file_lock = FileLock(settings.anthropic_credentials_file + ".lock")
            refresher = TokenRefresher(
                settings.anthropic_credentials_file,
                settings.anthropic_token_url,
                # Several boxes: one refresher among all of them, and the new pair shared.
                lock=SharedLock(shared, "oauth-refresh", 120.0, file_lock) if shared else file_lock,
                shared=shared,
                margin_s=settings.anthropic_refresh_margin_s,
                client_id=settings.anthropic_oauth_client_id,
                timeout_s=(settings.connect_timeout_s, 30.0),
                on_token=logs.add_secret,
                on_result=metrics.oauth_refresh,
                on_expiry=metrics.oauth_expiry,
            )
        return cls(
            settings.anthropic_upstream,
            settings.anthropic_api_key,
            settings.anthropic_token,
            refresher,
            allow_client_credentials=settings.allow_client_credentials,
        )

    @staticmethod
    def render_error(status: int, kind: str, message: str) -> bytes:
        return anthropic_error_body(kind, message)

    def describe(self) -> dict:
        return {"configured": self.configured, "credential": self.credential_kind}

    def __init__(
        self,
        upstream: str,
        api_key: str | None,
        oauth_token: str | None,
        refresher: TokenRefresher | None = None,
        allow_client_credentials: bool = False,
    ):
        super().__init__(upstream)
        self.allow_client_credentials = allow_client_credentials
        self._api_key = api_key
        self._oauth_token = oauth_token
        self._bearer = f"Bearer {oauth_token}" if oauth_token else None
        self._refresher = refresher
        self.credential = CredentialState()
        self.quota: dict = {
            "quota_status": None,
            "quota_reset": None,
            "quota_representative_claim": None,
            "quota_5h_utilization": None,
            "quota_7d_utilization": None,
        }
        if refresher is not None:
            # An expired or revoked token: refresh once, retry before any byte went out.
            self.retry_statuses = frozenset({401})

    def __repr__(self) -> str:
        return f"Anthropic(upstream={self.upstream!r}, credential={self.credential_kind})"

    @property
    def configured(self) -> bool:
        return bool(self._api_key or self._oauth_token or self._refresher)

    @property
    def credential_kind(self) -> str:
        if self._refresher is not None:
            return "oauth_file"
        return "oauth" if self._oauth_token else "api_key" if self._api_key else "none"

    def presented_secrets(self, environ: dict) -> list[bytes | None]:
        if self.allow_client_credentials:
            # A member bringing their own login: shim's secret is only in X-Shim-Key,
            # and x-api-key / Authorization are theirs, for upstream (issue #15).
            shim_key = environ.get("HTTP_X_SHIM_KEY")
            if shim_key is not None:
                return [shim_key.encode("latin-1")]
        api_key = environ.get("HTTP_X_API_KEY")
        return [
            api_key.encode("latin-1") if api_key is not None else None,
            bearer(environ.get("HTTP_AUTHORIZATION")),
        ]

    def own_credential(self, environ: dict, headers: dict[str, str]) -> str | None:
        """Send the client's own x-api-key / Authorization upstream, if it brought one.

        Only with SHIM_ALLOW_CLIENT_CREDENTIALS and a client that authenticated
        with X-Shim-Key. A subscription token (``sk-ant-oat…``) gets the OAuth
        beta merged in, as shim's own does. The return value names the
        credential in the access line by a short hash; the value itself is
        never logged, counted or kept.
        """
        if not self.allow_client_credentials or "HTTP_X_SHIM_KEY" not in environ:
            return None
        api_key = environ.get("HTTP_X_API_KEY")
        authorization = environ.get("HTTP_AUTHORIZATION")
        own = "\n".join(v for v in (api_key, authorization) if v)
        secret = environ.get(SECRET_ENVIRON)
        if not own or (secret and secret.decode("latin-1") in own):
            return None  # nothing brought (shim's credential serves), or the shim secret itself
        if api_key:
            headers["x-api-key"] = api_key
        if authorization:
            headers["authorization"] = authorization
            token = bearer(authorization)
            if token is not None and token.startswith(b"sk-ant-oat"):
                headers["anthropic-beta"] = merge_beta(headers.get("anthropic-beta"), OAUTH_BETA)
        return "client:" + hashlib.sha256(own.encode("latin-1")).hexdigest()[:12]

    def add_credential(self, headers: dict[str, str], model: str | None = None) -> str | None:
        if self._refresher is not None or self._bearer is not None:
            if self._refresher is not None:
                token, ident = self._refresher.credential()
                headers["authorization"] = "Bearer " + token
            else:
                headers["authorization"], ident = self._bearer, "oauth"
            headers["anthropic-beta"] = merge_beta(headers.get("anthropic-beta"), OAUTH_BETA)
            return ident
        if self._api_key is not None:
            headers["x-api-key"] = self._api_key
            return "api_key"
        raise ProviderNotConfigured(
            "The gateway has no Anthropic credential configured "
            "(SHIM_ANTHROPIC_TOKEN or SHIM_ANTHROPIC_API_KEY)."
        )

    def after_failure(
        self,
        credential: str | None,
        status: int,
        headers: dict,
        body: bytes,
        model: str | None = None,
    ) -> bool:
        if status == 401 and self._refresher is not None:
            return self._refresher.after_unauthorized(credential)
        return False

    def read_request(self, environ: dict, record: AccessRecord) -> None:
        # Claude Code names its session on every call: attribution for the access line.
        session = environ.get("HTTP_X_CLAUDE_CODE_SESSION_ID")
        if session:
            record.claude_session_id = session[:128]

    def read_headers(self, headers: object, record: AccessRecord) -> None:
        quota.read(headers, record)

    def read_error(
        self, status: int, content_encoding: str | None, body: bytes, record: AccessRecord
    ) -> None:
        # Only the statuses a subscription refusal has been seen with (issue #15).
        if status in _REFUSAL_STATUSES:
            record.refusal = refusals.classify(body, content_encoding)

    def read_usage(self, data: dict, record: AccessRecord) -> None:
        kind = data.get("type")
        if kind == "message_start":
            data = data.get("message") or {}
        elif kind == "message_delta":
            delta = data.get("delta") or {}
            if delta.get("stop_reason"):
                record.stop_reason = delta["stop_reason"]
        elif kind == "message":
            record.stop_reason = data.get("stop_reason") or record.stop_reason
        else:
            return
        if isinstance(data.get("model"), str):
            record.model = data["model"]
        usage = data.get("usage")
        if isinstance(usage, dict):
            # message_delta counts are cumulative: the last one seen wins.
            for field, name in _USAGE_FIELDS:
                value = usage.get(field)
                if isinstance(value, int):
                    setattr(record, name, value)

    def stream_error_frame(self, error: GatewayError, content_type: str) -> bytes | None:
        # An SSE client understands an `error` event; anything else gets an aborted body.
        if not content_type.startswith("text/event-stream"):
            return None
        return b"event: error\ndata: " + self.error_body(error) + b"\n\n"

    def observe(self, record: AccessRecord) -> None:
        super().observe(record)
        if record.client_credential is not None:
            return  # a member's own login: its quota and refusals say nothing of shim's
        if record.quota_status is not None:
            for field in self.quota:
                self.quota[field] = getattr(record, field)
        if record.upstream_status is not None:
            self.credential.observe(record.upstream_status, record.refusal)

    def readiness(self) -> dict:
        oauth = self._refresher.state() if self._refresher is not None else None
        ready = (
            self.configured
            and self.quota["quota_status"] != "rejected"
            and self.credential.state != "refused"
            and not (oauth is not None and oauth.get("state") == "relogin_needed")
        )
        return {
            "configured": self.configured,
            "credential": self.credential_kind,
            "ready": ready,
            "last_upstream_status": self.last_upstream_status,
            **self.quota,
            "credential_state": self.credential.state,
            "last_refusal": self.credential.last_refusal,
            "oauth": oauth,
        }


class CredentialState:
    """What Anthropic's answers said about the credential, as this worker saw them.

    ``state``: ``unknown`` (no success or refusal seen yet), ``ok`` (a success
    since the last refusal), ``limited`` (the last answer was a refusal that leaves the
    credential usable by some clients or at some cost: third-party extra
    usage, Claude Code only, OAuth not supported on that call) or ``refused``
    (``org_disabled`` or ``oauth_not_allowed``: it can serve no one, and the
    provider is reported unavailable). A later success (2xx) clears it; other
    errors (429, 5xx) leave it as it was. Readiness never calls upstream to
    find out: a worker knows what its own traffic told it.
    ``last_refusal`` stays after it is cleared: kind, unix time, status.
    """

    def __init__(self) -> None:
        self.state = "unknown"
        self.last_refusal: dict | None = None

    def observe(self, upstream_status: int, refusal: str | None) -> None:
        if refusal is not None:
            self.state = "refused" if refusal in refusals.BLOCKING else "limited"
            self.last_refusal = {
                "kind": refusal,
                "at": int(time.time()),
                "upstream_status": upstream_status,
            }
        elif 200 <= upstream_status < 300:
            self.state = "ok"
