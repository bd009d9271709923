"""The shared-secret check both providers put in front of every forwarded route.

Where the secret arrives differs per provider (the provider says); how it is
checked does not: ``hmac.compare_digest`` on bytes, against every value the
client presented, without stopping at the first. Comparing bytes matters: on
``str`` compare_digest raises TypeError for non-ASCII input, which would turn a
crafted header into a 500.
"""

from __future__ import annotations

import functools
import hmac
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import request

from shim.errors import AuthThrottled, Unauthorized
from shim.throttle import AuthThrottle

log = logging.getLogger("shim.auth")

if TYPE_CHECKING:
    from shim.providers.base import Provider


def authenticated(
    provider: Provider, secret: bytes, throttle: AuthThrottle | None = None
) -> Callable:
    """Wrap a view so it runs only when the client presented ``secret``.

    An address that failed too often is answered 429 before any comparison
    (see shim.throttle); its presented value is never logged.
    """

    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        def checked(*args: Any, **kwargs: Any) -> Any:
            environ = request.environ
            if throttle is not None:
                address = environ["shim.record"].client_ip
                wait = throttle.blocked_for(address)
                if wait:
                    log.warning(
                        "failed-secret cool-off: refused without checking",
                        extra={"event": "auth_throttled", "client_ip": address},
                    )
                    raise AuthThrottled(headers=(("Retry-After", str(math.ceil(wait))),))
            if not secret_matches(provider.presented_secrets(environ), secret):
                if throttle is not None and throttle.failed(address):
                    log.warning(
                        "too many failed secret checks; address cooling off",
                        extra={"event": "auth_throttled", "client_ip": address,
                               "cooloff_s": throttle.cooloff_s},
                    )
                raise Unauthorized()
            return view(*args, **kwargs)

        return checked

    return decorator


def secret_matches(presented: list[bytes], secret: bytes) -> bool:
    """Return True if any presented value equals ``secret``, in constant time per value."""
    matched = False
    for value in presented:
        # No short-circuit: every presented value is compared.
        matched = hmac.compare_digest(value, secret) | matched
    return matched
