"""Read model, token usage and stop reason off an answer as it passes, without holding a byte back.

The client gets each chunk before a tap looks at it. Three taps:

- ``SseTap`` (``text/event-stream``): per chunk it only counts event
  separators and remembers the *last* event carrying each of the provider's
  markers (Anthropic's ``message_start``/``message_delta``, Gemini's
  ``usageMetadata``); the remembered events are JSON-parsed once, when the
  stream ends, so a stream the client abandons still reports what had passed.
  An event is held until its end, up to ``MAX_COPY_BYTES``.
- ``JsonTap`` (a JSON answer relayed in pieces: no Content-Length, over
  ``WHOLE_BODY_BYTES``, or Gemini's ``streamGenerateContent`` without
  ``alt=sse``, a JSON array): keeps a copy up to ``MAX_COPY_BYTES`` and
  parses it at the end; an array hands each element over in order, so the
  last cumulative count wins.
- ``DecodedTap``: a compressed answer (gzip, deflate, br, zstd) is decoded
  chunk by chunk (``shim.decode``, bounded) and the pieces go to one of the
  taps above. The upstream flushes after each event, so each event is read
  as it passes.

Usage is read only from what passed; when it cannot be read (a body over the
bound, a corrupt or unknown coding) the access line says so in
``usage_unread`` and nothing is estimated.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import orjson

from shim.decode import DecodeFailed, DecodeLimit, Decoder, coding_of

log = logging.getLogger("shim.usage")

# The most decoded text held (or decoded, for a compressed answer) for one call's usage.
MAX_COPY_BYTES = 8 * 1_048_576
# A compressed stream may decode to this many times its size before it is a bomb.
MAX_RATIO = 64
# Below this, a pending event is joined to the next chunk directly (the usual case).
_SMALL_TAIL = 65_536

OnData = Callable[[dict], None]


class SseTap:
    __slots__ = ("_separator", "_markers", "_tail", "_held", "_held_bytes", "kept", "events",
                 "unread")

    def __init__(self, separator: bytes, markers: tuple[bytes, ...]):
        self._separator = separator
        self._markers = markers
        self._tail = b""
        # An event larger than _SMALL_TAIL waits here in pieces (no quadratic re-joining).
        self._held: list[bytes] = []
        self._held_bytes = 0
        self.kept: dict[bytes, bytes] = {}
        self.events = 0
        self.unread: str | None = None

    def feed(self, chunk: bytes) -> None:
        separator = self._separator
        if self._held:
            # Only the seam between the held bytes and this chunk can hide a separator.
            seam = self._held[-1][-(len(separator) - 1) :] + chunk[: len(separator) - 1]
            if separator not in seam and separator not in chunk:
                self._hold(chunk)
                return
            data = b"".join(self._held) + chunk
            self._held = []
            self._held_bytes = 0
        else:
            data = self._tail + chunk if self._tail else chunk
        end = data.rfind(separator)
        if end < 0:
            self._tail = b""
            self._hold(data)
            return
        tail = data[end + len(separator) :]
        self._tail = b""
        if tail:
            self._hold(tail)
        complete = data[:end]
        self.events += complete.count(separator) + 1
        for marker in self._markers:
            at = complete.rfind(marker)
            if at >= 0:
                start = complete.rfind(separator, 0, at)
                stop = complete.find(separator, at)
                begin = start + len(separator) if start >= 0 else 0
                self.kept[marker] = complete[begin : stop if stop >= 0 else None]

    def _hold(self, data: bytes) -> None:
        if not self._held and len(data) <= _SMALL_TAIL:
            self._tail = data
            return
        if self._held_bytes + len(data) > MAX_COPY_BYTES:
            # Too large to be read: drop it, and skip to the next separator.
            self.unread = "event_too_large"
            self._held = [data[-(len(self._separator) - 1) :]]
            self._held_bytes = len(self._held[0])
            return
        if self._tail:
            self._held.append(self._tail)
            self._held_bytes += len(self._tail)
            self._tail = b""
        self._held.append(data)
        self._held_bytes += len(data)

    def read(self, on_data: OnData) -> None:
        """Parse the kept events' ``data:`` JSON and hand each to ``on_data``."""
        for event in self.kept.values():
            at = event.find(b"data:")
            if at < 0:
                continue
            try:
                payload = orjson.loads(event[at + 5 :].strip())
            except orjson.JSONDecodeError:
                continue
            if isinstance(payload, dict):
                on_data(payload)


