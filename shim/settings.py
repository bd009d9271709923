"""The one frozen Settings object, built and validated from the environment.

Every setting is one entry in the ``Settings`` class body below: its variable,
parser (``shim.parsers``), default and a one-line description, grouped in
sections. That table is the only place a default is written; ``from_env`` reads
every entry the same way, and the README check (tests/test_docs.py) reads it
too. What is not one variable for one field (a secret required unless there is
a clients file, the Gemini key file the key list overrides, checks across
settings, warnings) is a small function after the table.

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

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import unquote, urlsplit

from shim import parsers as p
from shim.credentials import CLIENT_ID, DEFAULT_TOKEN_URL
from shim.keys import KeyFileError, load_keys


class ConfigError(ValueError):
    """The environment does not describe a gateway that can start."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


@dataclass(frozen=True)
class Setting:
    """One row of the settings table: where a field's value comes from and what it means."""

    variable: str
    parse: Callable[[str], Any]
    default: Any  # a callable is called for the default (the number of cores)
    section: str
    doc: str
    secret: bool = False
    field: str = ""  # the Settings field; filled in by table()


def _setting(
    section: str,
    variable: str,
    parse: Callable[[str], Any],
    default: Any,
    doc: str,
    *,
    secret: bool = False,
) -> Any:
    """A Settings field whose default and metadata come from one table row."""
    row = Setting(variable, parse, default, section, doc, secret)
    if callable(default):
        return field(default_factory=default, repr=not secret, metadata={"setting": row})
    return field(default=default, repr=not secret, metadata={"setting": row})


_server = partial(_setting, "server and workers")
_upstream = partial(_setting, "upstream timeouts and sizes")
_auth = partial(_setting, "auth and throttle")
_anthropic = partial(_setting, "Anthropic")
_gemini = partial(_setting, "Gemini")
_observability = partial(_setting, "observability")
_state = partial(_setting, "state")
_report = partial(_setting, "cost report")


