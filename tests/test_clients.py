"""Named clients: the clients file, constant-time matching, reload, the CLI, and live use."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time

import pytest

from shim.clients import ClientsFileError, ClientTable, main, parse_clients
from shim.settings import ConfigError, Settings
from tests.conftest import settings_env, start_gateway
from tests.fake_upstream import FAKE_API_KEY

ALICE, BOB, CAROL = "alice-secret-0123456789", "bob-secret-0123456789ab", "carol-secret-0123456789"


def line(name: str, secret: str) -> str:
    return f"{name} {hashlib.sha256(secret.encode()).hexdigest()}"


@pytest.mark.parametrize(
    "text",
    [
        "alice",
        "alice nothex",
        f"al ice {'0' * 64}",
        f"{'x' * 70} {'0' * 64}",
        f"default {'0' * 64}",
        f"alice {'0' * 64}\nalice {'1' * 64}",
    ],
)
def test_malformed_clients_file_says_which_line_and_never_echoes_a_digest(text):
    with pytest.raises(ClientsFileError) as caught:
        parse_clients(text)
    assert "line" in str(caught.value)
    assert "0" * 16 not in str(caught.value)


def test_match_names_the_client_whose_secret_was_presented(tmp_path):
    path = tmp_path / "clients.txt"
    path.write_text(f"# team\n{line('alice', ALICE)}\n\n{line('bob', BOB)}  # laptop\n")
    table = ClientTable("shared-secret-0123456789", str(path))
    assert table.match([ALICE.encode()]) == "alice"
    assert table.match([b"nope", BOB.encode()]) == "bob"
    assert table.match([b"shared-secret-0123456789"]) == "default"
    assert table.match([ALICE[:-1].encode(), b"caf\xe9\xff"]) is None
    assert table.match([]) is None
    assert ALICE not in repr(table) and "sha" not in repr(table)


def test_the_file_is_reloaded_when_it_changes_and_a_bad_one_keeps_the_last_good(tmp_path, caplog):
    now = [0.0]
    path = tmp_path / "clients.txt"
    path.write_text(line("alice", ALICE))
    table = ClientTable(None, str(path), clock=lambda: now[0])
    assert table.match([CAROL.encode()]) is None

    path.write_text(line("alice", ALICE) + "\n" + line("carol", CAROL))
    os.utime(path, (1_000, 1_000))
    now[0] += 1.5
    assert table.match([CAROL.encode()]) == "carol"

    path.write_text("garbage line here")
    os.utime(path, (2_000, 2_000))
    now[0] += 1.5
    assert table.match([CAROL.encode()]) == "carol"  # the last good table
    assert any(r.__dict__.get("event") == "clients_file_invalid" for r in caplog.records)


def test_a_file_emptied_by_a_truncating_writer_keeps_the_last_good_table(tmp_path):
    """Issue #19 (seen by the soak): truncate-then-write showed 'no clients' for a moment."""
    now = [0.0]
    path = tmp_path / "clients.txt"
    path.write_text(line("alice", ALICE))
    table = ClientTable(None, str(path), clock=lambda: now[0])
    path.write_text("")
    now[0] += 1.5
    assert table.match([ALICE.encode()]) == "alice"
    assert table.state()["state"] == "invalid"
    assert "empty file" in table.state()["error"]
    path.write_text("# nobody for now\n")
    now[0] += 1.5
    assert table.match([ALICE.encode()]) is None  # a comment line says "no clients"
    assert table.state()["state"] == "ok"


def test_cli_prints_a_new_secret_and_the_line_that_matches_it(capsys):
    assert main(["new", "dave"]) == 0
    out = capsys.readouterr().out.splitlines()
    secret = out[0].rsplit(" ", 1)[1]
    entries = parse_clients(out[1])
    assert entries[0][0] == "dave"
    assert entries[0][1] == hashlib.sha256(secret.encode()).digest()
    assert main(["new"]) == 2


def test_settings_accept_a_clients_file_instead_of_the_shared_secret(tmp_path):
    path = tmp_path / "clients.txt"
    path.write_text(line("alice", ALICE))
    settings = Settings.from_env(settings_env(SHIM_SHARED_SECRET="", SHIM_CLIENTS_FILE=str(path)))
    assert settings.shared_secret is None and settings.clients_file == str(path)
    with pytest.raises(ConfigError, match="SHIM_CLIENTS_FILE: file"):
        Settings.from_env(settings_env(SHIM_CLIENTS_FILE=str(tmp_path / "missing.txt")))
    with pytest.raises(ConfigError, match="SHIM_SHARED_SECRET: required"):
        Settings.from_env(settings_env(SHIM_SHARED_SECRET=""))


def test_live_named_clients_are_logged_by_name_and_a_new_one_works_without_restart(
    fake_upstream, tmp_path
):
    path = tmp_path / "clients.txt"
    path.write_text(line("alice", ALICE) + "\n" + line("bob", BOB) + "\n")
    gw = start_gateway(
        {
            "SHIM_SHARED_SECRET": "",
            "SHIM_CLIENTS_FILE": str(path),
            "SHIM_ANTHROPIC_API_KEY": FAKE_API_KEY,
            "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
        },
        tmp_path / "gw.log",
    )
    body = json.dumps({"model": "m", "max_tokens": 1, "messages": []})

    def call(secret: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", gw.anthropic_port, timeout=10)
        try:
            conn.request(
                "POST",
                "/v1/messages",
                body=body,
                headers={"x-api-key": secret, "content-type": "application/json"},
            )
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    try:
        assert [call(ALICE), call(BOB), call(CAROL)] == [200, 200, 401]
        path.write_text(path.read_text() + line("carol", CAROL) + "\n")
        deadline = time.monotonic() + 5
        while call(CAROL) != 200:
            assert time.monotonic() < deadline, "the new client was never accepted"
            time.sleep(0.3)
        time.sleep(0.2)
        log = gw.log_text()
    finally:
        gw.stop()
    access = [json.loads(x) for x in log.splitlines() if '"event":"access"' in x]
    assert {"alice", "bob", "carol"} <= {entry["client"] for entry in access}
    for secret in (ALICE, BOB, CAROL):
        assert secret not in log
