"""``GET /health/ready``: can each configured provider serve right now, as this worker sees it.

``/health`` stays trivial for the load balancer; this one says why a provider
cannot serve and what upstream said last. Each provider answers its own part
(``Provider.readiness``: Anthropic's credential, quota and OAuth login,
Gemini's key pool), from what its calls in this worker told it
(``Provider.observe``, fed by the access records); readiness never calls
upstream. No secrets, keys or key ids in it. The state store (Redis) is
reported but never makes the gateway unready: limits fail open without it,
and taking every box out of the load balancer because Redis is down would
turn a degraded gateway into a dead one.

The clients file (``SHIM_CLIENTS_FILE``) is reported the same way: when it is
missing or invalid the last good table still serves, so the gateway stays
ready and ``clients_file.state`` says what is wrong (``missing``,
``invalid``, ``unreadable``) for a monitor to alert on.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson
from flask import Response

from shim.access import AccessRecord
from shim.clients import ClientTable
from shim.providers.base import Provider
from shim.state import State


class Readiness:
    """Asks each provider for its part; adds the state store and the clients file."""

    def __init__(
        self,
        providers: Sequence[Provider],
        state: State | None = None,
        clients: ClientTable | None = None,
    ):
        self.providers = tuple(providers)
        self._by_name = {provider.name: provider for provider in self.providers}
        self.state = state
        self.clients = clients

    def observe(self, record: AccessRecord, fields: dict | None = None) -> None:
        provider = self._by_name.get(record.provider or "")
        if provider is not None:
            provider.observe(record)

    def report(self) -> tuple[dict, bool]:
        providers = {provider.name: provider.readiness() for provider in self.providers}
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
