"""The gateway's own errors: what went wrong, as a status, a kind and a log code.

Tree (status, and the access line's ``error`` code where it has one)::

    GatewayError (500 internal)
    ├── BadRequest (400)
    ├── Unauthorized (401)
    ├── NotFound (404)
    ├── RequestTimeout (408)
    ├── MethodNotAllowed (405)
    ├── PayloadTooLarge (413)
    ├── RateLimited (429)
    │   └── AuthThrottled (429)
    ├── UpstreamUnreachable (502, upstream_unreachable)
    │   └── UpstreamBodyFailed (502, upstream_body_failed)
    │       └── StreamFailed (502, stream_failed)
    ├── ProviderNotConfigured (503)
    ├── ShuttingDown (503, worker_stopping)
    └── UpstreamTimeout (504, upstream_timeout)

``kind`` picks the wire words: each provider module maps kinds to its own
vocabulary and renders the body (``Provider.render_error``), for the app and
for the gunicorn worker, which answers framing errors before the app runs.
``code`` is what the access line's ``error`` says when the error ends a
forwarded call (set by ``shim.failures``, the one place that translates
failures toward upstream); None where the status alone tells.

Messages are fixed strings meant for clients; details (exception classes,
addresses) go to the log, never into a response, because they can carry URLs,
hosts or keys.
"""

from __future__ import annotations


class GatewayError(Exception):
    status = 500
    kind = "internal"
    code: str | None = None
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


class RequestTimeout(GatewayError):
    status = 408
    kind = "request_timeout"
    message = "The request body did not arrive in time."


class MethodNotAllowed(GatewayError):
    status = 405
    kind = "method_not_allowed"
    message = "This method is not allowed on this endpoint."


class PayloadTooLarge(GatewayError):
    status = 413
    kind = "too_large"
    message = "The request body is larger than this gateway accepts."


class RateLimited(GatewayError):
    status = 429
    kind = "rate_limited"
    message = "Every upstream key is cooling down after a rate limit; retry later."


class AuthThrottled(RateLimited):
    message = "Too many failed secret checks from this address; retry later."


class UpstreamUnreachable(GatewayError):
    status = 502
    kind = "upstream_unreachable"
    code = "upstream_unreachable"
    message = "The upstream API could not be reached."


class UpstreamBodyFailed(UpstreamUnreachable):
    """Upstream answered, then broke off while its body was read whole."""

    code = "upstream_body_failed"
    message = "The upstream API ended the response early."


class StreamFailed(UpstreamBodyFailed):
    """Upstream broke off mid-stream: the client gets an error frame or an aborted body."""

    code = "stream_failed"


class ProviderNotConfigured(GatewayError):
    status = 503
    kind = "not_configured"
    message = "This provider has no upstream credential configured on the gateway."


class UpstreamTimeout(GatewayError):
    status = 504
    kind = "upstream_timeout"
    code = "upstream_timeout"
    message = "The upstream API did not answer in time."


class ShuttingDown(GatewayError):
    """A stream cut because the worker is stopping (deploy, restart) past its grace period."""

    status = 503
    kind = "shutting_down"
    code = "worker_stopping"
    message = "The gateway is restarting; retry the request."


# Access-line codes for outcomes that are not an error answered to the client.
CLIENT_GONE = "client_gone"  # the client hung up mid-stream (shim.stream)
UNHANDLED_ERROR = "unhandled_error"  # a bug: the last-resort 500 (shim.access)
STOPPED = "stopping"  # the worker stopped the request outside forwarding (shim.access)
# Codes that blame upstream (shim_upstream_errors_total); every other code on
# an access line (those above, ShuttingDown's, shim.limits' limit_<kind>) is
# the request's own outcome (shim_request_errors_total).
UPSTREAM_CODES = frozenset(
    {
        UpstreamUnreachable.code,
        UpstreamBodyFailed.code,
        StreamFailed.code,
        UpstreamTimeout.code,
    }
)


class StreamAborted(Exception):
    """Raised into the WSGI server to cut a stream so the client sees it fail.

    Not a GatewayError: no answer can be sent any more. shim.stream has logged
    why before raising it; gunicorn's logger keeps its traceback out (shim.logs).
    """
