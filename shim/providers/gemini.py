"""Google Gemini API: routes under /v1beta and /v1, secret as x-goog-api-key or ?key=.

The client's ``key`` query parameter is the shared secret; like every
credential parameter it is removed from the forwarded query (the base
``upstream_query``, shim.candidates). The upstream key (next in the pool)
travels in the ``x-goog-api-key`` header, never in a URL, so it cannot end up
in an access log.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

from shim.access import AccessRecord
from shim.candidates import param_values
from shim.errors import GatewayError, ProviderNotConfigured, RateLimited, google_error_body
from shim.keys import KeyPool
from shim.providers.base import Provider, Route

log = logging.getLogger("shim.gemini")

ACTIONS = "generateContent,streamGenerateContent,countTokens,embedContent,batchEmbedContents"
_VERSION = "<any(v1beta,v1):version>"


DEFAULT_COOL_DOWN_S = 60.0
# Gemini's daily quotas reset at midnight Pacific time; a fixed UTC-8 is at most
# an hour early in summer, and the key is simply benched again if so.
PACIFIC = timezone(timedelta(hours=-8))
# ErrorInfo reasons (and message starts) that mean the key itself is unusable.
DEAD_KEY_REASONS = frozenset(
    {"API_KEY_INVALID", "API_KEY_EXPIRED", "API_KEY_SERVICE_BLOCKED", "CONSUMER_SUSPENDED"}
)
DEAD_KEY_MESSAGES = ("API key not valid", "API key expired", "Permission denied: Consumer")


@dataclass(frozen=True)
class KeyVerdict:
    """What an upstream error says about the key that got it."""

    action: str  # "cool_down", "disable" or "keep"
    seconds: float = 0.0
    quota: str = ""  # "per_minute", "per_day" or "" when unknown


def _seconds(text: object) -> float | None:
    # Durations are JSON strings like "34s" or "1.5s".
    if isinstance(text, str) and text.endswith("s"):
        try:
            return max(0.0, float(text[:-1]))
        except ValueError:
            return None
    return None


def _until_pacific_midnight(now: datetime) -> float:
    local = now.astimezone(PACIFIC)
    midnight = (local + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - local).total_seconds()


def judge_key(
    status: int, retry_after: str | None, body: bytes, now: datetime | None = None
) -> KeyVerdict:
    """Read a 429/400/403 answer: bench the key, drop it, or leave it alone."""
    try:
        error = json.loads(body).get("error") or {}
        details = [d for d in error.get("details") or () if isinstance(d, dict)]
        message = str(error.get("message") or "")
    except (ValueError, AttributeError):
        error, details, message = {}, [], ""
    if status == 429:
        delay = None
        quota_ids: list[str] = []
        for detail in details:
            kind = str(detail.get("@type", ""))
            if kind.endswith("google.rpc.RetryInfo"):
                delay = _seconds(detail.get("retryDelay"))
            elif kind.endswith("google.rpc.QuotaFailure"):
                quota_ids += [str(v.get("quotaId", "")) for v in detail.get("violations") or ()]
        if delay is None and retry_after and retry_after.strip().isdigit():
            delay = float(retry_after.strip())
        if any("PerDay" in quota for quota in quota_ids):
            until_reset = _until_pacific_midnight(now or datetime.now(UTC))
            return KeyVerdict("cool_down", max(delay or 0.0, until_reset), "per_day")
        quota = "per_minute" if any("PerMinute" in q for q in quota_ids) else ""
        return KeyVerdict("cool_down", DEFAULT_COOL_DOWN_S if delay is None else delay, quota)
    if status in (400, 403):
        reasons = {str(d.get("reason", "")) for d in details}
        if reasons & DEAD_KEY_REASONS or message.startswith(DEAD_KEY_MESSAGES):
            return KeyVerdict("disable")
    return KeyVerdict("keep")


class Gemini(Provider):
    name = "gemini"
    routes = (
        Route(f"/{_VERSION}/models", "models", ("GET",)),
        Route(f"/{_VERSION}/models/<model_id:model>", "model", ("GET",)),
        Route(f"/{_VERSION}/models/<model_id:model>:<any({ACTIONS}):action>", "action", ("POST",)),
    )
    # Answers that may be about the key rather than the request.
    retry_statuses = frozenset({400, 403, 429})
    credential_log_field = "gemini_key_id"
    event_separator = b"\r\n\r\n"
    usage_markers = (b'"usageMetadata":',)

    def __init__(self, upstream: str, keys: KeyPool):
        super().__init__(upstream)
        self.keys = keys

    def __repr__(self) -> str:
        return f"Gemini(upstream={self.upstream!r}, keys={self.keys!r})"

    @property
    def configured(self) -> bool:
        return len(self.keys) > 0

    def presented_secrets(self, environ: dict) -> list[bytes | None]:
        header = environ.get("HTTP_X_GOOG_API_KEY")
        presented = [header.encode("latin-1") if header is not None else None]
        query = environ.get("QUERY_STRING", "")
        if query and ("key" in query.lower() or "%" in query):
            # Exactly `key` after decoding (so `%6Bey` too), as Google reads it;
            # `KEY=` or `api_key=` are not read here, only stripped before forwarding.
            presented += param_values(query, b"key")
        return presented

    def add_credential(self, headers: dict[str, str]) -> str | None:
        key = self.keys.next_key()
        if key is None:
            if not len(self.keys):
                raise ProviderNotConfigured(
                    "The gateway has no Gemini API key configured "
                    "(SHIM_GEMINI_KEYS or SHIM_GEMINI_KEYS_FILE)."
                )
            wait = self.keys.seconds_until_available()
            if wait is None:
                raise ProviderNotConfigured("Every Gemini API key on the gateway was rejected.")
            retry_after = str(max(1, int(wait + 0.999)))
            raise RateLimited(headers=(("Retry-After", retry_after),))
        headers["x-goog-api-key"] = key
        return self.keys.id_of(key)

    def after_failure(
        self, credential: str | None, status: int, headers: dict, body: bytes
    ) -> bool:
        verdict = judge_key(status, headers.get("retry-after"), body)
        if credential is None or verdict.action == "keep":
            return False
        if verdict.action == "disable":
            self.keys.disable(credential)
            log.warning(
                "gemini key rejected by upstream; taken out of rotation",
                extra={
                    "event": "gemini_key_disabled",
                    "gemini_key_id": credential,
                    "upstream_status": status,
                },
            )
        else:
            self.keys.cool_down(credential, verdict.seconds)
            log.warning(
                "gemini key rate limited; cooling down",
                extra={
                    "event": "gemini_key_cooling",
                    "gemini_key_id": credential,
                    "cool_down_s": round(verdict.seconds, 1),
                    "quota": verdict.quota,
                },
            )
        return True

    def read_usage(self, data: dict, record: AccessRecord) -> None:
        if isinstance(data.get("modelVersion"), str):
            record.model = data["modelVersion"]
        usage = data.get("usageMetadata")
        if isinstance(usage, dict):
            # Cumulative in a stream: the last chunk's counts are the call's.
            record.input_tokens = usage.get("promptTokenCount")
            output = usage.get("candidatesTokenCount") or 0
            record.output_tokens = output + (usage.get("thoughtsTokenCount") or 0) or None
            record.cache_read_tokens = usage.get("cachedContentTokenCount")
        candidates = data.get("candidates")
        if isinstance(candidates, list) and candidates and isinstance(candidates[0], dict):
            record.stop_reason = candidates[0].get("finishReason") or record.stop_reason

    def error_body(self, error: GatewayError) -> bytes:
        return google_error_body(error.status, error.kind, error.message)
