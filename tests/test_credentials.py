"""The OAuth credentials file: both layouts, bad files, the atomic rewrite, and its settings."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from shim.credentials import (
    CLIENT_ID,
    DEFAULT_TOKEN_URL,
    CredentialsFileError,
    OAuthCredentials,
    parse_credentials,
    read_credentials,
    with_credentials,
    write_credentials,
)
from shim.settings import ConfigError, Settings
from tests.conftest import SECRET
from tests.fake_upstream import FAKE_API_KEY, FAKE_OAUTH_TOKEN

ACCESS = "sk-ant-oat01-unit-access-token-0000000000000"
REFRESH = "sk-ant-ort01-unit-refresh-token-000000000000"
EXPIRES_MS = 1_900_000_000_000


def claude_code_file(**overrides) -> dict:
    """Claude Code's own layout, with the fields it keeps next to the tokens."""
    section = {
        "accessToken": ACCESS,
        "refreshToken": REFRESH,
        "expiresAt": EXPIRES_MS,
        "scopes": ["user:inference", "user:profile"],
        "subscriptionType": "max",
    }
    section.update(overrides)
    return {"claudeAiOauth": section, "organizationUuid": "org-0001"}


def write_json(path, document) -> str:
    path.write_text(json.dumps(document))
    path.chmod(0o600)
    return str(path)


# --- parsing -------------------------------------------------------------------------------


def test_claude_code_layout_is_read():
    parsed = parse_credentials(json.dumps(claude_code_file()))
    assert parsed.nested
    assert parsed.credentials == OAuthCredentials(ACCESS, REFRESH, EXPIRES_MS / 1000)


def test_flat_layout_is_read():
    text = json.dumps({"accessToken": ACCESS, "refreshToken": REFRESH, "expiresAt": EXPIRES_MS})
    parsed = parse_credentials(text)
    assert not parsed.nested
    assert parsed.credentials.access_token == ACCESS
    assert parsed.credentials.expires_at == EXPIRES_MS / 1000


def test_repr_holds_no_token():
    parsed = parse_credentials(json.dumps(claude_code_file()))
    assert ACCESS not in repr(parsed) and REFRESH not in repr(parsed)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("not json " + ACCESS, "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"claudeAiOauth": "' + ACCESS + '"}', "claudeAiOauth to be an object"),
        (json.dumps(claude_code_file(accessToken="")), "claudeAiOauth.accessToken"),
        (json.dumps(claude_code_file(refreshToken=None)), "claudeAiOauth.refreshToken"),
        (json.dumps(claude_code_file(accessToken=ACCESS + " x")), "printable ASCII"),
        (json.dumps(claude_code_file(expiresAt="soon")), "expiresAt: expected epoch milliseconds"),
        (json.dumps(claude_code_file(expiresAt=1_900_000_000)), "(seconds?)"),
        (json.dumps(claude_code_file(expiresAt=True)), "expiresAt"),
        (json.dumps({"accessToken": ACCESS, "refreshToken": REFRESH}), "expiresAt"),
    ],
)
def test_bad_file_is_refused_without_echoing_a_token(text, expected):
    with pytest.raises(CredentialsFileError) as info:
        parse_credentials(text)
    assert expected in str(info.value)
    assert ACCESS not in str(info.value) and REFRESH not in str(info.value)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(CredentialsFileError, match="does not exist"):
        read_credentials(str(tmp_path / "nope.json"))


# --- the rewrite ---------------------------------------------------------------------------


def test_rewrite_keeps_every_other_field_and_is_private(tmp_path):
    path = write_json(tmp_path / "credentials.json", claude_code_file())
    os.chmod(path, 0o644)
    parsed = read_credentials(path)
    new = OAuthCredentials("sk-ant-oat01-new-access", "sk-ant-ort01-new-refresh", 2_000_000_000.5)

    write_credentials(path, with_credentials(parsed, new))

    document = json.loads(Path(path).read_text())
    assert document["organizationUuid"] == "org-0001"
    section = document["claudeAiOauth"]
    assert section["scopes"] == ["user:inference", "user:profile"]
    assert section["subscriptionType"] == "max"
    assert section["accessToken"] == "sk-ant-oat01-new-access"
    assert section["refreshToken"] == "sk-ant-ort01-new-refresh"
    assert section["expiresAt"] == 2_000_000_000_500
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_credentials(path).credentials == OAuthCredentials(
        "sk-ant-oat01-new-access", "sk-ant-ort01-new-refresh", 2_000_000_000.5
    )
    # No temporary file left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["credentials.json"]


