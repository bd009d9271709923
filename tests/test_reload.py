"""Removing a client revokes it, however the clients file was changed (issue #14, item 4).

Config managers and ``rsync -a``/``cp -p`` preserve a file's mtime, so a
reload keyed on mtime alone kept a removed client working. These tests
change the file the ways those tools do and check the removed client is
refused; a missing or invalid file keeps the last table, says so at every
check and in ``/health/ready``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import time
from pathlib import Path

import pytest

from shim.clients import ClientTable
from tests.conftest import start_gateway
from tests.fake_upstream import FAKE_API_KEY

ALICE, BOB, CAROL, EVE = (
    "alice-secret-0123456789",
    "bob-secret-0123456789ab",
    "carol-secret-0123456789",
    "eve-secret-0123456789ab",
)


def line(name: str, secret: str) -> str:
    return f"{name} {hashlib.sha256(secret.encode()).hexdigest()}\n"


def rewrite_keeping_mtime(path: Path, text: str) -> None:
    """Rewrite in place (same inode), then set atime/mtime back, as ``cp -p`` onto it does."""
    before = os.stat(path)
    with open(path, "r+", encoding="utf-8") as handle:
        handle.seek(0)
        handle.write(text)
        handle.truncate()
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def replace_keeping_mtime(path: Path, text: str) -> None:
    """Write a new file beside it with the old times and rename it over, as ``rsync -a`` does."""
    before = os.stat(path)
    staged = path.with_name(path.name + ".staged")
    staged.write_text(text)
    os.utime(staged, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(staged, path)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += 1.5


def events(caplog, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.__dict__.get("event") == name]


def test_a_same_size_rewrite_with_its_mtime_set_back_is_seen(tmp_path):
    path = tmp_path / "clients.txt"
    path.write_text(line("alice", ALICE) + line("bob", BOB))
    clock = Clock()
    table = ClientTable(None, str(path), clock=clock)
    assert table.match([BOB.encode()]) == "bob"

    # Same inode, same size (eve's line is as long as bob's), same mtime: only ctime moves.
    rewrite_keeping_mtime(path, line("alice", ALICE) + line("eve", EVE))
    assert os.stat(path).st_size == len(line("alice", ALICE) + line("bob", BOB))
    clock.tick()
    assert table.match([BOB.encode()]) is None
    assert table.match([EVE.encode()]) == "eve"


def test_a_rename_over_with_the_old_mtime_is_seen(tmp_path):
    path = tmp_path / "clients.txt"
    path.write_text(line("alice", ALICE) + line("bob", BOB))
    clock = Clock()
    table = ClientTable(None, str(path), clock=clock)
    assert table.match([BOB.encode()]) == "bob"

    replace_keeping_mtime(path, line("alice", ALICE))
    clock.tick()
    assert table.match([BOB.encode()]) is None
    assert table.match([ALICE.encode()]) == "alice"


def test_a_deleted_file_keeps_the_table_and_is_logged_at_every_check(tmp_path, caplog):
    caplog.set_level(logging.INFO, "shim.clients")
    path = tmp_path / "clients.txt"
    path.write_text(line("alice", ALICE))
    clock = Clock()
    table = ClientTable(None, str(path), clock=clock)
    path.unlink()

    for _ in range(3):
        clock.tick()
        assert table.match([ALICE.encode()]) == "alice"
    # Checks within the interval do not log again.
    table.match([ALICE.encode()])
    missing = events(caplog, "clients_file_missing")
    assert len(missing) == 3
    assert all(r.levelno == logging.ERROR for r in missing)
    state = table.state()
    assert state["state"] == "missing" and state["clients"] == 1 and state["loaded_at"]

    path.write_text(line("carol", CAROL))
    clock.tick()
    assert table.match([ALICE.encode()]) is None
    assert table.match([CAROL.encode()]) == "carol"
    assert table.state()["state"] == "ok" and table.state()["error"] is None
    assert events(caplog, "clients_file_reloaded")[-1].__dict__["recovered"] is True


def test_an_invalid_file_keeps_the_table_and_is_logged_at_every_check(tmp_path, caplog):
    path = tmp_path / "clients.txt"
    path.write_text(line("alice", ALICE))
    clock = Clock()
    table = ClientTable(None, str(path), clock=clock)
    path.write_text(line("alice", ALICE) + "bob not-a-digest\n")

    for _ in range(2):
        clock.tick()
        assert table.match([ALICE.encode()]) == "alice"
    invalid = events(caplog, "clients_file_invalid")
    assert len(invalid) == 2 and "line 2" in invalid[0].__dict__["reason"]
    assert table.state()["state"] == "invalid"
    assert "not-a-digest" not in json.dumps(table.state())


def test_no_clients_file_reports_nothing():
    assert ClientTable("shared-secret-0123456789").state() is None


# -- live: a real gunicorn, the file changed under it ------------------------------------


@pytest.fixture
def reloading(fake_upstream, tmp_path):
    path = tmp_path / "clients.txt"
    path.write_text(line("alice", ALICE) + line("bob", BOB) + line("carol", CAROL))
    gw = start_gateway(
        {
            "SHIM_SHARED_SECRET": "",
            "SHIM_CLIENTS_FILE": str(path),
            "SHIM_ANTHROPIC_API_KEY": FAKE_API_KEY,
            "SHIM_ANTHROPIC_UPSTREAM": fake_upstream.url,
        },
        tmp_path / "gw.log",
    )
    yield gw, path
    gw.stop()


BODY = json.dumps({"model": "m", "max_tokens": 1, "messages": []})


def call(gw, secret: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", gw.anthropic_port, timeout=10)
    try:
        conn.request(
            "POST",
            "/v1/messages",
            body=BODY,
            headers={"x-api-key": secret, "content-type": "application/json"},
        )
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def ready(gw) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.anthropic_port, timeout=10)
    try:
        conn.request("GET", "/health/ready")
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def refused_within(gw, secret: str, seconds: float) -> float:
    start = time.monotonic()
    while call(gw, secret) != 401:
        assert time.monotonic() - start < seconds, "the removed client still works"
        time.sleep(0.2)
    return time.monotonic() - start


def test_live_removed_clients_are_refused_within_the_reload_interval(reloading):
    gw, path = reloading
    assert [call(gw, s) for s in (ALICE, BOB, CAROL)] == [200, 200, 200]

    rewrite_keeping_mtime(path, line("alice", ALICE) + line("carol", CAROL))
    refused_within(gw, BOB, 3.0)
    replace_keeping_mtime(path, line("carol", CAROL))
    refused_within(gw, ALICE, 3.0)
    assert call(gw, CAROL) == 200

    status, body = ready(gw)
    assert status == 200 and body["clients_file"]["state"] == "ok"
    assert body["clients_file"]["clients"] == 1


def test_live_a_deleted_file_keeps_serving_and_shows_in_readiness_and_the_log(reloading):
    gw, path = reloading
    assert call(gw, CAROL) == 200
    path.unlink()
    deadline = time.monotonic() + 5
    while True:
        status, body = ready(gw)
        if body["clients_file"]["state"] == "missing":
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # Still ready: the last good table serves, and says so.
    assert status == 200 and body["status"] == "ready"
    assert body["clients_file"]["clients"] == 3 and "missing" in body["clients_file"]["error"]
    assert call(gw, CAROL) == 200
    time.sleep(1.2)
    assert call(gw, ALICE) == 200  # another check, another error line

    path.write_text("garbage\n")
    deadline = time.monotonic() + 5
    while ready(gw)[1]["clients_file"]["state"] != "invalid":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert call(gw, BOB) == 200

    lines = [json.loads(x) for x in gw.log_text().splitlines() if x.startswith("{")]
    missing = [x for x in lines if x.get("event") == "clients_file_missing"]
    invalid = [x for x in lines if x.get("event") == "clients_file_invalid"]
    assert len(missing) >= 2 and all(x["level"] == "error" for x in missing)
    assert invalid and "garbage" not in json.dumps(invalid)
