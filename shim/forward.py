"""The forwarding core: read the client's request, send it upstream, relay the answer.

One ``Forwarder`` per worker process. It is provider-agnostic: the provider
passed in says where the secret was, how to attach the credential and how an
error looks; nothing here branches on which provider it is.

Its parts live beside it: reading the client's body (shim.request_body),
relaying a streamed answer (shim.stream), translating every failure toward
upstream into the gateway's errors (shim.failures). This module builds the
upstream request, sends it, retries once on another credential and relays
answers read whole.

Hot-path choices (every request, every chunk), measured in bench/:
- the upstream request is a ``PreparedRequest`` built by hand and given to
  the session's adapter directly: no environment/proxy lookups, no cookie
  jar, no redirects followed (a redirect is relayed to the client as is);
- the body comes back as raw bytes (``decode_content=False``): what upstream
  sent, with its own Content-Encoding and Content-Length, is what the client
  gets; chunked bodies are relayed chunk by chunk as they arrive, never
  re-chunked to a fixed size;
- small bodies of known length are read whole and sent as one piece.
"""

from __future__ import annotations

import logging

import requests
import urllib3
from requests.adapters import TimeoutSauce
from werkzeug.wrappers import Response

from shim import upstream_pool, usage
from shim.access import AccessRecord
from shim.candidates import SECRET_ENVIRON
from shim.errors import BadRequest, GatewayError
from shim.failures import SEND, WHOLE_BODY, map_upstream_failures
from shim.providers.base import Provider
from shim.request_body import read_body_in_time
from shim.stream import StreamCounter, UpstreamBody, usage_unread

log = logging.getLogger("shim.forward")

# Bodies of known length up to this size are read whole (one write, no iterator).
WHOLE_BODY_BYTES = 1_048_576

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Request headers that describe the hop to shim, not the call: the upstream
# request gets its own Host and Content-Length, and the client's address and
# the proxy chain in front of shim are nobody's business upstream.
REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "content-length",
    "expect",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-proto",
    "x-real-ip",
}
_CONNECTION_WORDS = frozenset({"keep-alive", "close", ""})
# gunicorn writes its own Date and Server; two of each would confuse clients.
RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}


class Forwarder:
    """Sends one client request upstream and turns the answer into a WSGI response."""

    def __init__(
        self,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_body_bytes: int,
        body_timeout_s: float = 60.0,
        on_stream: StreamCounter | None = None,
    ):
        self.body_timeout_s = body_timeout_s
        self.on_stream = on_stream
        self.session = requests.Session()
        # A stray HTTPS_PROXY or ~/.netrc must not redirect or re-authenticate traffic.
        self.session.trust_env = False
        # Pool sized for one gevent worker.
        self.adapter = upstream_pool.adapter(pool_maxsize=256)
        self.session.mount("https://", self.adapter)
        self.session.mount("http://", self.adapter)
        self.timeout = TimeoutSauce(connect=connect_timeout_s, read=read_timeout_s)
        self.max_body_bytes = max_body_bytes

    def forward(self, provider: Provider, environ: dict) -> Response:
        """Forward the request in ``environ`` to ``provider``'s upstream and relay the answer."""
        record: AccessRecord = environ["shim.record"]
        headers = upstream_headers(environ, provider.client_credential_headers)
        body = read_body_in_time(environ, self.max_body_bytes, self.body_timeout_s)
        method = environ["REQUEST_METHOD"]
        record.bytes_in = len(body)
        provider.read_request(environ, record)

        prepared = requests.PreparedRequest()
        prepared.method = method
        prepared.url = provider.upstream + upstream_path(environ, provider)
        if body or method in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
            prepared.body = body
        prepared.headers = headers  # type: ignore[assignment]  # a plain dict is all urllib3 needs

        # At most one retry, and only before any byte went to the client: a key
        # the provider benched on this answer is swapped for the next one.
        # The route's model, taken now: read_usage may later set the answer's.
        model = record.model
        # A member's own login (issue #15) is theirs to renew: never retried on shim's.
        own = record.client_credential = provider.own_credential(environ, headers)
        for attempt in (1, 2):
            credential = own or provider.add_credential(headers, model)
            if provider.credential_log_field:
                setattr(record, provider.credential_log_field, credential)
            raw = self._send(prepared, provider, credential, record)
            record.upstream_status = raw.status
            provider.read_headers(raw.headers, record)
            if raw.status not in provider.retry_statuses or own:
                return relay(raw, provider, method, environ, record, self.on_stream)
            answer = read_whole(raw, provider, record)
            learned = provider.after_failure(credential, raw.status, raw.headers, answer, model)
            if learned and attempt == 1:
                log.info(
                    "retrying on another credential",
                    extra={
                        "event": "upstream_retry",
                        "provider": provider.name,
                        "upstream_status": raw.status,
                        "credential": credential,
                    },
                )
                continue
            provider.read_error(raw.status, raw.headers.get("content-encoding"), answer, record)
            return whole_response(raw, answer)
        raise AssertionError("unreachable")  # the loop always returns on its second pass

    def _send(
        self,
        prepared: requests.PreparedRequest,
        provider: Provider,
        credential: str | None,
        record: AccessRecord,
    ) -> urllib3.HTTPResponse:
        # A stop past the grace period while upstream is silent becomes the
        # provider's 503 (retryable), not a dropped connection (shim.failures).
        with map_upstream_failures(SEND, record, provider.name, credential):
            return self.adapter.send(prepared, stream=True, timeout=self.timeout).raw


