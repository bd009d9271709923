"""Failed-secret throttling: an address that keeps guessing is told to wait, cheaply.

After ``max_failures`` failed secret checks from one client address within
``window_s``, that address is answered 429 for ``cooloff_s`` without the
secret being compared at all. Keyed by the client address shim believes
(the socket peer, or the last X-Forwarded-For hop from a trusted proxy), so
one address's failures never slow another's calls.

State is per worker process and bounded (``capacity`` addresses, oldest
dropped first), so a flood from many addresses costs memory only up to that.
With N workers an address gets at most N x ``max_failures`` guesses per window.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class AuthThrottle:
    def __init__(
        self,
        max_failures: int,
        window_s: float,
        cooloff_s: float,
        clock: Callable[[], float] = time.monotonic,
        capacity: int = 10_000,
    ):
        self.max_failures = max_failures
        self.window_s = window_s
        self.cooloff_s = cooloff_s
        self.capacity = capacity
        self._clock = clock
        # address -> [window start, failures in window, blocked until]
        self._entries: OrderedDict[str, list[float]] = OrderedDict()

    def __repr__(self) -> str:
        return f"AuthThrottle(max_failures={self.max_failures}, tracked={len(self._entries)})"

    def blocked_for(self, address: str | None) -> float:
        """Seconds ``address`` must still wait (0 when it may try)."""
        entry = self._entries.get(address or "")
        if entry is None:
            return 0.0
        return max(0.0, entry[2] - self._clock())

    def failed(self, address: str | None) -> bool:
        """Count a failed check; return True when this failure starts a cool-off."""
        key = address or ""
        now = self._clock()
        entry = self._entries.get(key)
        if entry is None or now - entry[0] > self.window_s:
            entry = [now, 0.0, 0.0]
            self._entries[key] = entry
        self._entries.move_to_end(key)
        entry[1] += 1
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        if entry[1] >= self.max_failures and entry[2] <= now:
            entry[2] = now + self.cooloff_s
            entry[0], entry[1] = now + self.cooloff_s, 0.0  # a fresh window after the cool-off
            return True
        return False
