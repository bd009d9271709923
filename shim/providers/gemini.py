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
from typing import TYPE_CHECKING

from shim.access import AccessRecord
from shim.candidates import param_values
from shim.decode import decoded
from shim.errors import ProviderNotConfigured, RateLimited
from shim.gemini_keys import KeyPool
from shim.providers.base import Provider, Route

if TYPE_CHECKING:
    from shim.settings import Settings
    from shim.state import RedisState

log = logging.getLogger("shim.gemini")

# How each gateway error kind reads on Google's wire (shim.errors).
GOOGLE_STATUSES = {
    "invalid_request": "INVALID_ARGUMENT",
    "authentication": "UNAUTHENTICATED",
    "not_found": "NOT_FOUND",
    "method_not_allowed": "INVALID_ARGUMENT",
    "too_large": "INVALID_ARGUMENT",
    "rate_limited": "RESOURCE_EXHAUSTED",
    "request_timeout": "DEADLINE_EXCEEDED",
    "upstream_unreachable": "UNAVAILABLE",
    "not_configured": "UNAVAILABLE",
    "upstream_timeout": "DEADLINE_EXCEEDED",
    "shutting_down": "UNAVAILABLE",
    "internal": "INTERNAL",
}


def google_error_body(status: int, kind: str, message: str) -> bytes:
    error = {"code": status, "message": message, "status": GOOGLE_STATUSES.get(kind, "INTERNAL")}
    return json.dumps({"error": error}).encode()


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
# An error body is small; a compressed one is decoded at most this far to judge it.
ERROR_BODY_BYTES = 65_536


@dataclass(frozen=True)
class KeyVerdict:
    """What an upstream error says about the key that got it.

    A quota 429 benches the whole key for ``seconds`` and/or the key for the
    request's model only for ``model_seconds`` (0: no such bench). Which one
    is read from each ``QuotaFailure`` violation (issue #14):

    - per model (``quotaId`` contains ``PerModel``, or ``quotaDimensions``
      names a ``model``): the (key, model) pair; the key keeps serving
      other models;
    - any other quota (per project for every model): the whole key;
    - ``PerDay`` in the ``quotaId``: until midnight Pacific (the reset), or
      the retry delay if that is longer; otherwise (per minute, unknown
      period) the retry delay;
    - no ``QuotaFailure`` at all: the whole key for the retry delay
      (``RetryInfo``, else ``Retry-After``, else ``DEFAULT_COOL_DOWN_S``).

    ``delay`` is that retry delay, for a per-model quota on a call that
    names no model (the key is then benched that long, never for a day).
    """

    action: str  # "cool_down", "disable" or "keep"
    seconds: float = 0.0
    quota: str = ""  # "per_minute", "per_day" or "" when unknown
    model_seconds: float = 0.0
    delay: float = 0.0


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


def _per_model(violation: dict) -> bool:
    dimensions = violation.get("quotaDimensions")
    named = isinstance(dimensions, dict) and "model" in dimensions
    return named or "PerModel" in str(violation.get("quotaId", ""))


def judge_key(
    status: int, retry_after: str | None, body: bytes, now: datetime | None = None
) -> KeyVerdict:
    """Read a 429/400/403 answer: bench the key (or the key for a model), drop it, or keep it."""
    try:
        error = json.loads(body).get("error") or {}
        details = [d for d in error.get("details") or () if isinstance(d, dict)]
        message = str(error.get("message") or "")
    except (ValueError, AttributeError):
        error, details, message = {}, [], ""
    if status == 429:
        delay = None
        violations: list[dict] = []
        for detail in details:
            kind = str(detail.get("@type", ""))
            if kind.endswith("google.rpc.RetryInfo"):
                delay = _seconds(detail.get("retryDelay"))
            elif kind.endswith("google.rpc.QuotaFailure"):
                found = detail.get("violations")
                violations += [v for v in found if isinstance(v, dict)] if found else []
        if delay is None and retry_after and retry_after.strip().isdigit():
            delay = float(retry_after.strip())
        delay = DEFAULT_COOL_DOWN_S if delay is None else delay
        if not violations:
            return KeyVerdict("cool_down", delay, "", 0.0, delay)
        whole = per_model = 0.0
        daily = False
        for violation in violations:
            seconds = delay
            if "PerDay" in str(violation.get("quotaId", "")):
                daily = True
                seconds = max(delay, _until_pacific_midnight(now or datetime.now(UTC)))
            if _per_model(violation):
                per_model = max(per_model, seconds)
            else:
                whole = max(whole, seconds)
        quotas = " ".join(str(v.get("quotaId", "")) for v in violations)
        quota = "per_day" if daily else "per_minute" if "PerMinute" in quotas else ""
        return KeyVerdict("cool_down", whole, quota, per_model, delay)
    if status in (400, 403):
        reasons = {str(d.get("reason", "")) for d in details}
        if reasons & DEAD_KEY_REASONS or message.startswith(DEAD_KEY_MESSAGES):
            return KeyVerdict("disable")
    return KeyVerdict("keep")


