"""The secret check both providers put in front of every forwarded route.

Where the secret arrives differs per provider (the provider says); how it is
checked does not: every presented value is matched against every known client
(``shim.clients``: SHA-256 digests compared with ``hmac.compare_digest`` on
bytes, no early exit). Bytes matter: on ``str`` compare_digest raises TypeError
for non-ASCII input, which would turn a crafted header into a 500. The client's
name goes into the access record, so logs and metrics say who called.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import request

from shim.clients import ClientTable
from shim.errors import AuthThrottled, Unauthorized
from shim.throttle import AuthThrottle

log = logging.getLogger("shim.auth")

if TYPE_CHECKING:
    from shim.providers.base import Provider


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
            client = clients.match(provider.presented_secrets(environ))
            if client is None:
                if throttle is not None and throttle.failed(address):
                    log.warning(
                        "too many failed secret checks; address cooling off",
                        extra={
                            "event": "auth_throttled",
                            "client_ip": address,
                            "cooloff_s": throttle.cooloff_s,
                        },
                    )
                raise Unauthorized()
            environ["shim.record"].client = client
            return view(*args, **kwargs)

        return checked

    return decorator
