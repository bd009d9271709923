"""The gateway's own errors: what went wrong, as a status and a kind.

Tree (rendering into a provider's JSON shape lives in each provider module)::

    GatewayError (500 internal)
    ├── BadRequest (400)
    ├── Unauthorized (401)
    ├── NotFound (404)
    ├── MethodNotAllowed (405)
    ├── PayloadTooLarge (413)
    ├── UpstreamUnreachable (502)
    ├── ProviderNotConfigured (503)
    └── UpstreamTimeout (504)

Messages are fixed strings meant for clients; details (exception classes,
addresses) go to the log, never into a response, because they can carry URLs,
hosts or keys.
"""

from __future__ import annotations


class GatewayError(Exception):
    status = 500
    kind = "internal"
    message = "The gateway failed to handle the request."

    def __init__(self, message: str | None = None, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message or self.message)
        self.message = message or self.message
        self.headers = headers


class BadRequest(GatewayError):
    status = 400
    kind = "invalid_request"
    message = "The request could not be read."


class Unauthorized(GatewayError):
    status = 401
    kind = "authentication"
    message = "Missing or invalid gateway secret."


class NotFound(GatewayError):
    status = 404
    kind = "not_found"
    message = "No such endpoint on this gateway."


class MethodNotAllowed(GatewayError):
    status = 405
    kind = "method_not_allowed"
    message = "This method is not allowed on this endpoint."


class PayloadTooLarge(GatewayError):
    status = 413
    kind = "too_large"
    message = "The request body is larger than this gateway accepts."


class UpstreamUnreachable(GatewayError):
    status = 502
    kind = "upstream_unreachable"
    message = "The upstream API could not be reached."


class ProviderNotConfigured(GatewayError):
    status = 503
    kind = "not_configured"
    message = "This provider has no upstream credential configured on the gateway."


class UpstreamTimeout(GatewayError):
    status = 504
    kind = "upstream_timeout"
    message = "The upstream API did not answer in time."