def readable(body: bytes, content_encoding: str | None) -> bytes:
    """``body`` decoded from its Content-Encoding (bounded), or b"" if it cannot be."""
    return decoded(body, content_encoding, ERROR_BODY_BYTES) or b""


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

    port_setting = "gemini_port"

    @classmethod
    def from_settings(cls, settings: Settings, shared: RedisState | None) -> Gemini:
        from shim import metrics

        gemini = cls(settings.gemini_upstream, KeyPool(settings.gemini_keys, shared=shared))
        gemini.keys.on_change(metrics.gemini_key_states)
        gemini.keys.on_keys(metrics.gemini_key_detail)
        gemini.keys_source = settings.gemini_keys_source
        return gemini

    @staticmethod
    def render_error(status: int, kind: str, message: str) -> bytes:
        return google_error_body(status, kind, message)

    def describe(self) -> dict:
        return {
            "configured": self.configured,
            "keys": len(self.keys),
            "keys_source": self.keys_source,
        }

    def __init__(self, upstream: str, keys: KeyPool):
        super().__init__(upstream)
        self.keys = keys
        self.keys_source: str | None = None

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

    def add_credential(self, headers: dict[str, str], model: str | None = None) -> str | None:
        key = self.keys.next_key(model)
        if key is None:
            if not len(self.keys):
                raise ProviderNotConfigured(
                    "The gateway has no Gemini API key configured "
                    "(SHIM_GEMINI_KEYS or SHIM_GEMINI_KEYS_FILE)."
                )
            wait = self.keys.seconds_until_available(model)
            if wait is None:
                raise ProviderNotConfigured("Every Gemini API key on the gateway was rejected.")
            retry_after = str(max(1, int(wait + 0.999)))
            raise RateLimited(headers=(("Retry-After", retry_after),))
        headers["x-goog-api-key"] = key
        return self.keys.id_of(key)

    def after_failure(
        self,
        credential: str | None,
        status: int,
        headers: dict,
        body: bytes,
        model: str | None = None,
    ) -> bool:
        if credential is None:
            return False
        # Google compresses error bodies too when the client offers it.
        body = readable(body, headers.get("content-encoding"))
        verdict = judge_key(status, headers.get("retry-after"), body)
        if verdict.action == "keep":
            return False
        if verdict.action == "disable":
            self.keys.disable(credential, f"rejected by upstream (HTTP {status})")
            log.warning(
                "gemini key rejected by upstream; taken out of rotation",
                extra={
                    "event": "gemini_key_disabled",
                    "gemini_key_id": credential,
                    "upstream_status": status,
                },
            )
            return True
        benches: list[tuple[float, str | None]] = []
        if verdict.seconds:
            benches.append((verdict.seconds, None))
        if verdict.model_seconds:
            # A per-model quota on a call without a model: bench the key briefly only.
            benches.append((verdict.model_seconds, model) if model else (verdict.delay, None))
        for seconds, benched in benches or [(0.0, None)]:
            if not self.keys.cool_down(credential, seconds, benched):
                continue  # too many models benched already: upstream keeps saying 429
            log.warning(
                "gemini key rate limited; cooling down",
                extra={
                    "event": "gemini_key_cooling",
                    "gemini_key_id": credential,
                    "model": benched,
                    "cool_down_s": round(seconds, 1),
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

    def readiness(self) -> dict:
        pool = self.keys
        keys = pool.states()
        per_key = pool.benches()
        benched = {m for entry in per_key for m in entry["benched_models"]}
        # Models no key can serve now, and in how many seconds one can.
        unavailable = {
            model: int(wait + 0.999)
            for model in sorted(benched)
            if (wait := pool.seconds_until_available(model))
        }
        return {
            "configured": self.configured,
            # Ready while some key is not benched whole: a key benched for one model
            # (a per-model quota) still serves the others.
            "ready": self.configured and keys["available"] > 0,
            "keys": keys,
            "per_key": per_key,
            "models_unavailable": unavailable,
            "last_upstream_status": self.last_upstream_status,
        }
