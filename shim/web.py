"""The web layer: each provider's routes behind one secret check, health answers, errors.

A provider module (``shim.providers``) declares what differs and knows no
Flask; this module turns one into a blueprint. Every forwarded route passes
``authenticated``, the secret check both providers share: where the secret
arrives differs per provider (the provider says); how it is checked does not:
the presented value is matched against every known client (``shim.clients``:
SHA-256 digests compared with ``hmac.compare_digest`` on bytes, no early
exit). Bytes matter: on ``str`` compare_digest raises TypeError for non-ASCII
input, which would turn a crafted header into a 500. The client's name goes
into the access record, so logs and metrics say who called.

One guess per request (issue #14): a request presenting more than one
*distinct* value (``shim.candidates.distinct``) is refused 401 without any
comparison, and every one of its values counts as a failed guess. Nothing in
that answer, or in how far the throttle moved, depends on whether one of them
was right, so a batch is never cheaper or more telling than single guesses.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, request

from shim.candidates import SECRET_ENVIRON, distinct
from shim.clients import ClientTable
from shim.errors import AuthThrottled, GatewayError, Unauthorized
from shim.limits import Limiter
from shim.providers.base import JSON, Provider
from shim.throttle import AuthThrottle

log = logging.getLogger("shim.auth")

# Fixed: said whatever the values were, so it tells nothing about any of them.
CONFLICTING = "More than one different gateway secret was presented; send exactly one."


def authenticated(
    provider: Provider, clients: ClientTable, throttle: AuthThrottle | None = None
) -> Callable:
    """Wrap a view so it runs only when the client presented a known client's secret.

    An address that failed too often is answered 429 before any comparison
    (see shim.throttle); its presented value is never logged.
    """

    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        def checked(*args: Any, **kwargs: Any) -> Any:
            environ = request.environ
            address = environ["shim.record"].client_ip
            if throttle is not None:
                wait = throttle.blocked_for(address)
                if wait:
                    log.warning(
                        "failed-secret cool-off: refused without checking",
                        extra={"event": "auth_throttled", "client_ip": address},
                    )
                    raise AuthThrottled(headers=(("Retry-After", str(math.ceil(wait))),))
            candidates = distinct(provider.presented_secrets(environ))
            if len(candidates) > 1:
                log.warning(
                    "more than one distinct secret presented: refused unchecked",
                    extra={
                        "event": "auth_conflicting_secrets",
                        "client_ip": address,
                        "candidates": len(candidates),
                    },
                )
                _count_failures(throttle, address, len(candidates))
                raise Unauthorized(CONFLICTING)
            client = clients.match(candidates)
            if client is None:
                # No value at all counts too: a probe is a guess.
                _count_failures(throttle, address, 1)
                raise Unauthorized()
            environ["shim.record"].client = client
            # For shim.forward: no copy of it goes upstream in another header or parameter.
            environ[SECRET_ENVIRON] = candidates[0]
            return view(*args, **kwargs)

        return checked

    return decorator


def _count_failures(throttle: AuthThrottle | None, address: str | None, count: int) -> None:
    """Count ``count`` failed guesses from ``address``; log once if they start a cool-off."""
    if throttle is None:
        return
    # One call for all of them: with Redis that is one round trip, not one per guess.
    if throttle.failed(address, count):
        log.warning(
            "too many failed secret checks; address cooling off",
            extra={
                "event": "auth_throttled",
                "client_ip": address,
                "cooloff_s": throttle.cooloff_s,
            },
        )


def error_response(provider: Provider, error: GatewayError) -> Response:
    """``error`` as ``provider``'s JSON error answer, with the error's headers."""
    response = Response(provider.error_body(error), status=error.status, mimetype=JSON)
    for name, value in error.headers:
        response.headers[name] = value
    return response


def make_blueprint(
    provider: Provider,
    clients: ClientTable,
    forward: Callable[[Provider, dict], Response],
    throttle: AuthThrottle | None = None,
    limiter: Limiter | None = None,
) -> Blueprint:
    """Build the provider's blueprint: its routes (authenticated) plus open health checks.

    Every rule carries ``host=provider.name``: the app binds its URL map to the
    provider that owns the listening port, so one provider's paths can never
    match on the other's port.
    """
    blueprint = Blueprint(provider.name, __name__)

    @authenticated(provider, clients, throttle)
    def proxy(**_route_args: str) -> Response:
        environ = request.environ
        if limiter is not None:
            record = environ["shim.record"]
            # Most clients have no limits: no limiter call at all for them.
            limits = clients.limits(record.client)
            if limits is not None:
                limiter.admit(record, limits)
        return forward(provider, environ)

    for route in provider.routes:
        blueprint.add_url_rule(
            route.rule,
            route.endpoint,
            proxy,
            methods=list(route.methods),
            host=provider.name,
            # No Flask-made OPTIONS answer: an API gateway for SDKs serves no CORS preflight.
            provide_automatic_options=False,
        )
    for rule, endpoint in (("/health", "health"), ("/", "root")):
        blueprint.add_url_rule(rule, endpoint, _health, methods=["GET"], host=provider.name)
    return blueprint


_HEALTH_BODY = b'{"status":"ok"}'


def _health() -> Response:
    # Load balancers call this often: no auth, no upstream call, no allocation beyond this.
    return Response(_HEALTH_BODY, mimetype=JSON)
