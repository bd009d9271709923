"""Parsers for setting values: one pure function per kind of value, str in, value out.

Each raises ValueError with the expected form ("expected an integer 1-65535, got 'abc'"),
which shim.settings prefixes with the variable's name; a parser of a secret never echoes
the value. Two read files (the clients file and the OAuth credentials file must parse),
none reads the environment. Standard library and shim's file formats only: gunicorn.conf.py
loads this in the master (see shim.settings).
"""

from __future__ import annotations

import ipaddress
import os
from urllib.parse import urlsplit

from shim.clients import ClientsFileError, parse_clients
from shim.credentials import CLIENT_ID, DEFAULT_TOKEN_URL, read_credentials
from shim.keys import header_safe, load_keys, read_text
from shim.prices import load as load_prices

MIN_SECRET_CHARS = 16


def default_workers() -> int:
    # sched_getaffinity honours a container's cpuset, cpu_count() does not.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def clients_file(raw: str) -> str:
    try:
        parse_clients(read_text(raw, ValueError))
    except ClientsFileError as exc:
        raise ValueError(str(exc)) from None
    return raw


def credentials_file(raw: str) -> str:
    """An OAuth credentials file: it must parse, and shim must be able to rewrite it."""
    read_credentials(raw)  # a CredentialsFileError is a ValueError
    # A refresh writes a temporary file next to the file (a symlink's target)
    # and renames it over; the .lock and .refresh-state files live next to the link.
    directories = {os.path.dirname(os.path.abspath(raw))}
    directories.add(os.path.dirname(os.path.realpath(raw)))
    for directory in sorted(directories):
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ValueError(
                f"directory {directory!r} is not writable by this user; "
                "a refresh must rewrite the file"
            )
    return raw


def key_list(raw: str) -> tuple[str, ...]:
    """Comma-separated keys, stripped and deduplicated; KeyFileError never echoes a key."""
    return load_keys(text=raw.replace(",", "\n"))


def prices_file(raw: str) -> str:
    """A price file (shim/prices.json's shape): it must read and validate now, not mid-report."""
    load_prices(raw)  # a PriceFileError is a ValueError naming the family and the key
    return raw


def usd(raw: str) -> float:
    try:
        value = float(raw.strip().lstrip("$"))
    except ValueError:
        raise ValueError(f"expected an amount in USD such as 200, got {raw!r}") from None
    if not 0 <= value <= 1_000_000:
        raise ValueError(f"expected an amount in USD 0-1000000, got {raw!r}")
    return value


def path(raw: str) -> str:
    """A file name, taken as given (whether it must exist is the caller's rule)."""
    return raw


def state_url(raw: str) -> str:
    url = raw.strip()
    if url.rstrip("/") == "memory:":
        return "memory://"
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss") and parts.hostname:
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError("expected a valid port in the Redis URL") from None
        if parts.path.strip("/") and not parts.path.strip("/").isdigit():
            raise ValueError("expected a database number as the Redis URL's path, e.g. /0")
        return url
    if parts.scheme == "unix" and parts.path:
        return url
    # Never echo the value: it may carry a password.
    raise ValueError(
        "expected memory:// or redis://[:password@]host[:port][/db], rediss://… or unix:///path"
    )


def token_url(raw: str) -> str:
    url = _http_url(raw, f"an http(s) URL such as {DEFAULT_TOKEN_URL}")
    # The refresh token travels in the body: plain http only to this box (a test endpoint).
    parts = urlsplit(url)
    if parts.scheme == "http" and not _loopback(parts.hostname or ""):
        raise ValueError(
            f"expected an https:// URL (plain http only to a loopback address), got {raw!r}"
        )
    return url


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_id(raw: str) -> str:
    value = raw.strip()
    if not 1 <= len(value) <= 100 or not all(
        c.isascii() and (c.isalnum() or c in "-._") for c in value
    ):
        raise ValueError(
            f"expected an OAuth client id such as {CLIENT_ID} (letters, digits, - . _)"
        )
    return value


def margin(raw: str) -> float:
    # Above an hour a short-lived token would be due again right after its refresh.
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"expected a number of seconds 1-3600, got {raw!r}") from None
    if not 1 <= value <= 3600:
        raise ValueError(f"expected a number of seconds 1-3600, got {raw!r}")
    return value


def secret(raw: str) -> str:
    if len(raw) < MIN_SECRET_CHARS:
        raise ValueError(f"expected at least {MIN_SECRET_CHARS} characters, got {len(raw)}")
    if not header_safe(raw):
        raise ValueError("expected printable ASCII without spaces (it travels in a header)")
    return raw


def credential(raw: str) -> str:
    raw = raw.strip()
    if not header_safe(raw):
        raise ValueError("expected printable ASCII without spaces (it travels in a header)")
    return raw


def base_url(raw: str) -> str:
    return _http_url(raw, "an http(s) base URL such as https://host[:port]").rstrip("/")


def _http_url(raw: str, what: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected {what}, got {raw!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("expected a URL without credentials, query or fragment")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"expected a valid port in the URL, got {raw!r}") from None
    return raw.strip()


def host(raw: str) -> str:
    host = raw.strip()
    if not host or " " in host or "/" in host:
        raise ValueError(f"expected an address to bind such as 0.0.0.0 or 127.0.0.1, got {raw!r}")
    return host


def _int(raw: str, low: int, high: int, what: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"expected {what}, got {raw!r}") from None
    if not low <= value <= high:
        raise ValueError(f"expected {what}, got {raw!r}")
    return value


def port(raw: str) -> int:
    return _int(raw, 1, 65535, "an integer 1-65535")


def optional_port(raw: str) -> int | None:
    port = _int(raw, 0, 65535, "an integer 1-65535, or 0 for off")
    return port or None


def addresses(raw: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in raw.split(",") if item.strip())
    for item in items:
        if item != "*":
            try:
                ipaddress.ip_address(item)
            except ValueError:
                raise ValueError(
                    f"expected comma-separated IP addresses or *, got {item!r}"
                ) from None
    return items


def flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 1 or 0 (true/false), got {raw!r}")


def log_format(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("json", "text"):
        raise ValueError(f"expected json or text, got {raw!r}")
    return value


def positive_int(raw: str) -> int:
    return _int(raw, 1, 2**40, "a positive integer")


def worker_connections(raw: str) -> int:
    return _int(raw, 1, 100_000, "an integer 1-100000")


def workers(raw: str) -> int:
    return _int(raw, 1, 64, "an integer 1-64")


def interval_or_off(raw: str) -> float:
    """Seconds between runs of a periodic job: 0 turns it off, else 1 to 86400."""
    what = "a number of seconds 1-86400, or 0 for off"
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"expected {what}, got {raw!r}") from None
    if not (value == 0 or 1 <= value <= 86_400):
        raise ValueError(f"expected {what}, got {raw!r}")
    return value


def seconds(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"expected a number of seconds > 0, got {raw!r}") from None
    if not 0 < value <= 86_400:
        raise ValueError(f"expected a number of seconds > 0 and <= 86400, got {raw!r}")
    return value


