"""The bounded decoders and the usage taps, on real compressed bytes (no server)."""

from __future__ import annotations

import base64
import gzip
import json
import os
import zlib

import brotli
import pytest

from shim import usage
from shim.decode import PIECE_BYTES, DecodeFailed, DecodeLimit, Decoder, coding_of
from tests.fake_upstream import Encoder, anthropic_events

try:
    from compression import zstd
except ImportError:
    from backports import zstd

CODINGS = ("gzip", "deflate", "br", "zstd")
TEXT = b'{"type":"message","usage":{"input_tokens":5}}' * 2000 + base64.b64encode(os.urandom(9000))


def compress(coding: str, data: bytes) -> bytes:
    return Encoder(coding).whole(data)


def decode_in_steps(coding: str, blob: bytes, step: int, budget: int = 10**9) -> bytes:
    decoder, parts = Decoder(coding, budget), []
    for at in range(0, len(blob), step):
        decoder.feed(blob[at:at + step], parts.append)
    return b"".join(parts)


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("step", [1, 7, 4096, 10**9])
def test_every_coding_decodes_whatever_the_chunking(coding, step):
    assert decode_in_steps(coding, compress(coding, TEXT), step) == TEXT


@pytest.mark.parametrize("coding", CODINGS)
def test_a_bomb_stops_at_the_budget_in_bounded_pieces(coding):
    bomb = compress(coding, b"\0" * (64 * 2**20))
    assert len(bomb) < 200_000
    decoder, sizes = Decoder(coding, 4 * 2**20), []
    with pytest.raises(DecodeLimit):
        decoder.feed(bomb, lambda piece: sizes.append(len(piece)))
    assert sum(sizes) <= 4 * 2**20
    assert max(sizes) <= 2 * PIECE_BYTES  # brotli's limit is soft, within one buffer


def test_raw_deflate_several_gzip_members_and_zstd_frames_are_one_body():
    raw = zlib.compressobj(wbits=-15)
    assert decode_in_steps("deflate", raw.compress(TEXT) + raw.flush(), 3) == TEXT
    two = gzip.compress(b"first ") + gzip.compress(b"second")
    assert decode_in_steps("gzip", two, 5) == b"first second"
    frames = zstd.compress(b"first ") + zstd.compress(b"second")
    assert decode_in_steps("zstd", frames, 4) == b"first second"
    assert Decoder("br", 100).decode(brotli.compress(b"brotli")) == b"brotli"


@pytest.mark.parametrize("coding", CODINGS)
def test_corrupt_data_is_a_decode_failure_not_a_crash(coding):
    with pytest.raises(DecodeFailed):
        Decoder(coding, 10**6).decode(b"\x1f\x8b\x08 this is not " + os.urandom(64))


def test_codings_shim_can_read():
    assert [coding_of(v) for v in (None, "", "identity", "GZIP", " br ", "zstd", "compress",
                                   "gzip, br")] == ["", "", "", "gzip", "br", "zstd", None, None]


def read(tap) -> list[dict]:
    seen: list[dict] = []
    tap.read(seen.append)
    return seen


@pytest.mark.parametrize("coding", ["identity", *CODINGS])
def test_a_compressed_stream_is_read_event_by_event(coding):
    frames = anthropic_events({"model": "claude-x"}, 5, input_tokens=321, output_tokens=9)
    encoder = None if coding == "identity" else Encoder(coding)
    tap = usage.tap_for("text/event-stream", None if encoder is None else coding, b"\n\n",
                        (b"event: message_start\n", b"event: message_delta\n"))
    for frame in frames:
        tap.feed(encoder.piece(frame) if encoder else frame)
        if frame.startswith(b"event: message_start"):
            # Flushed per event: the event is readable as soon as it passed.
            assert read(tap)[0]["message"]["usage"]["input_tokens"] == 321
    if encoder:
        tap.feed(encoder.end())
    events = read(tap)
    assert [e["type"] for e in events] == ["message_start", "message_delta"]
    assert events[1]["usage"]["output_tokens"] == 9
    assert tap.events == len(frames) and tap.unread is None


def test_an_sse_event_larger_than_many_chunks_is_held_whole_up_to_the_bound():
    payload = {"usageMetadata": {"promptTokenCount": 7}, "pad": "x" * 3_000_000}
    event = b"data: " + json.dumps(payload).encode() + b"\r\n\r\n"
    tap = usage.SseTap(b"\r\n\r\n", (b'"usageMetadata":',))
    for at in range(0, len(event), 65_536):
        tap.feed(event[at:at + 65_536])
    assert read(tap)[0]["usageMetadata"]["promptTokenCount"] == 7
    huge = b"data: " + b"x" * (usage.MAX_COPY_BYTES + 200_000) + b"\r\n\r\n"
    tap = usage.SseTap(b"\r\n\r\n", (b'"usageMetadata":',))
    for at in range(0, len(huge), 65_536):
        tap.feed(huge[at:at + 65_536])
    tap.feed(event)  # the next event is still found after the dropped one
    assert read(tap)[0]["usageMetadata"]["promptTokenCount"] == 7
    assert tap.unread == "event_too_large"


def test_a_json_array_stream_hands_over_each_element_and_json_has_a_bound():
    tap = usage.tap_for("application/json; charset=UTF-8", None, b"\r\n\r\n", ())
    for piece in (b'[{"usageMetadata":{"promptTokenCount":1}}', b',\r\n{"usageMetadata":',
                  b'{"promptTokenCount":2}}]'):
        tap.feed(piece)
    assert [e["usageMetadata"]["promptTokenCount"] for e in read(tap)] == [1, 2]
    big = usage.JsonTap()
    big.feed(b"x" * (usage.MAX_COPY_BYTES + 1))
    assert read(big) == [] and big.unread == "body_too_large"


def test_a_whole_answer_says_why_its_usage_could_not_be_read():
    seen: list[dict] = []
    body = b'{"type":"message","usage":{"input_tokens":3}}'
    assert usage.read_whole(compress("br", body), "br", seen.append) is None
    assert seen[0]["usage"]["input_tokens"] == 3
    assert usage.read_whole(b"garbage", "gzip", seen.append) == "decode_failed"
    assert usage.read_whole(body, "compress", seen.append) == "unknown_encoding"
    assert usage.read_whole(b'{"usage": nope', None, seen.append) == "unparsable"
    bomb = compress("zstd", b'{"usage":"' + b"a" * (usage.MAX_COPY_BYTES + 1) + b'"}')
    assert usage.read_whole(bomb, "zstd", seen.append) == "decode_limit"
