"""The soak's client side: an asyncio HTTP/1.1 client that sees everything; what an answer means.

A call (``Call``) goes out on a fresh, pooled or session connection (``Client``); its answer is
unframed (chunked, by length, or by close: a ``Cut`` when the framing ends early), decoded
(``Decoder``), read as what it claims to be (``Stream``: complete, an error frame, its stamped
deltas) and classified into a ``Result``. ``usage_in`` reads the tokens in what the fake sent,
as the APIs define usage. Which calls to make is soak_mix.py's; judging the results is
soak_report.py's.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field

import brotli

try:
    from compression import zstd
except ImportError:
    from backports import zstd


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
            # The tail too: the marker may be split across two reads.
            self.done = self.done or '"finishReason"' in self.text[-(len(text) + 32) :]
        # Trim what is scanned, keeping a tail that may hold a split marker
        # (not a JSON array: complete() parses it whole).
        if len(self.text) > 65536 and self.expect != "gemini_array":
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
