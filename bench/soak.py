"""Soak: shim under a steady, mixed, faulty load with reloads and restarts; leaks and lost calls.

    .venv/bin/python bench/soak.py                # 30 minutes (run by hand, never in CI)
    .venv/bin/python bench/soak.py --smoke        # 45 s, fewer clients (tests/test_soak.py)
    .venv/bin/python bench/soak.py --minutes 3    # any length; --out FILE for the JSON

Starts the project's fake upstream (tests/fake_upstream.py, in a process of its
own: compressed answers, quota headers, Gemini 429s, faults by header) and shim
as deployed (gunicorn, 2 gevent workers, JSON logs to a file, metrics on, a
named-clients file with limits). Then, at a fixed rate, for the chosen time:
Claude Code-like sessions (model list, count_tokens, a long SSE stream of a few
hundred paced events, a burst of short tool calls on one keep-alive connection)
and independent SDK-like calls on both ports, with faults at low rates: client
hang-ups mid-stream, upstream drops and stalls, 429s and 529s, Gemini keys over
quota, wrong secrets from other loopback addresses (127.0.0.2-250), slow
readers, a client over its rpm limit. Meanwhile the clients file is rewritten
every minute, the master gets one SIGHUP, and the workers one rolling restart.

Every call carries its own id (``X-Request-Id`` and the fake's ``x-test-id``),
so each is followed end to end: what the client saw, the access line(s) shim
wrote, and the usage in the bytes the fake actually sent. Prints one table
with PASS/FAIL per criterion and writes bench/results/soak.json (smoke:
soak-smoke.json). Loopback only; bounded in time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import brotli

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fake_upstream import (  # noqa: E402 - bench/ is a folder of scripts
    FAKE_GEMINI_KEYS,
    FAKE_OAUTH_TOKEN,
    OAUTH_BETA,
    FakeUpstream,
)

try:
    from compression import zstd
except ImportError:
    from backports import zstd

MiB = 2**20


@dataclass(frozen=True)
class Plan:
    """How long, how fast and how often: one for the real soak, one for the smoke."""

    duration_s: float
    short_per_s: float  # independent SDK-like calls
    session_every_s: float  # a new Claude Code-like session
    long_events: int  # deltas in a session's long stream
    long_gap_ms: int
    sample_s: float  # /proc and metrics sampling; also SHIM_SELF_STATS_S
    edit_every_s: float  # clients file rewrites
    grace_s: float  # SHIM_GRACEFUL_TIMEOUT_S
    warmup_s: float  # samples before this (and a new worker's first warmup_s) are not fitted

    @property
    def rate(self) -> float:
        """Calls per second through shim, roughly: short calls, sessions (~8 each), probes."""
        return self.short_per_s + 8 / self.session_every_s + 2


FULL = Plan(1800, 44, 1.0, 300, 100, 5, 60, 20, 360)
SMOKE = Plan(45, 20, 1.5, 60, 100, 2, 12, 10, 10)

# Claude Code's Accept-Encoding, the SDKs' (httpx), and none; the coding the real APIs pick.
OFFERS = (("gzip, deflate, br, zstd", 5), ("gzip, deflate", 4), ("identity", 1))
JSON_PICK = ("br", "gzip", "zstd", "deflate")
STREAM_PICK = ("gzip", "br", "zstd", "deflate")
HTTP_TIMEOUT_S = 3  # shim's upstream silence limit: the stall faults outlast it
CLIENTS = {  # name: limits (high enough never to refuse, except tight's rpm)
    "cc-1": "concurrency=200 rpm=100000 tokens_per_day=1000000000000",
    "cc-2": "concurrency=200 tokens_per_day=1000000000000",
    "sdk": "",
    "tight": "rpm=20",
}
ANTHROPIC_MODEL = "claude-sonnet-4-5-20250929"


def secret_of(name: str) -> str:
    return f"soak-secret-{name}-000000000000"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


# --- the fake upstream, in a process of its own ------------------------------------------------


def usage_in(text: str) -> int:
    """Tokens in what the fake sent, read as the APIs define usage (not as shim reads it).

    Anthropic: ``usage`` objects in order, later fields replacing earlier ones
    (message_start has input and cache counts, message_delta the output so far).
    Gemini: the last ``usageMetadata`` (cumulative). count_tokens answers carry
    neither, and are not usage.
    """
    gemini = re.findall(r'"usageMetadata": (\{[^{}]*\})', text)
    if gemini:
        u = json.loads(gemini[-1])
        return sum(
            u.get(k) or 0
            for k in (
                "promptTokenCount",
                "candidatesTokenCount",
                "thoughtsTokenCount",
                "cachedContentTokenCount",
            )
        )
    merged: dict = {}
    for found in re.findall(r'"usage": (\{[^{}]*\})', text):
        merged.update(json.loads(found))
    keys = ("input_tokens", "output_tokens", "cache_read_input_tokens")
    return sum(merged.get(k) or 0 for k in (*keys, "cache_creation_input_tokens"))


def run_upstream(port: int, out: str) -> None:
    """Serve as the fake upstream until SIGTERM, then write the usage it sent, per call id."""
    fake = FakeUpstream(port=port)
    # Keep no request records: 30 minutes of them is hundreds of MB. `sent` stays.
    fake.record = lambda request: None  # type: ignore[method-assign]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    fake.server.socket.listen(1024)  # socketserver's backlog of 5 drops SYNs under bursts
    fake.start()
    while not stop.wait(0.5):
        pass
    with fake.lock:
        sent = dict(fake.sent)
        ends = Counter(how for how, _ in fake.stream_ends.values())
    usage, undecodable = {}, []
    for marker, data in sent.items():
        try:
            usage[marker] = usage_in(Decoder(marker.rsplit("-", 1)[1]).whole(bytes(data)))
        except (zlib.error, brotli.error, zstd.ZstdError, ValueError, IndexError):
            undecodable.append(marker)
    Path(out).write_text(
        json.dumps({"usage": usage, "undecodable": undecodable, "stream_ends": ends})
    )


# --- an HTTP/1.1 client that sees everything --------------------------------------------------


class Decoder:
    """Content-Encoding undone piece by piece; ``finished`` when the coding's end was seen."""

    def __init__(self, coding: str):
        self.coding = coding
        self._d = {
            "gzip": lambda: zlib.decompressobj(31),
            "deflate": lambda: zlib.decompressobj(),
            "br": brotli.Decompressor,
            "zstd": zstd.ZstdDecompressor,
        }.get(coding, lambda: None)()

    def feed(self, data: bytes) -> bytes:
        if self._d is None:
            return data
        if self.coding == "br":
            return self._d.process(data)
        return self._d.decompress(data)

    @property
    def finished(self) -> bool:
        if self._d is None:
            return True
        return self._d.is_finished() if self.coding == "br" else self._d.eof

    def whole(self, data: bytes) -> str:
        return self.feed(data).decode("utf-8", "replace")


