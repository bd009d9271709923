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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import request

from shim.errors import Unauthorized

if TYPE_CHECKING:
    from shim.providers.base import Provider


def authenticated(provider: Provider, secret: bytes) -> Callable:
    """Wrap a view so it runs only when the client presented ``secret``."""

    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        def checked(*args: Any, **kwargs: Any) -> Any:
            if not secret_matches(provider.presented_secrets(request.environ), secret):
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
