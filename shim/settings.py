"""The one frozen Settings object, built and validated from the environment.

This is the only module that reads ``os.environ`` (via ``Settings.from_env``,
which takes any mapping so tests pass plain dicts). Every problem found is
collected into a single ``ConfigError`` that names each variable and the
expected form, and never echoes a secret.

It imports nothing but the standard library and shim's parsers on purpose:
gunicorn.conf.py loads it in the master process to bind the ports, and the
master must not import requests/ssl before gevent patches the workers
(gunicorn #2796, #1566).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from shim.clients import ClientsFileError, parse_clients
from shim.credentials import CLIENT_ID, DEFAULT_TOKEN_URL, CredentialsFileError, read_credentials
from shim.keys import KeyFileError, header_safe, load_keys, read_text

DEFAULT_ANTHROPIC_UPSTREAM = "https://api.anthropic.com"
DEFAULT_GEMINI_UPSTREAM = "https://generativelanguage.googleapis.com"
MIN_SECRET_CHARS = 16


class ConfigError(ValueError):
    """The environment does not describe a gateway that can start."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


@dataclass(frozen=True)
class Settings:
    """Everything shim is configured with; secrets are kept out of repr()."""

    shared_secret: str | None = field(repr=False)
    clients_file: str | None = None
    anthropic_token: str | None = field(default=None, repr=False)
    anthropic_api_key: str | None = field(default=None, repr=False)
    anthropic_credentials_file: str | None = None
    anthropic_token_url: str = DEFAULT_TOKEN_URL
    anthropic_oauth_client_id: str = CLIENT_ID
    anthropic_refresh_margin_s: float = 300.0
    # Mode 5 of issue #15: a client authenticated by X-Shim-Key brings its own Anthropic credential.
    allow_client_credentials: bool = False
    anthropic_upstream: str = DEFAULT_ANTHROPIC_UPSTREAM
    gemini_upstream: str = DEFAULT_GEMINI_UPSTREAM
    gemini_keys: tuple[str, ...] = field(default=(), repr=False)
    gemini_keys_source: str = "none"
    bind_host: str = "0.0.0.0"
    anthropic_port: int = 8889
    gemini_port: int = 8890
    http_timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    graceful_timeout_s: float = 120.0
    max_body_bytes: int = 33_554_432
    workers: int = 1
    worker_connections: int = 1000
    log_format: str = "json"
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9464
    metrics_dir: str | None = None
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    auth_failures_max: int = 10
    auth_failures_window_s: float = 60.0
    auth_cooloff_s: float = 300.0
    body_timeout_s: float = 60.0
    idle_timeout_s: float = 75.0
    # May carry a Redis password: kept out of repr().
    state_url: str = field(default="memory://", repr=False)
    warnings: tuple[str, ...] = ()

    @property
    def anthropic_configured(self) -> bool:
        return bool(
            self.anthropic_token or self.anthropic_api_key or self.anthropic_credentials_file
        )

    @property
    def gemini_configured(self) -> bool:
        return bool(self.gemini_keys)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build Settings from ``environ`` (default ``os.environ``) or raise ConfigError."""
        env = _Env(os.environ if environ is None else environ)
        values: dict[str, Any] = {
            "shared_secret": env.read(
                "SHIM_SHARED_SECRET", _secret, None, required=not env.raw("SHIM_CLIENTS_FILE")
            ),
            "clients_file": env.read("SHIM_CLIENTS_FILE", _clients_file, None),
            "anthropic_token": env.read("SHIM_ANTHROPIC_TOKEN", _credential, None),
            "anthropic_api_key": env.read("SHIM_ANTHROPIC_API_KEY", _credential, None),
            "anthropic_credentials_file": _credentials_file(env),
            "anthropic_token_url": env.read(
                "SHIM_ANTHROPIC_TOKEN_URL", _token_url, DEFAULT_TOKEN_URL
            ),
            "anthropic_oauth_client_id": env.read(
                "SHIM_ANTHROPIC_OAUTH_CLIENT_ID", _client_id, CLIENT_ID
            ),
            "allow_client_credentials": env.read(
                "SHIM_ALLOW_CLIENT_CREDENTIALS", _flag, False
            ),
            "anthropic_refresh_margin_s": env.read(
                "SHIM_ANTHROPIC_REFRESH_MARGIN_S", _margin, 300.0
            ),
            "anthropic_upstream": env.read(
                "SHIM_ANTHROPIC_UPSTREAM", _base_url, DEFAULT_ANTHROPIC_UPSTREAM
            ),
            "gemini_upstream": env.read("SHIM_GEMINI_UPSTREAM", _base_url, DEFAULT_GEMINI_UPSTREAM),
            "bind_host": env.read("SHIM_BIND_HOST", _host, "0.0.0.0"),
            "anthropic_port": env.read("SHIM_ANTHROPIC_PORT", _port, 8889),
            "gemini_port": env.read("SHIM_GEMINI_PORT", _port, 8890),
            "http_timeout_s": env.read("SHIM_HTTP_TIMEOUT_S", _seconds, 600.0),
            "connect_timeout_s": env.read("SHIM_CONNECT_TIMEOUT_S", _seconds, 10.0),
            "graceful_timeout_s": env.read("SHIM_GRACEFUL_TIMEOUT_S", _seconds, 120.0),
            "max_body_bytes": env.read("SHIM_MAX_BODY_BYTES", _positive_int, 33_554_432),
            "workers": env.read("SHIM_WORKERS", _workers, _default_workers()),
            "worker_connections": env.read("SHIM_WORKER_CONNECTIONS", _worker_connections, 1000),
            "log_format": env.read("SHIM_LOG_FORMAT", _log_format, "json"),
            "metrics_host": env.read("SHIM_METRICS_HOST", _host, "127.0.0.1"),
            "metrics_port": env.read("SHIM_METRICS_PORT", _optional_port, 9464),
            "auth_failures_max": env.read("SHIM_AUTH_FAILURES_MAX", _positive_int, 10),
            "auth_failures_window_s": env.read("SHIM_AUTH_FAILURES_WINDOW_S", _seconds, 60.0),
            "auth_cooloff_s": env.read("SHIM_AUTH_COOLOFF_S", _seconds, 300.0),
            "body_timeout_s": env.read("SHIM_BODY_TIMEOUT_S", _seconds, 60.0),
            "idle_timeout_s": env.read("SHIM_IDLE_TIMEOUT_S", _seconds, 75.0),
            "state_url": env.read("SHIM_STATE_URL", _state_url, "memory://"),
            "trusted_proxies": env.read("SHIM_TRUSTED_PROXIES", _addresses, ("127.0.0.1", "::1")),
            # prometheus-client's own variable; gunicorn.conf.py sets it for the workers.
            "metrics_dir": env.raw("PROMETHEUS_MULTIPROC_DIR"),
        }
        keys, source = _gemini_keys(env)
        values["gemini_keys"], values["gemini_keys_source"] = keys, source
        values["warnings"] = tuple(env.warnings)

        credentials = [
            name
            for name, key in (
                ("SHIM_ANTHROPIC_TOKEN", "anthropic_token"),
                ("SHIM_ANTHROPIC_API_KEY", "anthropic_api_key"),
                ("SHIM_ANTHROPIC_CREDENTIALS_FILE", "anthropic_credentials_file"),
            )
            if values[key] or name in env.failed
        ]
        if len(credentials) > 1:
            env.problems.append(
                ", ".join(credentials) + ": set one upstream credential, not several"
            )
        ports = [values["anthropic_port"], values["gemini_port"], values["metrics_port"]]
        ports = [port for port in ports if port]
        if len(set(ports)) != len(ports):
            env.problems.append(
                "SHIM_ANTHROPIC_PORT, SHIM_GEMINI_PORT, SHIM_METRICS_PORT: "
                "each needs a port of its own"
            )
        if (
            "SHIM_SHARED_SECRET" not in env.failed
            and not env.problems
            and not (values["anthropic_token"] or values["anthropic_api_key"] or keys)
            and not values["anthropic_credentials_file"]
        ):
            env.problems.append(
                "no provider configured: set SHIM_ANTHROPIC_TOKEN, SHIM_ANTHROPIC_API_KEY "
                "or SHIM_ANTHROPIC_CREDENTIALS_FILE, "
                "and/or SHIM_GEMINI_KEYS or a SHIM_GEMINI_KEYS_FILE with at least one key"
            )
        if env.problems:
            raise ConfigError(env.problems)
        return cls(**values)


class _Env:
    """Reads variables one by one, collecting problems instead of stopping at the first."""

    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ
        self.problems: list[str] = []
        self.failed: set[str] = set()
        self.warnings: list[str] = []

    def raw(self, name: str) -> str | None:
        # An empty value (``KEY=`` in an .env file) means "not set".
        value = self.environ.get(name)
        return value if value else None

    def read(
        self, name: str, coerce: Callable[[str], Any], default: Any, required: bool = False
    ) -> Any:
        raw = self.raw(name)
        if raw is None:
            if required:
                self.problems.append(f"{name}: required, not set")
                self.failed.add(name)
            return default
        try:
            return coerce(raw)
        except ValueError as exc:
            self.problems.append(f"{name}: {exc}")
            self.failed.add(name)
            return default


def _default_workers() -> int:
    # sched_getaffinity honours a container's cpuset, cpu_count() does not.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _clients_file(raw: str) -> str:
    try:
        parse_clients(read_text(raw, ValueError))
    except ClientsFileError as exc:
        raise ValueError(str(exc)) from None
    return raw


def _state_url(raw: str) -> str:
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


def _credentials_file(env: _Env) -> str | None:
    """The OAuth credentials file: it must parse, and shim must be able to rewrite it."""
    name = "SHIM_ANTHROPIC_CREDENTIALS_FILE"
    path = env.raw(name)
    if path is None:
        return None
    try:
        read_credentials(path)
    except CredentialsFileError as exc:
        env.problems.append(f"{name}: {exc}")
        env.failed.add(name)
        return None
    # A refresh writes a temporary file next to the file (a symlink's target)
    # and renames it over; the .lock and .refresh-state files live next to the link.
    directories = {os.path.dirname(os.path.abspath(path))}
    directories.add(os.path.dirname(os.path.realpath(path)))
    for directory in sorted(directories):
        if not os.access(directory, os.W_OK | os.X_OK):
            env.problems.append(
                f"{name}: directory {directory!r} is not writable by this user; "
                "a refresh must rewrite the file"
            )
            env.failed.add(name)
            return None
    _warn_if_world_readable(env, name, path)
    return path


def _warn_if_world_readable(env: _Env, name: str, path: str) -> None:
    if os.stat(path).st_mode & 0o004:
        env.warnings.append(f"{name}: {path} is readable by every user; chmod 600 it")


def _token_url(raw: str) -> str:
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


def _client_id(raw: str) -> str:
    value = raw.strip()
    if not 1 <= len(value) <= 100 or not all(
        c.isascii() and (c.isalnum() or c in "-._") for c in value
    ):
        raise ValueError(
            f"expected an OAuth client id such as {CLIENT_ID} (letters, digits, - . _)"
        )
    return value


def _margin(raw: str) -> float:
    # Above an hour a short-lived token would be due again right after its refresh.
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"expected a number of seconds 1-3600, got {raw!r}") from None
    if not 1 <= value <= 3600:
        raise ValueError(f"expected a number of seconds 1-3600, got {raw!r}")
    return value


def _secret(raw: str) -> str:
    if len(raw) < MIN_SECRET_CHARS:
        raise ValueError(f"expected at least {MIN_SECRET_CHARS} characters, got {len(raw)}")
    if not header_safe(raw):
        raise ValueError("expected printable ASCII without spaces (it travels in a header)")
    return raw


def _credential(raw: str) -> str:
    raw = raw.strip()
    if not header_safe(raw):
        raise ValueError("expected printable ASCII without spaces (it travels in a header)")
    return raw


def _base_url(raw: str) -> str:
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


def _host(raw: str) -> str:
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


def _port(raw: str) -> int:
    return _int(raw, 1, 65535, "an integer 1-65535")


def _optional_port(raw: str) -> int | None:
    port = _int(raw, 0, 65535, "an integer 1-65535, or 0 for off")
    return port or None


def _addresses(raw: str) -> tuple[str, ...]:
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


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 1 or 0 (true/false), got {raw!r}")


def _log_format(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("json", "text"):
        raise ValueError(f"expected json or text, got {raw!r}")
    return value


def _positive_int(raw: str) -> int:
    return _int(raw, 1, 2**40, "a positive integer")


def _worker_connections(raw: str) -> int:
    return _int(raw, 1, 100_000, "an integer 1-100000")


def _workers(raw: str) -> int:
    return _int(raw, 1, 64, "an integer 1-64")


def _seconds(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"expected a number of seconds > 0, got {raw!r}") from None
    if not 0 < value <= 86_400:
        raise ValueError(f"expected a number of seconds > 0 and <= 86400, got {raw!r}")
    return value


def _gemini_keys(env: _Env) -> tuple[tuple[str, ...], str]:
    """Return the Gemini keys and where they came from; the env list wins over the file."""
    listed = env.raw("SHIM_GEMINI_KEYS")
    file_name = env.raw("SHIM_GEMINI_KEYS_FILE")
    try:
        if listed is not None:
            return load_keys(text=listed.replace(",", "\n")), "SHIM_GEMINI_KEYS"
        path = file_name or "gemini_keys.txt"
        if file_name is None and not os.path.exists(path):
            return (), "none"  # the default file is optional; a named one is not
        keys = load_keys(path=path)
        _warn_if_world_readable(env, "SHIM_GEMINI_KEYS_FILE", path)
        return keys, path
    except KeyFileError as exc:
        name = "SHIM_GEMINI_KEYS" if listed is not None else "SHIM_GEMINI_KEYS_FILE"
        env.problems.append(f"{name}: {exc}")
        return (), "none"