class Cut(Exception):
    """The body ended without its framing's end: the client sees a transport error."""


_STAMP = re.compile(r'"@(\d+\.\d{6}) chunk')


@dataclass
class Call:
    id: str
    kind: str
    port: str  # "anthropic" | "gemini"
    method: str
    path: str
    headers: dict
    body: bytes = b""
    expect: str = "json"  # json | anthropic_sse | gemini_sse | gemini_array
    hangup_after: int = 0  # deltas, then the client closes
    slow: bool = False
    source: str | None = None  # bind the client socket to this loopback address


@dataclass
class Result:
    id: str
    kind: str
    start: float  # seconds since the load began
    expect: str = "json"
    outcome: str = ""
    status: int | None = None
    latency_ms: float | None = None  # whole answer, for the probes
    detail: str = ""
    reused: bool = False
    delays: list = field(default_factory=list)  # (arrival since start, delay ms)


class Stream:
    """What an answer means, fed decoded text: complete, an error frame, its stamps, its deltas."""

    def __init__(self, expect: str, t0: float):
        self.expect = expect
        self.t0 = t0
        self.text = ""
        self.done = False
        self.error_frame = False
        self.deltas = 0
        self.delays: list = []
        self._scan = 0
        self._sep = "\r\n\r\n" if expect == "gemini_sse" else "\n\n"

    def feed(self, text: str, now: float) -> None:
        self.text += text
        if self.expect == "json":
            return
        for match in _STAMP.finditer(self.text, self._scan):
            self.deltas += 1
            self.delays.append((now - self.t0, (now - float(match.group(1))) * 1000))
            self._scan = match.end()
        if self.expect == "anthropic_sse":
            if "event: message_stop\n" in text or "event: message_stop\n" in self.text[-200:]:
                self.done = True
            if "event: error\n" in self.text[-4096:]:
                self.error_frame = True
        elif self.expect == "gemini_sse":
            self.done = self.done or '"finishReason"' in text
        # Trim what is scanned, keeping a tail that may hold a split marker.
        if len(self.text) > 65536:
            cut = max(self._scan, len(self.text) - 4096)
            self.text, self._scan = self.text[cut:], self._scan - cut

    def complete(self) -> bool:
        if self.expect in ("anthropic_sse", "gemini_sse"):
            return self.done
        try:
            parsed = json.loads(self.text)
        except ValueError:
            return False
        if self.expect == "gemini_array":
            return isinstance(parsed, list) and bool(parsed) and '"finishReason"' in self.text
        return isinstance(parsed, dict)


def shaped(port: str, text: str) -> bool:
    """An error body in the provider's own shape."""
    try:
        body = json.loads(text)
    except ValueError:
        return False
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return False
    return body.get("type") == "error" if port == "anthropic" else "code" in body["error"]


class Client:
    """Opens connections (fresh or kept alive) and runs one call on one, classifying the end."""

    def __init__(self, ports: dict[str, int], t0: float):
        self.ports = ports
        self.t0 = t0
        self.idle: dict[str, list] = defaultdict(list)  # kept-alive connections per port

    async def connect(self, port: int, source: str | None, slow: bool):
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if slow:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        if source:
            sock.bind((source, 0))
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
        except OSError:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=4096 if slow else 2**20)

    async def run(
        self, call: Call, conn=None, keep: bool = False, timeout: float = 90, session: bool = False
    ) -> Result:
        """Run ``call``: a session's on its ``conn`` (None: a new one), else fresh or pooled."""
        result = Result(call.id, call.kind, time.time() - self.t0, call.expect)
        # A session's calls keep their own connection; other kept-alive calls share a pool.
        pooled = not session and keep and not call.source and not call.slow
        if conn is None and pooled and self.idle[call.port]:
            conn = self.idle[call.port].pop()
        if conn is not None and conn[0].at_eof():  # the server closed it while idle
            conn[1].close()
            conn = None
        result.reused = conn is not None
        try:
            if conn is None:
                conn = await self.connect(self.ports[call.port], call.source, call.slow)
            reusable = await asyncio.wait_for(self._exchange(call, conn, result, keep), timeout)
        except TimeoutError:
            result.outcome, reusable = "client_timeout", False
        except RuntimeError as exc:  # this client's own bug (a connection used twice): say so
            result.outcome, result.detail, reusable = "client_bug", repr(exc), False
        except (OSError, asyncio.IncompleteReadError, Cut, ValueError) as exc:
            reusable = False
            if result.status is None:
                result.outcome = "lost_on_reuse" if result.reused else "no_answer"
            else:
                result.outcome = "transport_error"
            result.detail = type(exc).__name__
        if conn is not None:
            if reusable and pooled:
                self.idle[call.port].append(conn)
            elif not (reusable and session):
                conn[1].close()
                conn = None
        result._conn = conn  # type: ignore[attr-defined] - a session keeps using it
        return result

    async def _exchange(self, call: Call, conn, result: Result, keep: bool) -> bool:
        reader, writer = conn
        head = [f"{call.method} {call.path} HTTP/1.1", "Host: 127.0.0.1"]
        headers = {
            **call.headers,
            "X-Request-Id": call.id,
            "x-test-id": call.id,
            "Content-Length": str(len(call.body)),
        }
        if not keep:
            headers["Connection"] = "close"
        head += [f"{k}: {v}" for k, v in headers.items()]
        sent = time.perf_counter()
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + call.body)
        await writer.drain()
        line = await reader.readline()
        if not line:
            raise Cut("no status line")
        result.status = int(line.split()[1])
        answer: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            answer[name.strip().lower()] = value.strip()
        if not line:
            raise Cut("headers cut")
        decoder = Decoder(answer.get("content-encoding", "identity"))
        stream = Stream(call.expect if result.status < 400 else "json", self.t0)
        hung_up = False
        async for piece in self._pieces(reader, answer, call.slow):
            stream.feed(decoder.feed(piece).decode("utf-8", "replace"), time.time())
            if call.hangup_after and stream.deltas >= call.hangup_after:
                writer.close()  # the client goes away mid-stream
                hung_up = True
                break
        result.latency_ms = (time.perf_counter() - sent) * 1000
        result.delays = stream.delays
        if hung_up:
            result.outcome = "hung_up"
            return False
        if result.status >= 400:
            result.outcome = "error_status" if shaped(call.port, stream.text) else "error_unshaped"
        elif stream.error_frame:
            result.outcome = "error_frame"
        elif stream.complete() and decoder.finished:
            result.outcome = "complete"
        elif call.expect == "json":
            result.outcome = "corrupt"
            result.detail = stream.text[:120]
        else:
            # A clean end of the HTTP body without the answer's end: a failure that hides.
            result.outcome = "TRUNCATED"
            result.detail = stream.text[-160:]
        return keep and answer.get("connection", "").lower() != "close"

    async def _pieces(self, reader, answer: dict, slow: bool):
        step = 4096 if slow else 65536
        if answer.get("transfer-encoding", "").lower() == "chunked":
            while True:
                line = await reader.readline()
                if not line.endswith(b"\r\n"):
                    raise Cut("chunk size cut")
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while (line := await reader.readline()) != b"\r\n":
                        if not line:
                            raise Cut("trailer cut")
                    return
                left = size
                while left:
                    data = await reader.readexactly(min(left, step))
                    left -= len(data)
                    yield data
                    if slow:
                        await asyncio.sleep(0.04)
                if await reader.readexactly(2) != b"\r\n":
                    raise Cut("chunk framing")
        elif "content-length" in answer:
            left = int(answer["content-length"])
            while left:
                data = await reader.read(min(left, step))
                if not data:
                    raise Cut("body cut")
                left -= len(data)
                yield data
                if slow:
                    await asyncio.sleep(0.04)
        else:  # delimited by close: the end cannot be told from a cut
            while data := await reader.read(step):
                yield data


