"""What a refresh attempt's answer leads to: a new pair, a back-off, the file's pair, or a relogin.

A part of ``shim.oauth.TokenRefresher`` (its base class), kept in a module of
its own for size; it is not used alone and relies on the refresher's state
(``_current``, ``_gate``, ``_failures``…). Called with the refresh lock held.

- 200: the new pair is installed (file, shared store), the back-off cleared.
- 429 / 5xx: back off by the answer's ``Retry-After`` (clamped), else
  exponentially; the back-off is written to the shared gate for every worker.
- ``invalid_grant``: the refresh token was spent elsewhere (Claude Code on
  the same box). Not the endpoint's fault, so no back-off: the file is
  watched for a moment and a newer pair adopted; only when none appears is
  the token marked dead and ``oauth_relogin_needed`` logged and counted.
"""

from __future__ import annotations

import logging
import time

import requests

from shim.oauth_endpoint import (
    TokenAnswerError,
    error_code,
    request_refresh,
    retry_after,
    token_answer,
)
from shim.oauth_gate import GateNote
from shim.secret_files import key_id

log = logging.getLogger("shim.oauth")

RELOGIN_NEEDED = "oauth_relogin_needed"


class RefreshOutcomes:
    """The refresher's handling of one call to the token endpoint (see the module docstring)."""

    def _call_endpoint(self, note: GateNote) -> bool:
        parsed = self._current[0]
        spent = parsed.credentials.refresh_token
        started = time.monotonic()
        try:
            response = request_refresh(
                self._session, self.token_url, spent, self.client_id, self.timeout_s
            )
        except requests.RequestException as exc:
            return self._failed("unreachable", note, error=type(exc).__name__)
        status = response.status_code
        if status != 200:
            error = error_code(response)
            if error == "invalid_grant":
                # Not the endpoint's fault but the token's: no back-off, see the file.
                log.warning(
                    "oauth refresh failed: the refresh token was refused",
                    extra={
                        "event": "oauth_refresh_failed",
                        "reason": "rejected",
                        "status": status,
                        "error": error,
                    },
                )
                self._on_result("failed")
                return self._after_invalid_grant(spent, note)
            wait = None
            if status == 429 or status >= 500:
                wait = retry_after(response.headers.get("Retry-After"), self._clock())
                if wait is not None:
                    low, high = self.retry_after_s
                    wait = min(high, max(low, wait))
            return self._failed("rejected", note, wait, status=status, error=error)
        try:
            new = token_answer(response, self._clock(), spent)
        except TokenAnswerError as exc:
            return self._failed("bad_answer", note, error=str(exc))
        self._install(new)
        self._publish(new)
        self._failures = 0
        self._next_attempt = self._clock() + self.min_interval_s
        if note != GateNote():
            self._gate.write(GateNote())
        log.info(
            "oauth token refreshed",
            extra={
                "event": "oauth_refreshed",
                "credential": self._current[1],
                "expires_in_s": round(new.expires_at - self._clock()),
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
            },
        )
        self._on_result("refreshed")
        return True

    def _failed(
        self, reason: str, note: GateNote, wait_s: float | None = None, **fields: object
    ) -> bool:
        """Back off (``wait_s`` from a Retry-After, else exponentially), for every worker."""
        self._failures = max(self._failures, note.failures) + 1
        low, high = self.backoff_s
        backoff = wait_s if wait_s is not None else min(high, low * 2 ** (self._failures - 1))
        self._next_attempt = self._clock() + backoff
        self._gate.write(GateNote(self._next_attempt, self._failures, note.dead))
        log.warning(
            "oauth refresh failed; keeping the current token",
            extra={
                "event": "oauth_refresh_failed",
                "reason": reason,
                "retry_in_s": backoff,
                **fields,
            },
        )
        self._on_result("failed")
        return False

    def _after_invalid_grant(self, spent: str, note: GateNote) -> bool:
        """The refresh token was spent elsewhere: adopt what the file holds now, or give up.

        Claude Code refreshes without shim's lock and may be writing its new
        pair right now, so the file is watched for ``relogin_grace_s``.
        """
        deadline = time.monotonic() + self.relogin_grace_s
        while True:
            self._reload(force=True)
            if self._current[0].credentials.refresh_token != spent:
                # The endpoint is fine; the token was stale. No back-off for the new one.
                self._failures = 0
                self._next_attempt = 0.0
                log.info(
                    "refresh token was spent elsewhere; adopted the file's newer pair",
                    extra={
                        "event": "oauth_stale_refresh_recovered",
                        "credential": self._current[1],
                    },
                )
                return True
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        self._dead = key_id(spent)
        self._gate.write(GateNote(note.not_before, note.failures, self._dead))
        log.error(
            "the refresh token is no longer valid and the credentials file holds nothing "
            "newer: log in again (run claude and /login), shim picks the new login up",
            extra={"event": RELOGIN_NEEDED, "credential": self._current[1], "path": self.path},
        )
        self._on_result("relogin_needed")
        return False
