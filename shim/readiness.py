"""``GET /health/ready``: can each configured provider serve right now, as this worker sees it.

``/health`` stays trivial for the load balancer; this one says why a provider
cannot serve (no available Gemini key, subscription quota rejected) and what
upstream said last. State is per worker process, fed by the access records.
No secrets, keys or key ids in it: ``per_key`` lists the Gemini keys in the
order they are configured, each with its state and the models it is benched
for (seconds left), and ``models_unavailable`` the models no key serves now.
The state store (Redis) is reported but never makes the gateway unready:
limits fail open without it, and taking every box out of the load balancer
because Redis is down would turn a degraded gateway into a dead one.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
from flask import Response

from shim.access import AccessRecord
from shim.providers.anthropic import Anthropic
from shim.providers.gemini import Gemini
from shim.state import State


class Readiness:
    def __init__(
        self,
        anthropic: Anthropic,
        gemini: Gemini,
        state: State | None = None,
        oauth_state: Callable[[], dict] | None = None,
    ):
        self.state = state
        # The credentials file's login (TokenRefresher.state), shared by all workers.
        self.oauth_state = oauth_state
        self.anthropic = anthropic
        self.gemini = gemini
        self.last_status: dict[str, int | None] = {"anthropic": None, "gemini": None}
        self.quota_status: str | None = None
        self.quota_reset: str | None = None

    def observe(self, record: AccessRecord) -> None:
        if record.provider in self.last_status and record.upstream_status is not None:
            self.last_status[record.provider] = record.upstream_status
        if record.quota_status is not None:
            self.quota_status = record.quota_status
            self.quota_reset = record.quota_reset

    def report(self) -> tuple[dict, bool]:
        anthropic_ok = self.anthropic.configured and self.quota_status != "rejected"
        oauth = self.oauth_state() if self.oauth_state is not None else None
        if oauth is not None and oauth.get("state") == "relogin_needed":
            anthropic_ok = False
        pool = self.gemini.keys
        keys = pool.states()
        # Ready while some key is not benched whole: a key benched for one model
        # (a per-model quota) still serves the others.
        gemini_ok = self.gemini.configured and keys["available"] > 0
        per_key = pool.benches()
        benched = {m for entry in per_key for m in entry["benched_models"]}
        # Models no key can serve now, and in how many seconds one can.
        unavailable = {
            model: int(wait + 0.999)
            for model in sorted(benched)
            if (wait := pool.seconds_until_available(model))
        }
        providers = {
            "anthropic": {
                "configured": self.anthropic.configured,
                "credential": self.anthropic.credential_kind,
                "ready": anthropic_ok,
                "last_upstream_status": self.last_status["anthropic"],
                "quota_status": self.quota_status,
                "quota_reset": self.quota_reset,
                "oauth": oauth,
            },
            "gemini": {
                "configured": self.gemini.configured,
                "ready": gemini_ok,
                "keys": keys,
                "per_key": per_key,
                "models_unavailable": unavailable,
                "last_upstream_status": self.last_status["gemini"],
            },
        }
        # A provider left unconfigured on purpose does not make the gateway unready.
        ready = all(p["ready"] for p in providers.values() if p["configured"])
        report = {"status": "ready" if ready else "unavailable", "providers": providers}
        if self.state is not None and self.state.shared:
            report["state"] = {"store": "redis", "reachable": self.state.reachable()}
        return report, ready

    def response(self) -> Response:
        body, ready = self.report()
        return Response(
            orjson.dumps(body), status=200 if ready else 503, mimetype="application/json"
        )
