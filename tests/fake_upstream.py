"""A fake Anthropic + Gemini upstream on 127.0.0.1 that records every request.

It speaks enough of both APIs for the official SDKs, Claude Code and the
Gemini CLI: messages (JSON and paced SSE), count_tokens, models; Gemini
generate/stream (SSE and JSON array)/countTokens/embed/batchEmbed/models. It
checks the *upstream* credential like the real APIs do, so a client that gets
an answer proves shim swapped the secret for the credential.

Per-request behaviour is chosen by headers the client sends (shim forwards
them untouched):

- ``x-fake-gap-ms``: pause between streamed events (default 0);
- ``x-fake-events``: number of text deltas in a stream (default 3);
- ``x-fake-stamp``: any value makes each streamed text piece start with the
  fake's send time (``"@1764000000.123456 chunk3 "``), for chunk delays;
- ``x-fake-limited-keys``: indexes into FAKE_GEMINI_KEYS (``0,2``) that get a
  Gemini 429 with ``RetryInfo`` (``x-fake-retry-delay``, default ``30s``) and
  ``QuotaFailure`` (``x-fake-quota``, default a per-minute quota id);
- ``x-fake-invalid-keys``: indexes of keys answered 400 ``API_KEY_INVALID``;
- ``x-fake-encoding``: the coding to answer with, if the request's
  ``Accept-Encoding`` offers it (``identity`` for none). Without it the fake
  is as rude as the real APIs: whatever the client offers, it compresses:
  JSON as br when offered, else gzip, zstd, deflate; SSE and Gemini answers
  as gzip when offered, else br, zstd, deflate. A stream is flushed after
  every event (each chunk decodes on its own), and ``sent`` records, by
  ``x-test-id``, exactly the body bytes put on the wire;
- ``x-fake-input-tokens`` / ``x-fake-output-tokens``: the usage reported
  (defaults 12 and 6 for Anthropic messages, 5 and 4 for Gemini);
- ``x-fake-pad-bytes``: this much more text in the answer (JSON) or in the
  usage-carrying event (Gemini SSE), to make big bodies and big events:
  random base64, which barely compresses, or ``x-fake-pad-char`` repeated
  (a decompression bomb);
- ``x-fake-scenario``: ``chunked-json`` (a JSON answer sent chunked, no
  Content-Length), ``bad-header`` (a stream whose headers carry a control
  byte that gunicorn refuses to relay), ``error:<status>`` (provider-shaped error with
  ``retry-after`` and rate-limit headers), ``stall:<seconds>`` (sleep before
  headers), ``gzip`` (gzip-encoded JSON body), ``drop`` (send two events, then
  cut the TCP connection), ``stall-mid:<seconds>`` (two events, then silence),
  ``close-delimited`` (no Content-Length, no chunking: body ends at close),
  ``redirect`` (302 to another host), ``bulk:<MiB>`` (a stream of that many
  MiB, as fast as the reader takes it), ``refusal:<name>`` (Anthropic only:
  one of the subscription refusals in ``REFUSALS``, with the real status and
  error type and the message text as upstream words it). While it stalls, the
  fake watches its connection and records in ``stream_ends`` when shim closes it;
- ``x-fake-quota-headers``: a JSON object of quota headers to add to every
  Anthropic answer (errors and streams too); a name without the
  ``anthropic-`` prefix gets ``anthropic-ratelimit-unified-`` put in front
  (``{"5h-utilization": "0.85"}``). They replace the fake's own ``status``.

It is also an OAuth token endpoint (``POST /v1/oauth/token``, Claude Code's
refresh request): ``issue_tokens`` mints a pair, refresh tokens are single-use
(a reused one gets 400 ``invalid_grant``, as two racing refreshes would), the
Anthropic routes accept an issued access token until it expires or is
``revoke``d, and ``token_calls`` records every refresh. ``token_delay_s`` and
``token_error`` (a status to answer with) are set by the test.

Run standalone for manual tries: ``python -m tests.fake_upstream --port 9999``.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import secrets
import select
import socket
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import brotli

try:
    from compression import zstd
except ImportError:
    from backports import zstd

FAKE_API_KEY = "sk-ant-api03-fake-upstream-key-000000000000"
FAKE_OAUTH_TOKEN = "sk-ant-oat01-fake-upstream-token-0000000000"
FAKE_GEMINI_KEYS = ("AIzaFakeGeminiKeyNumberOne000000000000", "AIzaFakeGeminiKeyNumberTwo000000000000",
                    "AIzaFakeGeminiKeyNumberThree0000000000")
OAUTH_BETA = "oauth-2025-04-20"
OAUTH_CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"

# Subscription refusals as the real API answers them: (status, error type, message).
REFUSALS = {
    "third_party_extra_usage": (400, "invalid_request_error",
                                "Third-party apps now draw from your extra usage, not your plan limits. "
                                "We've added a $200 credit to get you started. Claim it at "
                                "claude.ai/settings/usage and keep going."),
    # The same refusal as worded to an organization's members.
    "third_party_org": (400, "invalid_request_error",
                        "Third-party apps now draw from extra usage, not plan limits. We've added a "
                        "credit to your organization to get you started. Ask your workspace admin "
                        "to claim it and keep going."),
    "claude_code_only": (400, "invalid_request_error",
                         "This credential is only authorized for use with Claude Code and cannot be "
                         "used for other API requests."),
    "org_disabled": (400, "invalid_request_error", "This organization has been disabled."),
    "oauth_not_allowed": (403, "permission_error",
                          "OAuth authentication is currently not allowed for this organization."),
    "oauth_not_supported": (401, "authentication_error",
                            "OAuth authentication is currently not supported."),
}

ANTHROPIC_MODELS = ("claude-sonnet-4-5-20250929", "claude-opus-4-1-20250805", "claude-haiku-4-5-20251001")
GEMINI_MODELS = ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-3-pro-preview", "gemini-embedding-001")


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class FakeUpstream:
    """Owns the server thread and the list of requests it has seen."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, verbose: bool = False):
        self.verbose = verbose
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"fake": self})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        # How each stream ended, by x-test-id: "complete", "dropped" or "client_gone".
        self.stream_ends: dict[str, tuple[str, float]] = {}
        # Bytes of a bulk stream written so far, by x-test-id (backpressure shows here).
        self.bulk_sent: dict[str, int] = {}
        # The body bytes written, as on the wire (compressed, no chunk framing), by x-test-id.
        self.sent: dict[str, bytearray] = {}
        # The OAuth token endpoint: access token -> expiry (epoch s), unused refresh tokens.
        self.oauth_access: dict[str, float] = {}
        self.oauth_refresh: set[str] = set()
        self.oauth_minted: list[str] = []
        self.token_calls: list[Recorded] = []
        self.token_lifetime_s = 28_800
        self.token_delay_s = 0.0
        self.token_error: int | None = None
        self.token_retry_after: str | None = None  # a Retry-After sent with token_error
        self.token_invalid_grants = 0  # refreshes answered invalid_grant (a token spent twice)
        self.oauth_rejected = 0  # calls refused because their issued token expired or was revoked

    def issue_tokens(self, lifetime_s: float) -> tuple[str, str, float]:
        """Mint an (access, refresh, expires_at) triple the fake will accept."""
        with self.lock:
            serial = len(self.oauth_access)
            access = f"sk-ant-oat01-fake-issued-{serial:04d}-{secrets.token_hex(8)}"
            refresh = f"sk-ant-ort01-fake-issued-{serial:04d}-{secrets.token_hex(8)}"
            expires_at = time.time() + lifetime_s
            self.oauth_access[access] = expires_at
            self.oauth_refresh.add(refresh)
            self.oauth_minted += [access, refresh]
        return access, refresh, expires_at

    def revoke(self, access: str) -> None:
        with self.lock:
            self.oauth_access[access] = 0.0

    def issued_tokens(self) -> list[str]:
        """Every token minted so far (none may show up in shim's log)."""
        with self.lock:
            return list(self.oauth_minted)

    def start(self) -> FakeUpstream:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def record(self, request: Recorded) -> None:
        with self.lock:
            self.requests.append(request)
        if self.verbose:
            credential = [k for k in ("authorization", "x-api-key", "x-goog-api-key") if k in request.headers]
            print(f"{request.method} {request.path}?{request.query} credential={credential} "
                  f"beta={request.headers.get('anthropic-beta')} body={len(request.body)}B", flush=True)

    def matching(self, marker: str) -> list[Recorded]:
        """Requests whose ``x-test-id`` header equals ``marker``."""
        with self.lock:
            return [r for r in self.requests if r.headers.get("x-test-id") == marker]


