"""The docs tell the truth: every setting documented, the test command the one CI runs."""

from __future__ import annotations

import re

from tests.conftest import ROOT

SETTINGS_SOURCE = (ROOT / "shim" / "settings.py").read_text()
VARIABLES = sorted(set(re.findall(r'"(SHIM_[A-Z0-9_]+)"', SETTINGS_SOURCE)))
README = (ROOT / "README.md").read_text()


def test_settings_read_the_documented_variables():
    assert len(VARIABLES) >= 14


def test_every_setting_is_in_the_readme_table():
    table_rows = {m for m in re.findall(r"^\| `(SHIM_[A-Z0-9_]+)`", README, re.M)}
    assert set(VARIABLES) <= table_rows, set(VARIABLES) - table_rows


def test_every_setting_is_in_env_example():
    example = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^(SHIM_[A-Z0-9_]+)=", example, re.M))
    assert set(VARIABLES) <= listed, set(VARIABLES) - listed


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^\./scripts/test$", ci, re.M)
    assert command, "CI must run ./scripts/test"
    assert re.search(r"^\./scripts/test$", README, re.M)


def test_readme_starts_with_the_two_setup_commands():
    head = README[:1500]
    assert "./scripts/serve" in head and "./scripts/test" in head