@dataclass(frozen=True)
class Settings:
    """Everything shim is configured with; secrets are kept out of repr()."""

    # --- server and workers: field = _server(variable, parser, default, description)
    bind_host: str = _server("SHIM_BIND_HOST", p.host, "0.0.0.0", "address both ports listen on")
    anthropic_port: int = _server("SHIM_ANTHROPIC_PORT", p.port, 8889, "Anthropic API port")
    gemini_port: int = _server("SHIM_GEMINI_PORT", p.port, 8890, "Gemini API port")
    workers: int = _server(
        "SHIM_WORKERS", p.workers, p.default_workers, "gevent worker processes (default: cores)"
    )
    worker_connections: int = _server(
        "SHIM_WORKER_CONNECTIONS", p.worker_connections, 1000, "open connections per worker"
    )
    graceful_timeout_s: float = _server(
        "SHIM_GRACEFUL_TIMEOUT_S", p.seconds, 120.0, "on SIGTERM, how long streams may run on"
    )
    idle_timeout_s: float = _server(
        "SHIM_IDLE_TIMEOUT_S", p.seconds, 75.0, "longest idle or header-sending connection"
    )
    body_timeout_s: float = _server(
        "SHIM_BODY_TIMEOUT_S", p.seconds, 60.0, "longest time to receive a request body"
    )
    trusted_proxies: tuple[str, ...] = _server(
        "SHIM_TRUSTED_PROXIES", p.addresses, ("127.0.0.1", "::1"), "peers whose XFF is believed"
    )

    # --- upstream timeouts and sizes
    http_timeout_s: float = _upstream(
        "SHIM_HTTP_TIMEOUT_S", p.seconds, 600.0, "longest upstream silence (read timeout)"
    )
    connect_timeout_s: float = _upstream(
        "SHIM_CONNECT_TIMEOUT_S", p.seconds, 10.0, "connect timeout to upstream"
    )
    max_body_bytes: int = _upstream(
        "SHIM_MAX_BODY_BYTES", p.positive_int, 33_554_432, "larger request bodies get 413"
    )

    # --- auth and throttle (the secret is required unless there is a clients file: _require)
    shared_secret: str | None = _auth(
        "SHIM_SHARED_SECRET", p.secret, None, "what clients present", secret=True
    )
    clients_file: str | None = _auth(
        "SHIM_CLIENTS_FILE", p.clients_file, None, "named clients, one per line"
    )
    auth_failures_max: int = _auth(
        "SHIM_AUTH_FAILURES_MAX", p.positive_int, 10, "failed secrets per address in the window"
    )
    auth_failures_window_s: float = _auth(
        "SHIM_AUTH_FAILURES_WINDOW_S", p.seconds, 60.0, "that window"
    )
    auth_cooloff_s: float = _auth(
        "SHIM_AUTH_COOLOFF_S", p.seconds, 300.0, "how long such an address gets 429"
    )

    # --- Anthropic (at most one of the three credentials: _one_credential)
    anthropic_token: str | None = _anthropic(
        "SHIM_ANTHROPIC_TOKEN", p.credential, None, "subscription OAuth token", secret=True
    )
    anthropic_api_key: str | None = _anthropic(
        "SHIM_ANTHROPIC_API_KEY", p.credential, None, "API key", secret=True
    )
    anthropic_credentials_file: str | None = _anthropic(
        "SHIM_ANTHROPIC_CREDENTIALS_FILE", p.credentials_file, None, "OAuth file shim refreshes"
    )
    anthropic_token_url: str = _anthropic(
        "SHIM_ANTHROPIC_TOKEN_URL", p.token_url, DEFAULT_TOKEN_URL, "where it is refreshed"
    )
    anthropic_oauth_client_id: str = _anthropic(
        "SHIM_ANTHROPIC_OAUTH_CLIENT_ID", p.client_id, CLIENT_ID, "client_id sent with a refresh"
    )
    anthropic_refresh_margin_s: float = _anthropic(
        "SHIM_ANTHROPIC_REFRESH_MARGIN_S", p.margin, 300.0, "refresh this long before expiry"
    )
    # Mode 5 of issue #15: a client authenticated by X-Shim-Key brings its own Anthropic credential.
    allow_client_credentials: bool = _anthropic(
        "SHIM_ALLOW_CLIENT_CREDENTIALS", p.flag, False, "members bring their own credential"
    )
    anthropic_upstream: str = _anthropic(
        "SHIM_ANTHROPIC_UPSTREAM", p.base_url, "https://api.anthropic.com", "base URL"
    )

    # --- Gemini (the key list, when set, overrides the file: _gemini_keys_from_file)
    gemini_keys: tuple[str, ...] = _gemini(
        "SHIM_GEMINI_KEYS", p.key_list, (), "comma-separated keys", secret=True
    )
    gemini_keys_file: str = _gemini(
        "SHIM_GEMINI_KEYS_FILE", p.path, "gemini_keys.txt", "one key per line"
    )
    gemini_upstream: str = _gemini(
        "SHIM_GEMINI_UPSTREAM", p.base_url, "https://generativelanguage.googleapis.com", "base URL"
    )

    # --- observability
    log_format: str = _observability("SHIM_LOG_FORMAT", p.log_format, "json", "json or text")
    metrics_host: str = _observability(
        "SHIM_METRICS_HOST", p.host, "127.0.0.1", "address of the Prometheus port"
    )
    metrics_port: int | None = _observability(
        "SHIM_METRICS_PORT", p.optional_port, 9464, "Prometheus port; 0 turns it off"
    )
    # Issue #19: each worker's greenlets, open descriptors and RSS as gauges (shim.selfstats).
    self_stats_s: float = _observability(
        "SHIM_SELF_STATS_S", p.interval_or_off, 60.0, "worker self-stats refresh; 0 turns it off"
    )

    # --- state (may carry a Redis password: kept out of repr(), listed by secrets())
    state_url: str = _state(
        "SHIM_STATE_URL", p.state_url, "memory://", "memory:// or redis://…", secret=True
    )

    # --- cost report (read by python -m shim.report through report_settings; issue #17)
    prices_file: str | None = _report(
        "SHIM_PRICES_FILE", p.prices_file, None, "JSON prices replacing or adding to shipped ones"
    )
    subscription_usd_month: float | None = _report(
        "SHIM_SUBSCRIPTION_USD_MONTH", p.usd, None, "plan price the report compares against"
    )

    # --- not from the table: set by from_env's rules below
    gemini_keys_source: str = "none"  # "SHIM_GEMINI_KEYS", the key file's path, or "none"
    metrics_dir: str | None = None  # prometheus-client's PROMETHEUS_MULTIPROC_DIR
    warnings: tuple[str, ...] = ()

    @property
    def anthropic_configured(self) -> bool:
        return bool(
            self.anthropic_token or self.anthropic_api_key or self.anthropic_credentials_file
        )

    @property
    def gemini_configured(self) -> bool:
        return bool(self.gemini_keys)

    def secrets(self) -> tuple[str, ...]:
        """Every configured secret: the one list both the app's and gunicorn's logs redact."""
        password = urlsplit(self.state_url).password  # redis://:password@host
        found = [
            self.shared_secret,
            *self.gemini_keys,
            self.anthropic_token,
            self.anthropic_api_key,
            password,
            unquote(password) if password else None,  # what Redis is sent, if %-escaped
        ]
        return tuple(dict.fromkeys(s for s in found if s))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build Settings from ``environ`` (default ``os.environ``) or raise ConfigError."""
        env = _Env(os.environ if environ is None else environ)
        values = {row.field: env.read(row) for row in table()}
        _require_secret(env)
        _gemini_keys_from_file(env, values)
        # prometheus-client's own variable; gunicorn.conf.py sets it for the workers.
        values["metrics_dir"] = env.raw("PROMETHEUS_MULTIPROC_DIR")
        values["warnings"] = _world_readable(values)
        _one_credential(env, values)
        _ports_apart(env, values)
        _some_provider(env, values)
        if env.problems:
            raise ConfigError(env.problems)
        return cls(**values)


def report_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The cost report's rows only: a report needs no secret, credential or port.

    Returns {field: value} for the "cost report" section or raises ConfigError.
    """
    env = _Env(os.environ if environ is None else environ)
    values = {row.field: env.read(row) for row in table() if row.section == "cost report"}
    if env.problems:
        raise ConfigError(env.problems)
    return values