# --- the mix ----------------------------------------------------------------------------------


class Mix:
    """Builds calls: a fixed mix, faults at low rates, all from one seeded random source."""

    def __init__(self, plan: Plan, prefix: str = "soak", seed: int = 19):
        self.plan = plan
        self.prefix = prefix
        self.rng = random.Random(seed)
        self.serial = 0
        self.bad_sources = [f"127.0.0.{n}" for n in range(2, 250)]

    def _id(self, kind: str, coding: str) -> str:
        self.serial += 1
        return f"{self.prefix}-{self.serial:07d}-{kind}-{coding or 'identity'}"

    def _offer(self, stream: bool) -> tuple[str, str]:
        offer = self.rng.choices([o for o, _ in OFFERS], [w for _, w in OFFERS])[0]
        offered = [c.strip() for c in offer.split(",")]
        coding = next((c for c in (STREAM_PICK if stream else JSON_PICK) if c in offered), "")
        return offer, coding

    def call(
        self,
        kind: str,
        port: str,
        method: str,
        path: str,
        body: dict | None = None,
        expect: str = "json",
        client: str = "sdk",
        coding: str | None = None,
        **extra,
    ) -> Call:
        offer, picked = self._offer(expect != "json" or port == "gemini")
        if coding is not None:  # forced (identity for calls the gateway may retry)
            offer, picked = coding or "identity", coding
        headers = {"Accept-Encoding": offer, "x-fake-encoding": picked or "identity"}
        secret = secret_of(client)
        if port == "anthropic":
            headers |= {"x-api-key": secret, "anthropic-version": "2023-06-01"}
        else:
            headers["x-goog-api-key"] = secret
        if body is not None:
            headers["Content-Type"] = "application/json"
        headers.update(extra.pop("headers", {}))
        data = json.dumps(body).encode() if body is not None else b""
        return Call(
            self._id(kind, picked), kind, port, method, path, headers, data, expect, **extra
        )

    def messages(self, kind: str, stream: bool, events: int = 3, gap_ms: int = 0, **kw) -> Call:
        body = {
            "model": ANTHROPIC_MODEL,
            "max_tokens": 64,
            "stream": stream,
            "messages": [{"role": "user", "content": "soak"}],
        }
        headers = {
            "x-fake-events": str(events),
            "x-fake-gap-ms": str(gap_ms),
            "x-fake-stamp": "1",
            "x-fake-input-tokens": str(self.rng.randint(10, 5000)),
            **kw.pop("headers", {}),
        }
        if not stream:
            headers["x-fake-output-tokens"] = str(self.rng.randint(1, 800))
        return self.call(
            kind,
            "anthropic",
            "POST",
            "/v1/messages?beta=true",
            body,
            "anthropic_sse" if stream else "json",
            headers=headers,
            **kw,
        )

    def gemini(
        self,
        kind: str,
        action: str,
        model: str = "gemini-2.5-flash",
        events: int = 3,
        gap_ms: int = 0,
        **kw,
    ) -> Call:
        body = {"contents": [{"role": "user", "parts": [{"text": "soak"}]}]}
        path = f"/v1beta/models/{model}:{action}"
        expect = "json"
        if action == "streamGenerateContent":
            sse = self.rng.random() < 0.8
            path += "?alt=sse" if sse else ""
            expect = "gemini_sse" if sse else "gemini_array"
        headers = {
            "x-fake-events": str(events),
            "x-fake-gap-ms": str(gap_ms),
            "x-fake-stamp": "1",
            "x-fake-input-tokens": str(self.rng.randint(5, 3000)),
            "x-fake-output-tokens": str(self.rng.randint(1, 500)),
            **kw.pop("headers", {}),
        }
        return self.call(kind, "gemini", "POST", path, body, expect, headers=headers, **kw)

    def session_start(self, client: str) -> list[Call]:
        return [
            self.call("models", "anthropic", "GET", "/v1/models?limit=1000", client=client),
            self.call(
                "count_tokens",
                "anthropic",
                "POST",
                "/v1/messages/count_tokens?beta=true",
                {"model": ANTHROPIC_MODEL, "messages": [{"role": "user", "content": "x"}]},
                client=client,
            ),
        ]

    def long_stream(self, client: str) -> Call:
        """A session's main turn: a few hundred paced deltas; sometimes a fault."""
        p, roll = self.plan, self.rng.random()
        kw: dict = {"client": client}
        if roll < 0.06:
            kind, kw["hangup_after"] = "long_hangup", self.rng.randint(3, p.long_events // 2)
        elif roll < 0.08:
            kind, kw["headers"] = "long_drop", {"x-fake-scenario": "drop"}
        elif roll < 0.09:
            kind, kw["headers"] = (
                "long_stall",
                {"x-fake-scenario": f"stall-mid:{HTTP_TIMEOUT_S + 2}"},
            )
        else:
            kind = "long_stream"
        return self.messages(kind, True, p.long_events, p.long_gap_ms, **kw)

    def tool_call(self, client: str) -> Call:
        if self.rng.random() < 0.5:
            return self.messages("tool_json", False, client=client)
        return self.messages("tool_stream", True, self.rng.randint(5, 20), 10, client=client)

    SHORT = (
        ("a_json", 22),
        ("a_stream", 10),
        ("a_count", 4),
        ("a_models", 2),
        ("g_json", 20),
        ("g_stream", 14),
        ("g_count", 2),
        ("g_models", 1),
        ("a_429", 1.5),
        ("a_529", 1.5),
        ("g_429", 2),
        ("g_503", 0.5),
        ("bad_secret", 2),
        ("guesser", 0.5),
        ("slow_reader", 0.5),
        ("tight", 1.5),
        ("a_stall", 0.3),
        ("g_hangup", 1),
        ("g_drop", 0.7),
        ("a_drop", 0.5),
    )

    def short(self) -> Call:
        kind = self.rng.choices([k for k, _ in self.SHORT], [w for _, w in self.SHORT])[0]
        rng = self.rng
        if kind == "a_json":
            return self.messages(kind, False)
        if kind == "a_stream":
            return self.messages(kind, True, rng.randint(5, 40), 20)
        if kind == "a_count":
            return self.call(
                kind,
                "anthropic",
                "POST",
                "/v1/messages/count_tokens",
                {"model": ANTHROPIC_MODEL, "messages": []},
            )
        if kind == "a_models":
            return self.call(kind, "anthropic", "GET", f"/v1/models/{ANTHROPIC_MODEL}")
        if kind == "g_json":
            return self.gemini(kind, "generateContent")
        if kind == "g_stream":
            return self.gemini(kind, "streamGenerateContent", events=rng.randint(5, 40), gap_ms=30)
        if kind == "g_count":
            return self.call(
                kind,
                "gemini",
                "POST",
                "/v1beta/models/gemini-2.5-flash:countTokens",
                {"contents": []},
            )
        if kind == "g_models":
            return self.call(kind, "gemini", "GET", "/v1beta/models?pageSize=50")
        if kind in ("a_429", "a_529"):
            return self.messages(
                kind, rng.random() < 0.5, headers={"x-fake-scenario": f"error:{kind[2:]}"}
            )
        if kind == "g_429":
            # A per-model quota on a model only faults use: the gateway benches the key for
            # it (2 s) and retries on the next; all three over quota is its own 429.
            keys = "0" if rng.random() < 0.7 else "0,1,2"
            return self.gemini(
                kind,
                "generateContent",
                model="gemini-2.5-pro",
                coding="",
                headers={"x-fake-limited-keys": keys, "x-fake-retry-delay": "2s"},
            )
        if kind == "g_503":
            return self.gemini(
                kind, "generateContent", coding="", headers={"x-fake-scenario": "error:503"}
            )
        if kind == "bad_secret":
            call = self.messages(kind, False, source=rng.choice(self.bad_sources))
            call.headers["x-api-key"] = f"wrong-secret-{rng.randint(0, 10**9):010d}-padding"
            return call
        if kind == "guesser":  # one address over the failed-secret limit: 401s, then 429s
            call = self.gemini(kind, "generateContent", source="127.0.0.250")
            call.headers["x-goog-api-key"] = "wrong-secret-from-the-guesser-000000"
            return call
        if kind == "slow_reader":
            return self.messages(kind, False, slow=True, headers={"x-fake-pad-bytes": "100000"})
        if kind == "tight":
            return self.messages(kind, False, client="tight")
        if kind == "a_stall":
            return self.messages(
                kind, rng.random() < 0.5, headers={"x-fake-scenario": f"stall:{HTTP_TIMEOUT_S + 1}"}
            )
        if kind == "g_hangup":
            events = rng.randint(20, 40)
            return self.gemini(
                kind,
                "streamGenerateContent",
                events=events,
                gap_ms=30,
                hangup_after=rng.randint(2, events // 2),
            )
        if kind == "g_drop":
            return self.gemini(
                kind,
                "streamGenerateContent",
                events=10,
                gap_ms=20,
                headers={"x-fake-scenario": "drop"},
            )
        return self.messages("a_drop", True, 10, 20, headers={"x-fake-scenario": "drop"})


# --- shim and its clients file ----------------------------------------------------------------


class ClientsFile:
    """The named-clients file, rewritten now and then: atomically, or in place."""

    def __init__(self, path: Path):
        self.path = path
        self.edits = 0
        self.write(atomic=True)

    def text(self) -> str:
        lines = [
            f"{name} {hashlib.sha256(secret_of(name).encode()).hexdigest()} {limits}".strip()
            for name, limits in CLIENTS.items()
        ]
        # What changes: a client that comes and goes, and sdk's limits (added, removed).
        if self.edits % 2:
            lines.append(f"churn-{self.edits} {hashlib.sha256(b'churn').hexdigest()}")
        if self.edits % 3 == 1:
            lines[2] += " concurrency=500"
        return "\n".join(lines) + "\n"

    def write(self, atomic: bool) -> None:
        text = self.text()
        if atomic:
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(text)
            os.replace(temporary, self.path)
        else:  # over the old bytes, then cut: never an empty file in between
            with open(self.path, "r+") as handle:
                handle.write(text)
                handle.truncate()

    def edit(self) -> None:
        self.edits += 1
        self.write(atomic=self.edits % 2 == 0)


class Shim:
    def __init__(self, plan: Plan, upstream: int, work: Path):
        self.grace_s = plan.grace_s
        self.ports = {"anthropic": free_port(), "gemini": free_port()}
        self.metrics_port = free_port()
        self.log_path = work / "shim.log"
        self.clients = ClientsFile(work / "clients.txt")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SHIM_", "PROMETHEUS_"))}
        env.update(
            SHIM_CLIENTS_FILE=str(self.clients.path),
            SHIM_ANTHROPIC_TOKEN=FAKE_OAUTH_TOKEN,
            SHIM_GEMINI_KEYS=",".join(FAKE_GEMINI_KEYS),
            SHIM_ANTHROPIC_UPSTREAM=f"http://127.0.0.1:{upstream}",
            SHIM_GEMINI_UPSTREAM=f"http://127.0.0.1:{upstream}",
            SHIM_BIND_HOST="127.0.0.1",
            SHIM_ANTHROPIC_PORT=str(self.ports["anthropic"]),
            SHIM_GEMINI_PORT=str(self.ports["gemini"]),
            SHIM_METRICS_PORT=str(self.metrics_port),
            SHIM_WORKERS="2",
            SHIM_HTTP_TIMEOUT_S=str(HTTP_TIMEOUT_S),
            SHIM_GRACEFUL_TIMEOUT_S=str(plan.grace_s),
            SHIM_SELF_STATS_S=str(plan.sample_s),
            SHIM_GEMINI_KEYS_FILE="",
            PROMETHEUS_MULTIPROC_DIR=str(work / "metrics"),
        )
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        for port in (*self.ports.values(), self.metrics_port):
            wait_port(port)
        deadline = time.monotonic() + 20
        while len(self.workers()) < 2 or len(self.scrape_by_pid("shim_worker_requests")) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not come up")
            time.sleep(0.1)

    def workers(self) -> list[int]:
        pids = []
        try:
            for task in Path(f"/proc/{self.process.pid}/task").iterdir():
                pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
        return sorted(pids)

    def scrape(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=30)
        try:
            conn.request("GET", "/metrics", headers={"Connection": "close"})
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def scrape_by_pid(self, name: str, text: str | None = None) -> dict[int, float]:
        text = self.scrape() if text is None else text
        return {
            int(pid): float(v)
            for pid, v in re.findall(rf'^{name}{{pid="(\d+)"}} (\S+)$', text, re.M)
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.grace_s + 10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def descriptors(pid: int, ports: dict[str, int]) -> dict[str, int]:
    """A worker's open descriptors by what they are: client and upstream sockets, the rest."""
    inodes = {}
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            local, remote, state, inode = cols[1], cols[2], cols[3], cols[9]
            inodes[inode] = (
                int(local.rsplit(":", 1)[1], 16),
                int(remote.rsplit(":", 1)[1], 16),
                state,
            )
    counts = Counter()
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return {}
    for link in links:
        if link.startswith("socket:["):
            local, remote, state = inodes.get(link[8:-1], (0, 0, ""))
            if state == "0A":
                counts["listening"] += 1
            elif local in ports["shim"]:
                counts["client"] += 1
            elif remote == ports["upstream"]:
                counts["upstream"] += 1
            else:
                counts["other_socket"] += 1
        else:
            counts["other"] += 1
    counts["total"] = len(links)
    return dict(counts)


def rss_bytes(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


# --- the run ----------------------------------------------------------------------------------


class Sampler:
    """Every plan.sample_s: each worker's RSS and descriptors from /proc, greenlets from metrics."""

    def __init__(self, shim: Shim, ports: dict, t0: float):
        self.shim, self.ports, self.t0 = shim, ports, t0
        self.samples: list[dict] = []

    def take(self, label: str = "load") -> list[dict]:
        taken = []
        pids = self.shim.workers()
        fds = {pid: descriptors(pid, self.ports) for pid in pids}
        rss = {pid: rss_bytes(pid) for pid in pids}
        try:
            text = self.shim.scrape()
        except OSError:
            text = ""
        greenlets = self.shim.scrape_by_pid("shim_worker_greenlets", text)
        handled = self.shim.scrape_by_pid("shim_worker_requests", text)
        for pid in pids:
            if rss[pid] is None or not fds[pid]:
                continue
            taken.append(
                {
                    "t": round(time.time() - self.t0, 2),
                    "label": label,
                    "pid": pid,
                    "rss": rss[pid],
                    "fds": fds[pid],
                    "greenlets": greenlets.get(pid),
                    "handled": handled.get(pid),
                }
            )
        self.samples += taken
        return taken


class Control(threading.Thread):
    """The timeline beside the load: sampling, clients-file edits, a SIGHUP, a rolling restart."""

    def __init__(self, plan: Plan, shim: Shim, sampler: Sampler, t0: float):
        super().__init__(daemon=True)
        self.plan, self.shim, self.sampler, self.t0 = plan, shim, sampler, t0
        self.events: list[dict] = []
        self.stop = threading.Event()

    def note(self, what: str, **extra) -> None:
        self.events.append({"t": round(time.time() - self.t0, 2), "event": what, **extra})

    def wait_until(self, at: float) -> bool:
        while time.time() - self.t0 < at:
            if self.stop.wait(min(self.plan.sample_s, at - (time.time() - self.t0))):
                return False
            self.tick()
        return True

    def tick(self) -> None:
        now = time.time() - self.t0
        if now >= self._next_sample:
            self.sampler.take()
            self._next_sample += self.plan.sample_s
        if now >= self._next_edit:
            self.shim.clients.edit()
            self.note("clients_file_edited", edits=self.shim.clients.edits)
            self._next_edit += self.plan.edit_every_s

    def run(self) -> None:
        p = self.plan
        self._next_sample, self._next_edit = 0.0, p.edit_every_s
        if not self.wait_until(0.35 * p.duration_s):
            return
        before = self.shim.workers()
        os.kill(self.shim.process.pid, signal.SIGHUP)
        self.note("sighup", workers_before=before)
        if not self.wait_until(0.6 * p.duration_s):
            return
        for victim in self.shim.workers():  # rolling: one, its replacement up, then the next
            old = self.shim.workers()
            os.kill(victim, signal.SIGTERM)
            self.note("worker_sigterm", pid=victim)
            deadline = time.time() + p.grace_s + 20
            while time.time() < deadline and not self.stop.is_set():
                now = self.shim.workers()
                if victim not in now and len(now) >= 2:
                    self.note("worker_replaced", old=victim, new=sorted(set(now) - set(old)))
                    break
                self.stop.wait(0.2)
                self.tick()
        while not self.stop.is_set():
            self.stop.wait(0.2)
            self.tick()


async def load(
    plan: Plan, shim: Shim, upstream: int, t0: float, prefix: str = "soak"
) -> list[Result]:
    """Drive the mix at its fixed rate for plan.duration_s; return every call's result."""
    mix = Mix(plan, prefix)
    client = Client(shim.ports, t0)
    results: list[Result] = []
    tasks: set[asyncio.Task] = set()
    end = t0 + plan.duration_s

    def launch(coro) -> None:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def one(call: Call) -> None:
        results.append(await client.run(call, keep=mix.rng.random() < 0.5, timeout=60))

    async def session(number: int) -> None:
        name = ("cc-1", "cc-2")[number % 2]
        conn = None
        calls = [*mix.session_start(name), mix.long_stream(name)]
        calls += [mix.tool_call(name) for _ in range(mix.rng.randint(3, 6))]
        for call in calls:
            timeout = plan.long_events * plan.long_gap_ms / 1000 + 60
            result = await client.run(call, conn=conn, keep=True, timeout=timeout, session=True)
            results.append(result)
            conn = result._conn  # type: ignore[attr-defined]
        if conn is not None:
            conn[1].close()

    async def probes() -> None:
        """Added latency: the same small call straight to the fake, then through shim."""
        direct = None
        n = 0
        while time.time() < end:
            n += 1
            started = time.perf_counter()
            try:
                if direct is None:
                    direct = await asyncio.open_connection("127.0.0.1", upstream)
                body = b'{"model":"probe","max_tokens":1,"messages":[]}'
                direct[1].write(
                    b"POST /v1/messages HTTP/1.1\r\nHost: f\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {FAKE_OAUTH_TOKEN}\r\nanthropic-beta: {OAUTH_BETA}"
                    f"\r\nx-fake-encoding: identity\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await direct[1].drain()
                head = (await direct[0].readuntil(b"\r\n\r\n")).decode("latin-1").lower()
                length = re.search(r"content-length: *(\d+)", head)
                await direct[0].readexactly(int(length.group(1)))
                direct_ms = (time.perf_counter() - started) * 1000
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                direct, direct_ms = None, None
            call = mix.call(
                "probe",
                "anthropic",
                "POST",
                "/v1/messages",
                {"model": "probe", "max_tokens": 1, "messages": []},
                coding="",
            )
            result = await client.run(call, keep=True, timeout=30)
            results.append(result)
            if direct_ms is not None and result.outcome == "complete":
                result.detail = f"added {result.latency_ms - direct_ms:.3f}"
            await asyncio.sleep(0.5)

    launch(probes())
    next_short = next_session = time.time()
    sessions = 0
    while (now := time.time()) < end:
        while next_short <= now:
            launch(one(mix.short()))
            next_short += 1 / plan.short_per_s
        while next_session <= now:
            launch(session(sessions))
            sessions += 1
            next_session += plan.session_every_s
        await asyncio.sleep(0.01)
    while tasks:
        await asyncio.wait(set(tasks))
    for conns in client.idle.values():
        for _, writer in conns:
            writer.close()
    return results


# --- what it all adds up to -------------------------------------------------------------------


def access_lines(path: Path) -> list[dict]:
    lines = []
    with open(path, "rb") as log:
        for raw in log:
            if b'"event":"access"' in raw:
                try:
                    lines.append(json.loads(raw))
                except ValueError:
                    pass
    return lines


def metric_total(text: str, name: str, skip_provider: str = "none") -> float:
    total = 0.0
    for labels, value in re.findall(rf"^{name}{{([^}}]*)}} (\S+)$", text, re.M):
        if f'provider="{skip_provider}"' not in labels:
            total += float(value)
    return total


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def growth(samples: list[dict], plan: Plan, key) -> list[dict]:  # noqa: ANN001
    """Per worker pid, over its stable stretch after warm-up: slope of ``key`` per 100k requests."""
    by_pid: dict[int, list[dict]] = defaultdict(list)
    for s in samples:
        if s["label"] == "load" and s["handled"] is not None:
            by_pid[s["pid"]].append(s)
    out = []
    for pid, rows in by_pid.items():
        born = rows[0]["t"]
        kept = [r for r in rows if r["t"] >= plan.warmup_s and r["t"] >= born + plan.warmup_s / 2]
        xs = [r["handled"] for r in kept]
        if len(kept) < 4 or max(xs) - min(xs) < 100:
            out.append({"pid": pid, "samples": len(rows), "fitted": len(kept), "per_100k": None})
            continue
        ys = [key(r) for r in kept]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
            (x - mx) ** 2 for x in xs
        )
        out.append(
            {
                "pid": pid,
                "samples": len(rows),
                "fitted": len(kept),
                "requests": max(xs) - min(xs),
                "per_100k": slope * 100_000,
            }
        )
    return out


def analyse(
    plan: Plan,
    results: list[Result],
    lines: list[dict],
    fake: dict,
    metrics_text: str,
    samples: list[dict],
    idle: dict,
    after: dict,
    events: list[dict],
) -> dict:
    by_id: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        by_id[line.get("request_id")].append(line)
    ours = {r.id for r in results}
    outcomes = Counter(r.outcome for r in results)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        by_kind[r.kind][r.outcome] += 1
    unaccounted, mismatched_status = [], []
    for r in results:
        found = by_id.get(r.id, [])
        lost = r.outcome == "lost_on_reuse" and not found  # shim never read it: no line is right
        if len(found) != 1 and not lost:
            unaccounted.append(
                {
                    "id": r.id,
                    "outcome": r.outcome,
                    "status": r.status,
                    "start": round(r.start, 2),
                    "lines": len(found),
                    "detail": r.detail,
                }
            )
        elif found and r.status is not None and found[0]["status"] != r.status:
            mismatched_status.append({"id": r.id, "client": r.status, "line": found[0]["status"]})
    phantom = [i for i in by_id if i and i.startswith("soak-") and i not in ours]
    shim_failures = [
        asdict(r) | {"delays": len(r.delays)}
        for r in results
        if r.outcome in ("TRUNCATED", "corrupt", "client_timeout", "error_unshaped")
    ]

    def tokens(line: dict) -> int:
        keys = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens")
        return sum(line.get(k) or 0 for k in keys)

    usage = fake["usage"]
    token_rows = []
    log_tokens = fake_tokens = 0
    for r in results:
        found = by_id.get(r.id, [])
        mine = sum(tokens(line) for line in found)
        theirs = usage.get(r.id, 0)
        log_tokens += mine
        fake_tokens += theirs
        if mine != theirs:
            token_rows.append(
                {
                    "id": r.id,
                    "outcome": r.outcome,
                    "access_line": mine,
                    "fake_sent": theirs,
                    "expect": r.expect,
                    "error": found[0].get("error") if found else None,
                    "usage_unread": found[0].get("usage_unread") if found else None,
                }
            )
    api_lines = [line for line in lines if line.get("provider") in ("anthropic", "gemini")]
    metric_requests = metric_total(metrics_text, "shim_requests_total")

    # Latency and chunk delay in the first and the last tenth of the run.
    tenth = plan.duration_s / 10
    added = {"first": [], "last": []}
    delays = {"first": [], "last": []}
    for r in results:
        where = "first" if r.start < tenth else "last" if r.start >= 9 * tenth else None
        if where and r.detail.startswith("added "):
            added[where].append(float(r.detail.split()[1]))
        for at, delay in r.delays:
            if at < tenth:
                delays["first"].append(delay)
            elif at >= 9 * tenth:
                delays["last"].append(delay)
    latency = {
        f"{what}_{where}_{name}": pct(values[where], q)
        for what, values in (("added_ms", added), ("delay_ms", delays))
        for where in ("first", "last")
        for name, q in (("p50", 0.5), ("p99", 0.99))
    }
    latency["samples"] = {k: len(v) for k, v in added.items()}

    return {
        "plan": asdict(plan) | {"rate_per_s": plan.rate},
        "calls": len(results),
        "answered": sum(1 for r in results if r.status is not None),
        "outcomes": dict(outcomes),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "access_lines": len(lines),
        "access_lines_api": len(api_lines),
        "access_lines_ours": sum(len(by_id.get(i, [])) for i in ours),
        "metric_requests_api": metric_requests,
        "unaccounted": unaccounted,
        "not_complete": [
            {k: v for k, v in asdict(r).items() if k not in ("delays", "latency_ms")}
            for r in results
            if r.outcome != "complete"
        ],
        "phantom_lines": phantom,
        "status_mismatches": mismatched_status,
        "shim_failures": shim_failures,
        "tokens": {
            "access_lines": log_tokens,
            "fake_sent": fake_tokens,
            "mismatches": token_rows,
            "undecodable": fake["undecodable"],
            "fake_stream_ends": fake["stream_ends"],
        },
        "latency": latency,
        "rss_growth_mib": growth(samples, plan, lambda r: r["rss"] / MiB),
        "fds_growth": growth(samples, plan, lambda r: r["fds"]["total"]),
        "greenlets_growth": growth(
            [s for s in samples if s["greenlets"] is not None], plan, lambda r: r["greenlets"]
        ),
        "idle": idle,
        "after": after,
        "events": events,
        "samples": samples,
    }


def idle_level(rows: list[dict]) -> dict:
    """The fds (all but client and upstream sockets) and greenlets of idle workers: the max."""
    return {
        "greenlets": max((r["greenlets"] or 0) for r in rows),
        "fixed_fds": max(
            r["fds"]["total"] - r["fds"].get("client", 0) - r["fds"].get("upstream", 0)
            for r in rows
        ),
        "client_sockets": max(r["fds"].get("client", 0) for r in rows),
        "upstream_sockets": max(r["fds"].get("upstream", 0) for r in rows),
        "pids": sorted(r["pid"] for r in rows),
    }


GREENLET_SLACK = 2  # the tally and self-stats threads start with the first traffic
FD_SLACK = 2


def verdicts(report: dict, smoke: bool) -> list[tuple[str, bool | None, str]]:
    """(criterion, passed, detail); passed None when this run cannot judge it."""
    idle, after = report["idle"], report["after"]
    tokens = report["tokens"]
    out = []
    growths = [g for g in report["rss_growth_mib"] if g["per_100k"] is not None]
    worst = max((g["per_100k"] for g in growths), default=None)
    out.append(
        (
            "RSS growth <= 2 MiB per 100k requests per worker, after warm-up",
            None if smoke or worst is None else worst <= 2.0,
            "n/a"
            if worst is None
            else f"worst {worst:.2f} MiB/100k over {len(growths)} stable worker stretch(es)",
        )
    )
    out.append(
        (
            "descriptors back to idle after the load",
            after["client_sockets"] == 0 and after["fixed_fds"] <= idle["fixed_fds"] + FD_SLACK,
            f"fixed {after['fixed_fds']} vs idle {idle['fixed_fds']}, client sockets "
            f"{after['client_sockets']}, pooled upstream {after['upstream_sockets']}",
        )
    )
    out.append(
        (
            "greenlets back to idle after the load",
            after["greenlets"] <= idle["greenlets"] + GREENLET_SLACK,
            f"{after['greenlets']} vs idle {idle['greenlets']}",
        )
    )
    out.append(
        (
            "0 unaccounted calls (answered or visibly failed, one access line each)",
            not report["unaccounted"] and not report["phantom_lines"],
            f"{len(report['unaccounted'])} unaccounted, {len(report['phantom_lines'])} phantom",
        )
    )
    out.append(
        (
            "no clean-looking truncation, corrupt or stuck answer",
            not report["shim_failures"],
            f"{len(report['shim_failures'])}",
        )
    )
    out.append(
        (
            "token totals: access lines == what the fake sent",
            tokens["access_lines"] == tokens["fake_sent"] and not tokens["undecodable"],
            f"{tokens['access_lines']} vs {tokens['fake_sent']}, "
            f"{len(tokens['mismatches'])} call(s) differ",
        )
    )
    out.append(
        (
            "metric count == access lines (API ports)",
            report["metric_requests_api"] == report["access_lines_api"],
            f"shim_requests_total {report['metric_requests_api']:.0f} vs "
            f"{report['access_lines_api']} lines",
        )
    )
    lat = report["latency"]
    first, last = lat["added_ms_first_p99"], lat["added_ms_last_p99"]
    judged = (
        None if smoke or first is None or last is None else last <= max(first * 1.2, first + 0.5)
    )
    out.append(
        (
            "p99 added latency, last tenth within 20 % of the first",
            judged,
            "n/a" if first is None or last is None else f"{last:.2f} vs {first:.2f} ms",
        )
    )
    return out


def print_table(report: dict, checks: list, smoke: bool) -> None:
    p = report["plan"]
    label = "SMOKE " if smoke else ""
    print(
        f"{label}soak: {p['duration_s']:.0f} s at ~{p['rate_per_s']:.0f} calls/s through shim "
        f"(2 workers), a session every {p['session_every_s']} s with a "
        f"{p['long_events']}-event stream {p['long_gap_ms']} ms apart"
    )
    rows = [
        ("calls sent", report["calls"]),
        ("answered (a status line came back)", report["answered"]),
        ("access lines for these calls", report["access_lines_ours"]),
        ("access lines, API ports (all)", report["access_lines_api"]),
        ("shim_requests_total, API ports", f"{report['metric_requests_api']:.0f}"),
    ]
    rows += [(f"  outcome {k}", v) for k, v in sorted(report["outcomes"].items())]
    t = report["tokens"]
    rows += [
        ("tokens in access lines", t["access_lines"]),
        ("tokens the fake sent", t["fake_sent"]),
    ]
    lat = report["latency"]
    for what in ("added_ms", "delay_ms"):
        for where in ("first", "last"):
            p50, p99 = lat[f"{what}_{where}_p50"], lat[f"{what}_{where}_p99"]
            name = "added latency" if what == "added_ms" else "chunk delay"
            rows.append(
                (
                    f"{name} p50 / p99, {where} tenth (ms)",
                    "-" if p50 is None else f"{p50:.2f} / {p99:.2f}",
                )
            )
    for g in report["rss_growth_mib"]:
        if g["per_100k"] is not None:
            rows.append(
                (
                    f"RSS growth, worker {g['pid']} (MiB/100k req)",
                    f"{g['per_100k']:+.2f} over {g['requests']:.0f} req",
                )
            )
    idle, after = report["idle"], report["after"]
    rows += [
        ("idle: greenlets / fixed fds per worker", f"{idle['greenlets']} / {idle['fixed_fds']}"),
        ("after: greenlets / fixed fds per worker", f"{after['greenlets']} / {after['fixed_fds']}"),
    ]
    width = max(len(r[0]) for r in rows) + 2
    for name, value in rows:
        print(f"{name:<{width}}{value}")
    print("-" * (width + 30))
    for name, passed, detail in checks:
        mark = "PASS" if passed else "n/a " if passed is None else "FAIL"
        print(f"{mark}  {name}: {detail}")


def settle(sampler: Sampler, plan: Plan, timeout: float) -> dict:
    """Wait until the workers are at rest (two looks in a row agree, no client socket open).

    Each look comes after a self-stats refresh, so greenlets are counted after the last
    call ended. Returns the last look, at rest or not (the timeout).
    """
    deadline = time.time() + timeout
    last: dict = {}
    while True:
        time.sleep(plan.sample_s * 1.5)
        rows = sampler.take("after")
        level = idle_level(rows) if rows else {}
        if level and level == last and level["client_sockets"] == 0:
            return level
        if time.time() > deadline:
            return level
        last = level


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="~1 minute, fewer clients")
    parser.add_argument("--minutes", type=float, help="run this long instead (no smoke limits)")
    parser.add_argument("--out", help="the JSON file (default bench/results/soak[-smoke].json)")
    parser.add_argument("--upstream", nargs=2, metavar=("PORT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        run_upstream(int(args.upstream[0]), args.upstream[1])
        return 0
    plan = SMOKE if args.smoke else FULL
    if args.minutes:
        plan = Plan(
            **{**asdict(plan), "duration_s": args.minutes * 60, "warmup_s": args.minutes * 12}
        )
    out = (
        Path(args.out)
        if args.out
        else ROOT / "bench" / "results" / ("soak-smoke.json" if args.smoke else "soak.json")
    )
    work = Path(tempfile.mkdtemp(prefix="shim-soak-"))
    upstream_port = free_port()
    usage_file = work / "fake-usage.json"
    fake = subprocess.Popen(
        [sys.executable, __file__, "--upstream", str(upstream_port), str(usage_file)],
        start_new_session=True,
    )
    shim = None
    try:
        wait_port(upstream_port)
        shim = Shim(plan, upstream_port, work)
        ports = {"shim": set(shim.ports.values()) | {shim.metrics_port}, "upstream": upstream_port}
        print(f"shim log: {shim.log_path}", file=sys.stderr, flush=True)
        # Warm-up: a few calls of every kind fill the upstream pools; then the idle level.
        t0 = time.time()
        sampler = Sampler(shim, ports, t0)
        warm = Plan(
            **{
                **asdict(plan),
                "duration_s": 3,
                "short_per_s": 10,
                "session_every_s": 100,
                "long_events": 10,
            }
        )
        asyncio.run(load(warm, shim, upstream_port, time.time(), prefix="warm"))
        idle = settle(sampler, plan, 30)
        t0 = time.time()
        sampler = Sampler(shim, ports, t0)
        control = Control(plan, shim, sampler, t0)
        control.start()
        results = asyncio.run(load(plan, shim, upstream_port, t0))
        control.stop.set()
        control.join(timeout=plan.grace_s + 30)
        after = settle(sampler, plan, plan.grace_s + 30)
        metrics_text = shim.scrape()
    finally:
        if shim is not None:
            shim.stop()
        fake.send_signal(signal.SIGTERM)
        fake.wait(timeout=300)
    fake_report = json.loads(usage_file.read_text())
    lines = access_lines(shim.log_path)
    report = analyse(
        plan,
        results,
        lines,
        fake_report,
        metrics_text,
        sampler.samples,
        idle,
        after,
        control.events,
    )
    report["shim_log"] = str(shim.log_path)
    checks = verdicts(report, args.smoke)
    report["checks"] = [{"criterion": c, "passed": p, "detail": d} for c, p, d in checks]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print_table(report, checks, args.smoke)
    print(f"JSON: {out}")
    return 0 if all(p is not False for _, p, _ in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
