"""Settings.from_env: a plain dict in, a Settings or a ConfigError out (no I/O but key files)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from shim.settings import ConfigError, Settings, table
from tests import conftest
from tests.conftest import SECRET
from tests.fake_upstream import FAKE_API_KEY, FAKE_GEMINI_KEYS, FAKE_OAUTH_TOKEN


@pytest.fixture(autouse=True)
def _no_default_key_file(monkeypatch, tmp_path):
    # The default key file is looked up in the working directory: make that an empty one.
    monkeypatch.chdir(tmp_path)


def env(**overrides: str | None) -> dict[str, str]:
    """A minimal valid environment (secret + OAuth token), with overrides; None removes."""
    base: dict[str, str | None] = {
        "SHIM_SHARED_SECRET": SECRET,
        "SHIM_ANTHROPIC_TOKEN": FAKE_OAUTH_TOKEN,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def config_error(environ: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(environ)
    return info.value


def only_problem(environ: dict[str, str]) -> str:
    error = config_error(environ)
    assert len(error.problems) == 1, error.problems
    return error.problems[0]


# --- defaults and values -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("anthropic_port", 8889),
        ("gemini_port", 8890),
        ("http_timeout_s", 600.0),
        ("connect_timeout_s", 10.0),
        ("max_body_bytes", 33_554_432),
        ("anthropic_upstream", "https://api.anthropic.com"),
        ("gemini_upstream", "https://generativelanguage.googleapis.com"),
        ("bind_host", "0.0.0.0"),
        ("gemini_keys", ()),
        ("gemini_keys_source", "none"),
        ("anthropic_api_key", None),
    ],
)
def test_default(field, expected):
    assert getattr(Settings.from_env(env()), field) == expected


def test_default_workers_is_the_cpus_this_process_may_use():
    assert Settings.from_env(env()).workers == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("name", "raw", "field", "expected"),
    [
        ("SHIM_ANTHROPIC_PORT", "9001", "anthropic_port", 9001),
        ("SHIM_GEMINI_PORT", "9002", "gemini_port", 9002),
        ("SHIM_ANTHROPIC_PORT", "1", "anthropic_port", 1),
        ("SHIM_GEMINI_PORT", "65535", "gemini_port", 65535),
        ("SHIM_HTTP_TIMEOUT_S", "2.5", "http_timeout_s", 2.5),
        ("SHIM_CONNECT_TIMEOUT_S", "3", "connect_timeout_s", 3.0),
        ("SHIM_HTTP_TIMEOUT_S", "86400", "http_timeout_s", 86400.0),
        ("SHIM_MAX_BODY_BYTES", "100", "max_body_bytes", 100),
        ("SHIM_WORKERS", "1", "workers", 1),
        ("SHIM_WORKERS", "64", "workers", 64),
        ("SHIM_BIND_HOST", "127.0.0.1", "bind_host", "127.0.0.1"),
        (
            "SHIM_ANTHROPIC_UPSTREAM",
            "http://127.0.0.1:9999",
            "anthropic_upstream",
            "http://127.0.0.1:9999",
        ),
        (
            "SHIM_GEMINI_UPSTREAM",
            "https://gemini.example/base",
            "gemini_upstream",
            "https://gemini.example/base",
        ),
    ],
)
def test_value_is_read(name, raw, field, expected):
    assert getattr(Settings.from_env(env(**{name: raw})), field) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("https://h/", "https://h"),
        ("https://h///", "https://h"),
        ("http://127.0.0.1:9999/", "http://127.0.0.1:9999"),
        ("https://h/base/", "https://h/base"),
    ],
)
@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("SHIM_ANTHROPIC_UPSTREAM", "anthropic_upstream"),
        ("SHIM_GEMINI_UPSTREAM", "gemini_upstream"),
    ],
)
def test_upstream_trailing_slash_is_stripped(name, field, raw, expected):
    assert getattr(Settings.from_env(env(**{name: raw})), field) == expected


@pytest.mark.parametrize(
    ("name", "field", "default"),
    [
        ("SHIM_ANTHROPIC_PORT", "anthropic_port", 8889),
        ("SHIM_GEMINI_PORT", "gemini_port", 8890),
        ("SHIM_HTTP_TIMEOUT_S", "http_timeout_s", 600.0),
        ("SHIM_CONNECT_TIMEOUT_S", "connect_timeout_s", 10.0),
        ("SHIM_MAX_BODY_BYTES", "max_body_bytes", 33_554_432),
        ("SHIM_BIND_HOST", "bind_host", "0.0.0.0"),
        ("SHIM_ANTHROPIC_UPSTREAM", "anthropic_upstream", "https://api.anthropic.com"),
        ("SHIM_GEMINI_UPSTREAM", "gemini_upstream", "https://generativelanguage.googleapis.com"),
        ("SHIM_ANTHROPIC_API_KEY", "anthropic_api_key", None),
        ("SHIM_GEMINI_KEYS", "gemini_keys", ()),
        ("SHIM_GEMINI_KEYS_FILE", "gemini_keys_source", "none"),
    ],
)
def test_empty_string_is_treated_as_unset(name, field, default):
    assert getattr(Settings.from_env(env(**{name: ""})), field) == default


def test_empty_workers_is_treated_as_unset():
    assert Settings.from_env(env(SHIM_WORKERS="")).workers == len(os.sched_getaffinity(0))


def test_settings_are_frozen():
    settings = Settings.from_env(env())
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.anthropic_port = 1  # type: ignore[misc]


# --- the shared secret ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "short-secret",
        "a" * 15,
        "a secret with spaces in it",
        "s\u00e9cret-non-ascii-0123456789",
        "tab\tsecret-0123456789abcdef",
        "newline\nsecret-0123456789abc",
    ],
)
def test_bad_shared_secret_is_one_problem_naming_it(value):
    problem = only_problem(env(SHIM_SHARED_SECRET=value))
    assert problem.startswith("SHIM_SHARED_SECRET: ")


def test_sixteen_character_secret_is_accepted():
    assert Settings.from_env(env(SHIM_SHARED_SECRET="a" * 16)).shared_secret == "a" * 16


# --- upstream credentials --------------------------------------------------------------------


def test_both_anthropic_credentials_is_a_problem_naming_both():
    problem = only_problem(env(SHIM_ANTHROPIC_API_KEY=FAKE_API_KEY))
    assert "SHIM_ANTHROPIC_TOKEN" in problem
    assert "SHIM_ANTHROPIC_API_KEY" in problem


@pytest.mark.parametrize(
    "overrides",
    [
        {"SHIM_ANTHROPIC_TOKEN": None},
        {"SHIM_ANTHROPIC_TOKEN": ""},
        {"SHIM_ANTHROPIC_TOKEN": "", "SHIM_ANTHROPIC_API_KEY": "", "SHIM_GEMINI_KEYS": ""},
    ],
)
def test_no_provider_configured_is_a_problem(overrides):
    assert "no provider configured" in only_problem(env(**overrides))


@pytest.mark.parametrize(
    ("overrides", "anthropic", "gemini"),
    [
        ({}, True, False),
        ({"SHIM_ANTHROPIC_TOKEN": None, "SHIM_ANTHROPIC_API_KEY": FAKE_API_KEY}, True, False),
        ({"SHIM_ANTHROPIC_TOKEN": None, "SHIM_GEMINI_KEYS": FAKE_GEMINI_KEYS[0]}, False, True),
        ({"SHIM_GEMINI_KEYS": ",".join(FAKE_GEMINI_KEYS)}, True, True),
    ],
)
def test_one_provider_is_enough(overrides, anthropic, gemini):
    settings = Settings.from_env(env(**overrides))
    assert (settings.anthropic_configured, settings.gemini_configured) == (anthropic, gemini)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SHIM_ANTHROPIC_TOKEN", "sk-ant-oat01 with-a-space"),
        ("SHIM_ANTHROPIC_API_KEY", "sk-ant-api03-n\u00f6n-ascii"),
    ],
)
def test_credential_not_fit_for_a_header_is_a_problem_naming_it(name, value):
    overrides = {"SHIM_ANTHROPIC_TOKEN": None, name: value}
    assert only_problem(env(**overrides)).startswith(f"{name}: ")


def test_credential_whitespace_around_is_stripped():
    settings = Settings.from_env(env(SHIM_ANTHROPIC_TOKEN=f"  {FAKE_OAUTH_TOKEN}\n"))
    assert settings.anthropic_token == FAKE_OAUTH_TOKEN


# --- numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["abc", "0", "70000", "-1", "65536", "88.5"])
@pytest.mark.parametrize("name", ["SHIM_ANTHROPIC_PORT", "SHIM_GEMINI_PORT"])
def test_invalid_port_names_variable_and_expected_form(name, raw):
    problem = only_problem(env(**{name: raw}))
    assert problem.startswith(f"{name}: ")
    assert "expected an integer 1-65535" in problem


@pytest.mark.parametrize(
    ("anthropic", "gemini"), [("9000", "9000"), (None, "8889"), ("8890", None)]
)
def test_same_port_for_both_providers_is_a_problem(anthropic, gemini):
    problem = only_problem(env(SHIM_ANTHROPIC_PORT=anthropic, SHIM_GEMINI_PORT=gemini))
    assert "SHIM_ANTHROPIC_PORT" in problem
    assert "SHIM_GEMINI_PORT" in problem


@pytest.mark.parametrize("raw", ["-1", "x", "0", "nan", "inf", "86401"])
@pytest.mark.parametrize("name", ["SHIM_HTTP_TIMEOUT_S", "SHIM_CONNECT_TIMEOUT_S"])
def test_invalid_timeout_names_variable(name, raw):
    assert only_problem(env(**{name: raw})).startswith(f"{name}: expected a number of seconds")


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("SHIM_MAX_BODY_BYTES", "0"),
        ("SHIM_MAX_BODY_BYTES", "-5"),
        ("SHIM_MAX_BODY_BYTES", "1.5"),
        ("SHIM_MAX_BODY_BYTES", "big"),
        ("SHIM_WORKERS", "0"),
        ("SHIM_WORKERS", "65"),
        ("SHIM_WORKERS", "two"),
        ("SHIM_WORKERS", "1.5"),
        ("SHIM_WORKERS", "-2"),
    ],
)
def test_invalid_count_names_variable(name, raw):
    assert only_problem(env(**{name: raw})).startswith(f"{name}: expected ")


def test_workers_problem_says_the_range():
    assert "an integer 1-64" in only_problem(env(SHIM_WORKERS="65"))


@pytest.mark.parametrize("raw", ["has space", "a/b"])
def test_invalid_bind_host_names_variable(raw):
    assert only_problem(env(SHIM_BIND_HOST=raw)).startswith("SHIM_BIND_HOST: ")


# --- upstream URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "ftp://x",
        "http://",
        "https://h/?q=1",
        "https://user:pw@h",
        "https://h#frag",
        "api.anthropic.com",
        "https://h:99999",
        "https://h:port",
    ],
)
@pytest.mark.parametrize("name", ["SHIM_ANTHROPIC_UPSTREAM", "SHIM_GEMINI_UPSTREAM"])
def test_bad_upstream_url_names_variable(name, raw):
    assert only_problem(env(**{name: raw})).startswith(f"{name}: expected ")


# --- Gemini keys -----------------------------------------------------------------------------


def test_gemini_keys_list_is_comma_separated_stripped_and_deduplicated():
    settings = Settings.from_env(env(SHIM_GEMINI_KEYS=" k1, k2 ,k1,,k3 "))
    assert (settings.gemini_keys, settings.gemini_keys_source) == (
        ("k1", "k2", "k3"),
        "SHIM_GEMINI_KEYS",
    )


def test_gemini_keys_list_overrides_key_file(tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("AIzaFromTheFile\n")
    settings = Settings.from_env(
        env(SHIM_GEMINI_KEYS="AIzaFromEnvOne,AIzaFromEnvTwo", SHIM_GEMINI_KEYS_FILE=str(key_file))
    )
    assert settings.gemini_keys == ("AIzaFromEnvOne", "AIzaFromEnvTwo")
    assert settings.gemini_keys_source == "SHIM_GEMINI_KEYS"


def test_gemini_keys_from_named_file(tmp_path):
    key_file = tmp_path / "elsewhere.txt"
    key_file.write_text("# team keys\nAIzaOne\nAIzaTwo  # backup\n")
    settings = Settings.from_env(env(SHIM_GEMINI_KEYS_FILE=str(key_file)))
    assert settings.gemini_keys == ("AIzaOne", "AIzaTwo")
    assert settings.gemini_keys_source == str(key_file)


def test_gemini_keys_from_default_file_in_working_directory(tmp_path):
    (tmp_path / "gemini_keys.txt").write_text("AIzaDefault\n")
    assert Settings.from_env(env()).gemini_keys == ("AIzaDefault",)


def test_missing_default_key_file_is_fine():
    settings = Settings.from_env(env())
    assert (settings.gemini_keys, settings.gemini_keys_source) == ((), "none")


def test_missing_named_key_file_is_a_problem_naming_it(tmp_path):
    problem = only_problem(env(SHIM_GEMINI_KEYS_FILE=str(tmp_path / "nope.txt")))
    assert problem.startswith("SHIM_GEMINI_KEYS_FILE: ")


@pytest.mark.parametrize("text", ["", "# nothing here\n\n"])
def test_named_key_file_without_keys_is_a_problem_naming_it(tmp_path, text):
    key_file = tmp_path / "keys.txt"
    key_file.write_text(text)
    problem = only_problem(env(SHIM_GEMINI_KEYS_FILE=str(key_file)))
    assert problem.startswith("SHIM_GEMINI_KEYS_FILE: ")


@pytest.mark.parametrize("raw", ["AIzaGood,AIza bad-key-XYZ123", "AIza\u00e9-bad-key-XYZ123"])
def test_bad_key_in_list_is_a_problem_naming_the_list(raw):
    assert only_problem(env(SHIM_GEMINI_KEYS=raw)).startswith("SHIM_GEMINI_KEYS: ")


# --- several problems, and secrets never echoed ----------------------------------------------


def test_several_problems_are_reported_in_one_error():
    error = config_error(
        env(
            SHIM_SHARED_SECRET="short",
            SHIM_ANTHROPIC_API_KEY=FAKE_API_KEY,
            SHIM_ANTHROPIC_PORT="abc",
            SHIM_HTTP_TIMEOUT_S="x",
            SHIM_GEMINI_UPSTREAM="ftp://x",
            SHIM_WORKERS="0",
        )
    )
    assert len(error.problems) == 6, error.problems
    for name in (
        "SHIM_SHARED_SECRET",
        "SHIM_ANTHROPIC_API_KEY",
        "SHIM_ANTHROPIC_PORT",
        "SHIM_HTTP_TIMEOUT_S",
        "SHIM_GEMINI_UPSTREAM",
        "SHIM_WORKERS",
    ):
        assert name in str(error)


def test_error_message_lists_every_problem():
    error = config_error(env(SHIM_ANTHROPIC_PORT="abc", SHIM_GEMINI_PORT="0"))
    assert "SHIM_ANTHROPIC_PORT: expected an integer 1-65535, got 'abc'" in str(error)
    assert "SHIM_GEMINI_PORT: expected an integer 1-65535, got '0'" in str(error)


@pytest.mark.parametrize(
    ("overrides", "value"),
    [
        ({"SHIM_SHARED_SECRET": "short-secret"}, "short-secret"),
        ({"SHIM_SHARED_SECRET": "a secret with spaces in it"}, "a secret with spaces in it"),
        ({"SHIM_SHARED_SECRET": "s\u00e9cret-0123456789abc"}, "s\u00e9cret-0123456789abc"),
        ({"SHIM_ANTHROPIC_API_KEY": FAKE_API_KEY}, FAKE_API_KEY),
        ({"SHIM_ANTHROPIC_API_KEY": FAKE_API_KEY}, FAKE_OAUTH_TOKEN),
        ({"SHIM_ANTHROPIC_TOKEN": "sk-ant-oat01 leaky-token"}, "leaky-token"),
        ({"SHIM_ANTHROPIC_PORT": "abc"}, SECRET),
        ({"SHIM_GEMINI_KEYS": "AIzaGood0001,AIza bad-key-XYZ123"}, "bad-key-XYZ123"),
        ({"SHIM_GEMINI_KEYS": "AIzaGood0001,AIza bad-key-XYZ123"}, "AIzaGood0001"),
        ({"SHIM_GEMINI_UPSTREAM": "https://user:hunter2-password@h"}, "hunter2-password"),
    ],
)
def test_error_never_contains_secret_values(overrides, value):
    error = config_error(env(**overrides))
    assert value not in str(error)
    assert value not in repr(error)
    assert not any(value in problem for problem in error.problems)


def test_secret_values_in_a_key_file_are_never_echoed(tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("AIzaGood0001\nAIza bad-key-XYZ123\n")
    error = config_error(env(SHIM_GEMINI_KEYS_FILE=str(key_file)))
    assert "bad-key-XYZ123" not in str(error)
    assert "AIzaGood0001" not in str(error)


@pytest.mark.parametrize(
    "overrides",
    [
        {"SHIM_GEMINI_KEYS": ",".join(FAKE_GEMINI_KEYS)},
        {
            "SHIM_ANTHROPIC_TOKEN": None,
            "SHIM_ANTHROPIC_API_KEY": FAKE_API_KEY,
            "SHIM_GEMINI_KEYS": FAKE_GEMINI_KEYS[0],
        },
    ],
)
def test_repr_contains_no_secret(overrides):
    text = repr(Settings.from_env(env(**overrides)))
    for value in (SECRET, FAKE_API_KEY, FAKE_OAUTH_TOKEN, *FAKE_GEMINI_KEYS):
        assert value not in text


def test_allow_client_credentials_is_a_flag_and_a_bad_value_names_the_variable():
    def build(**extra: str) -> Settings:
        return Settings.from_env(conftest.settings_env(**extra))

    assert build().allow_client_credentials is False
    assert build(SHIM_ALLOW_CLIENT_CREDENTIALS="1").allow_client_credentials is True
    with pytest.raises(ConfigError, match="SHIM_ALLOW_CLIENT_CREDENTIALS"):
        build(SHIM_ALLOW_CLIENT_CREDENTIALS="maybe")


# --- the table -------------------------------------------------------------------------------


def test_each_variable_is_read_for_one_field():
    variables = [row.variable for row in table()]
    assert len(variables) == len(set(variables))
    assert len({row.field for row in table()}) == len(variables)


def test_every_field_comes_from_the_table_but_what_the_rules_derive():
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert fields - {row.field for row in table()} == {
        "gemini_keys_source",
        "metrics_dir",
        "warnings",
    }


@pytest.mark.parametrize(
    "row", [row for row in table() if row.variable not in env()], ids=lambda row: row.variable
)
def test_an_unset_variable_gives_the_tables_default(row):
    default = row.default() if callable(row.default) else row.default
    assert getattr(Settings.from_env(env()), row.field) == default


@pytest.mark.parametrize("row", table(), ids=lambda row: row.variable)
def test_a_secret_setting_is_kept_out_of_repr(row):
    [spec] = [f for f in dataclasses.fields(Settings) if f.name == row.field]
    assert spec.repr is not row.secret


# --- secrets, for log redaction --------------------------------------------------------------


def test_secrets_lists_every_configured_secret_the_redis_password_too():
    settings = Settings.from_env(
        env(
            SHIM_ANTHROPIC_TOKEN=None,
            SHIM_ANTHROPIC_API_KEY=FAKE_API_KEY,
            SHIM_GEMINI_KEYS=",".join(FAKE_GEMINI_KEYS),
            SHIM_STATE_URL="redis://:redis-pw-0123456789@127.0.0.1:6379/0",
        )
    )
    assert set(settings.secrets()) == {
        SECRET,
        FAKE_API_KEY,
        *FAKE_GEMINI_KEYS,
        "redis-pw-0123456789",
    }


def test_secrets_lists_the_oauth_token_and_a_percent_escaped_password_as_redis_gets_it():
    settings = Settings.from_env(env(SHIM_STATE_URL="redis://:pw%40redis-0123@h:6379"))
    assert set(settings.secrets()) == {SECRET, FAKE_OAUTH_TOKEN, "pw%40redis-0123", "pw@redis-0123"}


def test_secrets_of_a_memory_state_and_no_gemini_keys_are_the_secret_and_credential():
    assert Settings.from_env(env()).secrets() == (SECRET, FAKE_OAUTH_TOKEN)


# --- worker self-stats (issue #19) ---------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [(None, 60.0), ("0", 0.0), ("5", 5.0), ("1.5", 1.5)])
def test_self_stats_interval_defaults_to_a_minute_and_zero_is_off(raw, expected):
    assert Settings.from_env(env(SHIM_SELF_STATS_S=raw)).self_stats_s == expected


@pytest.mark.parametrize("raw", ["-1", "0.5", "x", "nan", "inf", "86401"])
def test_invalid_self_stats_interval_names_the_variable_and_the_form(raw):
    assert only_problem(env(SHIM_SELF_STATS_S=raw)) == (
        f"SHIM_SELF_STATS_S: expected a number of seconds 1-86400, or 0 for off, got {raw!r}"
    )
