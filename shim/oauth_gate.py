"""What every refresher of an instance agrees on before it calls the token endpoint.

Two facts, shared by all workers through a small JSON file next to the
credentials file and, with ``SHIM_STATE_URL=redis://``, by all boxes through a
Redis key (``shim:oauth:anthropic:gate``):

- ``not_before`` (epoch seconds): nobody calls the endpoint earlier. It is set
  from a 429/5xx's ``Retry-After`` or from the failure back-off, so an endpoint
  that is down or limiting sees one call per interval from the whole instance,
  not one per worker;
- ``dead``: the loggable id (``key_id``, never the token) of a refresh token the
  endpoint answered ``invalid_grant`` to, when the credentials file held nothing
  newer. No worker spends it again, and readiness says ``oauth_relogin_needed``
  while the file still holds it; a new login in the file has another id.

Writes happen under the refresh lock (``shim.locks``); reads need none, as the
file is replaced atomically. Redis down: the box's file is used instead (boxes
may then each call once per interval). An unreadable note counts as empty:
the worst case is one extra call to the endpoint, never a stuck gateway.
What is not here: deciding the interval (``shim.oauth``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from shim.secret_files import write_private_file
from shim.store import StateUnavailable

if TYPE_CHECKING:
    from shim.oauth_shared import OAuthRedis

log = logging.getLogger("shim.oauth")

SHARED_GATE = "oauth:anthropic:gate"
# How long Redis keeps a note: a dead refresh token stays known for a week.
_KEEP_S = 7 * 86_400


@dataclass(frozen=True)
class GateNote:
    """The shared back-off and the refresh token known to be dead, if any."""

    not_before: float = 0.0
    failures: int = 0
    dead: str | None = None

    def encode(self) -> bytes:
        return json.dumps(
            {"not_before": self.not_before, "failures": self.failures, "dead": self.dead}
        ).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> GateNote:
        """Parse a note; anything unusable is the empty note."""
        try:
            data = json.loads(raw)
            dead = data.get("dead")
            return cls(
                float(data.get("not_before", 0.0)),
                int(data.get("failures", 0)),
                dead if isinstance(dead, str) else None,
            )
        except (ValueError, TypeError, AttributeError):
            return cls()


class Gate(Protocol):
    def read(self) -> GateNote: ...

    def write(self, note: GateNote) -> None: ...


class FileGate:
    """The note in a file (mode 0600) shared by the workers of one box."""

    def __init__(self, path: str):
        self.path = path

    def __repr__(self) -> str:
        return f"FileGate({self.path!r})"

    def read(self) -> GateNote:
        try:
            with open(self.path, "rb") as handle:
                return GateNote.decode(handle.read())
        except FileNotFoundError:
            return GateNote()
        except OSError as exc:
            log.warning(
                "oauth refresh note unreadable; ignored",
                extra={"event": "oauth_gate_unreadable", "error": type(exc).__name__},
            )
            return GateNote()

    def write(self, note: GateNote) -> None:
        try:
            write_private_file(self.path, note.encode())
        except OSError as exc:
            # The workers of this box may each call the endpoint once more.
            log.warning(
                "oauth refresh note not written",
                extra={"event": "oauth_gate_write_failed", "error": type(exc).__name__},
            )


class SharedGate:
    """The note in Redis for every box; this box's ``FileGate`` while Redis is down."""

    def __init__(self, state: OAuthRedis, fallback: FileGate):
        self._state = state
        self._fallback = fallback

    def __repr__(self) -> str:
        return f"SharedGate(fallback={self._fallback!r})"

    def read(self) -> GateNote:
        try:
            raw = self._state.get_value(SHARED_GATE)
        except StateUnavailable:
            return self._fallback.read()
        return GateNote.decode(raw) if raw else GateNote()

    def write(self, note: GateNote) -> None:
        try:
            self._state.set_value(SHARED_GATE, note.encode(), _KEEP_S)
        except StateUnavailable:
            self._fallback.write(note)


def gate_path(credentials_path: str) -> str:
    """Where the box's note lives: next to the credentials file, as its lock does."""
    return os.fspath(credentials_path) + ".refresh-state"