def table() -> tuple[Setting, ...]:
    """The settings table, in order: every variable shim reads with its field and default."""
    return tuple(
        dataclasses.replace(f.metadata["setting"], field=f.name)
        for f in dataclasses.fields(Settings)
        if "setting" in f.metadata
    )


class _Env:
    """Reads variables one by one, collecting problems instead of stopping at the first."""

    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ
        self.problems: list[str] = []
        self.failed: set[str] = set()

    def raw(self, name: str) -> str | None:
        # An empty value (``KEY=`` in an .env file) means "not set".
        value = self.environ.get(name)
        return value if value else None

    def read(self, row: Setting) -> Any:
        """The row's parsed value, or its default when unset or (a problem noted) invalid."""
        raw = self.raw(row.variable)
        if raw is not None:
            try:
                return row.parse(raw)
            except ValueError as exc:
                self.fail(row.variable, str(exc))
        return row.default() if callable(row.default) else row.default

    def fail(self, name: str, problem: str) -> None:
        self.problems.append(f"{name}: {problem}")
        self.failed.add(name)


# --- the rules that are not one variable for one field ---------------------------------------


def _require_secret(env: _Env) -> None:
    """The shared secret is required unless named clients bring their own."""
    if env.raw("SHIM_SHARED_SECRET") is None and env.raw("SHIM_CLIENTS_FILE") is None:
        env.fail("SHIM_SHARED_SECRET", "required, not set")


def _gemini_keys_from_file(env: _Env, values: dict[str, Any]) -> None:
    """Without SHIM_GEMINI_KEYS, read the key file: the default one is optional, a named one not."""
    if env.raw("SHIM_GEMINI_KEYS") is not None:
        listed = "SHIM_GEMINI_KEYS" not in env.failed
        values["gemini_keys_source"] = "SHIM_GEMINI_KEYS" if listed else "none"
        return
    path = values["gemini_keys_file"]
    if env.raw("SHIM_GEMINI_KEYS_FILE") is None and not os.path.exists(path):
        values["gemini_keys_source"] = "none"
        return
    try:
        values["gemini_keys"], values["gemini_keys_source"] = load_keys(path=path), path
    except KeyFileError as exc:
        env.problems.append(f"SHIM_GEMINI_KEYS_FILE: {exc}")
        values["gemini_keys_source"] = "none"


def _world_readable(values: dict[str, Any]) -> tuple[str, ...]:
    """Warn about a secrets file every user of the box can read."""
    files = [("SHIM_ANTHROPIC_CREDENTIALS_FILE", values["anthropic_credentials_file"])]
    if values["gemini_keys_source"] not in ("none", "SHIM_GEMINI_KEYS"):
        files.append(("SHIM_GEMINI_KEYS_FILE", values["gemini_keys_source"]))
    return tuple(
        f"{name}: {path} is readable by every user; chmod 600 it"
        for name, path in files
        if path and os.stat(path).st_mode & 0o004
    )


def _one_credential(env: _Env, values: dict[str, Any]) -> None:
    """At most one Anthropic credential: which one goes upstream must never be a guess."""
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
        env.problems.append(", ".join(credentials) + ": set one upstream credential, not several")


def _ports_apart(env: _Env, values: dict[str, Any]) -> None:
    ports = [values["anthropic_port"], values["gemini_port"], values["metrics_port"]]
    ports = [port for port in ports if port]
    if len(set(ports)) != len(ports):
        env.problems.append(
            "SHIM_ANTHROPIC_PORT, SHIM_GEMINI_PORT, SHIM_METRICS_PORT: each needs a port of its own"
        )


def _some_provider(env: _Env, values: dict[str, Any]) -> None:
    """Report "no provider" only when nothing else is wrong (a typo'd credential says more)."""
    if "SHIM_SHARED_SECRET" in env.failed or env.problems:
        return
    if not (
        values["anthropic_token"]
        or values["anthropic_api_key"]
        or values["anthropic_credentials_file"]
        or values["gemini_keys"]
    ):
        env.problems.append(
            "no provider configured: set SHIM_ANTHROPIC_TOKEN, SHIM_ANTHROPIC_API_KEY "
            "or SHIM_ANTHROPIC_CREDENTIALS_FILE, "
            "and/or SHIM_GEMINI_KEYS or a SHIM_GEMINI_KEYS_FILE with at least one key"
        )