def test_rewrite_of_a_flat_file_stays_flat(tmp_path):
    flat = {"accessToken": ACCESS, "refreshToken": REFRESH, "expiresAt": EXPIRES_MS, "note": "x"}
    path = write_json(tmp_path / "flat.json", flat)
    new = OAuthCredentials("sk-ant-oat01-a2", "sk-ant-ort01-r2", 1_950_000_000)
    write_credentials(path, with_credentials(read_credentials(path), new))
    document = json.loads(Path(path).read_text())
    assert document == {
        "accessToken": "sk-ant-oat01-a2",
        "refreshToken": "sk-ant-ort01-r2",
        "expiresAt": 1_950_000_000_000,
        "note": "x",
    }


def test_rewrite_replaces_the_file_never_edits_it_in_place(tmp_path):
    # A reader holding the old file keeps reading the old bytes: a new inode, renamed over.
    path = write_json(tmp_path / "credentials.json", claude_code_file())
    before = os.stat(path).st_ino
    with open(path) as reader:
        parsed = read_credentials(path)
        new = OAuthCredentials("sk-ant-oat01-a3", "sk-ant-ort01-r3", 1_950_000_000)
        write_credentials(path, with_credentials(parsed, new))
        assert json.loads(reader.read())["claudeAiOauth"]["accessToken"] == ACCESS
    assert os.stat(path).st_ino != before


def test_rewrite_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path):
    # ~/.claude/.credentials.json as a link into a dotfiles directory (or shim's path
    # a link to Claude Code's file): the link must stay a link to the refreshed file.
    (tmp_path / "real").mkdir()
    (tmp_path / "home").mkdir()
    target = tmp_path / "real" / "credentials.json"
    document = claude_code_file()
    document["claudeAiOauth"]["rateLimitTier"] = "default_claude_max_20x"
    write_json(target, document)
    link = tmp_path / "home" / ".credentials.json"
    link.symlink_to(target)
    new = OAuthCredentials("sk-ant-oat01-linked", "sk-ant-ort01-linked", 1_960_000_000)

    write_credentials(str(link), with_credentials(read_credentials(str(link)), new))

    assert link.is_symlink() and os.readlink(link) == str(target)
    assert read_credentials(str(target)).credentials == new
    written = json.loads(target.read_text())
    assert written["organizationUuid"] == "org-0001"
    assert written["claudeAiOauth"]["rateLimitTier"] == "default_claude_max_20x"
    assert written["claudeAiOauth"]["scopes"] == ["user:inference", "user:profile"]
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert [p.name for p in (tmp_path / "real").iterdir()] == ["credentials.json"]
    assert [p.name for p in (tmp_path / "home").iterdir()] == [".credentials.json"]


def test_a_failed_rewrite_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = write_json(tmp_path / "credentials.json", claude_code_file())
    before = Path(path).read_bytes()
    with pytest.raises(TypeError):  # not JSON-serialisable: fails before the rename
        write_credentials(path, {"claudeAiOauth": {"accessToken": object()}})
    assert Path(path).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["credentials.json"]


# --- settings ------------------------------------------------------------------------------


