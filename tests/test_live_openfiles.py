"""The open-file limit at start-up, live: gunicorn started under a low ``ulimit -n``.

Each stream holds two descriptors (client and upstream socket), so the master
raises the soft limit the workers inherit when it is short (shim.openfiles),
and warns when even the hard limit cannot hold SHIM_WORKER_CONNECTIONS streams.
"""

from __future__ import annotations

import functools
import json
import resource
import subprocess
from pathlib import Path

import pytest

from shim import openfiles
from tests.conftest import start_gateway
from tests.fake_upstream import FAKE_GEMINI_KEYS


def start_with_nofile(monkeypatch, tmp_path, soft: int, hard: int, connections: int):
    """A gateway whose master starts with RLIMIT_NOFILE (soft, hard)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    # The gateway fixture's Popen, with the limit set in the child before exec.
    monkeypatch.setattr(subprocess, "Popen", functools.partial(subprocess.Popen, preexec_fn=limit))
    try:
        return start_gateway(
            {
                "SHIM_GEMINI_KEYS": FAKE_GEMINI_KEYS[0],
                "SHIM_WORKER_CONNECTIONS": str(connections),
            },
            tmp_path / "gunicorn.log",
        )
    finally:
        monkeypatch.undo()


def events(gateway, name: str) -> list[dict]:
    lines = [json.loads(line) for line in gateway.log_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == name]


def nofile_of(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


@pytest.fixture
def hard_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip("this box's hard open-file limit is below 4096")
    return hard


def test_a_hard_limit_too_low_for_the_streams_is_warned_about_at_start(
    monkeypatch, tmp_path, hard_limit
):
    gateway = start_with_nofile(monkeypatch, tmp_path, 256, 256, connections=1000)
    try:
        [warning] = events(gateway, "open_files_limit_low")
        assert warning["level"] == "warning"
        assert (warning["nofile_soft"], warning["nofile_hard"]) == (256, 256)
        assert warning["nofile_needed"] == openfiles.needed(1000) == 2064
        assert warning["streams_possible"] == 96
        assert "LimitNOFILE" in warning["message"]
        assert events(gateway, "open_files_limit_raised") == []
    finally:
        gateway.stop()


def test_a_short_soft_limit_is_raised_to_the_hard_one_for_the_workers(
    monkeypatch, tmp_path, hard_limit
):
    gateway = start_with_nofile(monkeypatch, tmp_path, 256, 4096, connections=1000)
    try:
        assert events(gateway, "open_files_limit_low") == []
        [raised] = events(gateway, "open_files_limit_raised")
        assert (raised["nofile_from"], raised["nofile_to"]) == (256, 4096)
        for pid in gateway.pids():  # the master and the worker it forked
            assert nofile_of(pid) == (4096, 4096)
    finally:
        gateway.stop()


def test_enough_descriptors_leave_the_limit_alone_and_say_nothing(
    monkeypatch, tmp_path, hard_limit
):
    gateway = start_with_nofile(monkeypatch, tmp_path, 3000, 4096, connections=1000)
    try:
        assert events(gateway, "open_files_limit_low") == []
        assert events(gateway, "open_files_limit_raised") == []
        assert nofile_of(gateway.pids()[-1]) == (3000, 4096)
    finally:
        gateway.stop()
