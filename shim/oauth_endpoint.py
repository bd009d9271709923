"""The OAuth token endpoint: the refresh request shim sends, and reading its answer.

One ``POST`` of the ``refresh_token`` grant (JSON, Claude Code's client id,
shim's own User-Agent, no redirects followed) on a session of its own that
ignores proxies and ``~/.netrc`` from the environment. The answer is parsed
strictly: a 200 whose body is not a usable pair is ``TokenAnswerError``;
from an error only a short snake_case code (``invalid_grant``) and a
``Retry-After`` are taken, never the body.

What is not here: when to refresh, locking, back-off (``shim.oauth``).
"""

from __future__ import annotations

import email.utils
import re

import requests
from requests.adapters import HTTPAdapter

from shim.credentials import OAuthCredentials
from shim.secret_files import header_safe

# Kept equal to pyproject.toml's version (tests/test_oauth_shared_login.py checks). A
# plain product token: shim does not pass itself off as Claude Code.
VERSION = "0.1.0"
USER_AGENT = f"shim/{VERSION}"
# Only a short snake_case OAuth error code (invalid_grant) from the endpoint goes into a log line.
_ERROR_CODE = re.compile(r"[a-z_]{1,40}")


class TokenAnswerError(ValueError):
    """The token endpoint said 200 but its body is not a usable token pair."""


def parse_token_answer(body: object, now: float, old_refresh_token: str) -> OAuthCredentials:
    """Turn the endpoint's JSON answer into a pair; keep the old refresh token if none came."""
    if not isinstance(body, dict):
        raise TokenAnswerError("expected a JSON object")
    access = body.get("access_token")
    refresh = body.get("refresh_token", old_refresh_token)
    expires_in = body.get("expires_in")
    for name, value in (("access_token", access), ("refresh_token", refresh)):
        if not isinstance(value, str) or not value or not header_safe(value):
            raise TokenAnswerError(f"{name}: expected a non-empty printable string")
    if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) or expires_in <= 0:
        raise TokenAnswerError("expires_in: expected a positive number of seconds")
    return OAuthCredentials(access, refresh, now + expires_in)


def request_refresh(
    session: requests.Session,
    url: str,
    refresh_token: str,
    client_id: str,
    timeout_s: tuple[float, float],
) -> requests.Response:
    """Spend ``refresh_token`` at the endpoint; ``requests.RequestException`` if unreachable."""
    return session.post(
        url,
        json={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": client_id,
        },
        headers={"Accept": "application/json", "User-Agent": USER_AGENT},
        timeout=timeout_s,
        allow_redirects=False,
    )


def token_answer(
    response: requests.Response, now: float, old_refresh_token: str
) -> OAuthCredentials:
    """The pair in a 200 answer, or TokenAnswerError."""
    return parse_token_answer(_json(response), now, old_refresh_token)


def new_session() -> requests.Session:
    session = requests.Session()
    # A stray HTTPS_PROXY or ~/.netrc must not see or redirect the refresh token.
    session.trust_env = False
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=2, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def _json(response: requests.Response) -> object:
    try:
        return response.json()
    except ValueError:
        raise TokenAnswerError("expected a JSON body") from None


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - now


def error_code(response: requests.Response) -> str | None:
    try:
        code = response.json().get("error")
    except (ValueError, AttributeError):
        return None
    return code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else None
