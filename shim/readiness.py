"""``GET /health/ready``: can each configured provider serve right now, as this worker sees it.

``/health`` stays trivial for the load balancer; this one says why a provider
cannot serve (no available Gemini key, subscription quota rejected, the
Anthropic credential refused for everyone: ``AnthropicCredential``) and what
upstream said last. State is per worker process, fed by the access records.
No secrets, keys or key ids in it: ``per_key`` lists the Gemini keys in the
order they are configured, each with its state and the models it is benched
for (seconds left), and ``models_unavailable`` the models no key serves now.
The state store (Redis) is reported but never makes the gateway unready:
limits fail open without it, and taking every box out of the load balancer
because Redis is down would turn a degraded gateway into a dead one.

The clients file (``SHIM_CLIENTS_FILE``) is reported the same way: when it is
missing or invalid the last good table still serves, so the gateway stays
ready and ``clients_file.state`` says what is wrong (``missing``,
``invalid``, ``unreadable``) for a monitor to alert on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson
from flask import Response

from shim import refusals
from shim.access import AccessRecord
from shim.clients import ClientTable
from shim.providers.anthropic import Anthropic
from shim.providers.gemini import Gemini
from shim.state import State


class Readiness:
    def __init__(
        self,
        anthropic: Anthropic,
        gemini: Gemini,
        state: State | None = None,
        clients: ClientTable | None = None,
        oauth_state: Callable[[], dict] | None = None,
    ):
        self.state = state
        self.clients = clients
        # The credentials file's login (TokenRefresher.state), shared by all workers.
        self.oauth_state = oauth_state
        self.anthropic = anthropic
        self.gemini = gemini
        self.last_status: dict[str, int | None] = {"anthropic": None, "gemini": None}
        self.quota_status: str | None = None
        self.quota_reset: str | None = None
        self.quota_claim: str | None = None
        self.quota_utilization: dict[str, float | None] = {"5h": None, "7d": None}
        self.credential = AnthropicCredential()

    def observe(self, record: AccessRecord) -> None:
        if record.provider in self.last_status and record.upstream_status is not None:
            self.last_status[record.provider] = record.upstream_status
        if record.client_credential is not None:
            return  # a member's own login: its quota and refusals say nothing of shim's
        if record.quota_status is not None:
            self.quota_status = record.quota_status
            self.quota_reset = record.quota_reset
            self.quota_claim = record.quota_representative_claim
            self.quota_utilization = {
                "5h": record.quota_5h_utilization,
                "7d": record.quota_7d_utilization,
            }
        if record.provider == "anthropic" and record.upstream_status is not None:
            self.credential.observe(record.upstream_status, record.refusal)

    def report(self) -> tuple[dict, bool]:
        anthropic_ok = (
            self.anthropic.configured
            and self.quota_status != "rejected"
            and self.credential.state != "refused"
        )
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
                "quota_representative_claim": self.quota_claim,
                "quota_5h_utilization": self.quota_utilization["5h"],
                "quota_7d_utilization": self.quota_utilization["7d"],
                "credential_state": self.credential.state,
                "last_refusal": self.credential.last_refusal,
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
        clients_file = self.clients.state() if self.clients is not None else None
        if clients_file is not None:
            report["clients_file"] = clients_file
        return report, ready

    def response(self) -> Response:
        body, ready = self.report()
        return Response(
            orjson.dumps(body), status=200 if ready else 503, mimetype="application/json"
        )


class AnthropicCredential:
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