def upstream_headers(environ: dict, credential_headers: frozenset[str]) -> dict[str, str]:
    """Return the client's end-to-end headers, minus its credentials, lower-cased.

    Beyond the credential headers by name, a header whose value carries the
    secret that authenticated the request is dropped too (issue #14).
    """
    connection = environ.get("HTTP_CONNECTION")
    # Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1); the usual
    # "keep-alive"/"close" tokens name nothing else, so check them only then.
    named = (
        {t.strip().lower() for t in connection.split(",")} - _CONNECTION_WORDS if connection else ()
    )
    secret = _secret_text(environ)
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:].replace("_", "-").lower()
            if name not in REQUEST_DROP and name not in credential_headers and name not in named:
                if secret is None or secret not in value:
                    headers[name] = value
    content_type = environ.get("CONTENT_TYPE")
    if content_type and (secret is None or secret not in content_type):
        headers["content-type"] = content_type
    return headers


def _secret_text(environ: dict) -> str | None:
    # As WSGI text (latin-1), to search header values and the raw query without
    # decoding each of them; None (no check) when no secret was presented.
    secret = environ.get(SECRET_ENVIRON)
    return secret.decode("latin-1") if secret else None


SECRET_IN_PATH = "The request path contains the gateway secret; send it only as a credential."

# Characters that may stand in a query string as they are; anything else is
# percent-encoded before it goes on the wire (http.client refuses non-ASCII).
_QUERY_SAFE = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/?%"
)


def upstream_path(environ: dict, provider: Provider) -> str:
    """Return path and query to request upstream; the path already passed the route allow-list.

    The query loses every credential parameter and any pair carrying the
    client's secret; a path carrying it (a model id, say) cannot be trimmed,
    so the request is refused.
    """
    path = environ.get("PATH_INFO", "")
    query = environ.get("QUERY_STRING", "")
    secret = environ.get(SECRET_ENVIRON)
    if secret and secret.decode("latin-1") in path:
        raise BadRequest(SECRET_IN_PATH)
    if query:
        query = provider.upstream_query(query, secret)
    if not query:
        return path
    if not _QUERY_SAFE.issuperset(query):
        query = "".join(
            ch if ch in _QUERY_SAFE else "".join(f"%{b:02X}" for b in ch.encode("latin-1"))
            for ch in query
        )
    return f"{path}?{query}"


def response_headers(raw: urllib3.HTTPResponse) -> list[tuple[str, str]]:
    return [(k, v) for k, v in raw.headers.items() if k.lower() not in RESPONSE_DROP]


def status_line(raw: urllib3.HTTPResponse) -> str | int:
    return f"{raw.status} {raw.reason}" if raw.reason else raw.status


def whole_response(raw: urllib3.HTTPResponse, body: bytes) -> Response:
    """The client's response for an upstream answer already read whole."""
    return Response(
        [body], status=status_line(raw), headers=response_headers(raw), direct_passthrough=True
    )


def relay(
    raw: urllib3.HTTPResponse,
    provider: Provider,
    method: str,
    environ: dict,
    record: AccessRecord,
    on_stream: StreamCounter | None = None,
) -> Response:
    """Turn the upstream response into the client's, bytes untouched."""
    length = raw.headers.get("content-length")
    if method == "HEAD":
        raw.release_conn()
        return whole_response(raw, b"")
    content_type = raw.headers.get("content-type", "")
    encoding = raw.headers.get("content-encoding")
    if length is not None and length.isdigit() and int(length) <= WHOLE_BODY_BYTES:
        body = read_whole(raw, provider, record)
        if raw.status >= 400:
            # An error answer (a subscription refusal?): read from a copy, relay `body` as sent.
            provider.read_error(raw.status, encoding, body, record)
        if provider.usage_markers and content_type.startswith("application/json"):
            # Read from a decoded copy when compressed; the client gets `body` as sent.
            why = usage.read_whole(body, encoding, lambda data: provider.read_usage(data, record))
            if why is not None:
                usage_unread(record, why)
        return whole_response(raw, body)
    headers = response_headers(raw)
    if length is None:
        # A body of unknown length is a stream: tell a proxy in front not to buffer it.
        headers.append(("X-Accel-Buffering", "no"))
    # An error frame cannot be appended to a compressed body: the stream is aborted instead.
    frame = None if encoding else provider.stream_error_frame
    tap = None
    if provider.usage_markers:
        tap = usage.tap_for(
            content_type, encoding, provider.event_separator, provider.usage_markers
        )
    upstream_pool.forget_parsed_headers(raw)
    body = UpstreamBody(raw, provider, content_type, frame, record, tap, on_stream)
    body.watch_client(environ.get("gunicorn.socket"))
    return Response(body, status=status_line(raw), headers=headers, direct_passthrough=True)


def read_whole(raw: urllib3.HTTPResponse, provider: Provider, record: AccessRecord) -> bytes:
    """Read the whole body of an answer (small, or an error answer before a retry).

    A failure is a clean 502/503/504 (shim.failures), the connection closed.
    """
    try:
        with map_upstream_failures(WHOLE_BODY, record, provider.name):
            return raw.read(decode_content=False)
    except GatewayError:
        raw.close()  # a half-read answer must not go back to the pool
        raise
    finally:
        raw.release_conn()