def padding(size: int, char: str | None) -> str:
    if not size:
        return ""
    if char:
        return char[0] * size
    return base64.b64encode(secrets.token_bytes(size * 3 // 4 + 3)).decode()[:size]


JSON_PREFERENCE = ("br", "gzip", "zstd", "deflate")
STREAM_PREFERENCE = ("gzip", "br", "zstd", "deflate")


def offered_codings(accept_encoding: str | None) -> list[str]:
    """The codings an Accept-Encoding header offers (q=0 excluded), in its order."""
    offered = []
    for item in (accept_encoding or "").split(","):
        name, _, params = item.strip().partition(";")
        if name and params.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
            offered.append(name.strip().lower())
    return offered


class Encoder:
    """Compresses a body piece by piece, flushing after each so every piece decodes alone."""

    def __init__(self, coding: str):
        self.coding = coding
        if coding == "gzip":
            self._obj = zlib.compressobj(6, zlib.DEFLATED, 31)
        elif coding == "deflate":
            self._obj = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS)
        elif coding == "br":
            # Quality 5, as servers compress dynamic answers (11 is for static files).
            self._obj = brotli.Compressor(quality=5)
        elif coding == "zstd":
            self._obj = zstd.ZstdCompressor()

    def piece(self, data: bytes) -> bytes:
        if self.coding in ("gzip", "deflate"):
            return self._obj.compress(data) + self._obj.flush(zlib.Z_SYNC_FLUSH)
        if self.coding == "br":
            return self._obj.process(data) + self._obj.flush()
        return self._obj.compress(data, zstd.ZstdCompressor.FLUSH_BLOCK)

    def end(self) -> bytes:
        if self.coding in ("gzip", "deflate"):
            return self._obj.flush()
        if self.coding == "br":
            return self._obj.finish()
        return self._obj.flush(zstd.ZstdCompressor.FLUSH_FRAME)

    def whole(self, data: bytes) -> bytes:
        return self.piece(data) + self.end()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeUpstream
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: tests read the recorded requests instead

    # -- plumbing -----------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        rec = Recorded(
            method=self.command,
            path=parts.path,
            query=parts.query,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        self.fake.record(rec)
        self.rec = rec
        self.query = parse_qs(parts.query)
        self.gap = int(rec.header("x-fake-gap-ms") or 0) / 1000
        self.n_events = int(rec.header("x-fake-events") or 3)
        self.scenario = rec.header("x-fake-scenario") or ""
        self.pad = padding(int(rec.header("x-fake-pad-bytes") or 0), rec.header("x-fake-pad-char"))
        self.offered = offered_codings(rec.header("accept-encoding"))
        self.input_tokens = rec.header("x-fake-input-tokens")
        self.output_tokens = rec.header("x-fake-output-tokens")
        # The two APIs share /v1/models: the credential header tells them apart.
        gemini = ("x-goog-api-key" in rec.headers or "key" in self.query
                  or parts.path.startswith("/v1beta/") or ":" in parts.path)
        try:
            if parts.path == "/v1/oauth/token" and self.command == "POST":
                return self._oauth_token()
            if self.scenario.startswith("stall:"):
                if self._quiet(float(self.scenario.split(":", 1)[1])):
                    return
            if self.scenario == "redirect":
                self._send(302, b"", "text/plain", [("Location", "http://127.0.0.2:9/elsewhere")])
            elif gemini:
                self._gemini(parts.path)
            else:
                self._anthropic(parts.path)
        except (BrokenPipeError, ConnectionResetError):
            self._stream_ended("client_gone")
            self.close_connection = True

    def _quiet(self, seconds: float) -> bool:
        """Say nothing for ``seconds``; return True (and record it) if the peer hangs up."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.connection], [], [], 0.02)
            if readable:
                try:
                    gone = not self.connection.recv(1, socket.MSG_PEEK)
                except OSError:
                    gone = True
                if gone:
                    self._stream_ended("client_gone")
                    self.close_connection = True
                    return True
        return False

    def _stream_ended(self, how: str) -> None:
        marker = self.rec.header("x-test-id")
        if marker:
            with self.fake.lock:
                self.fake.stream_ends[marker] = (how, time.monotonic())

    def _coding(self, preference: tuple[str, ...]) -> str | None:
        """The coding to answer with: forced by x-fake-encoding, else the first offered."""
        forced = self.rec.header("x-fake-encoding")
        if forced:
            return forced if forced in self.offered and forced != "identity" else None
        if "gemini" in self.rec.path or "x-goog-api-key" in self.rec.headers:
            preference = STREAM_PREFERENCE  # Google answers gzip when offered
        return next((c for c in preference if c in self.offered), None)

    def _record_sent(self, data: bytes) -> None:
        marker = self.rec.header("x-test-id")
        if marker:
            with self.fake.lock:
                self.fake.sent.setdefault(marker, bytearray()).extend(data)

    def _quota_headers(self, extra: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
        """``extra`` plus the quota headers the test asked for (theirs win over the fake's)."""
        raw = self.rec.header("x-fake-quota-headers")
        if not raw:
            return list(extra or [])
        asked = [(n if n.startswith("anthropic-") else "anthropic-ratelimit-unified-" + n, str(v))
                 for n, v in json.loads(raw).items()]
        names = {n.lower() for n, _ in asked}
        return [(n, v) for n, v in extra or [] if n.lower() not in names] + asked

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              extra: list[tuple[str, str]] | None = None) -> None:
        extra = self._quota_headers(extra)
        if self.scenario == "gzip" and body:
            body = gzip.compress(body)
            extra = [*(extra or []), ("Content-Encoding", "gzip")]
        elif body:
            coding = self._coding(JSON_PREFERENCE)
            if coding:
                body = Encoder(coding).whole(body)
                extra = [*(extra or []), ("Content-Encoding", coding)]
        if self.scenario == "chunked-json" and self.command != "HEAD":
            self._start_chunked(content_type, extra, status=status)
            for at in range(0, len(body), 65_536):
                self._chunk(body[at:at + 65_536])
            self._end_chunked()
            return
        self._record_sent(body)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("request-id", "req_fake_0001")
        for name, value in extra or []:
            self.send_header(name, value)
        if self.scenario == "close-delimited":
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _start_chunked(self, content_type: str, extra: list[tuple[str, str]] | None = None,
                       status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("request-id", "req_fake_stream")
        for name, value in self._quota_headers(
                [("anthropic-ratelimit-unified-status", "allowed"), *(extra or [])]):
            self.send_header(name, value)
        self.end_headers()
        self.wfile.flush()

    def _chunk(self, data: bytes) -> None:
        if not data:
            return  # an empty chunk would end the body
        self._record_sent(data)
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _stream(self, frames: list[bytes], content_type: str) -> None:
        """Send frames one chunk each, paced by the gap, honouring mid-stream faults."""
        coding = self._coding(STREAM_PREFERENCE)
        encoder = Encoder(coding) if coding else None
        extra = [("Content-Encoding", coding)] if coding else []
        if self.scenario == "bad-header":
            extra.append(("X-Fake-Odd", "a\x01b"))  # a control byte gunicorn refuses to relay
        self._start_chunked(content_type, extra)
        stamp = bool(self.rec.header("x-fake-stamp"))
        for index, frame in enumerate(frames):
            if index and self.gap:
                time.sleep(self.gap)
            if stamp:
                frame = frame.replace(b'"chunk', b'"@%.6f chunk' % time.time(), 1)
            if index == 2 and self.scenario == "drop":
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                self._stream_ended("dropped")
                return
            if index == 2 and self.scenario.startswith("stall-mid:"):
                if self._quiet(float(self.scenario.split(":", 1)[1])):
                    return
            self._chunk(encoder.piece(frame) if encoder else frame)
        if encoder:
            self._chunk(encoder.end())
        self._end_chunked()
        self._stream_ended("complete")

    def _bulk(self, megabytes: int) -> None:
        """Stream ``megabytes`` of 16 KiB SSE deltas as fast as the reader lets us."""
        self._start_chunked("text/event-stream; charset=utf-8")
        frame = _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "text_delta", "text": "x" * 16000}})
        count = megabytes * 1024 * 1024 // len(frame)
        marker = self.rec.header("x-test-id") or ""
        for index in range(count):
            self._chunk(frame)
            with self.fake.lock:
                self.fake.bulk_sent[marker] = (index + 1) * len(frame)
        self._end_chunked()
        self._stream_ended("complete")

    def _error(self, status: int, gemini: bool, message: str) -> None:
        if gemini:
            names = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                     404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                     503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
            body = {"error": {"code": status, "message": message,
                              "status": names.get(status, "UNKNOWN")}}
        else:
            types = {400: "invalid_request_error", 401: "authentication_error",
                     403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
                     500: "api_error", 529: "overloaded_error"}
            body = {"type": "error", "error": {"type": types.get(status, "api_error"),
                                               "message": message},
                    "request_id": "req_fake_error"}
        extra = [("retry-after", "7"), ("x-should-retry", "true"),
                 ("anthropic-ratelimit-requests-remaining", "0")]
        self._send(status, json.dumps(body).encode(), extra=extra)

    # -- OAuth token endpoint ------------------------------------------------
    def _oauth_token(self) -> None:
        fake = self.fake
        with fake.lock:
            fake.token_calls.append(self.rec)
        if fake.token_delay_s:
            time.sleep(fake.token_delay_s)
        if fake.token_error:
            extra = [("Retry-After", fake.token_retry_after)] if fake.token_retry_after else None
            return self._send(fake.token_error, json.dumps({"error": "server_error"}).encode(), extra=extra)
        try:
            request = json.loads(self.rec.body)
        except ValueError:
            request = None
        if (not isinstance(request, dict) or request.get("grant_type") != "refresh_token"
                or request.get("client_id") != OAUTH_CLIENT_ID):
            return self._send(400, json.dumps({"error": "invalid_request"}).encode())
        with fake.lock:
            known = request.get("refresh_token") in fake.oauth_refresh
            fake.oauth_refresh.discard(request.get("refresh_token"))
        if not known:  # unknown, or used before: single-use, as upstream
            with fake.lock:
                fake.token_invalid_grants += 1
            body = {"error": "invalid_grant", "error_description": "Refresh token not found or invalid"}
            return self._send(400, json.dumps(body).encode())
        access, refresh, _ = fake.issue_tokens(fake.token_lifetime_s)
        body = {"token_type": "Bearer", "access_token": access, "refresh_token": refresh,
                "expires_in": fake.token_lifetime_s, "scope": "user:inference user:profile"}
        self._send(200, json.dumps(body).encode())

    # -- Anthropic ---------------------------------------------------------
    def _anthropic_authorized(self) -> bool:
        h = self.rec.headers
        if "authorization" in h:
            betas = [b.strip() for b in h.get("anthropic-beta", "").split(",")]
            token = h["authorization"].removeprefix("Bearer ")
            if token != FAKE_OAUTH_TOKEN:
                with self.fake.lock:
                    expires_at = self.fake.oauth_access.get(token)
                    if expires_at is None or expires_at <= time.time():
                        if expires_at is not None:
                            self.fake.oauth_rejected += 1
                        return False
            return OAUTH_BETA in betas and "x-api-key" not in h
        return h.get("x-api-key") == FAKE_API_KEY

    def _refusal(self, name: str) -> None:
        status, kind, message = REFUSALS[name]
        body = {"type": "error", "error": {"type": kind, "message": message},
                "request_id": "req_fake_refusal"}
        self._send(status, json.dumps(body).encode())

    def _anthropic(self, path: str) -> None:
        if self.scenario.startswith("refusal:"):
            return self._refusal(self.scenario.split(":", 1)[1])
        if not self._anthropic_authorized():
            return self._error(401, False, "invalid x-api-key")
        if self.scenario.startswith("error:"):
            return self._error(int(self.scenario.split(":")[1]), False, "Fake upstream error.")
        if self.command == "POST":
            try:
                json.loads(self.rec.body)
            except ValueError:
                return self._error(400, False, "There was an error parsing the body of your request.")
        if path == "/v1/messages" and self.command == "POST":
            request = json.loads(self.rec.body or b"{}")
            if not isinstance(request, dict) or "messages" not in request:
                return self._error(400, False, "messages: Field required")
            if request.get("stream"):
                if self.scenario.startswith("bulk:"):
                    return self._bulk(int(self.scenario.split(":")[1]))
                events = anthropic_events(request, self.n_events, int(self.input_tokens or 12),
                                          self.output_tokens and int(self.output_tokens))
                return self._stream(events, "text/event-stream; charset=utf-8")
            message = anthropic_message(request, int(self.input_tokens or 12),
                                        int(self.output_tokens or 6), self.pad)
            return self._send(200, json.dumps(message).encode(),
                              extra=[("anthropic-ratelimit-unified-status", "allowed")])
        if path == "/v1/messages/count_tokens" and self.command == "POST":
            return self._send(200, json.dumps({"input_tokens": 3 + len(self.rec.body) // 4}).encode())
        if path == "/v1/models":
            data = [anthropic_model(m) for m in ANTHROPIC_MODELS]
            body = {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
            return self._send(200, json.dumps(body).encode())
        if path.startswith("/v1/models/"):
            model = path.rsplit("/", 1)[1]
            if model not in ANTHROPIC_MODELS:
                return self._error(404, False, f"model: {model}")
            return self._send(200, json.dumps(anthropic_model(model)).encode())
        return self._error(404, False, "Not found")

    def _gemini_key_error(self, status: int, message: str, details: list[dict]) -> None:
        names = {400: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED"}
        body = {"error": {"code": status, "message": message, "status": names[status],
                          "details": details}}
        self._send(status, json.dumps(body).encode())

    # -- Gemini --------------------------------------------------------------
    def _gemini_usage(self) -> dict:
        prompt, output = int(self.input_tokens or 5), int(self.output_tokens or 4)
        return {"promptTokenCount": prompt, "candidatesTokenCount": output,
                "totalTokenCount": prompt + output}

    def _gemini(self, path: str) -> None:
        if self.rec.header("x-goog-api-key") not in FAKE_GEMINI_KEYS or "key" in self.query:
            return self._error(401 if "x-goog-api-key" not in self.rec.headers else 400, True,
                               "API key not valid. Please pass a valid API key.")
        if self.scenario.startswith("error:"):
            return self._error(int(self.scenario.split(":")[1]), True, "Fake upstream error.")
        key_index = str(FAKE_GEMINI_KEYS.index(self.rec.header("x-goog-api-key")))
        if key_index in (self.rec.header("x-fake-invalid-keys") or "").split(","):
            return self._gemini_key_error(400, "API key not valid. Please pass a valid API key.", [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com"}])
        if key_index in (self.rec.header("x-fake-limited-keys") or "").split(","):
            quota = self.rec.header("x-fake-quota") or "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
            return self._gemini_key_error(429, "You exceeded your current quota.", [
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                 "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                                 "quotaId": quota}]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo",
                 "retryDelay": self.rec.header("x-fake-retry-delay") or "30s"}])
        version, _, rest = path.lstrip("/").partition("/")
        if rest == "models":
            models = [gemini_model(m) for m in GEMINI_MODELS]
            return self._send(200, json.dumps({"models": models}).encode())
        model, _, action = rest.removeprefix("models/").partition(":")
        if not action:
            if model not in GEMINI_MODELS:
                return self._error(404, True, f"models/{model} is not found")
            return self._send(200, json.dumps(gemini_model(model)).encode())
        try:
            request = json.loads(self.rec.body or b"{}")
        except ValueError:
            return self._error(400, True, "Invalid JSON payload received.")
        if action == "generateContent":
            text = gemini_text(request)
            answer = gemini_response(model, text + self.pad, True, self._gemini_usage())
            return self._send(200, json.dumps(answer).encode())
        if action == "streamGenerateContent":
            pieces = gemini_stream(model, self.n_events, self._gemini_usage())
            if self.pad:
                pieces[-1]["candidates"][0]["content"]["parts"][0]["text"] += self.pad
            if self.query.get("alt") == ["sse"]:
                frames = [b"data: " + json.dumps(p).encode() + b"\r\n\r\n" for p in pieces]
                return self._stream(frames, "text/event-stream")
            frames = [(b"[" if i == 0 else b",\r\n") + json.dumps(p).encode() for i, p in enumerate(pieces)]
            frames.append(b"]")
            return self._stream(frames, "application/json; charset=UTF-8")
        if action == "countTokens":
            return self._send(200, json.dumps({"totalTokens": 2 + len(self.rec.body) // 4}).encode())
        if action == "embedContent":
            return self._send(200, json.dumps({"embedding": {"values": [0.1, 0.2, 0.3]}}).encode())
        if action == "batchEmbedContents":
            count = len(request.get("requests", []))
            body = {"embeddings": [{"values": [0.1 * i, 0.2, 0.3]} for i in range(count)]}
            return self._send(200, json.dumps(body).encode())
        return self._error(404, True, "Not found")


# -- response builders -------------------------------------------------------

def anthropic_model(model: str) -> dict:
    return {"type": "model", "id": model, "display_name": model.replace("-", " ").title(),
            "created_at": "2025-09-29T00:00:00Z"}


def anthropic_message(request: dict, input_tokens: int = 12, output_tokens: int = 6,
                      pad: str = "") -> dict:
    return {
        "id": "msg_fake_0001", "type": "message", "role": "assistant",
        "model": request.get("model", "claude-sonnet-4-5"),
        "content": [{"type": "text", "text": "Hello from fake Claude." + pad}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                  "cache_read_input_tokens": 0,
                  "cache_creation_input_tokens": 0},
    }


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def anthropic_events(request: dict, deltas: int, input_tokens: int = 12,
                     output_tokens: int | None = None) -> list[bytes]:
    model = request.get("model", "claude-sonnet-4-5")
    message = {"id": "msg_fake_stream", "type": "message", "role": "assistant", "model": model,
               "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": input_tokens, "output_tokens": 1,
                         "cache_read_input_tokens": 0,
                         "cache_creation_input_tokens": 0}}
    frames = [
        _sse("message_start", {"type": "message_start", "message": message}),
        _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
        _sse("ping", {"type": "ping"}),
    ]
    for i in range(deltas):
        frames.append(_sse("content_block_delta", {
            "type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": f"chunk{i} "}}))
    frames += [
        _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": deltas if output_tokens is None
                                         else output_tokens}}),
        _sse("message_stop", {"type": "message_stop"}),
    ]
    return frames


def gemini_model(model: str) -> dict:
    return {"name": f"models/{model}", "version": "001", "displayName": model,
            "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
            "supportedGenerationMethods": ["generateContent", "countTokens"]}


def gemini_response(model: str, text: str, last: bool, usage: dict | None = None) -> dict:
    candidate = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if last:
        candidate["finishReason"] = "STOP"
    return {"candidates": [candidate],
            "usageMetadata": usage or {"promptTokenCount": 5, "candidatesTokenCount": 4,
                                       "totalTokenCount": 9},
            "modelVersion": model}


def _from_schema(schema: dict):
    kind = str(schema.get("type", "STRING")).upper()
    if kind == "OBJECT":
        props = schema.get("properties", {})
        return {name: _from_schema(sub) for name, sub in props.items()}
    return {"INTEGER": 1, "NUMBER": 1.0, "BOOLEAN": False, "ARRAY": []}.get(kind, "fake")


def gemini_text(request: dict) -> str:
    """Plain text, or a JSON document matching the schema the client asked for."""
    config = request.get("generationConfig") or {}
    schema = config.get("responseJsonSchema") or config.get("responseSchema")
    if config.get("responseMimeType") == "application/json":
        return json.dumps(_from_schema(schema) if isinstance(schema, dict) else {})
    return "Hello from fake Gemini."


def gemini_stream(model: str, pieces: int, usage: dict | None = None) -> list[dict]:
    return [gemini_response(model, f"chunk{i} ", i == pieces - 1, usage) for i in range(pieces)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9999)
    args = parser.parse_args()
    fake = FakeUpstream(port=args.port, verbose=True)
    print(f"fake upstream on {fake.url}; API key {FAKE_API_KEY}, OAuth token {FAKE_OAUTH_TOKEN}, "
          f"Gemini keys {','.join(FAKE_GEMINI_KEYS)}", flush=True)
    fake.server.serve_forever()


if __name__ == "__main__":
    main()