def env(**overrides: str | None) -> dict[str, str]:
    base: dict[str, str | None] = {"SHIM_SHARED_SECRET": SECRET, "SHIM_GEMINI_KEYS_FILE": ""}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def problems(environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(environ)
    return info.value.problems


def test_settings_take_the_credentials_file(tmp_path):
    path = write_json(tmp_path / "c.json", claude_code_file())
    settings = Settings.from_env(env(SHIM_ANTHROPIC_CREDENTIALS_FILE=path))
    assert settings.anthropic_credentials_file == path
    assert settings.anthropic_configured
    assert settings.anthropic_token_url == DEFAULT_TOKEN_URL
    assert settings.anthropic_refresh_margin_s == 300.0
    assert settings.anthropic_oauth_client_id == CLIENT_ID
    assert settings.warnings == ()


def test_settings_take_another_oauth_client_id(tmp_path):
    path = write_json(tmp_path / "c.json", claude_code_file())
    settings = Settings.from_env(
        env(SHIM_ANTHROPIC_CREDENTIALS_FILE=path, SHIM_ANTHROPIC_OAUTH_CLIENT_ID=" my-client.1 ")
    )
    assert settings.anthropic_oauth_client_id == "my-client.1"


def test_settings_refuse_a_bad_credentials_file_naming_the_variable(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(claude_code_file(expiresAt="x")))
    [problem] = problems(env(SHIM_ANTHROPIC_CREDENTIALS_FILE=str(path)))
    assert problem.startswith("SHIM_ANTHROPIC_CREDENTIALS_FILE: ")
    assert "expiresAt" in problem and ACCESS not in problem and REFRESH not in problem


def test_settings_refuse_a_missing_credentials_file(tmp_path):
    [problem] = problems(env(SHIM_ANTHROPIC_CREDENTIALS_FILE=str(tmp_path / "gone.json")))
    assert problem.startswith("SHIM_ANTHROPIC_CREDENTIALS_FILE: ") and "does not exist" in problem


@pytest.mark.parametrize(
    ("other", "value"),
    [("SHIM_ANTHROPIC_TOKEN", FAKE_OAUTH_TOKEN), ("SHIM_ANTHROPIC_API_KEY", FAKE_API_KEY)],
)
def test_credentials_file_excludes_the_static_credentials(tmp_path, other, value):
    path = write_json(tmp_path / "c.json", claude_code_file())
    [problem] = problems(env(SHIM_ANTHROPIC_CREDENTIALS_FILE=path, **{other: value}))
    assert other in problem and "SHIM_ANTHROPIC_CREDENTIALS_FILE" in problem
    assert value not in problem


def test_world_readable_credentials_file_warns(tmp_path):
    path = write_json(tmp_path / "c.json", claude_code_file())
    os.chmod(path, 0o644)
    settings = Settings.from_env(env(SHIM_ANTHROPIC_CREDENTIALS_FILE=path))
    [warning] = settings.warnings
    assert warning.startswith("SHIM_ANTHROPIC_CREDENTIALS_FILE: ") and "chmod 600" in warning


def test_credentials_file_in_a_read_only_directory_is_refused(tmp_path, monkeypatch):
    directory = tmp_path / "ro"
    directory.mkdir()
    path = write_json(directory / "c.json", claude_code_file())
    # Root may write anywhere (CI runs as root), so the kernel's answer is
    # replaced by what a non-root user in a read-only directory would get.
    real_access = os.access
    monkeypatch.setattr(
        "shim.settings.os.access",
        lambda where, mode: False if str(where) == str(directory) else real_access(where, mode),
    )
    [problem] = problems(env(SHIM_ANTHROPIC_CREDENTIALS_FILE=path))
    assert "not writable" in problem and "SHIM_ANTHROPIC_CREDENTIALS_FILE" in problem


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://127.0.0.1:9999/v1/oauth/token", "http://127.0.0.1:9999/v1/oauth/token"),
        ("http://127.8.0.1/v1/oauth/token", "http://127.8.0.1/v1/oauth/token"),
        ("http://localhost:9/v1/oauth/token", "http://localhost:9/v1/oauth/token"),
        ("http://[::1]:9/v1/oauth/token", "http://[::1]:9/v1/oauth/token"),
        (
            " https://console.anthropic.com/v1/oauth/token ",
            "https://console.anthropic.com/v1/oauth/token",
        ),
    ],
)
def test_token_url_is_read(tmp_path, raw, expected):
    path = write_json(tmp_path / "c.json", claude_code_file())
    settings = Settings.from_env(
        env(SHIM_ANTHROPIC_CREDENTIALS_FILE=path, SHIM_ANTHROPIC_TOKEN_URL=raw)
    )
    assert settings.anthropic_token_url == expected


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("SHIM_ANTHROPIC_TOKEN_URL", "ftp://host/token"),
        ("SHIM_ANTHROPIC_TOKEN_URL", "https://user:pw@host/token"),
        ("SHIM_ANTHROPIC_TOKEN_URL", "https://host/token?x=1"),
        # The refresh token travels in the body: plain http only on loopback.
        ("SHIM_ANTHROPIC_TOKEN_URL", "http://platform.claude.com/v1/oauth/token"),
        ("SHIM_ANTHROPIC_TOKEN_URL", "http://10.0.0.5/v1/oauth/token"),
        ("SHIM_ANTHROPIC_TOKEN_URL", "http://localhost.example.com/v1/oauth/token"),
        ("SHIM_ANTHROPIC_OAUTH_CLIENT_ID", "not a client id"),
        ("SHIM_ANTHROPIC_OAUTH_CLIENT_ID", "x" * 101),
        ("SHIM_ANTHROPIC_REFRESH_MARGIN_S", "0"),
        ("SHIM_ANTHROPIC_REFRESH_MARGIN_S", "3601"),
        ("SHIM_ANTHROPIC_REFRESH_MARGIN_S", "soon"),
    ],
)
def test_bad_refresh_settings_are_named(tmp_path, name, raw):
    path = write_json(tmp_path / "c.json", claude_code_file())
    [problem] = problems(env(SHIM_ANTHROPIC_CREDENTIALS_FILE=path, **{name: raw}))
    assert problem.startswith(f"{name}: ")
