"""The subscription OAuth token from a credentials file, refreshed before it expires.

One ``TokenRefresher`` per worker process stands in for a static token. The
file is the shared truth between processes: a worker re-reads it when it
changes (another worker may have refreshed), and a refresh happens under a
cross-process lock (``shim.locks``) with a double check: after taking the
lock the file is read again, and the token endpoint is called only if the
token there is still the stale one. Refresh tokens are single-use, so two
refreshes racing would end in ``invalid_grant`` for one of them.

When the token is due (within ``margin_s`` of expiry) but still valid, one
background greenlet refreshes while calls go on with the current token; once
it has expired, calls wait (bounded) for the refresh. A 401 from upstream
refreshes once, unless the token used is already superseded (then the call
just retries with the newer one). A failed refresh (``invalid_grant``, the
endpoint unreachable) is logged, keeps the current token and backs off
exponentially, or by the endpoint's ``Retry-After`` (429, 5xx); nothing here
raises into a request. The back-off is shared by every worker (and box) through
``shim.oauth_gate``, so an endpoint that is down sees one call per interval.

A login shared with Claude Code (issue #15): the file may be Claude Code's own
``~/.claude/.credentials.json``, which Claude Code refreshes and rewrites
without shim's lock. Refresh tokens are single-use, so shim never spends one it
has not just re-read from the file: the file is re-read whenever it changes
(inode, size, mtime) and right before every refresh, and any other pair found
there is adopted. After an ``invalid_grant`` the file is read again (for a
moment, as Claude Code may still be writing it) and a pair Claude Code wrote is
adopted; only when the file holds nothing newer does shim give up on that
refresh token: ``oauth_relogin_needed`` is logged and counted, the token is
marked dead in the shared gate so no worker spends it again, and readiness
turns 503 until a new login appears in the file (picked up without a restart).

Several boxes (``SHIM_STATE_URL=redis://``): the lock is a Redis lock, and the
pair a refresh produced is also put in Redis (``shared``). Every refresher,
after taking the lock, first adopts a newer pair from Redis (and writes it to
its own file for its box's workers), so a box never spends a refresh token
another box already used.

What is not here: the file format (``shim.credentials``), the lock
(``shim.locks``), the retry itself (``shim.forward``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import requests

from shim.credentials import (
    CLIENT_ID,
    CredentialsDocument,
    OAuthCredentials,
)
from shim.locks import FileLock, Lock, LockTimeout
from shim.oauth_endpoint import (
    new_session,
)
from shim.oauth_file import CredentialsFile, ident
from shim.oauth_gate import FileGate, Gate, SharedGate, gate_path
from shim.oauth_outcome import RELOGIN_NEEDED, RefreshOutcomes
from shim.oauth_shared import OAuthRedis, publish_pair, read_pair
from shim.secret_files import key_id

log = logging.getLogger("shim.oauth")



class TokenRefresher(RefreshOutcomes):
    """Hands out the current access token; refreshes it at most once across processes."""

    def __init__(
        self,
        path: str,
        token_url: str,
        *,
        lock: Lock | None = None,
        session: requests.Session | None = None,
        margin_s: float = 300.0,
        timeout_s: tuple[float, float] = (10.0, 30.0),
        wait_s: float = 45.0,
        min_interval_s: float = 10.0,
        backoff_s: tuple[float, float] = (5.0, 300.0),
        reload_interval_s: float = 1.0,
        clock: Callable[[], float] = time.time,
        on_token: Callable[[str], None] | None = None,
        on_result: Callable[[str], None] | None = None,
        on_expiry: Callable[[float], None] | None = None,
        shared: OAuthRedis | None = None,
        client_id: str = CLIENT_ID,
        gate: Gate | None = None,
        retry_after_s: tuple[float, float] = (5.0, 300.0),
        relogin_grace_s: float = 2.0,
    ):
        self.path = path
        self._shared = shared
        self.token_url = token_url
        self.client_id = client_id
        self.retry_after_s = retry_after_s
        self.relogin_grace_s = relogin_grace_s
        if gate is None:
            box = FileGate(gate_path(path))
            gate = SharedGate(shared, box) if shared is not None else box
        self._gate = gate
        self.margin_s = margin_s
        self.timeout_s = timeout_s
        self.wait_s = wait_s
        self.min_interval_s = min_interval_s
        self.backoff_s = backoff_s
        self._file = CredentialsFile(path, reload_interval_s)
        self._lock = lock or FileLock(path + ".lock")
        self._session = session or new_session()
        self._clock = clock
        self._on_token = on_token or (lambda token: None)
        self._on_result = on_result or (lambda result: None)
        # Told the expiry (epoch s) of every pair this worker takes up (the status page).
        self._on_expiry = on_expiry or (lambda expires_at: None)
        # In-process single flight: one greenlet talks to the lock and the endpoint.
        self._mutex = threading.Lock()
        self._background = False
        self._failures = 0
        self._next_attempt = 0.0  # clock time before which the endpoint is not called again
        self._dead: str | None = None  # key_id of a refresh token known to be dead
        # (parsed file, loggable id of its access token), swapped as one value.
        self._current: tuple[CredentialsDocument, str] = self._load()

    def __repr__(self) -> str:
        return f"TokenRefresher(path={self.path!r}, credential={self._current[1]})"

    # -- what a call uses -----------------------------------------------------------------

    def credential(self) -> tuple[str, str]:
        """Return (access token, loggable id) for a call about to go upstream."""
        self._reload()
        parsed, ident = self._current
        creds = parsed.credentials
        now = self._clock()
        if now < creds.expires_at - self.margin_s:
            return creds.access_token, ident
        if now < creds.expires_at:
            self._refresh_in_background()
            return creds.access_token, ident
        # Expired: wait (bounded) for a refresh; on failure the old token goes
        # out and upstream's 401 reaches the client.
        self._refresh(None, self.wait_s)
        parsed, ident = self._current
        return parsed.credentials.access_token, ident

    def state(self) -> dict[str, object]:
        """The credential's state for readiness: ``ok``, ``expired`` or ``relogin_needed``."""
        self._reload()
        creds = self._current[0].credentials
        expires_in_s = round(creds.expires_at - self._clock())
        dead = key_id(creds.refresh_token)
        if self._dead == dead or self._gate.read().dead == dead:
            return {
                "state": "relogin_needed",
                "reason": RELOGIN_NEEDED,
                "expires_in_s": expires_in_s,
            }
        return {"state": "ok" if expires_in_s > 0 else "expired", "expires_in_s": expires_in_s}

    def after_unauthorized(self, used_id: str | None) -> bool:
        """Upstream rejected the token ``used_id``: True if a newer token is there to retry with."""
        parsed, ident = self._current
        if used_id != ident:
            return True  # superseded while the call was out: retry with the current one
        return self._refresh(parsed.credentials.access_token, self.wait_s)

    # -- refreshing -----------------------------------------------------------------------

    def _refresh_in_background(self) -> None:
        if self._background or self._mutex.locked() or self._clock() < self._next_attempt:
            return
        self._background = True
        # A greenlet under gevent's patched threading; calls go on meanwhile.
        threading.Thread(target=self._background_refresh, name="oauth-refresh", daemon=True).start()

    def _background_refresh(self) -> None:
        try:
            self._refresh(None, self.wait_s)
        except Exception:  # noqa: BLE001 - a background greenlet has nobody to raise to
            log.exception("oauth refresh crashed", extra={"event": "oauth_refresh_failed"})
        finally:
            self._background = False

    def _refresh(self, rejected: str | None, wait_s: float) -> bool:
        """Refresh unless it is no longer needed; True if the token now differs from ``rejected``.

        ``rejected`` is the token upstream answered 401 to, or None when the
        refresh is due by the clock.
        """
        if not self._mutex.acquire(timeout=wait_s):
            return False
        try:
            self._reload(force=True)
            if not self._needed(rejected):
                return True
            if self._dead == key_id(self._current[0].credentials.refresh_token):
                return False  # spent elsewhere and nothing newer: waiting for a new login
            if self._clock() < self._next_attempt:
                return False  # backing off after a failure, or refreshed a moment ago
            try:
                with self._lock.held(wait_s):
                    # Double check: another process (or Claude Code) may have
                    # refreshed while we waited; never spend a stale token.
                    self._reload(force=True)
                    self._settle()
                    self._adopt_shared()
                    if not self._needed(rejected):
                        return True
                    note = self._gate.read()
                    if note.dead == key_id(self._current[0].credentials.refresh_token):
                        self._dead = note.dead  # another worker found it dead
                        return False
                    if self._clock() < note.not_before:
                        # Another worker's failure: its back-off holds here too.
                        self._next_attempt = note.not_before
                        return False
                    return self._call_endpoint(note)
            except LockTimeout:
                log.warning(
                    "oauth refresh lock not taken in time",
                    extra={"event": "oauth_lock_timeout", "wait_s": wait_s},
                )
                return False
        finally:
            self._mutex.release()

    def _settle(self, wait_s: float = 1.0) -> None:
        """If the file is mid-write (Claude Code writes in place), wait (bounded) for the end.

        What is being written is most likely a pair Claude Code just refreshed:
        spending the token shim holds now would end in ``invalid_grant``.
        """
        deadline = time.monotonic() + wait_s
        while self._file.unusable is not None and time.monotonic() < deadline:
            time.sleep(0.05)
            self._reload(force=True)

    def _needed(self, rejected: str | None) -> bool:
        creds = self._current[0].credentials
        if rejected is not None:
            return creds.access_token == rejected
        return self._clock() >= creds.expires_at - self.margin_s

    def _install(self, new: OAuthCredentials) -> None:
        """Make ``new`` this worker's pair and write it to the file for the other workers."""
        # Known to the log filter before anything could print them.
        self._on_token(new.access_token)
        self._on_token(new.refresh_token)
        self._current = (self._file.write_back(self._current[0], new), ident(new.access_token))
        self._on_expiry(new.expires_at)

    # -- the pair shared between boxes (Redis) -----------------------------------------------

    def _publish(self, new: OAuthCredentials) -> None:
        if self._shared is not None:
            publish_pair(self._shared, new, self._clock())

    def _adopt_shared(self) -> None:
        """Take a newer pair another box refreshed into the shared store, and write it here."""
        if self._shared is None:
            return
        shared = read_pair(self._shared)
        if shared is None:
            return
        parsed, _ = self._current
        if (
            shared.access_token == parsed.credentials.access_token
            or shared.expires_at <= parsed.credentials.expires_at
        ):
            return
        self._install(shared)
        log.info(
            "adopted the token another instance refreshed",
            extra={"event": "oauth_token_adopted", "credential": self._current[1], "from": "redis"},
        )
        self._on_result("adopted")

    # -- the file ---------------------------------------------------------------------------

    def _load(self) -> tuple[CredentialsDocument, str]:
        parsed = self._file.load()
        self._on_token(parsed.credentials.access_token)
        self._on_token(parsed.credentials.refresh_token)
        self._on_expiry(parsed.credentials.expires_at)
        return parsed, ident(parsed.credentials.access_token)

    def _reload(self, force: bool = False) -> None:
        """Adopt the file's pair if the file changed (checked at most every reload_interval_s)."""
        parsed = self._file.changed(force)
        if parsed is None:
            return
        old = self._current[0].credentials
        if parsed.credentials.refresh_token != old.refresh_token and self._failures:
            # A new login or another client's refresh: the old token's back-off is moot
            # (an endpoint's Retry-After stays in the shared gate).
            self._failures, self._next_attempt = 0, 0.0
        if parsed.credentials.access_token != old.access_token:
            self._on_token(parsed.credentials.access_token)
            self._on_token(parsed.credentials.refresh_token)
            self._current = (parsed, ident(parsed.credentials.access_token))
            self._on_expiry(parsed.credentials.expires_at)
            log.info(
                "adopted the token in the credentials file",
                extra={"event": "oauth_token_adopted", "credential": self._current[1]},
            )
            self._on_result("adopted")
        else:
            self._current = (parsed, self._current[1])
