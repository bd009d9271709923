"""Decode a compressed answer incrementally, in bounded steps, for the usage reader only.

The client always gets the upstream's bytes as they were sent (its own
``Content-Encoding``); this module makes a *decoded copy* so that model,
token usage and stop reason can be read from gzip, deflate, br and zstd
answers. Two bounds make a decompression bomb harmless:

- no single step yields more than ``PIECE_BYTES`` (every decoder is asked
  for at most that much output, and the rest of its input waits inside it),
  so memory never holds more than one piece of decoded text at a time;
- a call decodes at most ``budget`` bytes in all; past that ``feed``
  raises ``DecodeLimit`` and the caller stops decoding (and logs it).

Decoders: zlib (standard library) for gzip and deflate, ``brotli`` >= 1.2
(``output_buffer_limit``) for br, and ``compression.zstd`` (``backports.zstd``
before Python 3.14) for zstd: it is the zstd binding that can bound its
output per call (``max_length``), which the ``zstandard`` package's
streaming decompressor cannot. urllib3 2.6+ picked the same pair for the
same reason.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import brotli

try:
    from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+
except ImportError:
    from backports import zstd  # type: ignore[import-not-found,no-redef]

# At most this much decoded text is produced (and held) per step.
PIECE_BYTES = 65_536
CODINGS = ("gzip", "x-gzip", "deflate", "br", "zstd")


# Where decoded pieces go (a usage tap's feed, or a list's append).
Sink = Callable[[bytes], None]


class DecodeLimit(Exception):
    """The call's decoded copy reached its budget; stop decoding it."""


class DecodeFailed(Exception):
    """The body is not valid data of its declared coding."""


class Decoder:
    """One answer's incremental decoder: feed it compressed chunks, it hands on decoded pieces."""

    __slots__ = ("_step", "budget", "decoded")

    def __init__(self, coding: str, budget: int):
        if coding in ("gzip", "x-gzip"):
            self._step: _Zlib | _Brotli | _Zstd = _Zlib(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._step = _Zlib(None)
        else:
            self._step = _Brotli() if coding == "br" else _Zstd()
        self.budget = budget
        self.decoded = 0

    def feed(self, data: bytes, sink: Sink) -> None:
        """Decode ``data`` into ``sink``, piece by piece; raise DecodeLimit past the budget.

        No generators on this path: it runs for every chunk of a compressed
        stream, and most chunks decode in one call to one piece.
        """
        try:
            self.decoded += self._step.feed(data, sink, self.budget - self.decoded)
        except (zlib.error, brotli.error, zstd.ZstdError, EOFError) as exc:
            raise DecodeFailed(type(exc).__name__) from None

    def decode(self, data: bytes) -> bytes:
        """Decode a whole body at once (still in bounded pieces, still within the budget)."""
        parts: list[bytes] = []
        self.feed(data, parts.append)
        return b"".join(parts)



def decoded(body: bytes, content_encoding: str | None, budget: int) -> bytes | None:
    """A whole body decoded from its Content-Encoding within ``budget``; None if it cannot be.

    For small answers read to judge them (error bodies): identity comes back
    as is; an unknown coding, a corrupt body or one over the budget is None.
    """
    coding = coding_of(content_encoding)
    if coding == "":
        return body
    if coding is None:
        return None
    try:
        return Decoder(coding, budget).decode(body)
    except (DecodeLimit, DecodeFailed):
        return None


def coding_of(content_encoding: str | None) -> str | None:
    """The single coding a decoder exists for, "" for identity, None when not decodable."""
    if not content_encoding:
        return ""
    coding = content_encoding.strip().lower()
    if coding == "identity":
        return ""
    return coding if coding in CODINGS else None


class _Zlib:
    """gzip (several members back to back make one body, RFC 1952) and deflate.

    HTTP "deflate" is zlib-wrapped by the RFC and raw deflate from some
    servers: the first two bytes tell which (``wbits`` None until then).
    """

    __slots__ = ("_obj", "_wbits", "_head")

    def __init__(self, wbits: int | None):
        self._wbits = wbits
        self._obj = zlib.decompressobj(wbits) if wbits else None
        self._head = b""

    def feed(self, data: bytes, take: Sink, room: int) -> int:
        obj = self._obj
        if obj is None:
            data = self._head + data
            if len(data) < 2:
                self._head = data
                return 0
            # A zlib header: CM=8 and the 16-bit header a multiple of 31 (RFC 1950).
            wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._wbits = zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS
            obj = self._obj = zlib.decompressobj(self._wbits)
        done = 0
        while True:
            out = obj.decompress(data, PIECE_BYTES)
            if out:
                done += len(out)
                if done > room:
                    raise DecodeLimit(done)
                take(out)
            data = obj.unconsumed_tail
            if obj.eof and obj.unused_data:
                data = obj.unused_data
                obj = self._obj = zlib.decompressobj(self._wbits)
                continue
            if not data and len(out) < PIECE_BYTES:
                return done


class _Brotli:
    __slots__ = ("_obj",)

    def __init__(self) -> None:
        self._obj = brotli.Decompressor()

    def feed(self, data: bytes, take: Sink, room: int) -> int:
        obj = self._obj
        out = obj.process(data, output_buffer_limit=PIECE_BYTES)
        done = len(out)
        if done > room:
            raise DecodeLimit(done)
        if out:
            take(out)
        # Output stops short of the limit only when the input is used up; at the
        # limit, the rest waits inside and comes out with empty input.
        while len(out) >= PIECE_BYTES and not obj.is_finished():
            out = obj.process(b"", output_buffer_limit=PIECE_BYTES)
            if out:
                done += len(out)
                if done > room:
                    raise DecodeLimit(done)
                take(out)
        return done


class _Zstd:
    __slots__ = ("_obj",)

    def __init__(self) -> None:
        self._obj = zstd.ZstdDecompressor()

    def feed(self, data: bytes, take: Sink, room: int) -> int:
        obj = self._obj
        done = 0
        while True:
            if obj.eof:
                # A next frame: zstd bodies may be several frames back to back.
                obj = self._obj = zstd.ZstdDecompressor()
            out = obj.decompress(data, PIECE_BYTES)
            if out:
                done += len(out)
                if done > room:
                    raise DecodeLimit(done)
                take(out)
            if obj.eof:
                data = obj.unused_data
                if not data:
                    return done
                continue
            if obj.needs_input:
                return done
            data = b""