class JsonTap:
    """A copy of a JSON answer relayed in pieces, parsed once at its end."""

    __slots__ = ("_parts", "_size", "events", "unread")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self.events = 0
        self.unread: str | None = None

    def feed(self, chunk: bytes) -> None:
        self.events += 1
        if self.unread is not None:
            return
        self._size += len(chunk)
        if self._size > MAX_COPY_BYTES:
            self.unread = "body_too_large"
            self._parts = []
            return
        self._parts.append(chunk)

    def read(self, on_data: OnData) -> None:
        if self.unread is None:
            self.unread = read_json(b"".join(self._parts), on_data)


def read_json(body: bytes, on_data: OnData) -> str | None:
    """Hand a JSON answer (an object, or an array of them) to ``on_data``; say if unparsable."""
    # Model lists and token counts carry no usage: skip parsing them.
    if b'"usage' not in body:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        # Gemini's JSON-array stream cut short (a hang-up, an upstream drop)
        # still carries whole chunks, each with the usage so far (issue #19).
        data = _whole_items(body)
        if not data:
            return "unparsable"
    if isinstance(data, dict):
        on_data(data)
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, dict):
                on_data(item)
    return None


_DECODER = json.JSONDecoder()  # orjson has no raw_decode; this runs once per cut stream


def _whole_items(body: bytes) -> list:
    """The complete items at the head of a JSON array whose end never came."""
    text = body.decode("utf-8", "replace")
    start = text.find("[")
    if start < 0 or text[:start].strip():
        return []
    items, index, decoder = [], start + 1, _DECODER
    while True:
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        try:
            item, index = decoder.raw_decode(text, index)
        except ValueError:
            return items
        items.append(item)


class DecodedTap:
    """Decodes a compressed answer chunk by chunk and feeds the pieces to ``inner``."""

    __slots__ = ("_decoder", "_inner", "_seen", "_stopped")

    def __init__(self, decoder: Decoder | None, inner: SseTap | JsonTap):
        self._decoder = decoder
        self._inner = inner
        self._seen = 0
        # Why decoding stopped (or never started: no decoder for the coding).
        self._stopped: str | None = None if decoder is not None else "unknown_encoding"

    @property
    def events(self) -> int:
        return self._inner.events

    @property
    def unread(self) -> str | None:
        return self._stopped or self._inner.unread

    def feed(self, chunk: bytes) -> None:
        if self._stopped is not None:
            return
        self._seen += len(chunk)
        decoder = self._decoder  # not None: without one the tap is stopped from the start
        # A stream may grow its budget with what passed; a bomb cannot.
        budget = MAX_RATIO * self._seen
        if budget > decoder.budget:  # type: ignore[union-attr]
            decoder.budget = budget  # type: ignore[union-attr]
        try:
            decoder.feed(chunk, self._inner.feed)  # type: ignore[union-attr]
        except DecodeLimit:
            self._stopped = "decode_limit"
        except DecodeFailed:
            self._stopped = "decode_failed"

    def read(self, on_data: OnData) -> None:
        # What passed before a decoder stopped is still true; `unread` marks the
        # access line, so a half read never passes for a complete one.
        self._inner.read(on_data)


Tap = SseTap | JsonTap | DecodedTap


def tap_for(
    content_type: str,
    content_encoding: str | None,
    separator: bytes,
    markers: tuple[bytes, ...],
) -> Tap | None:
    """The tap for a relayed answer, or None when it carries no usage to read."""
    if content_type.startswith("text/event-stream"):
        inner: SseTap | JsonTap = SseTap(separator, markers)
    elif content_type.startswith("application/json"):
        inner = JsonTap()
    else:
        return None
    coding = coding_of(content_encoding)
    if coding == "":
        return inner
    return DecodedTap(Decoder(coding, MAX_COPY_BYTES) if coding else None, inner)


def read_whole(body: bytes, content_encoding: str | None, on_data: OnData) -> str | None:
    """Read usage from a whole JSON answer; return why it could not be read, or None."""
    coding = coding_of(content_encoding)
    if coding == "":
        return read_json(body, on_data)
    if coding is None:
        return "unknown_encoding"
    try:
        copy = Decoder(coding, MAX_COPY_BYTES).decode(body)
    except DecodeLimit:
        return "decode_limit"
    except DecodeFailed:
        return "decode_failed"
    return read_json(copy, on_data)
