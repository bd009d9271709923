"""Read token usage off a stream as it passes, without holding a byte back.

Per chunk, ``SseTap.feed`` only counts event separators and remembers the
*last* event that carries one of the provider's markers (Anthropic's
``message_start``/``message_delta``, Gemini's ``usageMetadata``); the few
remembered events are JSON-parsed once, when the stream ends. The client gets
each chunk before the tap looks at it, and the tap keeps at most one
incomplete event (capped) between chunks.

Not for Gemini's JSON-array stream (no ``alt=sse``): its elements are not
framed as events, so usage is left empty there.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

MAX_TAIL_BYTES = 262_144  # an event longer than this is not a usage event


class SseTap:
    __slots__ = ("_separator", "_markers", "_tail", "kept", "events")

    def __init__(self, separator: bytes, markers: tuple[bytes, ...]):
        self._separator = separator
        self._markers = markers
        self._tail = b""
        self.kept: dict[bytes, bytes] = {}
        self.events = 0

    def feed(self, chunk: bytes) -> None:
        separator = self._separator
        data = self._tail + chunk if self._tail else chunk
        end = data.rfind(separator)
        if end < 0:
            self._tail = data if len(data) <= MAX_TAIL_BYTES else b""
            return
        self._tail = data[end + len(separator) :]
        if len(self._tail) > MAX_TAIL_BYTES:
            self._tail = b""
        complete = data[:end]
        self.events += complete.count(separator) + 1
        for marker in self._markers:
            at = complete.rfind(marker)
            if at >= 0:
                start = complete.rfind(separator, 0, at)
                stop = complete.find(separator, at)
                begin = start + len(separator) if start >= 0 else 0
                event = complete[begin : stop if stop >= 0 else None]
                self.kept[marker] = event

    def read(self, on_data: Callable[[dict], None]) -> None:
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
