"""What a worker runs on, built once from the settings: the state store, providers, the core.

``build_services`` is the one place the parts are made and wired to each
other; ``shim.app`` only configures Flask and registers what it is given.
The providers come from ``shim.providers.REGISTRY``, each built by its own
``from_settings``; nothing here names one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shim import metrics, shared_table
from shim.access import AccessRecord
from shim.clients import ClientTable
from shim.forward import Forwarder
from shim.limits import Limiter
from shim.providers import REGISTRY
from shim.providers.base import Provider
from shim.readiness import Readiness
from shim.settings import Settings
from shim.state import RedisState, State, open_state
from shim.throttle import AuthThrottle, RedisFailures

# Called with each finished request's record and access-line fields, in order.
Listener = Callable[[AccessRecord, dict], None]


@dataclass(frozen=True)
class Services:
    state: State
    providers_by_port: dict[str, Provider]
    forwarder: Forwarder
    throttle: AuthThrottle
    clients: ClientTable
    limiter: Limiter
    readiness: Readiness
    # The end-of-request listeners: settle the call's limits, feed metrics and readiness.
    listeners: tuple[Listener, ...]

    @property
    def providers(self) -> tuple[Provider, ...]:
        return tuple(self.providers_by_port.values())

    def end_of_request(self, record: AccessRecord, fields: dict) -> None:
        for listener in self.listeners:
            listener(record, fields)


def build_services(settings: Settings) -> Services:
    state = open_state(settings.state_url)
    shared = state if isinstance(state, RedisState) else None
    providers_by_port = {
        str(cls.port(settings)): cls.from_settings(settings, shared)
        for cls in REGISTRY
    }
    forwarder = Forwarder(
        settings.connect_timeout_s,
        settings.http_timeout_s,
        settings.max_body_bytes,
        settings.body_timeout_s,
        on_stream=_count_streams,
    )
    throttle = AuthThrottle(
        settings.auth_failures_max,
        settings.auth_failures_window_s,
        settings.auth_cooloff_s,
        # One count for all workers (made by the master), and for all instances on Redis.
        table=shared_table.inherited(),
        shared=RedisFailures(shared.redis) if shared else None,
        on_state_error=metrics.state_failed,
    )
    clients = ClientTable(settings.shared_secret, settings.clients_file)
    readiness = Readiness(tuple(providers_by_port.values()), state, clients)
    limiter = Limiter(state, on_reject=metrics.limit_rejected, on_state_error=metrics.state_failed)
    return Services(
        state=state,
        providers_by_port=providers_by_port,
        forwarder=forwarder,
        throttle=throttle,
        clients=clients,
        limiter=limiter,
        readiness=readiness,
        listeners=(limiter.settle, metrics.observe, readiness.observe),
    )


def _count_streams(provider: str, delta: int) -> None:
    (metrics.stream_started if delta > 0 else metrics.stream_ended)(provider)
