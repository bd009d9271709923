"""The soak's smoke run (``bench/soak.py --smoke``): 45 s of mixed, faulty load with
a SIGHUP and a rolling restart, nothing leaks and nothing is lost (issue #19).

One run (~75 s with start-up and settling) feeds every test. Each asserts on counts, never
on timing, so a loaded 2-core box cannot make it flaky: a slow box only makes fewer calls.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def soak(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("soak")
    out = work / "soak.json"
    with open(work / "soak.out", "wb") as log:  # never a pipe nobody reads
        subprocess.run(
            [sys.executable, "bench/soak.py", "--smoke", "--out", str(out)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=400,
            check=False,  # the verdicts are the tests below, one by one
        )
    assert out.exists(), (work / "soak.out").read_text()
    return json.loads(out.read_text())


def test_the_whole_mix_ran_with_its_faults_reload_and_restart(soak):
    assert soak["calls"] >= 500
    outcomes = soak["outcomes"]
    for outcome in ("complete", "error_status", "hung_up", "transport_error"):
        assert outcomes.get(outcome, 0) > 0, outcome
    events = [event["event"] for event in soak["events"]]
    assert events.count("sighup") == 1
    assert events.count("worker_replaced") == 2
    assert events.count("clients_file_edited") >= 3


def test_no_answer_ends_cleanly_without_being_complete(soak):
    # A stream without message_stop / a final Gemini chunk and without an error is a lie.
    assert soak["shim_failures"] == []


def test_descriptors_are_back_to_idle_after_the_load(soak):
    idle, after = soak["idle"], soak["after"]
    assert after["client_sockets"] == 0
    assert after["fixed_fds"] <= idle["fixed_fds"] + 2


def test_greenlets_are_back_to_idle_after_the_load(soak):
    assert soak["after"]["greenlets"] <= soak["idle"]["greenlets"] + 2


def test_the_request_metric_counts_every_access_line(soak):
    assert soak["metric_requests_api"] == soak["access_lines_api"]


def test_no_access_line_without_a_call(soak):
    assert soak["phantom_lines"] == []


def test_each_access_line_says_the_status_its_client_got(soak):
    assert soak["status_mismatches"] == []


def test_every_call_was_answered_or_failed_visibly_with_one_access_line(soak):
    assert soak["unaccounted"] == []


def test_the_access_lines_count_the_tokens_the_fake_sent(soak):
    tokens = soak["tokens"]
    assert tokens["undecodable"] == []
    assert tokens["mismatches"] == []
    assert tokens["access_lines"] == tokens["fake_sent"]
