"""Benchmark upstream: raw asyncio, fast enough never to be the bottleneck.

Answers both APIs' shapes from canned bytes:
- a non-streaming call (no ``"stream": true`` in the body, or a Gemini
  ``:generateContent``) gets a small JSON message;
- a stream (``"stream": true`` or ``:streamGenerateContent``) gets SSE deltas,
  ``x-bench-deltas`` of them (default 20), ``x-bench-interval-ms`` apart
  (default 100), each carrying the upstream's send time (``time.time()``) as
  its text, so a client can measure delay = arrival - stamp;
- ``x-bench-encoding`` (gzip, deflate, br, zstd) compresses the answer as the
  real APIs do when the client offers it: JSON whole, a stream flushed after
  every event (each chunk decodes on its own). Used by bench/usage.py.

Usage: python bench/upstream.py PORT
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# One per-event compressor for every fake upstream the project has.
from tests.fake_upstream import Encoder  # noqa: E402

JSON_BODY = (
    b'{"id":"msg_1","type":"message","role":"assistant","model":"claude-bench",'
    b'"content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn",'
    b'"usage":{"input_tokens":10,"output_tokens":2}}'
)
JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nrequest-id: req_bench\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(JSON_BODY), JSON_BODY)
)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    b"request-id: req_bench\r\n\r\n"
)
START = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
    b'"type":"message","role":"assistant","model":"claude-bench","content":[],'
    b'"usage":{"input_tokens":10,"output_tokens":1}}}\n\n'
)
END = (
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    b'"usage":{"output_tokens":20}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def json_response(coding: str) -> bytes:
    encoder = Encoder(coding)
    body = encoder.piece(JSON_BODY) + encoder.end()
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nrequest-id: req_bench\r\n"
        b"Content-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s"
        % (coding.encode(), len(body), body)
    )


JSON_RESPONSES = {c: json_response(c) for c in ("gzip", "deflate", "br", "zstd")}


async def stream(
    writer: asyncio.StreamWriter, deltas: int, interval: float, gemini: bool, coding: str = ""
) -> None:
    encoder = Encoder(coding) if coding else None
    if encoder is None:
        writer.write(STREAM_HEAD)
    else:
        writer.write(STREAM_HEAD[:-2] + b"Content-Encoding: %s\r\n\r\n" % coding.encode())

    def chunk(data: bytes) -> bytes:  # noqa: F811 - the coded variant of the module's chunk
        if encoder is not None:
            data = encoder.piece(data)
        return b"%x\r\n%s\r\n" % (len(data), data)

    if not gemini:
        writer.write(chunk(START))
    for index in range(deltas):
        if index:
            await asyncio.sleep(interval)
        stamp = b"%.6f" % time.time()
        if gemini:
            frame = (
                b'data: {"candidates":[{"content":{"parts":[{"text":"'
                + stamp
                + b'"}],"role":"model"},"index":0}]}\r\n\r\n'
            )
        else:
            frame = (
                b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                b'"delta":{"type":"text_delta","text":"' + stamp + b'"}}\n\n'
            )
        writer.write(chunk(frame))
        await writer.drain()
    if not gemini:
        writer.write(chunk(END))
    if encoder is not None:
        tail = encoder.end()
        writer.write(b"%x\r\n%s\r\n" % (len(tail), tail))
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            path = lines[0].split(b" ")[1]
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0"))
            body = await reader.readexactly(length) if length else b""
            gemini = b":streamGenerateContent" in path
            coding = headers.get(b"x-bench-encoding", b"").decode()
            if gemini or b'"stream":true' in body.replace(b" ", b""):
                await stream(
                    writer,
                    int(headers.get(b"x-bench-deltas", b"20")),
                    int(headers.get(b"x-bench-interval-ms", b"100")) / 1000,
                    gemini,
                    coding,
                )
            else:
                writer.write(JSON_RESPONSES[coding] if coding else JSON_RESPONSE)
            if headers.get(b"connection", b"").lower() == b"close":
                await writer.drain()
                writer.close()
                return
    except (asyncio.IncompleteReadError, ConnectionError, IndexError):
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop  # noqa: F401 - faster when present, not required

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(int(sys.argv[1])))
