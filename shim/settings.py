"""The one frozen Settings object, built and validated from the environment.

This is the only module that reads ``os.environ`` (via ``Settings.from_env``,
which takes any mapping so tests pass plain dicts). Every problem found is
collected into a single ``ConfigError`` that names each variable and the
expected form, and never echoes a secret.

How each kind of value is parsed lives in shim.parsers. This module imports
nothing but the standard library and shim's parsers on purpose:
gunicorn.conf.py loads it in the master process to bind the ports, and the
master must not import requests/ssl before gevent patches the workers
(gunicorn #2796, #1566).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shim import parsers as p
from shim.credentials import CLIENT_ID, DEFAULT_TOKEN_URL, CredentialsFileError, read_credentials
from shim.keys import KeyFileError, load_keys

DEFAULT_ANTHROPIC_UPSTREAM = "https://api.anthropic.com"
DEFAULT_GEMINI_UPSTREAM = "https://generativelanguage.googleapis.com"


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
                "SHIM_SHARED_SECRET", p.secret, None, required=not env.raw("SHIM_CLIENTS_FILE")
            ),
            "clients_file": env.read("SHIM_CLIENTS_FILE", p.clients_file, None),
            "anthropic_token": env.read("SHIM_ANTHROPIC_TOKEN", p.credential, None),
            "anthropic_api_key": env.read("SHIM_ANTHROPIC_API_KEY", p.credential, None),
            "anthropic_credentials_file": _credentials_file(env),
            "anthropic_token_url": env.read(
                "SHIM_ANTHROPIC_TOKEN_URL", p.token_url, DEFAULT_TOKEN_URL
            ),
            "anthropic_oauth_client_id": env.read(
                "SHIM_ANTHROPIC_OAUTH_CLIENT_ID", p.client_id, CLIENT_ID
            ),
            "allow_client_credentials": env.read(
                "SHIM_ALLOW_CLIENT_CREDENTIALS", p.flag, False
            ),
            "anthropic_refresh_margin_s": env.read(
                "SHIM_ANTHROPIC_REFRESH_MARGIN_S", p.margin, 300.0
            ),
            "anthropic_upstream": env.read(
                "SHIM_ANTHROPIC_UPSTREAM", p.base_url, DEFAULT_ANTHROPIC_UPSTREAM
            ),
            "gemini_upstream": env.read(
                "SHIM_GEMINI_UPSTREAM", p.base_url, DEFAULT_GEMINI_UPSTREAM
            ),
            "bind_host": env.read("SHIM_BIND_HOST", p.host, "0.0.0.0"),
            "anthropic_port": env.read("SHIM_ANTHROPIC_PORT", p.port, 8889),
            "gemini_port": env.read("SHIM_GEMINI_PORT", p.port, 8890),
            "http_timeout_s": env.read("SHIM_HTTP_TIMEOUT_S", p.seconds, 600.0),
            "connect_timeout_s": env.read("SHIM_CONNECT_TIMEOUT_S", p.seconds, 10.0),
            "graceful_timeout_s": env.read("SHIM_GRACEFUL_TIMEOUT_S", p.seconds, 120.0),
            "max_body_bytes": env.read("SHIM_MAX_BODY_BYTES", p.positive_int, 33_554_432),
            "workers": env.read("SHIM_WORKERS", p.workers, p.default_workers()),
            "worker_connections": env.read("SHIM_WORKER_CONNECTIONS", p.worker_connections, 1000),
            "log_format": env.read("SHIM_LOG_FORMAT", p.log_format, "json"),
            "metrics_host": env.read("SHIM_METRICS_HOST", p.host, "127.0.0.1"),
            "metrics_port": env.read("SHIM_METRICS_PORT", p.optional_port, 9464),
            "auth_failures_max": env.read("SHIM_AUTH_FAILURES_MAX", p.positive_int, 10),
            "auth_failures_window_s": env.read("SHIM_AUTH_FAILURES_WINDOW_S", p.seconds, 60.0),
            "auth_cooloff_s": env.read("SHIM_AUTH_COOLOFF_S", p.seconds, 300.0),
            "body_timeout_s": env.read("SHIM_BODY_TIMEOUT_S", p.seconds, 60.0),
            "idle_timeout_s": env.read("SHIM_IDLE_TIMEOUT_S", p.seconds, 75.0),
            "state_url": env.read("SHIM_STATE_URL", p.state_url, "memory://"),
            "trusted_proxies": env.read("SHIM_TRUSTED_PROXIES", p.addresses, ("127.0.0.1", "::1")),
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
